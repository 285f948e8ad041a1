"""Every family the scan meets: same entries as the reference loop where it can score the model,
names the loaded model has, towers kept apart, fused experts trained by slice, and every layer
file trains with train.py changing exactly the weights it names."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import yaml
from families import FAMILIES, FUSED_EXPERTS, MOE, MULTIMODAL, make_family
from reference_spectrum import reference_scan, reference_select
from safetensors.torch import load_file
from test_train import run_train

import spectrum_sm

pytestmark = pytest.mark.integration
ZERO_NORM_BLOCK = ("post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def stored_tensors(folder):
    tensors = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(shard))
    return tensors


def expected_changes(result, stored: set[str]) -> set[str]:
    """Stored tensor names a training run on ``result``'s layer file must change: a module
    entry trains the module's weight and bias (axolotl's and the reference's semantics), a
    sliced entry only its expert's stored weight (and, where experts are stored fused, the
    fused tensor and its bias: :func:`expected_expert_slices` says which experts in them)."""
    chosen = [m for modules in result.selection().values() for m in modules]
    expected = set()
    for module in chosen:
        score = result.scores[module]
        if score.entry.startswith("^"):
            expected.add(score.stored)
            if "(_bias)?$" in score.entry:
                expected.add(score.stored + "_bias")
        else:
            prefix = score.stored.removesuffix(".weight") + "."
            expected |= {n for n in stored if n.startswith(prefix)}
    for entry in result.embedding_entries:
        module = entry.strip("^$").removesuffix(".weight")
        if module in result.scores:
            expected.add(result.scores[module].stored)
    return expected


def expected_expert_slices(result) -> set[tuple[str, int]]:
    """(stored fused tensor, expert) pairs the selection trains: each selected expert's row of
    the weight and of its bias."""
    slices = set()
    for modules in result.selection().values():
        for module in modules:
            score = result.scores[module]
            if "(_bias)?$" in score.entry:
                expert = int(module.split(".")[-2])
                slices |= {(score.stored, expert), (score.stored + "_bias", expert)}
    return slices


def changed_expert_slices(before, after) -> set[tuple[str, int]]:
    """(fused expert tensor, expert) pairs whose row changed."""
    return {
        (n, e)
        for n, t in before.items()
        if ".experts." in n
        for e in range(t.shape[0])
        if not torch.equal(t[e], after[n][e])
    }


@pytest.fixture(scope="module", params=FAMILIES)
def family(request, tmp_path_factory):
    paths = make_family(request.param, tmp_path_factory.mktemp(request.param))
    result = spectrum_sm.scan(
        paths["model"], 50, output_dir=paths["model"].parent / "scan", show_progress=False
    )
    return request.param, paths, result


def test_same_entries_as_the_reference_where_it_can_score(family):
    name, paths, ours = family
    if name in MULTIMODAL:
        pytest.skip("the reference loads with AutoModelForCausalLM, which refuses VLM configs")
    ref = reference_scan(str(paths["model"]))
    if ours.tied_embeddings:
        ref.pop("lm_head")  # the reference meets the shared matrix twice; we score it once
    ref_types = {info["type"] for info in ref.values()}
    # Fused experts have no `weight` attribute under transformers 5: the reference skips them.
    assert {s.type for s in ours.scores.values()} - ref_types == (
        {s.type for s in ours.scores.values() if ".experts." in s.type} if name in MOE else set()
    )
    for module, info in ref.items():
        assert ours.scores[module].snr == pytest.approx(info["snr"], rel=1e-4, abs=1e-7)
    for percent in (25, 50):
        mine = ours.selection(percent)
        theirs = reference_select(ref, percent)
        assert {t: sorted(mine[t]) for t in theirs} == {t: sorted(v) for t, v in theirs.items()}


def test_embedding_entries_name_the_models_own_parameters(family):
    name, paths, ours = family
    from spectrum_sm.core.names import model_class_for

    config = json.loads((paths["model"] / "config.json").read_text())
    model = model_class_for(config).from_pretrained(paths["model"])
    params = dict(model.named_parameters(remove_duplicate=False))
    heads = [e.strip("^$") for e in ours.embedding_entries]
    assert heads[0] == "lm_head.weight"
    assert heads[1] == {
        "gpt-neox": "gpt_neox.embed_in.weight",
        "qwen2.5-vl": "model.language_model.embed_tokens.weight",
        "qwen3-vl": "model.language_model.embed_tokens.weight",
        "llama3.2-vision": "model.language_model.embed_tokens.weight",
        "gemma3-vl": "model.language_model.embed_tokens.weight",
    }.get(name, "model.embed_tokens.weight")
    assert all(h in params for h in heads)
    manifest = json.loads(ours.files["manifest"].read_text())
    assert manifest["tied_embeddings"] is (name in ("qwen3-tied", "gemma3-vl"))


def test_layer_file_trains_exactly_the_weights_it_names(family, tmp_path):
    name, paths, ours = family
    out = tmp_path / "trained"
    proc = run_train(
        [
            "--model_name_or_path",
            str(paths["model"]),
            "--spectrum_config",
            str(ours.files["layers"]),
            "--train_data",
            str(paths["train"]),
            "--output_dir",
            str(out),
            "--max_steps",
            "3",
            "--learning_rate",
            "3e-3",
            "--weight_decay",
            "0.1",
            "--per_device_train_batch_size",
            "4",
            "--max_seq_length",
            "64",
            "--precision",
            "fp32",
            "--warmup_ratio",
            "0",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    before, after = stored_tensors(paths["model"]), stored_tensors(out)
    assert set(before) == set(after)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    expected = expected_changes(ours, set(before))
    # A zeroed norm zeroes its MLP's input: that block gets no gradient and cannot change.
    dead = (
        {f"model.layers.2.{w}.weight" for w in ZERO_NORM_BLOCK}
        if name == "llama-zero-norm"
        else set()
    )
    if name in MOE:  # an expert the router sent no token to gets no gradient either
        dead |= {n for n in expected if ".experts." in n}
    if name == "llama3.2-vision":  # its cross-attention layer (1) is skipped without images
        dead |= {n for n in expected if ".layers.1." in n}
    assert changed <= expected
    assert expected - changed <= dead
    if name in FUSED_EXPERTS:
        # Stored fused too: compare expert by expert, weights and biases.
        slices = changed_expert_slices(before, after)
        expected_slices = expected_expert_slices(ours)
        assert slices <= expected_slices
        assert any(n.endswith("_bias") for n, _ in slices)
        all_slices = {(n, e) for n, t in before.items() if ".experts." in n for e in range(4)}
        assert all_slices - expected_slices  # some experts are not selected, and stay put
    elif name in MOE:
        # Fused 3-D parameters trained by slice: the other experts are bit-identical.
        assert any(".experts." in n for n in changed)
        assert any(".experts." in n and n not in changed for n in before)


def test_zero_weight_scores_infinity_and_is_selected_first(tmp_path):
    paths = make_family("llama-zero-norm", tmp_path)
    result = spectrum_sm.scan(paths["model"], 25, show_progress=False)
    zero = result.scores["model.layers.2.post_attention_layernorm"]
    assert zero.snr == float("inf")
    assert result.selection()["post_attention_layernorm"] == [zero.module]
    # Infinity round-trips through the results file and select.
    result.write(tmp_path / "out")
    table = spectrum_sm.load_results(result.files["results"])
    assert table[zero.module]["snr"] == float("inf")
    path = spectrum_sm.select(result.files["results"], 25, output_dir=tmp_path / "again")
    assert path.read_text() == result.files["layers"].read_text()


def test_vlm_towers_never_mix(tmp_path, caplog):
    paths = make_family("qwen2.5-vl", tmp_path)
    with caplog.at_level(logging.INFO, logger="spectrum_sm"):
        language = spectrum_sm.scan(paths["model"], 50, show_progress=False)
    assert {s.tower for s in language.scores.values()} == {"language"}
    assert any("left out" in r.getMessage() and "vision" in r.getMessage() for r in caplog.records)
    assert all(m.startswith(("model.language_model.", "lm_head")) for m in language.scores)
    everything = spectrum_sm.scan(paths["model"], 50, towers="all", show_progress=False)
    for score in everything.scores.values():
        assert (score.tower == "language") == (":" not in score.type), score
    # Vision blocks have a type of their own: mlp.down_proj keeps the language layers only.
    text_down = everything.selection()["mlp.down_proj"]
    assert text_down and all(".language_model." in m for m in text_down)
    assert everything.selection()["vision:mlp.down_proj"]
    merger = [s for s in everything.scores.values() if ".merger." in s.module]
    assert merger and all(s.tower == "projector" for s in merger)
    vision = spectrum_sm.scan(paths["model"], 50, towers=["vision"], show_progress=False)
    assert {s.tower for s in vision.scores.values()} == {"vision"}


def test_published_mixtral_naming_trains_the_fused_slices(tmp_path):
    """A layer file in the checkpoint's naming (the reference's published Mixtral results use
    block_sparse_moe.experts.N.w1) trains the same slices as our own entries."""
    paths = make_family("mixtral", tmp_path)
    layer_file = tmp_path / "stored-names.yaml"
    layer_file.write_text(
        "unfrozen_parameters:\n"
        "- model.layers.1.block_sparse_moe.experts.2.w1\n"
        "- model.layers.0.block_sparse_moe.experts.3.w2\n"
        "- model.layers.1.block_sparse_moe.gate\n"
    )
    from spectrum_sm.core.names import model_class_for

    model = model_class_for(json.loads((paths["model"] / "config.json").read_text()))
    model = model.from_pretrained(paths["model"])
    report = spectrum_sm.freeze_except(model, layer_file)
    assert report.translated == {
        "model.layers.1.block_sparse_moe.experts.2.w1": (
            "^model.layers.1.mlp.experts.gate_up_proj$[2, 0:128]"
        ),
        "model.layers.0.block_sparse_moe.experts.3.w2": "^model.layers.0.mlp.experts.down_proj$[3]",
        "model.layers.1.block_sparse_moe.gate": "model.layers.1.mlp.gate",
    }
    assert report.trainable_params == 128 * 64 + 64 * 128 + 4 * 64
    out = tmp_path / "trained"
    proc = run_train(
        [
            "--model_name_or_path",
            str(paths["model"]),
            "--spectrum_config",
            str(layer_file),
            "--train_data",
            str(paths["train"]),
            "--output_dir",
            str(out),
            "--max_steps",
            "2",
            "--learning_rate",
            "3e-3",
            "--per_device_train_batch_size",
            "4",
            "--max_seq_length",
            "64",
            "--precision",
            "fp32",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    before, after = stored_tensors(paths["model"]), stored_tensors(out)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == {
        "model.layers.1.block_sparse_moe.experts.2.w1.weight",
        "model.layers.0.block_sparse_moe.experts.3.w2.weight",
        "model.layers.1.block_sparse_moe.gate.weight",
    }


def test_slice_entries_read_as_yaml_and_parse():
    from spectrum_sm.core.freeze import split_slice

    text = "unfrozen_parameters:\n- ^a.b$[7, 0:32]\n- ^a.c$[3]\n- ^a.d$[:16]\n- layers.[0-9]\n"
    entries = yaml.safe_load(text)["unfrozen_parameters"]
    assert [split_slice(e) for e in entries] == [
        ("^a.b$", (slice(7, 8), slice(0, 32))),
        ("^a.c$", (slice(3, 4),)),
        ("^a.d$", (slice(0, 16),)),
        ("layers.[0-9]", None),  # a character class, not a slice
    ]
