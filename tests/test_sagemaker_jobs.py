"""Submitting to SageMaker and following jobs, against a real moto server over HTTP.

Moto marks every training job Completed at once and cannot stop one; ``set_job_status`` moves a
job to another state by editing moto's backend, which lives in this process with the server.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time

import boto3
import pytest
from botocore.stub import Stubber
from factories import run_cli
from staging import prepare_analysis, prepare_training
from test_jobs import EXAMPLES

from spectrum_sm.aws.config import load_pipeline
from spectrum_sm.aws.jobs import JobFailed, JobTimeout, TrainingJob, submit
from spectrum_sm.core.errors import SpectrumError

pytestmark = pytest.mark.integration


def _job_count() -> int:
    pages = boto3.client("sagemaker").get_paginator("list_training_jobs").paginate()
    return sum(len(page["TrainingJobSummaries"]) for page in pages)


def set_job_status(name: str, status: str, reason: str = "") -> None:
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.sagemaker.models import sagemaker_backends

    job = sagemaker_backends[DEFAULT_ACCOUNT_ID]["us-east-1"].training_jobs[name]
    job.training_job_status = status
    job.failure_reason = reason or None


def put_logs(name: str, lines: list[str]) -> None:
    logs = boto3.client("logs")
    group = "/aws/sagemaker/TrainingJobs"
    with contextlib.suppress(logs.exceptions.ResourceAlreadyExistsException):
        logs.create_log_group(logGroupName=group)
    stream = f"{name}/algo-1-1700000000"
    now = int(time.time() * 1000)  # CloudWatch drops events older than 14 days
    logs.create_log_stream(logGroupName=group, logStreamName=stream)
    logs.put_log_events(logGroupName=group, logStreamName=stream,
                        logEvents=[{"timestamp": now + i, "message": m}
                                   for i, m in enumerate(lines)])  # fmt: skip


@pytest.fixture
def config(s3_bucket):
    return load_pipeline(EXAMPLES / "qwen3-8b.yaml", [f"common.output_s3=s3://{s3_bucket}/q"])


def test_submit_sends_the_prepared_request_exactly(config, s3_bucket):
    request = prepare_analysis(config.analysis, dry_run=False, local=False)
    sent: dict = {}
    session = boto3.Session()
    session.events.register(
        "before-parameter-build.sagemaker.CreateTrainingJob",
        lambda params, **_: sent.update(json.loads(json.dumps(params))),
    )
    job = submit(request, boto_session=session)
    # One representation: the name and every field leave as prepared (and as the dry run
    # prints them); no driver channel, no renamed job.
    assert sent == request
    assert job.name == request["TrainingJobName"]
    described = job.describe()
    for key in ("RoleArn", "HyperParameters", "ResourceConfig", "StoppingCondition"):
        assert described[key] == request[key], key
    assert described["OutputDataConfig"] == request["OutputDataConfig"]
    assert described["InputDataConfig"] == request["InputDataConfig"]
    spec = described["AlgorithmSpecification"]
    assert spec["TrainingImage"] == request["AlgorithmSpecification"]["TrainingImage"]
    code = boto3.client("s3").list_objects_v2(
        Bucket=s3_bucket, Prefix=f"q/code/{request['TrainingJobName']}/"
    )
    assert any(o["Key"].endswith("entrypoints/launch.py") for o in code["Contents"])
    assert TrainingJob.attach(job.name).status == "Completed"
    with pytest.raises(SpectrumError, match="cannot describe job nope"):
        TrainingJob.attach("nope")


def test_a_job_the_sdk_would_change_is_not_sent(config, monkeypatch):
    """The resource layer may fill fields from SageMaker config defaults (its
    ``get_updated_kwargs_with_configured_attributes``; in SDK 3 its schema rejects such files, so
    the defaults are simulated here): a job that would differ from the dry run is not sent."""
    from sagemaker.core import resources
    from sagemaker.core.shapes import VpcConfig

    def with_defaults(schema, name, **kwargs):
        kwargs["vpc_config"] = VpcConfig(security_group_ids=["sg-0abc1234"], subnets=["subnet-1"])
        return kwargs

    monkeypatch.setattr(
        resources.Base, "get_updated_kwargs_with_configured_attributes", staticmethod(with_defaults)
    )
    before = _job_count()
    request = prepare_analysis(config.analysis, dry_run=False, local=False)
    with pytest.raises(SpectrumError, match=r"not sent: the SageMaker SDK would change VpcConfig"):
        submit(request)
    assert _job_count() == before


def test_wait_streams_logs_and_surfaces_failures(config):
    request = prepare_analysis(config.analysis, dry_run=False, local=False)
    job = submit(request)
    put_logs(job.name, ["loading weights", "step=1 train_loss=1.0"])
    seen: list[str] = []
    assert job.wait(logs=True, poll_s=0.01, echo=seen.append)["TrainingJobStatus"] == "Completed"
    assert seen == ["loading weights", "step=1 train_loss=1.0"]

    set_job_status(job.name, "Failed", "AlgorithmError: layer file entries match no parameter")
    with pytest.raises(JobFailed) as info:
        TrainingJob(job.name).wait(logs=True, poll_s=0.01, echo=lambda line: None)
    assert info.value.reason.startswith("AlgorithmError: layer file entries")
    assert "step=1 train_loss=1.0" in str(info.value)

    set_job_status(job.name, "InProgress")
    with pytest.raises(JobTimeout, match="still InProgress"):
        job.wait(logs=False, poll_s=0.05, timeout_s=0.2)


def test_stop_sends_the_request_and_reports_refusals(config):
    client = boto3.client("sagemaker")
    with Stubber(client) as stub:
        stub.add_response("stop_training_job", {}, {"TrainingJobName": "job-1"})
        TrainingJob("job-1", sagemaker=client).stop()
        stub.assert_no_pending_responses()
    job = submit(prepare_analysis(config.analysis, dry_run=False, local=False))
    with pytest.raises(SpectrumError, match="cannot stop job"):  # moto has no StopTrainingJob
        job.stop()


def test_outputs_layer_file_and_score_table_from_s3(config, s3_bucket):
    job = submit(prepare_analysis(config.analysis, dry_run=False, local=False))
    model_uri = job.outputs["model"]
    assert model_uri.endswith(f"/{job.name}/output/model/")
    key = model_uri.split("/", 3)[3]
    s3 = boto3.client("s3")
    s3.put_object(
        Bucket=s3_bucket,
        Key=key + "snr_results_x_unfrozenparameters_30percent.yaml",
        Body=b"unfrozen_parameters:\n- ^lm_head.weight$\n- model.layers.3.mlp.down_proj\n",
    )
    s3.put_object(
        Bucket=s3_bucket,
        Key=key + "snr_results_x.json",
        Body=json.dumps(
            {"model.layers.3.mlp.down_proj": {"snr": 0.5, "type": "mlp.down_proj"}}
        ).encode(),
    )
    s3.put_object(Bucket=s3_bucket, Key=key + "snr_results_x_sorted.json", Body=b"{}")
    assert job.layer_file() == ["^lm_head.weight$", "model.layers.3.mlp.down_proj"]
    assert job.snr_table()["model.layers.3.mlp.down_proj"]["snr"] == 0.5


def data_sets(bucket: str) -> list[str]:
    """Training data in the test bucket, and the overrides that point the example at it."""
    s3 = boto3.client("s3")
    for part in ("train", "validation"):
        s3.put_object(Bucket=bucket, Key=f"data/{part}/part-0.jsonl", Body=b'{"text": "x"}\n')
    return [
        "--set",
        f"training.train_data=s3://{bucket}/data/train/",
        "--set",
        f"training.validation_data=s3://{bucket}/data/validation/",
    ]


def test_pipeline_submits_both_jobs_and_reuses_an_analysis_of_the_same_bytes(s3_bucket, tiny_model):
    """Reuse is keyed by what the analysis read (here S3 sizes and ETags) and its settings, not
    by the model's path: new bytes under the same prefix are scanned again."""
    from spectrum_sm.aws.s3 import upload_folder

    model = f"s3://{s3_bucket}/models/tiny/"
    upload_folder(tiny_model, model)
    sets = [
        "--set",
        f"common.output_s3=s3://{s3_bucket}/p",
        "--set",
        f"analysis.model={model}",
        "--set",
        f"training.model={model}",
        "--no-logs",
        *data_sets(s3_bucket),
    ]

    def run(*extra: str) -> dict:
        proc = run_cli("run", str(EXAMPLES / "qwen3-8b.yaml"), *sets, *extra)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout.strip().splitlines()[-1])

    result = run()
    assert result["analysis_reused"] is False
    analysis = boto3.client("sagemaker").describe_training_job(
        TrainingJobName=result["analysis_job"]
    )
    key = analysis["HyperParameters"]["reuse_key"]  # the job's manifest records it
    training = boto3.client("sagemaker").describe_training_job(
        TrainingJobName=result["training_job"]
    )
    channels = {
        c["ChannelName"]: c["DataSource"]["S3DataSource"]["S3Uri"]
        for c in training["InputDataConfig"]
    }
    assert channels["spectrum"] == result["layer_file_s3"]
    # What the real service would have left behind: the layer file at the analysis output.
    layer_key = result["layer_file_s3"].split("/", 3)[3]
    boto3.client("s3").put_object(
        Bucket=s3_bucket,
        Key=layer_key + "snr_unfrozenparameters_30percent.yaml",
        Body=b"unfrozen_parameters: []\n",
    )
    again = run()
    assert again["analysis_reused"] is True and again["layer_file_s3"] == result["layer_file_s3"]
    assert again["analysis_job"] == result["analysis_job"]
    assert run("--set", "analysis.top_percent=25")["analysis_reused"] is False
    # Other weights under the same prefix: a new analysis, under a new key.
    shard = sorted(p for p in tiny_model.iterdir() if p.suffix == ".safetensors")[0]
    boto3.client("s3").put_object(
        Bucket=s3_bucket,
        Key=f"models/tiny/{shard.name}",
        Body=shard.read_bytes()[:-8] + b"\x00" * 8,
    )
    changed = run()
    assert changed["analysis_reused"] is False
    rescan = boto3.client("sagemaker").describe_training_job(
        TrainingJobName=changed["analysis_job"]
    )
    assert rescan["HyperParameters"]["reuse_key"] != key


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("training.instance_type=ml.g5.3xlarge", "not a SageMaker training instance type"),
        ("common.role=", "IAM role ARN"),
        ("training.train_data=s3://{bucket}/missing/", "no such S3 object or prefix"),
        ("analysis.output_s3=not-s3", "s3://bucket/prefix"),
    ],
)
def test_bad_input_submits_nothing(s3_bucket, override, fragment):
    before = _job_count()
    proc = run_cli(
        "run",
        str(EXAMPLES / "qwen3-8b.yaml"),
        "--no-logs",
        *data_sets(s3_bucket),
        "--set",
        f"common.output_s3=s3://{s3_bucket}/b",
        "--set",
        override.format(bucket=s3_bucket),
    )
    assert proc.returncode == 1, proc.stdout
    assert fragment in proc.stderr and "Traceback" not in proc.stderr
    assert _job_count() == before


def test_validate_role_asks_iam_for_the_role_and_its_trust(config, s3_bucket):
    iam = boto3.client("iam")
    trust = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": {"Service": "sagemaker.amazonaws.com"},
                "Action": "sts:AssumeRole",
            }
        ],
    }
    good = iam.create_role(RoleName="sm-good", AssumeRolePolicyDocument=json.dumps(trust))
    trust["Statement"][0]["Principal"]["Service"] = "ec2.amazonaws.com"
    bad = iam.create_role(RoleName="sm-ec2", AssumeRolePolicyDocument=json.dumps(trust))
    checked = dataclasses.replace(config.analysis, validate_role=True)
    request = prepare_analysis(
        dataclasses.replace(checked, role=good["Role"]["Arn"]), dry_run=False, local=False
    )
    assert request["RoleArn"] == good["Role"]["Arn"]
    for role, fragment in (
        (bad["Role"]["Arn"], "does not trust sagemaker.amazonaws.com"),
        ("arn:aws:iam::123456789012:role/missing", "cannot read role .*NoSuchEntity"),
    ):
        before = _objects(s3_bucket)
        with pytest.raises(SpectrumError, match=fragment):
            prepare_analysis(dataclasses.replace(checked, role=role), dry_run=False, local=False)
        assert _objects(s3_bucket) == before  # refused before any upload


def _objects(bucket: str) -> list[str]:
    listing = boto3.client("s3").list_objects_v2(Bucket=bucket)
    return sorted(o["Key"] for o in listing.get("Contents", []))


def test_cli_run_without_the_sdk_says_how_to_install_it(s3_bucket, tmp_path):
    """The SDK is imported only when needed; without it the error names the install command."""
    blocker = tmp_path / "sitecustomize.py"
    blocker.write_text(
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'sagemaker' or name.startswith('sagemaker.'):\n"
        "            raise ImportError('blocked for the test')\n"
        "sys.meta_path.insert(0, Block())\n"
    )
    proc = run_cli(
        "run",
        str(EXAMPLES / "qwen3-8b.yaml"),
        "--dry-run",
        env={"PYTHONPATH": str(tmp_path)},
    )
    assert proc.returncode == 1
    assert "pip install 'spectrum-sm[sagemaker]'" in proc.stderr
    assert "Traceback" not in proc.stderr
    with_image = run_cli(
        "run",
        str(EXAMPLES / "qwen3-8b.yaml"),
        "--dry-run",
        "--set",
        "common.image_uri=123456789012.dkr.ecr.us-east-1.amazonaws.com/mine:1",
        env={"PYTHONPATH": str(tmp_path)},
    )
    assert with_image.returncode == 0, with_image.stderr


def test_training_job_options_reach_the_service_through_the_sdk(s3_bucket):
    """Spot, VPC, KMS, isolation, encryption, tags, metrics and TensorBoard reach the service as
    prepared, and moto stores what it received."""
    data_sets(s3_bucket)
    key = "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    config = load_pipeline(
        EXAMPLES / "qwen3-8b.yaml",
        [
            f"common.output_s3=s3://{s3_bucket}/t",
            f"training.train_data=s3://{s3_bucket}/data/train/",
            f"training.validation_data=s3://{s3_bucket}/data/validation/",
            "training.subnets=[subnet-0abc1234]",
            "training.security_group_ids=[sg-0abc1234]",
            f"training.volume_kms_key={key}",
            f"training.output_kms_key={key}",
            "training.encrypt_inter_container=true",
            "training.instance_count=2",
        ],
    )
    request = prepare_training(
        config.training, spectrum_uri=f"s3://{s3_bucket}/layers/", dry_run=False, local=False
    )
    sent: dict = {}
    session = boto3.Session()
    session.events.register(
        "before-parameter-build.sagemaker.CreateTrainingJob",
        lambda params, **_: sent.update(params),
    )
    job = submit(request, boto_session=session)
    assert sent == request
    for field in ("TensorBoardOutputConfig", "Tags", "HyperParameters", "CheckpointConfig"):
        assert sent[field] == request[field], field
    # moto answers DescribeTrainingJob with canned metric definitions: check what was sent.
    metrics = sent["AlgorithmSpecification"]["MetricDefinitions"]
    assert metrics == request["AlgorithmSpecification"]["MetricDefinitions"]
    described = job.describe()
    assert described["EnableManagedSpotTraining"] is True
    assert described["StoppingCondition"] == request["StoppingCondition"]
    assert described["CheckpointConfig"] == request["CheckpointConfig"]
    assert described["VpcConfig"] == request["VpcConfig"]
    assert described["ResourceConfig"] == request["ResourceConfig"]
    # ml.p4d.24xlarge has local NVMe storage: CreateTrainingJob refuses a volume key there.
    assert "VolumeKmsKeyId" not in described["ResourceConfig"]
    assert described["OutputDataConfig"]["KmsKeyId"] == key
    assert described["EnableInterContainerTrafficEncryption"] is True
    assert described["HyperParameters"] == request["HyperParameters"]
    channels = {c["ChannelName"] for c in described["InputDataConfig"]}
    assert channels == {"code", "train", "validation", "spectrum"}
