"""Checkpoints beyond plain safetensors: legacy .bin, FP8 with block scales, integer weights,
packed quantization; and the scan's output folder under stress (busy, full, umask)."""

from __future__ import annotations

import json
import logging
import os
import resource
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from factories import run_cli, tiny_qwen3
from safetensors.torch import load_file, save_file

import spectrum_sm
from spectrum_sm.core.atomic import output_lock

pytestmark = pytest.mark.integration


def scores(result):
    return {m: s.snr for m, s in result.scores.items()}


def as_bin(safetensors_dir, target, shards: int = 1):
    """The same checkpoint as ``pytorch_model*.bin`` (what transformers 4 wrote by default)."""
    target.mkdir(parents=True)
    shutil.copy(safetensors_dir / "config.json", target / "config.json")
    state = {}
    for shard in sorted(safetensors_dir.glob("*.safetensors")):
        state.update(load_file(shard))
    names = sorted(state)
    if shards == 1:
        torch.save(state, target / "pytorch_model.bin")
        return target
    weight_map = {}
    for index in range(shards):
        part = names[index::shards]
        file = f"pytorch_model-{index + 1:05d}-of-{shards:05d}.bin"
        torch.save({n: state[n] for n in part}, target / file)
        weight_map.update(dict.fromkeys(part, file))
    (target / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return target


@pytest.mark.parametrize("shards", [1, 3])
def test_bin_checkpoints_score_like_safetensors(tiny_model, tmp_path, shards):
    binary = as_bin(tiny_model, tmp_path / "bin", shards)
    assert not list(binary.glob("*.safetensors"))
    ours = spectrum_sm.scan(binary, 50, output_dir=tmp_path / "out", show_progress=False)
    reference = spectrum_sm.scan(tiny_model, 50, show_progress=False)
    assert scores(ours) == scores(reference)
    files = {
        f["name"]
        for f in json.loads(ours.files["manifest"].read_text())["model"]["source"]["files"]
    }
    assert any(name.endswith(".bin") for name in files)


def test_fused_expert_bin_checkpoint_scores_like_safetensors(tmp_path):
    """gpt-oss's 3-D expert tensors read expert by expert from a .bin shard too."""
    from families import make_family

    model = make_family("gpt-oss", tmp_path / "st")["model"]
    binary = as_bin(model, tmp_path / "bin")
    ours = spectrum_sm.scan(binary, 50, show_progress=False)
    reference = spectrum_sm.scan(model, 50, show_progress=False)
    assert scores(ours) == scores(reference)
    assert "model.layers.3.mlp.experts.3.down_proj" in ours.scores


def test_fused_expert_tensors_stored_as_integers_are_refused(tmp_path):
    model = tmp_path / "int-experts"
    model.mkdir()
    save_file(
        {
            "model.layers.0.mlp.experts.down_proj": torch.randint(-8, 8, (4, 32, 16)).to(
                torch.int8
            ),
            "model.layers.0.mlp.router.weight": torch.randn(4, 16),
        },
        str(model / "model.safetensors"),
    )
    (model / "config.json").write_text('{"model_type": "planted"}')
    with pytest.raises(spectrum_sm.SpectrumError, match=r"experts\.down_proj \(I8\)"):
        spectrum_sm.scan(model, 50, show_progress=False)


class _Boom:
    def __reduce__(self):
        return (os.system, (f"touch {os.environ['BOOM_MARKER']}",))


def test_a_bin_file_that_would_run_code_is_refused(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("BOOM_MARKER", str(marker))
    model = tmp_path / "evil"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "llama"}')
    torch.save(
        {"model.layers.0.mlp.down_proj.weight": torch.ones(4, 4), "x": _Boom()},
        model / "pytorch_model.bin",
    )
    proc = run_cli("scan", str(model), "--output-dir", str(tmp_path / "out"))
    assert proc.returncode == 1 and "weights_only" in proc.stderr and "Traceback" not in proc.stderr
    assert not marker.exists()


def fp8_checkpoint(path, weights: dict[str, torch.Tensor], block: int = 32):
    """Block-scaled FP8 (e4m3) weights with ``weight_scale_inv``, DeepSeek/Qwen FP8 style; and
    the float32 weights they dequantize to (the scan must score those)."""
    tensors, dequantized = {}, {}
    for name, weight in weights.items():
        n, m = weight.shape
        bn, bm = -(-n // block), -(-m // block)
        padded = torch.zeros(bn * block, bm * block)
        padded[:n, :m] = weight
        blocks = padded.view(bn, block, bm, block)
        scale = blocks.abs().amax(dim=(1, 3)) / 448.0
        quantized = (blocks / scale[:, None, :, None]).view_as(padded)[:n, :m]
        fp8 = quantized.to(torch.float8_e4m3fn)
        tensors[f"{name}.weight"] = fp8
        tensors[f"{name}.weight_scale_inv"] = scale
        full = scale.repeat_interleave(block, 0)[:n].repeat_interleave(block, 1)[:, :m]
        dequantized[f"{name}.weight"] = fp8.to(torch.float32) * full
    path.mkdir(parents=True)
    save_file(tensors, str(path / "model.safetensors"))
    config = {
        "model_type": "planted",
        "quantization_config": {"quant_method": "fp8", "weight_block_size": [block, block]},
    }
    (path / "config.json").write_text(json.dumps(config))
    return dequantized


def test_fp8_weights_are_scored_after_dequantization(tmp_path):
    gen = torch.Generator().manual_seed(0)
    weights = {
        f"model.layers.{i}.mlp.down_proj": torch.randn(200, 150 + 10 * i, generator=gen)
        * torch.logspace(0, -1, 150 + 10 * i)
        for i in range(3)
    }
    dequantized = fp8_checkpoint(tmp_path / "fp8", weights)
    plain = tmp_path / "plain"
    plain.mkdir()
    save_file(dequantized, str(plain / "model.safetensors"))
    (plain / "config.json").write_text('{"model_type": "planted"}')
    fp8 = spectrum_sm.scan(tmp_path / "fp8", 50, precision="float64", show_progress=False)
    reference = spectrum_sm.scan(plain, 50, precision="float64", show_progress=False)
    for module, score in reference.scores.items():
        assert fp8.scores[module].snr == pytest.approx(score.snr, rel=1e-12)
        assert fp8.scores[module].dtype == "F8_E4M3"
    # The FP8 codes alone score differently: the scales were applied, not skipped.
    codes = {m: load_file(tmp_path / "fp8" / "model.safetensors")[f"{m}.weight"] for m in weights}
    raw = {
        m: spectrum_sm.core.snr.snr_from_singular_values(torch.linalg.svdvals(c.double()), *c.shape)
        for m, c in codes.items()
    }
    assert any(raw[m] != pytest.approx(s.snr, rel=1e-6) for m, s in reference.scores.items())


def test_quantized_weights_without_a_usable_scale_are_refused(tmp_path):
    model = tmp_path / "int8"
    model.mkdir()
    save_file(
        {
            "model.layers.0.mlp.down_proj.weight": torch.randint(-8, 8, (64, 32), dtype=torch.int8),
            "model.layers.1.mlp.down_proj.weight": torch.randn(64, 32).to(torch.float8_e4m3fn),
            "model.layers.2.mlp.down_proj.weight": torch.randn(64, 32),
        },
        str(model / "model.safetensors"),
    )
    (model / "config.json").write_text('{"model_type": "planted"}')
    proc = run_cli("scan", str(model), "--output-dir", str(tmp_path / "out"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "2 weights are stored as integers or 8-bit floats" in proc.stderr
    assert "model.layers.0.mlp.down_proj.weight (I8)" in proc.stderr
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_int8_with_per_row_scales_is_dequantized(tmp_path):
    gen = torch.Generator().manual_seed(1)
    q = torch.randint(-127, 128, (96, 48), generator=gen, dtype=torch.int8)
    scale = torch.rand(96, 1, generator=gen) + 0.1
    model = tmp_path / "w8"
    model.mkdir()
    save_file(
        {"a.0.proj.weight": q, "a.0.proj.weight_scale": scale}, str(model / "model.safetensors")
    )
    (model / "config.json").write_text('{"model_type": "planted"}')
    result = spectrum_sm.scan(model, 100, precision="float64", show_progress=False)
    expected = spectrum_sm.core.snr.snr_from_singular_values(
        torch.linalg.svdvals((q.float() * scale).double()), 96, 48
    )
    assert result.scores["a.0.proj"].snr == pytest.approx(expected, rel=1e-9)


def test_packed_quantization_is_refused_by_name(tiny_model, tmp_path):
    model = shutil.copytree(tiny_model, tmp_path / "gptq")
    config = json.loads((model / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(spectrum_sm.SpectrumError, match="quantized with gptq"):
        spectrum_sm.scan(model, 50, show_progress=False)


def test_a_busy_output_folder_is_refused(tiny_model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with output_lock(out):
        proc = run_cli("scan", str(tiny_model), "--output-dir", str(out))
    assert proc.returncode == 1 and "another scan is writing into" in proc.stderr
    assert list(out.iterdir()) == []
    assert run_cli("scan", str(tiny_model), "--output-dir", str(out)).returncode == 0


def _small_file_limit():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a killed process
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))


def test_a_full_disk_leaves_no_partial_output(tiny_model, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "spectrum_sm.cli",
            "scan",
            str(tiny_model),
            "--output-dir",
            str(out),
        ],
        capture_output=True,
        text=True,
        preexec_fn=_small_file_limit,
        timeout=600,
    )
    assert proc.returncode == 1, proc.stderr
    assert "nothing was written" in proc.stderr and "Traceback" not in proc.stderr
    assert list(out.iterdir()) == []  # no temporaries, no half of the set


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_outputs_follow_the_umask(tiny_model, tmp_path, umask):
    old = os.umask(umask)
    try:
        result = spectrum_sm.scan(tiny_model, 50, output_dir=tmp_path, show_progress=False)
    finally:
        os.umask(old)
    for path in result.files.values():
        assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_an_all_nan_results_file_warns(tmp_path, caplog):
    src = tmp_path / "snr_results_x.json"
    src.write_text(json.dumps({f"m.{i}.w": {"snr": float("nan"), "type": "w"} for i in range(4)}))
    with caplog.at_level(logging.WARNING, logger="spectrum_sm"):
        spectrum_sm.select(src, 50)
    assert any("every score is NaN" in r.getMessage() for r in caplog.records)


def test_gpt_neox_head_is_not_called_tied(tmp_path):
    from families import make_family

    paths = make_family("gpt-neox", tmp_path)
    result = spectrum_sm.scan(paths["model"], 50, show_progress=False)
    assert not result.tied_embeddings
    assert "lm_head" in result.scores and result.scores["lm_head"].stored == "embed_out.weight"


def test_dense_checkpoints_name_weights_without_building_the_model(tmp_path):
    """Plain model.* + lm_head checkpoints load unchanged: their names are the checkpoint's,
    and transformers (seconds of imports, then the model on the meta device) is never imported:
    checked in a fresh interpreter, whose ``sys.modules`` holds only what the scan imported."""
    model = tiny_qwen3(tmp_path / "m")
    code = (
        "import json, sys, spectrum_sm\n"
        f"result = spectrum_sm.scan({str(model)!r}, 50, show_progress=False)\n"
        "loaded = sorted(m for m in sys.modules if m.partition('.')[0] == 'transformers')\n"
        "print(json.dumps([result.names_source, loaded]))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    source, loaded = json.loads(proc.stdout.splitlines()[-1])
    assert loaded == [] and source == "checkpoint names"
