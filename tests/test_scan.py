"""The scan end to end on real safetensors checkpoints, against the reference loop."""

from __future__ import annotations

import hashlib
import json
import logging
import tracemalloc

import pytest
import torch
import yaml
from factories import planted_checkpoint, tiny_qwen3
from reference_spectrum import reference_scan, reference_select
from safetensors.torch import load_file, save_file

import spectrum_sm
from spectrum_sm.core.selection import EMBEDDING_ENTRIES

pytestmark = pytest.mark.integration


def nonempty(selection):
    return {t: sorted(mods) for t, mods in selection.items() if mods}


def layer_entries(path):
    return yaml.safe_load(path.read_text())["unfrozen_parameters"]


@pytest.mark.parametrize("seed", [0, 1])
def test_same_selection_and_scores_as_reference_loop(tmp_path, seed):
    model = tiny_qwen3(tmp_path / "m", layers=6, hidden=96, intermediate=224, seed=seed)
    assert (model / "model.safetensors.index.json").exists()  # sharded
    ours = spectrum_sm.scan(model, 30, show_progress=False)
    ref = reference_scan(str(model))
    assert set(ours.scores) == set(ref)
    for module, info in ref.items():
        assert ours.scores[module].type == info["type"]
        assert ours.scores[module].snr == pytest.approx(info["snr"], rel=1e-4, abs=1e-7)
    for percent in (10, 25, 30, 50, 75, 100):
        assert nonempty(ours.selection(percent)) == nonempty(reference_select(ref, percent))


def test_exact_and_float64_modes_match_the_certified_default(tiny_model):
    certified = spectrum_sm.scan(tiny_model, 50, show_progress=False)
    exact = spectrum_sm.scan(tiny_model, 50, exact=True, show_progress=False)
    float64 = spectrum_sm.scan(tiny_model, 50, precision="float64", show_progress=False)
    assert exact.method == "svdvals-float32"
    assert certified.method == "gram-float32-certified"
    assert float64.method == "gram-float64-eigvalsh"
    assert certified.selection() == exact.selection() == float64.selection()
    for module, score in certified.scores.items():
        assert score.snr == pytest.approx(exact.scores[module].snr, rel=1e-4)
        # The float64 method's score lies inside every certified interval.
        low, high = score.bounds
        assert low <= float64.scores[module].snr <= high


def test_sharded_and_single_file_give_identical_scores(tmp_path):
    sharded = tiny_qwen3(tmp_path / "sharded", seed=5)
    single = tiny_qwen3(tmp_path / "single", seed=5, shard_size=None)
    assert (single / "model.safetensors").exists()
    assert len(list(sharded.glob("*.safetensors"))) > 1
    a = spectrum_sm.scan(sharded, 30, show_progress=False)
    b = spectrum_sm.scan(single, 30, show_progress=False)
    assert {m: s.snr for m, s in a.scores.items()} == {m: s.snr for m, s in b.scores.items()}
    # A bare .safetensors file works too.
    c = spectrum_sm.scan(single / "model.safetensors", 30, show_progress=False)
    assert {m: s.snr for m, s in c.scores.items()} == {m: s.snr for m, s in b.scores.items()}


def test_planted_signal_ranking_gives_known_selection(tmp_path):
    ranks = {
        "model.layers.0.mlp.down_proj": 2,
        "model.layers.1.mlp.down_proj": 24,
        "model.layers.2.mlp.down_proj": 8,
        "model.layers.3.mlp.down_proj": 16,
        "model.layers.4.mlp.down_proj": 1,
        "model.layers.0.self_attn.o_proj": 20,
        "model.layers.1.self_attn.o_proj": 1,
        "model.layers.2.self_attn.o_proj": 4,
        "model.layers.3.self_attn.o_proj": 12,
        "model.layers.4.self_attn.o_proj": 2,
    }
    model = planted_checkpoint(tmp_path / "planted", ranks)
    result = spectrum_sm.scan(model, 40, output_dir=tmp_path / "out", show_progress=False)
    assert result.selection() == {
        "mlp.down_proj": ["model.layers.1.mlp.down_proj", "model.layers.3.mlp.down_proj"],
        "self_attn.o_proj": ["model.layers.0.self_attn.o_proj", "model.layers.3.self_attn.o_proj"],
    }
    for layer_type in ("mlp.down_proj", "self_attn.o_proj"):
        layers = [m for m in ranks if m.endswith(layer_type)]
        by_score = sorted(layers, key=lambda m: result.scores[m].snr, reverse=True)
        assert by_score == sorted(layers, key=lambda m: ranks[m], reverse=True)


def test_output_files_follow_the_reference_formats(tiny_model, tmp_path):
    out = tmp_path / "out"
    result = spectrum_sm.scan(
        tiny_model, 30, output_dir=out, name="Org/tiny_qwen3", show_progress=False
    )
    slug = "Org-tiny-qwen3"
    assert sorted(p.name for p in out.iterdir()) == sorted(  # no lock file or temporaries
        [
            f"snr_results_{slug}.json",
            f"snr_results_{slug}_sorted.json",
            f"snr_results_{slug}_unfrozenparameters_30percent.yaml",
            f"scan_manifest_{slug}.json",
        ]
    )
    results = json.loads((out / f"snr_results_{slug}.json").read_text())
    assert results == {m: {"snr": s.snr, "type": s.type} for m, s in result.scores.items()}
    ordered = json.loads((out / f"snr_results_{slug}_sorted.json").read_text())
    for layer_type, modules in ordered.items():
        values = list(modules.values())
        assert values == sorted(values, reverse=True), layer_type
    text = (out / f"snr_results_{slug}_unfrozenparameters_30percent.yaml").read_text()
    lines = text.splitlines()
    assert lines[:3] == [
        "unfrozen_parameters:",
        f"- {EMBEDDING_ENTRIES[0]}",
        f"- {EMBEDDING_ENTRIES[1]}",
    ]
    assert "# mlp.down_proj layers" in lines
    entries = yaml.safe_load(text)["unfrozen_parameters"]
    chosen = [m for mods in result.selection().values() for m in mods]
    assert entries == [*EMBEDDING_ENTRIES, *chosen]
    assert all(not e.endswith(".weight") for e in chosen)  # module names, like the reference
    # 4 layers at 30% -> int(1.2) = 1 per layered type; single modules -> int(0.3) = 0.
    assert len(chosen) == 11


def test_manifest_records_provenance_and_per_tensor_details(tiny_model, tmp_path):
    result = spectrum_sm.scan(tiny_model, 25, output_dir=tmp_path, show_progress=False)
    manifest = json.loads(result.files["manifest"].read_text())
    assert manifest["spectrum_sm_version"] == spectrum_sm.__version__
    assert manifest["method"] == "gram-float32-certified"
    assert manifest["certified_percents"] == [25]
    assert manifest["device"] == "cpu"
    assert manifest["top_percent"] == 25
    assert manifest["model"]["model_type"] == "qwen3"
    files = {f["name"]: f for f in manifest["model"]["source"]["files"]}
    for shard in tiny_model.glob("*.safetensors"):
        assert files[shard.name]["sha256"] == hashlib.sha256(shard.read_bytes()).hexdigest()
    q = manifest["tensors"]["model.layers.0.self_attn.q_proj"]
    assert q["shape"] == [64, 64] and q["dtype"] == "BF16" and q["seconds"] >= 0
    assert q["type"] == "self_attn.q_proj"
    # Small weights go straight to float64 (exact point bounds); big ones carry an interval.
    assert q["precision"] == "float64" and q["bounds"] == [q["snr"], q["snr"]]
    embed = manifest["tensors"]["model.embed_tokens"]
    assert embed["precision"] in ("float32", "float64")
    assert embed["bounds"][0] <= embed["snr"] <= embed["bounds"][1]
    assert manifest["tied_embeddings"] is False


def test_tied_embeddings_are_reported_and_scored_once(tmp_path, caplog):
    model = tiny_qwen3(tmp_path / "tied", tie=True)
    with caplog.at_level(logging.INFO, logger="spectrum_sm"):
        result = spectrum_sm.scan(model, 100, output_dir=tmp_path / "out", show_progress=False)
    assert result.tied_embeddings
    assert "lm_head" not in result.scores and "model.embed_tokens" in result.scores
    assert any("tied" in r.getMessage() for r in caplog.records)
    ref = reference_scan(str(model))
    # The reference walks modules, so it meets the shared tensor twice; we score it once.
    assert ref["lm_head"]["snr"] == pytest.approx(ref["model.embed_tokens"]["snr"])
    ref.pop("lm_head")
    assert nonempty(result.selection(50)) == nonempty(reference_select(ref, 50))


def test_type_filters_and_embedding_switch(tiny_model, tmp_path):
    result = spectrum_sm.scan(
        tiny_model,
        50,
        include=["self_attn.*", "mlp.down_proj"],
        exclude=["*norm"],
        embeddings=False,
        output_dir=tmp_path,
        show_progress=False,
    )
    assert {s.type for s in result.scores.values()} == {
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.down_proj",
    }
    entries = layer_entries(result.files["layers"])
    assert not any(e.startswith("^") for e in entries)
    assert len(entries) == 5 * 2


def test_plain_log_lines_when_not_a_terminal(tiny_model, caplog):
    with caplog.at_level(logging.INFO, logger="spectrum_sm"):
        spectrum_sm.scan(tiny_model, 50)
    assert any("scanned 47/47 tensors (100%)" in r.getMessage() for r in caplog.records)


def test_select_reproduces_scan_at_another_percent(tiny_model, tmp_path):
    scanned = spectrum_sm.scan(tiny_model, 50, output_dir=tmp_path / "a", show_progress=False)
    again = spectrum_sm.scan(tiny_model, 75, output_dir=tmp_path / "b", show_progress=False)
    path = spectrum_sm.select(scanned.files["results"], 75, output_dir=tmp_path / "c")
    assert path.name == "snr_results_tiny-qwen3_unfrozenparameters_75percent.yaml"
    assert path.read_text() == again.files["layers"].read_text()


def test_select_reads_a_reference_results_file(tmp_path):
    """A file shaped like the reference repository's model_snr_results/ (module order, NaN)."""
    scores = {
        "model.layers.0.mlp.down_proj": {"snr": 0.5, "type": "mlp.down_proj"},
        "model.layers.1.mlp.down_proj": {"snr": float("nan"), "type": "mlp.down_proj"},
        "model.layers.2.mlp.down_proj": {"snr": 0.9, "type": "mlp.down_proj"},
        "model.layers.3.mlp.down_proj": {"snr": 0.9, "type": "mlp.down_proj"},
        "model.layers.0.self_attn.q_proj": {"snr": 0.1, "type": "self_attn.q_proj"},
        "model.layers.1.self_attn.q_proj": {"snr": 0.3, "type": "self_attn.q_proj"},
    }
    src = tmp_path / "snr_results_Qwen-Qwen3-8B.json"
    src.write_text(json.dumps(scores))
    path = spectrum_sm.select(src, 50, output_dir=tmp_path / "out")
    assert path.name == "snr_results_Qwen-Qwen3-8B_unfrozenparameters_50percent.yaml"
    # Ties keep file order; NaN ranks last.
    assert layer_entries(path) == [
        *EMBEDDING_ENTRIES,
        "model.layers.2.mlp.down_proj",
        "model.layers.3.mlp.down_proj",
        "model.layers.1.self_attn.q_proj",
    ]


def _float32_checkpoint(path, shapes):
    path.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    tensors = {name: torch.randn(*shape, generator=gen) for name, shape in shapes.items()}
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps({"model_type": "probe"}))
    return path


def test_scan_memory_is_two_chunks_of_a_tall_weight_or_one_wide_weight_whole(tmp_path, monkeypatch):
    """Peak memory, measured, while each kind of weight is scanned (one worker; the scan runs
    one per core). Stored in float32, a weight's bytes are the reader's buffers (bytearrays,
    which tracemalloc sees) and the float32 blocks scored are those very buffers; torch's own
    allocations (the Gram matrix, short x short) are not traced. A tall weight is read in
    chunks along its long side: two chunks in memory at most (the one scored, the next read).
    A wide weight is read whole (``scanner._chunks``) and cut into column blocks, so the true
    bound is the largest wide weight, not the chunk size: the memory still follows the largest
    tensor and the number of workers, never the model."""
    from spectrum_sm.core import scanner

    monkeypatch.setattr(scanner, "_worker_count", lambda device: 1)
    tall = {f"model.layers.{i}.mlp.up_proj.weight": (8192, 128) for i in range(4)}
    wide = {"model.layers.3.mlp.down_proj.weight": (128, 8192)}
    tall_model = _float32_checkpoint(tmp_path / "tall", tall)
    wide_model = _float32_checkpoint(tmp_path / "wide", {**dict(list(tall.items())[:3]), **wide})
    weight = 8192 * 128 * 4  # 4 MiB; each model holds 16 MiB
    chunk = 1024 * 1024 // 8 * 4  # chunk_mb=1: 1 MiB of float64 elements, here in float32
    slack = 256 * 1024  # headers, the result, the logging: measured ~40 KiB

    def peak(model) -> int:
        tracemalloc.start()
        try:
            spectrum_sm.scan(model, 50, chunk_mb=1, hash_files=False, show_progress=False)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    spectrum_sm.scan(tall_model, 50, hash_files=False, show_progress=False)  # lazy imports
    assert peak(tall_model) <= 2 * chunk + slack
    assert weight <= peak(wide_model) <= weight + chunk + slack


def _arch_configs():
    import transformers as T

    small = dict(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
    )
    return {
        "llama": lambda: T.LlamaConfig(**small, num_key_value_heads=2),
        "mistral": lambda: T.MistralConfig(**small, num_key_value_heads=2),
        "gemma2-tied": lambda: T.Gemma2Config(**small, num_key_value_heads=2, head_dim=16),
        "phi3-fused-qkv": lambda: T.Phi3Config(**small, num_key_value_heads=4, pad_token_id=0),
        "gpt2-conv1d": lambda: T.GPT2Config(vocab_size=300, n_embd=64, n_layer=4, n_head=4),
    }


@pytest.mark.parametrize("arch", list(_arch_configs()))
def test_same_selection_as_reference_on_other_architectures(tmp_path, arch):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_arch_configs()[arch]())
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1:
                param.uniform_(0.5, 1.5)
    model.save_pretrained(tmp_path / arch)
    ours = spectrum_sm.scan(tmp_path / arch, 50, show_progress=False)
    ref = reference_scan(str(tmp_path / arch))
    if ours.tied_embeddings:
        ref.pop("lm_head")  # the reference scores the shared tensor twice
    assert set(ours.scores) == set(ref)
    for percent in (25, 50):
        assert nonempty(ours.selection(percent)) == nonempty(reference_select(ref, percent))


def test_recomputed_weights_are_listed_in_model_order(tmp_path, monkeypatch):
    """The float64 rechecks are listed in model order, not in the order the workers finished
    them (so the manifest is the same bytes on every run): one worker finishes them in header
    order here, ``layers.10`` before ``layers.2``."""
    from spectrum_sm.core import scanner

    monkeypatch.setattr(scanner, "_worker_count", lambda device: 1)
    ranks = {"model.layers.2.mlp.down_proj": 30, "model.layers.1.mlp.down_proj": 10}
    model = planted_checkpoint(
        tmp_path / "m", {**ranks, "model.layers.3.mlp.down_proj": 0}, size=160
    )
    tensors = load_file(model / "model.safetensors")
    twin = tensors["model.layers.2.mlp.down_proj.weight"].clone()
    tensors["model.layers.10.mlp.down_proj.weight"] = twin  # ties across the 50% boundary
    save_file(tensors, str(model / "model.safetensors"))
    result = spectrum_sm.scan(model, 50, output_dir=tmp_path / "out", show_progress=False)
    twins = ["model.layers.2.mlp.down_proj", "model.layers.10.mlp.down_proj"]
    assert result.recomputed == twins
    assert json.loads(result.files["manifest"].read_text())["recomputed_in_float64"] == twins


@pytest.mark.parametrize("scale_shape", [(), (96,), (96, 1)], ids=["scalar", "per-row", "column"])
def test_fp8_weights_with_a_scalar_or_per_row_scale(tmp_path, scale_shape):
    gen = torch.Generator().manual_seed(1)
    codes = torch.randn(96, 48, generator=gen).to(torch.float8_e4m3fn)
    scale = torch.rand(scale_shape, generator=gen) + 0.1
    model = tmp_path / "fp8"
    model.mkdir()
    tensors = {"a.0.proj.weight": codes, "a.0.proj.weight_scale": scale}
    save_file(tensors, str(model / "model.safetensors"))
    (model / "config.json").write_text('{"model_type": "planted"}')
    result = spectrum_sm.scan(model, 100, precision="float64", show_progress=False)
    dequantized = (codes.float() * scale.reshape(-1, 1)).double()  # as the scan dequantizes
    expected = spectrum_sm.core.snr.snr_from_singular_values(
        torch.linalg.svdvals(dequantized), 96, 48
    )
    assert result.scores["a.0.proj"].snr == pytest.approx(expected, rel=1e-9)
