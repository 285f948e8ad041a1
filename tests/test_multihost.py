"""Local mode with several hosts: one /opt/ml-like root per host, gloo rendezvous on this
machine, checkpoints synced through S3 the way SageMaker syncs them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import yaml

pytestmark = pytest.mark.integration
#: Long enough that the run outlasts several passes of the local runner's 1 s checkpoint sync:
#: under DDP the toy trains ~100 steps a second, and at 120 steps a clean CI run ended before
#: any pass had uploaded a checkpoint, so the kill never landed mid-run.
MAX_STEPS = 600


def _keys(s3, bucket, prefix):
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def _config(tmp_path, paths, layer_file, bucket, distribution):
    config = {
        "common": {"output_s3": f"s3://{bucket}/mh", "base_job_name": "mh"},
        "training": {
            "model": str(paths["model"]),
            "train_data": str(paths["train"]),
            "spectrum_config": str(layer_file),
            "method": "spectrum",
            "instance_type": "ml.g5.xlarge",
            "instance_count": 2,
            "distribution": distribution,
            "checkpoint_s3": f"s3://{bucket}/mh/ck/",
            "hyperparameters": {
                "max_steps": MAX_STEPS,
                "save_steps": 24,
                "per_device_train_batch_size": 2,
                "max_seq_length": 64,
                "precision": "fp32",
                "learning_rate": 3.0e-3,
                "warmup_ratio": 0,
                "logging_steps": 1,
            },
        },
    }
    path = tmp_path / f"train-{distribution}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("distribution", ["fsdp", "ddp"])
def test_two_hosts_train_and_resume_from_s3_synced_checkpoints(moto_server, tmp_path, distribution):
    import boto3

    from spectrum_sm.toy import make_toy_training_setup

    paths = make_toy_training_setup(tmp_path / "toy", layers=2, rows=48)
    layer_file = tmp_path / "layers.yaml"
    layer_file.write_text(
        "unfrozen_parameters:\n- ^lm_head.weight$\n- model.layers.1.mlp.down_proj\n"
    )
    bucket = f"mh-{distribution}"
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=bucket)
    config = _config(tmp_path, paths, layer_file, bucket, distribution)
    cli = [sys.executable, "-m", "spectrum_sm.cli", "train", str(config), "--local"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    first = subprocess.Popen(
        [*cli, "--workdir", str(tmp_path / "jobs-1")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        start_new_session=True,
    )
    deadline = time.monotonic() + 400
    try:
        while True:
            keys = set(_keys(s3, bucket, "mh/ck/"))
            started = {k.split("/")[2] for k in keys if k.endswith("state.json")}
            files = ["state.json"]
            files += [f"rank-0000{r}.{ext}" for r in (0, 1) for ext in ("json", "safetensors")]
            if any(all(f"mh/ck/{c}/{f}" in keys for f in files) for c in started):
                break
            assert first.poll() is None, "the first job ended before a checkpoint reached S3"
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the CLI; its hosts and workers die with it
        first.wait()
    time.sleep(1)
    pids = subprocess.run(["pgrep", "-f", str(tmp_path / "jobs-1")], capture_output=True, text=True)
    assert pids.stdout.strip() == "", "processes of the killed job are still running"

    second = subprocess.run(
        [*cli, "--workdir", str(tmp_path / "jobs-2")],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert second.returncode == 0, second.stderr[-4000:]
    result = json.loads(second.stdout.strip().splitlines()[-1])
    assert result["status"] == "Completed"
    key = result["model_s3"].split("/", 3)[3]
    report = json.loads(
        s3.get_object(Bucket=bucket, Key=key + "training_report.json")["Body"].read()
    )
    assert report["processes"] == 2 and report["distribution"] == distribution
    assert report["steps"] == MAX_STEPS and 0 < report["resumed_from_step"] < MAX_STEPS
    hosts = sorted(p.name for p in (tmp_path / "jobs-2" / result["job"]).iterdir() if p.is_dir())
    assert hosts == ["algo-1", "algo-2"]


def test_resume_from_continues_another_local_run_through_its_channel(moto_server, tmp_path):
    """training.resume_from in local mode works as on SageMaker: the prefix arrives as the
    'resume' channel and train.py continues from its last checkpoint (no container path)."""
    import boto3

    from spectrum_sm.toy import make_toy_training_setup

    paths = make_toy_training_setup(tmp_path / "toy", layers=1, rows=16)
    layer_file = tmp_path / "layers.yaml"
    layer_file.write_text("unfrozen_parameters:\n- model.layers.0.mlp.down_proj\n")
    bucket = "resume-local"
    boto3.client("s3").create_bucket(Bucket=bucket)

    def run(steps: int, checkpoints: str, resume_from: str = "") -> dict:
        config = yaml.safe_load(_config(tmp_path, paths, layer_file, bucket, "ddp").read_text())
        training = config["training"]
        training.update(instance_count=1, distribution="auto", checkpoint_s3=checkpoints)
        training["hyperparameters"].update(max_steps=steps, save_steps=2)
        if resume_from:
            training["resume_from"] = resume_from
        path = tmp_path / f"resume-{steps}.yaml"
        path.write_text(yaml.safe_dump(config))
        proc = subprocess.run(
            [sys.executable, "-m", "spectrum_sm.cli", "train", str(path), "--local",
             "--workdir", str(tmp_path / f"jobs-{steps}")],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-4000:]
        result = json.loads(proc.stdout.strip().splitlines()[-1])
        key = result["model_s3"].split("/", 3)[3] + "training_report.json"
        body = boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read()
        return json.loads(body)

    first = run(4, f"s3://{bucket}/ck/first/")
    assert first["steps"] == 4 and not first.get("resumed_from_step")
    second = run(6, f"s3://{bucket}/ck/second/", resume_from=f"s3://{bucket}/ck/first/")
    assert second["steps"] == 6 and second["resumed_from_step"] == 4
