"""What a real account needs on the first try, checked against a moto server over HTTP: nothing
uploaded for a refused config, no credential anywhere we write, reuse by content, SSE-KMS on our
uploads, least-privilege policies IAM accepts, and local mode exactly as documented."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import boto3
import pytest
from factories import run_cli
from test_jobs import EXAMPLES, ROOT

pytestmark = pytest.mark.integration
SHELL_TOKEN = "hf_" + "S" * 34
SECRET_TOKEN = "hf_" + "V" * 34


def _objects(bucket: str) -> dict[str, bytes]:
    s3 = boto3.client("s3")
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
    return {k: s3.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


def _bucket(name: str) -> str:
    s3 = boto3.client("s3")
    if name not in {b["Name"] for b in s3.list_buckets()["Buckets"]}:
        s3.create_bucket(Bucket=name)
    return name


@pytest.mark.parametrize(
    "override",
    [
        "training.instance_count=0",
        "training.max_runtime_s=2500000",
        "training.hyperparameters.lora_target_modules=" + "q" * 3000,
        "training.hyperparameters.learning_rat=1e-5",
        "training.hyperparameters.max_steps=100.0",
        "training.environment.HF_TOKEN=" + SHELL_TOKEN,
    ],
)
def test_a_refused_config_uploads_nothing(moto_server, s3_bucket, tmp_path, override):
    """The model and data are local (they would be uploaded first): the refusal comes before."""
    from spectrum_sm.toy import make_toy_training_setup

    paths = make_toy_training_setup(tmp_path / "toy", layers=2, rows=4)
    proc = run_cli(
        "run",
        str(EXAMPLES / "qwen3-8b.yaml"),
        "--no-logs",
        *("--set", f"common.output_s3=s3://{s3_bucket}/r"),
        *("--set", f"analysis.model={paths['model']}"),
        *("--set", f"training.model={paths['model']}"),
        *("--set", f"training.train_data={paths['train']}"),
        *("--set", "training.validation_data="),
        *("--set", override),
    )
    assert proc.returncode == 1, proc.stdout
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert _objects(s3_bucket) == {}
    assert SHELL_TOKEN not in proc.stderr


def test_our_uploads_use_the_output_key(moto_server, s3_bucket, tmp_path):
    """A bucket policy that requires SSE-KMS accepts our code, inputs and config."""
    from staging import prepare_analysis

    from spectrum_sm.aws.config import load_pipeline
    from spectrum_sm.toy import make_toy_training_setup

    key = boto3.client("kms").create_key()["KeyMetadata"]["Arn"]
    paths = make_toy_training_setup(tmp_path / "toy", layers=2, rows=4)
    config = load_pipeline(
        EXAMPLES / "qwen3-8b.yaml",
        [
            f"common.output_s3=s3://{s3_bucket}/k",
            f"analysis.model={paths['model']}",
            f"analysis.output_kms_key={key}",
        ],
    )
    request = prepare_analysis(config.analysis, dry_run=False, local=False)
    assert request["OutputDataConfig"]["KmsKeyId"] == key
    s3 = boto3.client("s3")
    written = list(_objects(s3_bucket))
    assert any("/code/" in k for k in written) and any("/inputs/model-" in k for k in written)
    assert any(k.endswith("spectrum-sm-config.yaml") for k in written)
    for name in written:
        head = s3.head_object(Bucket=s3_bucket, Key=name)
        assert head["ServerSideEncryption"] == "aws:kms", name
        assert head["SSEKMSKeyId"] == key, name


def _launch_module():
    spec = importlib.util.spec_from_file_location("launch", ROOT / "entrypoints" / "launch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_container_reads_secrets_with_its_role(moto_server):
    secrets = boto3.client("secretsmanager")
    plain = secrets.create_secret(Name="hf-plain", SecretString=SECRET_TOKEN)["ARN"]
    as_json = secrets.create_secret(
        Name="hf-json", SecretString=json.dumps({"HF_TOKEN": SECRET_TOKEN, "other": "x"})
    )["ARN"]
    launch = _launch_module()
    environ = {"SPECTRUM_SM_SECRET_HF_TOKEN": plain, "SPECTRUM_SM_SECRET_WANDB_API_KEY": plain}
    assert launch.secret_environment(environ) == {
        "HF_TOKEN": SECRET_TOKEN,
        "WANDB_API_KEY": SECRET_TOKEN,
    }
    assert launch.secret_environment({"SPECTRUM_SM_SECRET_HF_TOKEN": as_json}) == {
        "HF_TOKEN": SECRET_TOKEN
    }
    missing = plain.replace("hf-plain", "nope")
    with pytest.raises(RuntimeError, match=r"cannot read secret .*ResourceNotFoundException"):
        launch.secret_environment({"SPECTRUM_SM_SECRET_HF_TOKEN": missing})
    assert launch.secret_environment({"PATH": "/bin"}) == {}


def _change_weights(model: Path) -> None:
    """Other weights under the same path (as when a folder is overwritten with a new export)."""
    from safetensors.torch import load_file, save_file

    shard = sorted(model.glob("*.safetensors"))[0]
    tensors = load_file(shard)
    name = next(n for n in tensors if n.endswith("mlp.down_proj.weight"))
    tensors[name] = tensors[name] * 3
    save_file(tensors, shard, metadata={"format": "pt"})


def test_local_example_header_runs_from_any_folder_without_leaking_a_token(moto_server, tmp_path):
    """examples/local-tiny.yaml's header command, as written (default, relative work folder;
    relative model and data paths), from a folder other than the repository; a Hub token in the
    shell and one in Secrets Manager appear in no output, file or S3 object; the analysis is
    reused while the model's bytes stay the same and rerun when they change."""
    from spectrum_sm.toy import make_toy_training_setup

    bucket = _bucket("spectrum-sm-local")
    before = set(_objects(bucket))
    elsewhere = tmp_path / "elsewhere"
    make_toy_training_setup(elsewhere / "toy", layers=2, rows=16)
    secret = boto3.client("secretsmanager").create_secret(
        Name="hf-token-local", SecretString=SECRET_TOKEN
    )["ARN"]
    header = (EXAMPLES / "local-tiny.yaml").read_text().splitlines()[:2]
    command = " ".join(line.lstrip("# ").rstrip("\\ ") for line in header).split()
    assert command[:4] == ["spectrum-sm", "run", "examples/local-tiny.yaml", "--local"]
    args = [a.replace("MODEL_DIR", "toy/model").replace("DATA", "toy/train.jsonl") for a in command]
    args[2] = str(EXAMPLES / "local-tiny.yaml")  # the one path that names the repository
    args += ["--set", f"common.secret_environment.HF_TOKEN={secret}"]

    def run() -> dict:
        proc = run_cli(*args[1:], cwd=elsewhere, env={"HF_TOKEN": SHELL_TOKEN})
        assert proc.returncode == 0, proc.stderr[-3000:]
        for token in (SHELL_TOKEN, SECRET_TOKEN):
            assert token not in proc.stdout + proc.stderr
        return json.loads(proc.stdout.strip().splitlines()[-1])

    first = run()
    assert first["analysis_reused"] is False
    assert Path(first["workdir"]) == elsewhere / "spectrum-sm-jobs"
    assert (elsewhere / "spectrum-sm-jobs" / first["training_job"] / "model").is_dir()
    again = run()
    assert again["analysis_reused"] is True
    assert again["layer_file_s3"] == first["layer_file_s3"]
    _change_weights(elsewhere / "toy" / "model")
    changed = run()
    assert changed["analysis_reused"] is False
    assert changed["layer_file_s3"] != first["layer_file_s3"]

    written = _objects(bucket)
    new = [k for k in written if k not in before]  # other tests share the bucket
    staged = {k.split("/")[2] for k in new if "/inputs/model-" in k and "staged" not in k}
    assert len(staged) == 2  # one copy per model content, not one per job
    for key, body in written.items():
        if key not in before:
            for token in (SHELL_TOKEN, SECRET_TOKEN):
                assert token.encode() not in body, key
    for path in elsewhere.rglob("*"):
        if path.is_file() and path.stat().st_size < 50_000_000:
            data = path.read_bytes()
            for token in (SHELL_TOKEN, SECRET_TOKEN):
                assert token.encode() not in data, path
    training = json.loads(
        (elsewhere / "spectrum-sm-jobs" / first["training_job"] / "job.json").read_text()
    )
    assert "HF_TOKEN" not in json.dumps(training["Environment"]).replace(
        "SPECTRUM_SM_SECRET_HF_TOKEN", ""
    )
    # The planned names and prefixes are the ones run: job name, layer-file channel, outputs.
    assert training["TrainingJobName"] == first["training_job"]
    channels = {
        c["ChannelName"]: c["DataSource"]["S3DataSource"]["S3Uri"]
        for c in training["InputDataConfig"]
    }
    assert channels["spectrum"] == first["layer_file_s3"]
    assert first["layer_file_s3"].endswith(f"/analysis/{first['analysis_job']}/output/model/")
    assert first["model_s3"] == (
        training["OutputDataConfig"]["S3OutputPath"] + first["training_job"] + "/output/model/"
    )


def test_iam_policies_are_narrow_and_valid_for_iam(moto_server, tmp_path):
    key = "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    secret = "arn:aws:secretsmanager:us-east-1:123456789012:secret:hf-token-AbCdEf"
    proc = run_cli(
        "iam-policy",
        str(EXAMPLES / "qwen3-8b.yaml"),
        "--set",
        f"common.output_kms_key={key}",
        "--set",
        f"training.secret_environment.HF_TOKEN={secret}",
    )
    assert proc.returncode == 0, proc.stderr
    policies = json.loads(proc.stdout)
    iam = boto3.client("iam")
    for name in ("job_role", "launching_user"):
        # IAM's own validation of the document (moto implements AWS's policy grammar checks).
        iam.create_policy(
            PolicyName=f"spectrum-{name}-{os.getpid()}",
            PolicyDocument=json.dumps(policies[name]),
        )
    role = {s["Sid"]: s for s in policies["job_role"]["Statement"]}
    assert role["WriteOutputs"]["Resource"] == ["arn:aws:s3:::my-spectrum-bucket/qwen3-8b/*"]
    assert role["Secrets"]["Resource"] == [secret]
    assert role["Keys"]["Resource"] == [key]
    assert role["PullImage"]["Resource"] == [
        "arn:aws:ecr:us-east-1:763104351884:repository/huggingface-pytorch-training"
    ]
    user = {s["Sid"]: s for s in policies["launching_user"]["Statement"]}
    assert user["Jobs"]["Resource"] == [
        "arn:aws:sagemaker:us-east-1:123456789012:training-job/qwen3-8b-spectrum-*"
    ]
    assert user["PassTheJobRole"]["Condition"] == {
        "StringEquals": {"iam:PassedToService": "sagemaker.amazonaws.com"}
    }
    assert "*" not in json.dumps(user["StageAndReadOutputs"]["Resource"]).replace("/*", "")


COMMIT = "0123456789abcdef0123456789abcdef01234567"


def test_a_hub_model_is_staged_by_the_analysis_and_training_needs_no_hub(tmp_path):
    """Dry run of the flagship example pinned to a Hub commit (no network needed): the analysis
    job copies the checkpoint to S3, the training job reads it as its model channel and carries
    neither a Hub id nor a token; with staging off it reads the Hub id."""
    sets = ["--set", f"analysis.revision={COMMIT}"]
    proc = run_cli(
        "run",
        str(EXAMPLES / "qwen3-8b.yaml"),
        "--dry-run",
        *sets,
        env={"HF_TOKEN": SHELL_TOKEN, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    staged = "s3://my-spectrum-bucket/qwen3-8b/models/Qwen--Qwen3-8B@0123456789ab/"
    assert data["analysis"]["HyperParameters"]["stage_model_s3"] == staged
    assert data["analysis"]["HyperParameters"]["reuse_key"]
    training = data["training"]
    channels = {c["ChannelName"]: c for c in training["InputDataConfig"]}
    assert channels["model"]["DataSource"]["S3DataSource"]["S3Uri"] == staged
    assert "model_name_or_path" not in training["HyperParameters"]
    assert SHELL_TOKEN not in proc.stdout and "HF_TOKEN" not in json.dumps(training)
    off = run_cli(
        "run",
        str(EXAMPLES / "qwen3-8b.yaml"),
        "--dry-run",
        *sets,
        "--set",
        "analysis.stage_model=false",
        env={"HF_HUB_OFFLINE": "1"},
    )
    data = json.loads(off.stdout)
    assert "stage_model_s3" not in data["analysis"]["HyperParameters"]
    assert data["training"]["HyperParameters"]["model_name_or_path"] == "Qwen/Qwen3-8B"


def test_the_analysis_job_stages_a_cached_hub_checkpoint(
    moto_server, s3_bucket, tmp_path, tiny_model
):
    """analyze.py's staging step on a Hub cache laid out as huggingface_hub leaves it (offline):
    every checkpoint file lands under the prefix, and the marker is written last."""
    import shutil
    import subprocess
    import sys

    home = tmp_path / "hf"
    repo = home / "hub" / "models--org--tiny"
    snapshot = repo / "snapshots" / COMMIT
    shutil.copytree(tiny_model, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    uri = f"s3://{s3_bucket}/models/org--tiny@{COMMIT[:12]}/"
    code = (
        "import sys; sys.path.insert(0, 'entrypoints'); import analyze;"
        f"analyze.stage_hub_model('org/tiny', {COMMIT!r}, {uri!r})"
    )
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env=env)
    written = _objects(s3_bucket)
    expected = {f"models/org--tiny@{COMMIT[:12]}/{p.name}" for p in tiny_model.iterdir()}
    assert expected <= set(written)
    marker = json.loads(written[f"models/org--tiny@{COMMIT[:12]}.staged.json"])
    assert marker["commit"] == COMMIT


def test_a_lone_analysis_hands_the_staged_hub_model_to_training(moto_server, s3_bucket):
    """The notebook's path (launch an analysis, then a training job): a reused analysis of a Hub
    commit whose checkpoint is staged returns that S3 copy as the training model."""
    from spectrum_sm.aws.config import AnalysisConfig
    from spectrum_sm.aws.pipeline import analysis_key, hub_stage_uri, launch

    config = AnalysisConfig(
        output_s3=f"s3://{s3_bucket}/n", model="org/tiny", revision=COMMIT, top_percent=30
    )
    fingerprint = {"kind": "hub", "id": "org/tiny", "sha": COMMIT}
    key = analysis_key(config, fingerprint)
    layer_dir = f"s3://{s3_bucket}/n/analysis/old-job/output/model/"
    s3 = boto3.client("s3")
    s3.put_object(
        Bucket=s3_bucket, Key="n/analysis/old-job/output/model/x_30percent.yaml", Body=b""
    )
    s3.put_object(
        Bucket=s3_bucket,
        Key=f"n/analysis/index/{key}.json",
        Body=json.dumps({"job": "old-job", "layer_dir": layer_dir}).encode(),
    )
    staged = hub_stage_uri(config, fingerprint)
    assert staged == f"s3://{s3_bucket}/n/models/org--tiny@{COMMIT[:12]}/"
    result = launch(config, local=True)
    assert result["reused"] is True and "model_s3" not in result  # nothing staged yet
    s3.put_object(Bucket=s3_bucket, Key=f"n/models/org--tiny@{COMMIT[:12]}.staged.json", Body=b"{}")
    assert launch(config, local=True)["model_s3"] == staged


def test_a_training_job_carries_its_chat_template_and_the_pinned_trl(
    moto_server, s3_bucket, tmp_path
):
    """``chat_template:`` is staged as the job's ``chat_template`` channel (train.py reads it
    from SM_CHANNEL_CHAT_TEMPLATE); the code channel holds this machine's TRL modules, chat
    templates and metadata; a missing template file is refused before anything is uploaded."""
    from staging import prepare_training

    from spectrum_sm.aws.config import load_pipeline
    from spectrum_sm.core.errors import SpectrumError
    from spectrum_sm.toy import make_toy_training_setup

    paths = make_toy_training_setup(tmp_path / "toy", layers=2, rows=4)
    template = tmp_path / "marked.jinja"
    template.write_text("{% for m in messages %}{{ m.content }}{% endfor %}")

    def config(chat_template: str, prefix: str):
        return load_pipeline(
            EXAMPLES / "qwen3-8b.yaml",
            [
                f"common.output_s3=s3://{s3_bucket}/{prefix}",
                f"training.model={paths['model']}",
                f"training.train_data={paths['train']}",
                "training.validation_data=",
                "training.method=full",
                f"training.chat_template={chat_template}",
            ],
        ).training

    with pytest.raises(SpectrumError, match=r"chat_template '.*missing\.jinja' does not exist"):
        prepare_training(
            config(str(tmp_path / "missing.jinja"), "m"), spectrum_uri=None, dry_run=False,
            local=False,
        )  # fmt: skip
    assert _objects(s3_bucket) == {}
    with pytest.raises(SpectrumError, match="'chat_template_path' is set by the job itself"):
        hyperparameter = ["training.hyperparameters.chat_template_path=x"]
        training = load_pipeline(EXAMPLES / "qwen3-8b.yaml", hyperparameter).training
        prepare_training(training, spectrum_uri=None, dry_run=True, local=True)

    request = prepare_training(
        config(str(template), "c"), spectrum_uri=None, dry_run=False, local=False
    )
    channels = {
        c["ChannelName"]: c["DataSource"]["S3DataSource"]["S3Uri"]
        for c in request["InputDataConfig"]
    }
    written = _objects(s3_bucket)
    staged = channels["chat_template"].split(f"s3://{s3_bucket}/", 1)[1]
    assert written[staged.rstrip("/") + "/marked.jinja"] == template.read_bytes()
    code = channels["code"].split(f"s3://{s3_bucket}/", 1)[1].rstrip("/")
    for part in (
        "trl/chat_template_utils.py",
        "trl/chat_templates/qwen3_training.jinja",
        "trl/chat_templates/qwen3.jinja",
        "trl-1.16.0.dist-info/METADATA",
        "spectrum_sm/training/chat.py",
    ):
        assert f"{code}/{part}" in written, part
    assert not any(k.startswith(f"{code}/trl/trainer/") for k in written)  # only what masks use
