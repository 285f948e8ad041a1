"""The memory planner: exact counts from config.json, and memory estimates against measurement."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from factories import run_cli, tiny_qwen3

import spectrum_sm
from spectrum_sm.core.freeze import freeze_except
from spectrum_sm.plan import plan
from spectrum_sm.training.memory import (
    Step,
    build_meta,
    count_parameters,
    estimate_memory,
    load_config,
)

ROOT = Path(__file__).resolve().parents[1]


def test_qwen3_8b_counts_from_config_json_alone(tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from train_gpu import QWEN3_8B

    config = {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], **QWEN3_8B}
    (tmp_path / "config.json").write_text(json.dumps(config))
    proc = run_cli("plan", str(tmp_path), "--top-percent", "30", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["total_params"] == 8_190_735_360
    assert result["trainable_params"] == 3_174_124_032
    assert result["recommended"]["spectrum"] is not None
    human = run_cli("plan", str(tmp_path / "config.json"), "--top-percent", "30")
    assert human.returncode == 0 and "3,174,124,032" in human.stdout


@pytest.mark.integration
@pytest.mark.parametrize("tie", [False, True])
def test_counts_equal_instantiated_models(tmp_path, tie):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model_dir = tiny_qwen3(tmp_path / "m", tie=tie, layers=5)
    result = plan(str(model_dir), 40, lora_rank=8)
    real = AutoModelForCausalLM.from_pretrained(model_dir)
    assert result["total_params"] == sum(p.numel() for p in real.parameters())
    assert result["tied_embeddings"] is tie
    for embeddings, key in ((True, "trainable_params"), (False, "trainable_params_no_embeddings")):
        scan = spectrum_sm.scan(
            model_dir,
            40,
            embeddings=embeddings,
            show_progress=False,
            output_dir=tmp_path / f"scan-{embeddings}",
        )
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        report = freeze_except(model, scan.files["layers"])
        assert report.trainable_params == result[key], key
    lora = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_dir),
        LoraConfig(r=8, target_modules="all-linear"),
    )
    assert sum(p.numel() for p in lora.parameters() if p.requires_grad) == result["lora_params"]


def test_bad_model_path_is_a_clear_error(tmp_path):
    proc = run_cli("plan", str(tmp_path / "nothing"))
    assert proc.returncode == 1 and "does not exist" in proc.stderr
    (tmp_path / "empty").mkdir()
    proc = run_cli("plan", str(tmp_path / "empty"))
    assert proc.returncode == 1 and "no config.json" in proc.stderr


@pytest.mark.integration
def test_memory_estimate_within_25_percent_of_measured_training(tmp_path):
    """Train a ~30M model on this CPU with each method and compare peak RSS with the estimate
    (plus the measured resident size of the imported libraries, the CPU's fixed overhead)."""
    from spectrum_sm.toy import make_qwen3, make_tokenizer, toy_chat_rows

    rows = toy_chat_rows(200)
    model = tmp_path / "model"
    make_tokenizer(model, [m["content"] for r in rows for m in r["messages"]] * 4, 512)
    make_qwen3(
        model,
        layers=4,
        hidden=512,
        intermediate=1536,
        vocab=16000,
        heads=8,
        kv_heads=4,
        head_dim=64,
        shard_size=None,
        dtype="float32",
    )
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    layers = spectrum_sm.scan(model, 30, output_dir=tmp_path / "snr", show_progress=False)
    baseline = subprocess.run(
        [
            sys.executable,
            "-c",
            "import torch, transformers, accelerate, peft, safetensors\n"
            "print(open('/proc/self/status').read().split('VmHWM:')[1].split()[0])",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    overhead_gib = int(baseline.stdout.strip()) / 1024**2
    meta, cfg = build_meta(load_config(str(model)))
    counts = count_parameters(meta, 30)
    for method in ("full", "spectrum", "lora"):
        out = tmp_path / f"out-{method}"
        proc = subprocess.run(
            [
                sys.executable,
                str(ROOT / "entrypoints" / "train.py"),
                "--model_name_or_path",
                str(model),
                "--spectrum_config",
                str(layers.files["layers"]),
                "--train_data",
                str(data),
                "--output_dir",
                str(out),
                "--method",
                method,
                "--max_steps",
                "2",
                "--packing",
                "true",
                "--max_seq_length",
                "256",
                "--per_device_train_batch_size",
                "4",
                "--precision",
                "fp32",
            ],
            capture_output=True,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "2"},
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        report = json.loads((out / "training_report.json").read_text())
        estimate = estimate_memory(
            cfg,
            counts.total_params,
            report["trainable_params"],
            method,
            Step("fp32", seq=256, batch=4, checkpointing=False),
            overhead_gib=overhead_gib,
        )
        measured = report["peak_memory_bytes"] / 1024**3
        assert abs(estimate.total_gib - measured) <= 0.25 * measured, (method, estimate, measured)


def test_the_request_planner_counts_the_step_train_py_will_run(monkeypatch, tmp_path):
    """The client's distribution planner reads the step from the hyperparameters with train.py's
    own parser (its defaults and its spelling of values), as the recipe's ``auto`` does."""
    from spectrum_sm.aws.config import TrainingConfig
    from spectrum_sm.aws.requests import resolve_distribution
    from spectrum_sm.training import memory
    from spectrum_sm.training.args import check_hyperparameters

    model = tiny_qwen3(tmp_path / "m")
    counted: list[memory.Step] = []
    planner = memory.plan_distribution

    def recording(config, **kwargs):
        counted.append(kwargs["step"])
        return planner(config, **kwargs)

    monkeypatch.setattr(memory, "plan_distribution", recording)
    given = {"max_seq_length": "512", "gradient_checkpointing": "1", "precision": "fp32"}
    for hyperparameters in ({}, given):
        config = TrainingConfig(
            output_s3="s3://b/o",
            model=str(model),
            instance_type="ml.g5.12xlarge",
            hyperparameters=hyperparameters,
        )
        resolve_distribution(config)
    args = check_hyperparameters(given)
    assert counted == [Step("bf16", 2048, 1, False), Step.of(args, "fp32")]
    assert counted[1] == Step("fp32", 512, 1, True)  # "1" is true to train.py's parser
