"""Every bad input ends in one clear `error:` line, a non-zero exit, no traceback, no layer file."""

from __future__ import annotations

import shutil
import struct

import pytest
import torch
from factories import run_cli, tiny_qwen3
from safetensors.torch import save_file

pytestmark = pytest.mark.integration


def assert_clean_failure(proc, *fragments, code=1):
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    error_lines = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(error_lines) == 1, proc.stderr
    for fragment in fragments:
        assert fragment in error_lines[0], proc.stderr


def assert_no_outputs(directory):
    assert not directory.exists() or not any(directory.iterdir()), list(directory.iterdir())


@pytest.fixture
def model_copy(tiny_model, tmp_path):
    return shutil.copytree(tiny_model, tmp_path / "model")


def test_missing_path(tmp_path):
    out = tmp_path / "out"
    proc = run_cli("scan", str(tmp_path / "nope"), "--output-dir", str(out))
    assert_clean_failure(proc, "does not exist", "nope")
    assert_no_outputs(out)


def test_folder_without_safetensors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    out = tmp_path / "out"
    proc = run_cli("scan", str(tmp_path / "empty"), "--output-dir", str(out))
    assert_clean_failure(proc, "no weights found", "pytorch_model.bin")
    assert_no_outputs(out)


def test_truncated_shard(model_copy, tmp_path):
    shard = sorted(model_copy.glob("model-*.safetensors"))[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])
    out = tmp_path / "out"
    proc = run_cli("scan", str(model_copy), "--output-dir", str(out))
    assert_clean_failure(proc, shard.name, "truncated")
    assert_no_outputs(out)


@pytest.mark.parametrize("damage", ["garbage", "huge-header", "bad-json", "tiny"])
def test_corrupt_shard(model_copy, tmp_path, damage):
    shard = sorted(model_copy.glob("model-*.safetensors"))[0]
    data = shard.read_bytes()
    if damage == "garbage":
        shard.write_bytes(b"\x00\xff" * 64 + data[128:])
    elif damage == "huge-header":
        shard.write_bytes(struct.pack("<Q", 2**40) + data[8:])
    elif damage == "bad-json":
        (length,) = struct.unpack("<Q", data[:8])
        shard.write_bytes(data[:8] + b"{" * length + data[8 + length :])
    else:
        shard.write_bytes(data[:5])
    out = tmp_path / "out"
    proc = run_cli("scan", str(model_copy), "--output-dir", str(out))
    assert_clean_failure(proc, shard.name)
    assert_no_outputs(out)


def test_non_finite_weights_leave_nothing_behind(tmp_path):
    model = tmp_path / "nan"
    model.mkdir()
    bad = torch.randn(8, 8)
    bad[3, 3] = float("nan")
    save_file(
        {"a.0.w.weight": torch.randn(8, 8), "a.1.w.weight": bad}, str(model / "model.safetensors")
    )
    out = tmp_path / "out"
    proc = run_cli("scan", str(model), "--output-dir", str(out))
    assert_clean_failure(proc, "a.1.w.weight", "non-finite")
    assert_no_outputs(out)


@pytest.mark.parametrize("percent", ["0", "101", "-5", "abc", "nan"])
def test_percent_out_of_range(tiny_model, tmp_path, percent):
    out = tmp_path / "out"
    proc = run_cli("scan", str(tiny_model), "--top-percent", percent, "--output-dir", str(out))
    assert_clean_failure(proc, "--top-percent", code=2)
    assert_no_outputs(out)


def test_percent_out_of_range_in_python(tiny_model):
    import spectrum_sm

    with pytest.raises(spectrum_sm.SpectrumError, match=r"\(0, 100\]"):
        spectrum_sm.scan(tiny_model, 150)


def test_output_path_is_a_file(tiny_model, tmp_path):
    target = tmp_path / "taken"
    target.write_text("keep me")
    proc = run_cli("scan", str(tiny_model), "--output-dir", str(target))
    assert_clean_failure(proc, "not a directory")
    assert target.read_text() == "keep me"


def test_unknown_type_filter(tiny_model, tmp_path):
    out = tmp_path / "out"
    proc = run_cli("scan", str(tiny_model), "--include", "mlp.nonsense", "--output-dir", str(out))
    assert_clean_failure(proc, "mlp.nonsense", "matches no module type", "mlp.down_proj")
    assert_no_outputs(out)


def test_cuda_requested_without_gpu(tiny_model, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = run_cli("scan", str(tiny_model), "--device", "cuda", "--output-dir", str(tmp_path / "o"))
    assert_clean_failure(proc, "CUDA is not available")


def test_hub_model_offline_fails_clearly(tmp_path):
    out = tmp_path / "out"
    proc = run_cli("scan", "Qwen/Qwen3-8B", "--output-dir", str(out), env={"HF_HUB_OFFLINE": "1"})
    assert_clean_failure(proc, "Qwen/Qwen3-8B", "Hugging Face Hub")
    assert_no_outputs(out)


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ("not json", "not a valid JSON"),
        ('{"m": {"snr": 1}}', "is not of the form"),
        ('{"m": {"snr": "high", "type": "t"}}', "is not a number"),
        ('{"mlp.down_proj": {"model.layers.0.mlp.down_proj": "x"}}', "is not a number"),
        ('{"mlp.down_proj": [0.5]}', "is not of the form"),
        ('{"t": {"a": 1}, "u": 5}', "does not map modules to scores"),
        ('{"m": {"snr": 1' + "0" * 400 + ', "type": "t"}}', "too large"),
        ("\ufeff[]", "expected a non-empty object"),
    ],
)
def test_select_rejects_bad_results(tmp_path, content, fragment):
    src = tmp_path / "snr_results_x.json"
    src.write_text(content)
    proc = run_cli("select", str(src), "--top-percent", "30")
    assert_clean_failure(proc, fragment)
    assert list(tmp_path.glob("*.yaml")) == []


def test_select_missing_file_and_bad_percent(tmp_path):
    assert_clean_failure(
        run_cli("select", str(tmp_path / "none.json"), "--top-percent", "30"), "does not exist"
    )
    assert_clean_failure(
        run_cli("select", str(tmp_path / "none.json"), "--top-percent", "0"),
        "--top-percent",
        code=2,
    )


def test_cli_scan_and_select_happy_path(tmp_path):
    model = tiny_qwen3(tmp_path / "m")
    out = tmp_path / "out"
    proc = run_cli("scan", str(model), "--top-percent", "50", "--output-dir", str(out), "--json")
    assert proc.returncode == 0, proc.stderr
    import json

    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["weights_scanned"] == 47
    assert summary["files"]["layers"].endswith("snr_results_m_unfrozenparameters_50percent.yaml")
    proc = run_cli(
        "select", summary["files"]["results"], "--top-percent", "25", "--exclude", "*norm*"
    )
    assert proc.returncode == 0, proc.stderr
    assert (out / "snr_results_m_unfrozenparameters_25percent.yaml").exists()


def test_help_imports_nothing_heavy():
    """``--help`` stays instant: torch, transformers, boto3 and the SageMaker SDK load on use."""
    import subprocess
    import sys

    code = (
        "import sys, contextlib, io\n"
        "from spectrum_sm import cli\n"
        "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "    cli.main(['--help'])\n"
        "heavy = {'torch', 'transformers', 'boto3', 'sagemaker'}\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & heavy))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_every_help_page_prints():
    """Help text with a literal ``%`` (``{% generation %}``) must not break argparse."""
    import argparse
    import subprocess
    import sys
    from pathlib import Path

    from spectrum_sm import cli

    entrypoints = Path(__file__).resolve().parents[1] / "entrypoints"
    (commands,) = [
        a.choices for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction)
    ]
    assert {"scan", "run", "plan", "data-check"} <= set(commands)
    pages = [[sys.executable, "-m", "spectrum_sm.cli", c, "--help"] for c in sorted(commands)]
    pages += [[sys.executable, str(entrypoints / s), "--help"] for s in ("analyze.py", "train.py")]
    for page in pages:
        proc = subprocess.run(page, capture_output=True, text=True)
        assert proc.returncode == 0 and "usage:" in proc.stdout, (page, proc.stderr[-300:])
    assert "{% generation %}" in proc.stdout  # train.py's page, the escaped text shown as written
