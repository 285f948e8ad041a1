"""The real-account smoke test: the tiny pipeline on SageMaker, for real. Never in CI.

Run once with credentials and a SageMaker execution role (see README, "Real-account smoke
test")::

    SPECTRUM_SM_AWS_SMOKE=1 \\
    SPECTRUM_SM_AWS_ROLE=arn:aws:iam::<account>:role/<SageMakerRole> \\
    SPECTRUM_SM_AWS_S3=s3://<bucket>/spectrum-sm-smoke \\
    .venv/bin/python -m pytest -m aws -s tests/test_aws_smoke.py

It prints the expected cost first, runs the analysis on the cheapest CPU instance and a few
training steps on the cheapest GPU instance with the Hugging Face image, follows both jobs,
checks the layer file and the model in S3, stops whatever it started if anything fails or on
Ctrl-C, and deletes its S3 prefix at the end.
"""

from __future__ import annotations

import contextlib
import os
import uuid

import pytest

pytestmark = pytest.mark.aws
ANALYSIS_INSTANCE = "ml.m5.large"
TRAINING_INSTANCE = "ml.g5.xlarge"
#: On-demand SageMaker training prices, us-east-1, USD per hour (2026-11; other regions differ).
PRICES = {ANALYSIS_INSTANCE: 0.115, TRAINING_INSTANCE: 1.408}
#: Billed minutes each job is expected to take (start-up and image pull included).
MINUTES = {ANALYSIS_INSTANCE: 6, TRAINING_INSTANCE: 10}


def _settings() -> dict[str, str]:
    wanted = ("SPECTRUM_SM_AWS_SMOKE", "SPECTRUM_SM_AWS_ROLE", "SPECTRUM_SM_AWS_S3")
    missing = [name for name in wanted if not os.environ.get(name)]
    if missing:
        pytest.skip(f"real-account smoke test: set {', '.join(missing)} (see the module docstring)")
    if os.environ.get("AWS_ENDPOINT_URL"):
        pytest.skip("AWS_ENDPOINT_URL is set: the smoke test talks to real AWS only")
    import boto3

    try:
        identity = boto3.client("sts").get_caller_identity()
    except Exception as exc:  # no credentials, expired session
        pytest.skip(f"no usable AWS credentials ({type(exc).__name__})")
    return {
        "role": os.environ["SPECTRUM_SM_AWS_ROLE"],
        "s3": os.environ["SPECTRUM_SM_AWS_S3"].rstrip("/"),
        "region": os.environ.get("AWS_REGION")
        or os.environ.get("AWS_DEFAULT_REGION")
        or boto3.session.Session().region_name
        or "us-east-1",
        "account": identity["Account"],
    }


def expected_cost() -> float:
    return sum(PRICES[i] * MINUTES[i] / 60 for i in PRICES)


def test_tiny_pipeline_on_a_real_account(tmp_path):
    from spectrum_sm.aws.config import AnalysisConfig, PipelineConfig, TrainingConfig
    from spectrum_sm.aws.jobs import TERMINAL, submit
    from spectrum_sm.aws.pipeline import plan_analysis, plan_training
    from spectrum_sm.aws.requests import analysis_output_uri
    from spectrum_sm.aws.s3 import s3_client, split_s3_uri
    from spectrum_sm.toy import make_toy_training_setup

    settings = _settings()
    print(
        f"\nspectrum-sm smoke test in {settings['region']} (account {settings['account']}): "
        f"{ANALYSIS_INSTANCE} ~{MINUTES[ANALYSIS_INSTANCE]} min + {TRAINING_INSTANCE} "
        f"~{MINUTES[TRAINING_INSTANCE]} min, expected cost ~${expected_cost():.2f} on demand"
    )
    prefix = f"{settings['s3']}/run-{uuid.uuid4().hex[:8]}"
    paths = make_toy_training_setup(tmp_path / "toy", layers=2, rows=32)
    common = {"role": settings["role"], "region": settings["region"], "output_s3": prefix}
    config = PipelineConfig(
        AnalysisConfig(
            **common,
            base_job_name="spectrum-smoke",
            model=str(paths["model"]),
            top_percent=50,
            instance_type=ANALYSIS_INSTANCE,
            volume_size_gb=30,
            max_runtime_s=1800,
        ),
        TrainingConfig(
            **common,
            base_job_name="spectrum-smoke",
            model=str(paths["model"]),
            train_data=str(paths["train"]),
            top_percent=50,
            instance_type=TRAINING_INSTANCE,
            volume_size_gb=30,
            max_runtime_s=1800,
            hyperparameters={"max_steps": 4, "max_seq_length": 64, "logging_steps": 1},
        ),
    )
    started = []
    try:
        analysis = plan_analysis(config.analysis, dry_run=False, local=False)
        layer_dir = analysis_output_uri(config.analysis, analysis.request["TrainingJobName"])
        training = plan_training(
            config.training, spectrum_uri=layer_dir, dry_run=False, local=False
        )
        analysis.stage()
        training.stage()
        job = submit(analysis.request)
        started.append(job)
        job.wait(logs=True, poll_s=30)
        layers = job.layer_file()
        assert layers, "the analysis wrote an empty layer file"
        job = submit(training.request)
        started.append(job)
        job.wait(logs=True, poll_s=30)
        bucket, key = split_s3_uri(job.outputs["model"])
        listing = s3_client().list_objects_v2(Bucket=bucket, Prefix=key).get("Contents", [])
        names = {o["Key"].rsplit("/", 1)[-1] for o in listing}
        assert {"model.safetensors", "training_report.json"} <= names, names
    except BaseException:  # a failure or Ctrl-C: nothing keeps running (and billing)
        for job in started:
            with contextlib.suppress(Exception):
                if job.status not in TERMINAL:
                    job.stop()
                    print(f"stopped {job.name}")
        raise
    finally:
        _delete_prefix(prefix)


def _delete_prefix(uri: str) -> None:
    from spectrum_sm.aws.s3 import s3_client, split_s3_uri

    bucket, key = split_s3_uri(uri + "/")
    client = s3_client()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key):
        objects = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if objects:
            client.delete_objects(Bucket=bucket, Delete={"Objects": objects})
