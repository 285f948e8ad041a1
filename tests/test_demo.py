"""``spectrum-sm demo``: the pipeline end to end on this machine, with our own or a given S3."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import boto3
import pytest
import torch
from safetensors.torch import load_file

from spectrum_sm.core.freeze import freeze_except, read_layer_file

pytestmark = pytest.mark.integration


def run_demo(workdir, env):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "spectrum_sm.cli",
            "demo",
            "--workdir",
            str(workdir),
            "--json",
            "--steps",
            "6",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc, json.loads(proc.stdout.strip().splitlines()[-1])


def assert_only_selected_changed(result):
    from transformers import AutoModelForCausalLM

    before = load_file(os.path.join(result["base_model"], "model.safetensors"))
    after = load_file(os.path.join(result["model_dir"], "model.safetensors"))
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    model = AutoModelForCausalLM.from_pretrained(result["base_model"])
    expected = set(freeze_except(model, read_layer_file(result["unfrozen_parameters"])).trainable)
    assert changed == expected and len(expected) > 2


def test_demo_with_its_own_embedded_s3(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    proc, result = run_demo(tmp_path / "demo", env)
    assert {"base_model", "unfrozen_parameters", "model_dir", "layer_file_s3", "model_s3"} <= set(
        result
    )
    assert "trainable params:" in proc.stdout and "fine-tuned:" in proc.stdout
    assert Path(result["snr_report"]).read_bytes()[:4] == b"\x89PNG"
    assert_only_selected_changed(result)


def test_demo_uses_the_configured_endpoint(moto_server, tmp_path):
    _, result = run_demo(tmp_path / "demo", dict(os.environ))
    assert result["s3_endpoint"] == moto_server
    bucket, key = result["model_s3"][5:].split("/", 1)
    keys = [
        o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix=key)["Contents"]
    ]
    assert any(k.endswith("model.safetensors") for k in keys)
    layer_bucket, layer_key = result["layer_file_s3"][5:].split("/", 1)
    layer_keys = boto3.client("s3").list_objects_v2(Bucket=layer_bucket, Prefix=layer_key)[
        "Contents"
    ]
    assert any(o["Key"].endswith("percent.yaml") for o in layer_keys)
    assert_only_selected_changed(result)
