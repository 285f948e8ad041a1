"""Job configs, CreateTrainingJob requests and their limits, dry runs, and the local pipeline
against a real moto server over HTTP."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
import yaml
from factories import run_cli
from safetensors.torch import load_file

from spectrum_sm.aws.config import AnalysisConfig, TrainingConfig, load_pipeline
from spectrum_sm.aws.requests import (
    analysis_output_uri,
    build_analysis_request,
    build_training_request,
    validate_request,
)
from spectrum_sm.core.errors import SpectrumError

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
ROLE = "arn:aws:iam::123456789012:role/SageMakerRole"
COMMON = {"role": ROLE, "output_s3": "s3://bucket/prefix"}


def analysis(**kw):
    return AnalysisConfig(**{**COMMON, "model": "Qwen/Qwen3-8B", **kw})


def training(**kw):
    return TrainingConfig(
        **{**COMMON, "model": "Qwen/Qwen3-8B", "train_data": "s3://bkt/train/", **kw}
    )


def test_requests_carry_what_the_jobs_need():
    a = build_analysis_request(analysis(top_percent=30, include=["mlp.*"]))
    assert a["OutputDataConfig"]["CompressionType"] == "NONE"
    assert a["HyperParameters"]["include"] == "mlp.*"
    assert a["HyperParameters"]["model_name_or_path"] == "Qwen/Qwen3-8B"
    layer_uri = analysis_output_uri(analysis(), a["TrainingJobName"])
    t = build_training_request(
        training(spot=True, hyperparameters={"max_steps": 5}), spectrum_uri=layer_uri
    )
    channels = {
        c["ChannelName"]: c["DataSource"]["S3DataSource"]["S3Uri"] for c in t["InputDataConfig"]
    }
    assert channels["spectrum"] == layer_uri and channels["train"] == "s3://bkt/train/"
    # The layer list travels through S3, never as a hyperparameter.
    assert "spectrum_config" not in t["HyperParameters"]
    assert not any("model.layers" in v for v in t["HyperParameters"].values())
    assert t["EnableManagedSpotTraining"] is True
    assert (
        t["StoppingCondition"]["MaxWaitTimeInSeconds"]
        >= t["StoppingCondition"]["MaxRuntimeInSeconds"]
    )
    assert t["CheckpointConfig"]["LocalPath"] == "/opt/ml/checkpoints"
    assert t["TensorBoardOutputConfig"]["S3OutputPath"].startswith(
        "s3://bucket/prefix/tensorboard/"
    )
    assert t["Environment"]["SPECTRUM_SM_NPROC_PER_HOST"] == "8"  # p4d: 8 GPUs
    assert {m["Name"] for m in t["AlgorithmSpecification"]["MetricDefinitions"]} >= {
        "train:loss",
        "eval:loss",
    }


def test_job_names_are_unique_within_one_second():
    names = {build_analysis_request(analysis())["TrainingJobName"] for _ in range(20)}
    assert len(names) == 20
    assert all(len(n) <= 63 for n in names)
    # <base>-analysis-<random>-<YYYYmmddHHMMSS>: sent as it is, no SDK renaming.
    assert all(re.fullmatch(r"spectrum-analysis-[0-9a-f]{6}-\d{14}", n) for n in names)
    long = build_analysis_request(analysis(base_job_name="x" * 41))["TrainingJobName"]
    assert len(long) <= 63


HF_IMAGE = "huggingface-pytorch-training:2.9.0-transformers5.3.0-gpu-py312-cu130-ubuntu22.04"


def _image(request):
    return request["AlgorithmSpecification"]["TrainingImage"]


def test_images_come_from_the_sdk_image_uris():
    assert _image(build_analysis_request(analysis())) == (
        f"763104351884.dkr.ecr.us-east-1.amazonaws.com/{HF_IMAGE}"
    )
    # Opt-in regions have their own registry account; the SDK's table knows them.
    cape_town = build_analysis_request(analysis(region="af-south-1"))
    assert _image(cape_town) == f"626614931356.dkr.ecr.af-south-1.amazonaws.com/{HF_IMAGE}"
    # The scan runs on CPU instances too, in the PyTorch CPU image.
    cpu = build_analysis_request(analysis(instance_type="ml.c5.9xlarge"))
    assert (
        _image(cpu) == "763104351884.dkr.ecr.us-east-1.amazonaws.com/pytorch-training:"
        "2.9.0-cpu-py312-ubuntu22.04-sagemaker"
    )
    with pytest.raises(SpectrumError, match=r"no Hugging Face training image for ml\.c5\.9xlarge"):
        build_training_request(training(instance_type="ml.c5.9xlarge"), spectrum_uri="s3://bkt/l/")
    mine = "123456789012.dkr.ecr.us-east-1.amazonaws.com/mine:1"
    cpu_training = build_training_request(
        training(instance_type="ml.c5.9xlarge", image_uri=mine), spectrum_uri="s3://bkt/l/"
    )
    assert _image(cpu_training) == mine


@pytest.mark.parametrize(
    ("make", "fragment"),
    [
        (lambda: analysis(role="not-an-arn"), "IAM role ARN"),
        (lambda: analysis(role=""), "IAM role ARN"),
        (lambda: analysis(output_s3="bucket/prefix"), "s3://bucket/prefix"),
        (lambda: analysis(instance_type="p4d.24xlarge"), "instance_type"),
        (lambda: analysis(top_percent=0), "top_percent"),
        (lambda: analysis(max_runtime_s=0), "max_runtime_s"),
        (lambda: analysis(volume_size_gb=0), "volume_size_gb"),
        (lambda: analysis(base_job_name="bad_name!"), "base_job_name"),
        (lambda: training(spot=True, max_wait_s=10), "max_wait_s"),
        (lambda: training(hyperparameters={"spectrum_config": "x"}), "set by the job itself"),
        # the job points TensorBoard at its own upload folder; a user path would lose the curves
        (lambda: training(hyperparameters={"tensorboard_dir": "/tmp/tb"}), "set by the job itself"),
        (lambda: training(method="dpo"), "method"),
    ],
)
def test_config_validation(make, fragment):
    config = make()
    with pytest.raises(SpectrumError, match=fragment):
        if isinstance(config, AnalysisConfig):
            build_analysis_request(config)
        else:
            build_training_request(config, spectrum_uri="s3://bkt/layers/")


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (lambda r: r.update(TrainingJobName="x" * 64), "at most 63"),
        (lambda r: r.update(TrainingJobName="bad_name"), "does not match"),
        (lambda r: r["HyperParameters"].update({f"k{i}": "v" for i in range(100)}), "at most 100"),
        (lambda r: r["HyperParameters"].update(big="v" * 2501), "at most 2500"),
        (lambda r: r["Environment"].update(BIG="v" * 513), "at most 512"),
        (lambda r: r["InputDataConfig"][0].update(ChannelName="bad channel"), "does not match"),
        (
            lambda r: r["InputDataConfig"][0]["DataSource"]["S3DataSource"].update(S3Uri="ftp://x"),
            "does not match",
        ),
        (lambda r: r.update(RoleArn="arn:aws:iam::12:role/x"), "RoleArn"),
        (lambda r: r.pop("OutputDataConfig"), "required"),
        (lambda r: r["ResourceConfig"].update(InstanceCount="2"), "expected an integer"),
        (lambda r: r.update(Bogus=1), "not a CreateTrainingJob field"),
    ],
)
def test_request_limits_from_the_service_model(mutate, fragment):
    request = build_analysis_request(analysis())
    mutate(request)
    with pytest.raises(SpectrumError, match=fragment):
        validate_request(request)


def test_unknown_config_keys_and_overrides(tmp_path):
    good = load_pipeline(
        EXAMPLES / "qwen3-8b.yaml", ["training.spot=false", "analysis.top_percent=25"]
    )
    assert good.training.spot is False and good.analysis.top_percent == 25
    bad = tmp_path / "bad.yaml"
    bad.write_text("analysis:\n  model: m\n  top_precent: 30\n")
    with pytest.raises(SpectrumError, match=r"unknown key.*top_precent"):
        load_pipeline(bad)
    with pytest.raises(SpectrumError, match="top_percent must be float, got 'abc'"):
        load_pipeline(EXAMPLES / "qwen3-8b.yaml", ["analysis.top_percent=abc"])
    with pytest.raises(SpectrumError, match="spot must be bool"):
        load_pipeline(EXAMPLES / "qwen3-8b.yaml", ["training.spot=3"])
    with pytest.raises(SpectrumError, match="not of the form"):
        load_pipeline(EXAMPLES / "qwen3-8b.yaml", ["training.spot"])
    (tmp_path / "top.yaml").write_text("analysys: {}\n")
    with pytest.raises(SpectrumError, match=r"unknown key.*analysys.*did you mean 'analysis'"):
        load_pipeline(tmp_path / "top.yaml")


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("trainig.spot=false", "no section 'trainig' (did you mean 'training'?)"),
        ("training.spott=false", "training has no setting 'spott' (did you mean 'spot'?)"),
        ("common=5", "common is a section; use --set common.KEY=VALUE"),
        ("common.method=full", "'method' is not a setting both jobs have"),
        ("training.hyperparameters=[", "the value is not valid YAML"),
        ("training.spot.x=1", "training.spot has no sub-keys"),
        ('reuse_analysis="false"', "reuse_analysis must be true or false, got 'false'"),
        (
            "training.hyperparameters.learning_rat=1e-5",
            "no argument 'learning_rat' (did you mean 'learning_rate'?)",
        ),
        ("training.hyperparameters.epochs=3", "train.py has no argument 'epochs'"),
        (
            "training.hyperparameters.max_steps=abc",
            "argument --max_steps: invalid int value: 'abc'",
        ),
        (
            "training.hyperparameters.max_steps=100.0",
            "argument --max_steps: invalid int value: '100.0'",
        ),
        ("training.hyperparameters.learning_rate=5", "learning_rate must be in (0, 1]"),
        ("training.hyperparameters.gradient_checkpointing=maybe", "expected true or false"),
        ("common.output_s3=s3://My_Bucket/x", "S3 refuses the bucket name 'My_Bucket'"),
        ("common.output_s3=s3://my..bucket/x", "no '..'"),
        ("common.output_s3=s3://192.168.1.1/x", "not an IP address"),
        (
            "common.region=cn-north-1",
            "is in partition 'aws', but region 'cn-north-1' is in 'aws-cn'",
        ),
        (
            "training.environment.WANDB_API_KEY=abc",
            "environment.WANDB_API_KEY looks like a credential",
        ),
        (
            "common.environment.HF_TOKEN=hf_" + "a" * 34,
            "environment.HF_TOKEN looks like a credential",
        ),
        (
            "training.hyperparameters.note=hf_" + "a" * 34,
            "hyperparameters.note looks like a credential",
        ),
        (
            "training.secret_environment.HF_TOKEN=hf_" + "a" * 34,
            "must be one Secrets Manager secret ARN",
        ),
    ],
)
def test_bad_overrides_fail_the_dry_run_naming_the_key(override, fragment):
    from factories import run_cli

    proc = run_cli("run", str(EXAMPLES / "qwen3-8b.yaml"), "--dry-run", "--set", override)
    assert proc.returncode == 1, proc.stdout
    assert fragment in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "hf_aaaa" not in proc.stderr + proc.stdout  # not even a part of a token


@pytest.mark.parametrize("example", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_config_is_valid(example, tmp_path):
    from spectrum_sm.aws.pipeline import launch
    from spectrum_sm.comparison import compare

    header = example.read_text().splitlines()[0]
    command = header.split()[2]
    assert command in ("run", "compare")
    assert header.startswith(f"# spectrum-sm {command} examples/{example.name}")
    overrides = []
    if "--local" in header:  # its local paths must exist, and its data is read on the client
        from spectrum_sm.toy import make_toy_training_setup

        paths = make_toy_training_setup(tmp_path, layers=1, rows=8, validation_rows=4)
        overrides = [
            f"analysis.model={paths['model']}",
            f"training.model={paths['model']}",
            f"training.train_data={paths['train']}",
        ]
        if "validation_data" in example.read_text():
            overrides.append(f"training.validation_data={paths['validation']}")
    config = load_pipeline(example, overrides)
    local = "--local" in header
    if command == "run":
        requests = list(launch(config, local=local, dry_run=True).values())
    else:
        methods = header.split("--methods ")[1].split()[0]
        result = compare(config, methods, local=local, dry_run=True)
        requests = [result.analysis["request"], *(r.request for r in result.runs if r.request)]
        assert len(requests) == 1 + sum(r.status != "skipped" for r in result.runs)
    for request in requests:
        validate_request(request)


SHELL_TOKEN = "hf_" + "Q" * 34


def test_dry_run_needs_no_credentials(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        AWS_CONFIG_FILE=str(tmp_path / "none"),
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
        AWS_EC2_METADATA_DISABLED="true",
        HF_TOKEN=SHELL_TOKEN,
        PYTHONPATH=str(tmp_path),
    )
    # No network either: any connection attempt in the subprocess fails the run.
    (tmp_path / "sitecustomize.py").write_text(
        "import socket\n"
        "def refuse(*args, **kwargs):\n"
        "    raise OSError('network used during a dry run')\n"
        "socket.socket.connect = refuse\n"
        "socket.create_connection = refuse\n"
    )
    import subprocess
    import sys

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "spectrum_sm.cli",
            "run",
            str(EXAMPLES / "qwen3-8b.yaml"),
            "--dry-run",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert set(data) == {"analysis", "training"}
    layer_uri = analysis_output_uri(
        load_pipeline(EXAMPLES / "qwen3-8b.yaml").analysis, data["analysis"]["TrainingJobName"]
    )
    spectrum = [c for c in data["training"]["InputDataConfig"] if c["ChannelName"] == "spectrum"]
    assert spectrum[0]["DataSource"]["S3DataSource"]["S3Uri"] == layer_uri
    assert data["training"]["ResourceConfig"]["InstanceType"] == "ml.p4d.24xlarge"
    for request in data.values():  # looked up offline with the SDK's image_uris
        assert request["AlgorithmSpecification"]["TrainingImage"] == (
            "763104351884.dkr.ecr.us-east-1.amazonaws.com/huggingface-pytorch-training:"
            "2.9.0-transformers5.3.0-gpu-py312-cu130-ubuntu22.04"
        )
    assert data["training"]["EnableManagedSpotTraining"] is True
    # The launching shell's token never travels (a job reads one from Secrets Manager).
    assert all("HF_TOKEN" not in r["Environment"] for r in data.values())
    assert SHELL_TOKEN not in proc.stdout + proc.stderr
    for request in data.values():
        validate_request(request)


def test_training_distribution_is_planned_and_a_misfit_refused():
    """The flagship example: Spectrum-30% of Qwen3-8B on 8 x A100 40 GB needs FSDP."""

    def dry(*sets):
        return run_cli(
            "run",
            str(EXAMPLES / "qwen3-8b.yaml"),
            "--dry-run",
            *[x for s in sets for x in ("--set", s)],
            env={"HF_HUB_OFFLINE": "1"},
        )

    proc = dry()
    assert proc.returncode == 0, proc.stderr
    training = json.loads(proc.stdout)["training"]
    assert training["HyperParameters"]["distribution"] == "fsdp"
    assert "fsdp over 8 GPUs 17.1 GiB" in proc.stderr
    # One checkpoint prefix per run: no other run can resume from it by accident.
    assert training["CheckpointConfig"]["S3Uri"].endswith(f"/{training['TrainingJobName']}/")
    refused = dry("training.distribution=ddp")
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "needs ~66.7 GiB per GPU" in refused.stderr and "force: true" in refused.stderr
    assert refused.stdout == ""
    forced = dry("training.distribution=ddp", "training.force=true")
    assert forced.returncode == 0, forced.stderr
    assert json.loads(forced.stdout)["training"]["HyperParameters"]["distribution"] == "ddp"
    # Every GPU instance of the one table is planned: ml.g5.xlarge (24 GiB) was "no GPU table
    # entry" to the planner, so an 8B model was sent to it unplanned.
    small = dry("training.instance_type=ml.g5.xlarge", "training.instance_count=1")
    assert small.returncode == 1 and "on ml.g5.xlarge x1" in small.stderr, small.stderr
    assert "24 GiB" in small.stderr
    small = dry("training.instance_type=ml.g5.2xlarge")
    assert small.returncode == 1 and "more than 90% of its 24 GiB" in small.stderr


@pytest.mark.integration
def test_local_pipeline_against_moto(moto_server, tmp_path):
    import boto3

    from spectrum_sm.core.freeze import freeze_except, read_layer_file
    from spectrum_sm.toy import make_toy_training_setup

    paths = make_toy_training_setup(tmp_path / "toy", layers=2, rows=16)
    bucket = "pipeline-test"
    boto3.client("s3").create_bucket(Bucket=bucket)
    # The toy's ChatML with {% generation %} blocks, as a user's training template would be.
    marked = tmp_path / "chatml-marked.jinja"
    marked.write_text(
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }}"
        "<|im_end|>{% endgeneration %}{% else %}{{ message['content'] }}<|im_end|>{% endif %}\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    proc = run_cli(
        "-q",
        "run",
        str(EXAMPLES / "local-tiny.yaml"),
        "--local",
        "--workdir",
        str(tmp_path / "jobs"),
        "--set",
        f"common.output_s3=s3://{bucket}/tiny",
        "--set",
        f"analysis.model={paths['model']}",
        "--set",
        f"training.model={paths['model']}",
        "--set",
        f"training.train_data={paths['train']}",
        "--set",
        f"training.chat_template={marked}",
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    # The template reached train.py as the job's chat_template channel and made the masks.
    job_log = (tmp_path / "jobs" / result["training_job"] / "output" / "job.log").read_text()
    assert "assistant-only loss: the template's {% generation %} markers" in job_log
    s3 = boto3.client("s3")

    def keys(uri):
        key = uri.split("/", 3)[3]
        return [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=key).get("Contents", [])]

    layer_keys = [k for k in keys(result["layer_file_s3"]) if k.endswith("percent.yaml")]
    assert len(layer_keys) == 1
    model_keys = keys(result["model_s3"])
    assert any(k.endswith("model.safetensors") for k in model_keys)
    assert any(k.endswith("training_report.json") for k in model_keys)
    download = tmp_path / "download"
    download.mkdir()
    s3.download_file(bucket, layer_keys[0], str(download / "layers.yaml"))
    s3.download_file(
        bucket,
        next(k for k in model_keys if k.endswith("model.safetensors")),
        str(download / "model.safetensors"),
    )
    before = load_file(str(paths["model"] / "model.safetensors"))
    after = load_file(str(download / "model.safetensors"))
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    from transformers import AutoModelForCausalLM

    expected = set(
        freeze_except(
            AutoModelForCausalLM.from_pretrained(paths["model"]),
            read_layer_file(download / "layers.yaml"),
        ).trainable
    )
    assert changed == expected and len(expected) > 2
    assert any("tfevents" in k for k in keys(f"s3://{bucket}/tiny/tensorboard/"))
    config_keys = [k for k in keys(f"s3://{bucket}/tiny/") if k.endswith("spectrum-sm-config.yaml")]
    assert len(config_keys) == 2  # written next to each job's outputs
    assert yaml.safe_load(s3.get_object(Bucket=bucket, Key=config_keys[0])["Body"].read())


@pytest.mark.integration
def test_local_job_failures_surface_the_reason(moto_server, tmp_path):
    import boto3

    from spectrum_sm.toy import make_toy_training_setup

    paths = make_toy_training_setup(tmp_path / "toy", layers=2, rows=16)
    bucket = "failing-test"
    boto3.client("s3").create_bucket(Bucket=bucket)
    base = [
        "--local",
        "--workdir",
        str(tmp_path / "jobs"),
        "--set",
        f"common.output_s3=s3://{bucket}/x",
        "--set",
        f"analysis.model={paths['model']}",
        "--set",
        f"training.model={paths['model']}",
    ]
    missing = run_cli(
        "run",
        str(EXAMPLES / "local-tiny.yaml"),
        *base,
        "--set",
        f"training.train_data=s3://{bucket}/no/such/data/",
    )
    assert missing.returncode == 1 and "no such S3 object or prefix" in missing.stderr
    assert not (tmp_path / "jobs").exists()  # rejected before any job ran
    refused = run_cli(
        "run",
        str(EXAMPLES / "local-tiny.yaml"),
        *base,
        "--set",
        f"training.train_data={paths['train']}",
        "--set",
        "training.hyperparameters.max_steps=-5",
        "--set",
        "training.hyperparameters.num_train_epochs=0",
    )
    # train.py's own checks, run on the client: refused before any upload or job.
    assert refused.returncode == 1 and "nothing to train" in refused.stderr
    assert not (tmp_path / "jobs").exists()
    assert "Contents" not in boto3.client("s3").list_objects_v2(Bucket=bucket)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"messages": "not a list"}\n')
    on_client = run_cli(
        "run", str(EXAMPLES / "local-tiny.yaml"), *base, "--set", f"training.train_data={broken}"
    )  # local data is read on the client: refused before any job
    assert on_client.returncode == 1, on_client.stderr
    assert "train_data" in on_client.stderr and "'messages' must be a list" in on_client.stderr
    assert not (tmp_path / "jobs").exists()
    # Data in S3 only the job reads: it fails there, and the reason comes back.
    boto3.client("s3").upload_file(str(broken), bucket, "data/broken.jsonl")
    failing = run_cli(
        "run",
        str(EXAMPLES / "local-tiny.yaml"),
        *base,
        "--set",
        f"training.train_data=s3://{bucket}/data/broken.jsonl",
    )
    assert failing.returncode == 1
    assert "failed: data row 0: 'messages' must be a list" in failing.stderr
    assert "Traceback" not in failing.stderr.split("last log lines")[0]


def test_launcher_builds_the_container_command(tmp_path, monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("launch", ROOT / "entrypoints" / "launch.py")
    launch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launch)
    config = tmp_path / "input" / "config"
    config.mkdir(parents=True)
    (config / "hyperparameters.json").write_text(json.dumps({"max_steps": "5", "method": "full"}))
    (config / "inputdataconfig.json").write_text(json.dumps({"train": {}, "spectrum": {}}))
    (config / "resourceconfig.json").write_text(
        json.dumps({"current_host": "algo-2", "hosts": ["algo-1", "algo-2"]})
    )
    env = launch.container_environment(tmp_path)
    assert env["SM_CHANNEL_TRAIN"] == str(tmp_path / "input" / "data" / "train")
    assert env["SM_MODEL_DIR"] == str(tmp_path / "model")
    monkeypatch.setenv("SPECTRUM_SM_NPROC_PER_HOST", "8")
    cmd = launch.command("train", tmp_path)
    assert cmd[1:3] == ["-m", "torch.distributed.run"]
    assert "--nnodes=2" in cmd and "--node_rank=1" in cmd and "--nproc_per_node=8" in cmd
    assert "--master_addr=algo-1" in cmd
    assert cmd[-4:] == ["--max_steps", "5", "--method", "full"]
    assert launch.command("analyze", tmp_path)[1].endswith("analyze.py")


def test_launch_script_example_runs(tmp_path):
    import subprocess
    import sys

    script = EXAMPLES / "launch_pipeline.py"
    assert script.read_text().startswith("# python examples/launch_pipeline.py ")
    proc = subprocess.run(
        [sys.executable, str(script), str(EXAMPLES / "qwen3-8b.yaml"), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "analysis: qwen3-8b-spectrum-analysis-" in proc.stdout
    assert "'spectrum'" in proc.stdout and "ml.p4d.24xlarge" in proc.stdout


def test_single_job_commands_dry_run():
    analyze = run_cli("analyze", str(EXAMPLES / "qwen3-8b.yaml"), "--dry-run")
    assert analyze.returncode == 0, analyze.stderr
    assert json.loads(analyze.stdout)["ResourceConfig"]["InstanceType"] == "ml.g5.2xlarge"
    train = run_cli(
        "train",
        str(EXAMPLES / "qwen3-8b.yaml"),
        "--dry-run",
        "--set",
        "training.spectrum_config=s3://my-spectrum-bucket/layers/",
    )
    assert train.returncode == 0, train.stderr
    channels = {c["ChannelName"]: c for c in json.loads(train.stdout)["InputDataConfig"]}
    assert channels["spectrum"]["DataSource"]["S3DataSource"]["S3Uri"].endswith("/layers/")
    missing = run_cli("train", str(EXAMPLES / "qwen3-8b.yaml"), "--dry-run")
    assert missing.returncode == 1 and "training.spectrum_config" in missing.stderr


@pytest.mark.parametrize(
    ("instance_type", "sent"),
    [("ml.p3.16xlarge", True), ("ml.m5.xlarge", True), ("ml.g5.2xlarge", False),
     ("ml.p4d.24xlarge", False), ("ml.p5.48xlarge", False), ("ml.g4dn.xlarge", False),
     ("ml.r5d.large", False)],
)  # fmt: skip
def test_volume_key_only_where_the_instance_has_an_ebs_volume(instance_type, sent):
    key = "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    request = build_analysis_request(
        analysis(
            instance_type=instance_type,
            volume_kms_key=key,
            image_uri="123456789012.dkr.ecr.us-east-1.amazonaws.com/mine:1",
        )
    )
    assert ("VolumeKmsKeyId" in request["ResourceConfig"]) is sent


def test_credentials_are_recognised_by_whole_name_parts_and_by_shape():
    from spectrum_sm.aws.config import secret_problems

    fine = {"TOKENIZERS_PARALLELISM": "false", "max_tokens": "512", "NCCL_DEBUG": "INFO"}
    assert secret_problems(analysis(environment=fine)) == []
    for key, value in (
        ("HF_TOKEN", "x"),
        ("WANDB_API_KEY", "x"),
        ("DB_PASSWORD", "x"),
        ("NOTE", "AKIA" + "A" * 16),
        ("NOTE", "hf_" + "b" * 34),
        ("NOTE", "ghp_" + "c" * 36),
    ):
        (problem,) = secret_problems(analysis(environment={key: value}))
        assert f"environment.{key} looks like a credential" in problem
        assert value not in problem  # never echoed


def test_each_job_is_validated_once(tmp_path, monkeypatch):
    """One check per job, before any lookup: the analysis, the training job and every run of a
    comparison each validated once (it was two or three times: the step, the plan, the
    request builder)."""
    from spectrum_sm.aws import config as config_module
    from spectrum_sm.aws.pipeline import launch
    from spectrum_sm.comparison import compare

    checked: list[str] = []
    problems = config_module.JobConfig.problems

    def counting(self, need_role):
        checked.append(type(self).__name__)
        return problems(self, need_role)

    monkeypatch.setattr(config_module.JobConfig, "problems", counting)
    config = load_pipeline(EXAMPLES / "qwen3-8b.yaml")
    launch(config, dry_run=True)
    assert sorted(checked) == ["AnalysisConfig", "TrainingConfig"]
    checked.clear()
    launch(config.analysis, dry_run=True)
    assert checked == ["AnalysisConfig"]
    checked.clear()
    launch(config.training, spectrum_uri="s3://b/layers/", dry_run=True)
    assert checked == ["TrainingConfig"]
    checked.clear()
    result = compare(config, "spectrum:30,full", dry_run=True)
    assert [run.status for run in result.runs] == ["planned", "planned"]
    assert sorted(checked) == ["AnalysisConfig", "TrainingConfig", "TrainingConfig"]
