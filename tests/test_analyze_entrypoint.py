"""entrypoints/analyze.py as SageMaker runs it: a subprocess with the container's environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ENTRYPOINT = Path(__file__).resolve().parents[1] / "entrypoints" / "analyze.py"


def run_entrypoint(args, env):
    return subprocess.run(
        [sys.executable, str(ENTRYPOINT), *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=300,
    )


def test_reads_the_model_channel_and_writes_to_sm_model_dir(tiny_model, tmp_path):
    model_dir = tmp_path / "opt-ml-model"
    proc = run_entrypoint(
        ["--top_percent", "30", "--model_name", "Qwen/tiny", "--exclude", "*norm*"],
        {"SM_CHANNEL_MODEL": str(tiny_model), "SM_MODEL_DIR": str(model_dir)},
    )
    assert proc.returncode == 0, proc.stderr
    files = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(files["layers"]).name == "snr_results_Qwen-tiny_unfrozenparameters_30percent.yaml"
    assert Path(files["layers"]).parent == model_dir
    assert "norm" not in Path(files["layers"]).read_text()


def test_failure_reason_is_written_for_sagemaker(tmp_path):
    output = tmp_path / "output"
    output.mkdir()
    proc = run_entrypoint(
        ["--model_name_or_path", str(tmp_path / "missing")],
        {"SM_MODEL_DIR": str(tmp_path / "m"), "SM_OUTPUT_FAILURE": str(output / "failure")},
    )
    assert proc.returncode == 1
    assert "does not exist" in (output / "failure").read_text()
    assert "Traceback" not in proc.stderr


def test_unknown_argument_is_a_failure_reason(tmp_path):
    output = tmp_path / "output"
    output.mkdir()
    proc = run_entrypoint(
        ["--model_name_or_path", "x", "--bogus", "1"],
        {"SM_OUTPUT_FAILURE": str(output / "failure")},
    )
    assert proc.returncode == 1
    assert "unrecognized arguments: --bogus" in (output / "failure").read_text()
