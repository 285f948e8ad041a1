"""One job handle for local and SageMaker jobs: a local job (real subprocesses, our moto server
over HTTP for S3) answers describe, status, log_events, wait, stop, outputs, layer_file and
snr_table as a SageMaker job (moto) does, and the comparison collects it through that handle
alone: no ``local`` flag above the launcher."""

from __future__ import annotations

import ast
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
from staging import prepare_analysis
from test_compare import _toy_overrides
from test_jobs import EXAMPLES
from test_sagemaker_jobs import put_logs, set_job_status

from spectrum_sm.aws.config import load_pipeline
from spectrum_sm.aws.jobs import JobFailed, JobHandle, SageMaker, TrainingJob, submit
from spectrum_sm.aws.local import Local, LocalJob, run_local
from spectrum_sm.core.errors import SpectrumError

PACKAGE = Path(__file__).resolve().parents[1] / "spectrum_sm"
#: What the callers (pipeline, comparison, cli) read of a description.
DESCRIBED = {
    "TrainingJobName",
    "TrainingJobStatus",
    "TrainingStartTime",
    "TrainingEndTime",
    "OutputDataConfig",
    "HyperParameters",
    "InputDataConfig",
    "ResourceConfig",
    "AlgorithmSpecification",
}


@pytest.mark.integration
def test_a_local_job_answers_as_a_sagemaker_job_does(moto_server, s3_bucket, tmp_path):
    from spectrum_sm.aws.pipeline import launch

    config = load_pipeline(
        EXAMPLES / "compare-tiny.yaml", _toy_overrides(tmp_path, s3_bucket, role=True)
    ).analysis
    here = Local(tmp_path / "jobs")
    ran = launch(config, launcher=here, reuse=False, logs=False)
    local = here.attach(ran["job"])
    remote = submit(prepare_analysis(config, dry_run=False, local=False))  # moto: Completed
    put_logs(remote.name, ["scoring", "step=1 train_loss=1.0"])
    assert isinstance(local, JobHandle) and isinstance(remote, JobHandle)
    attached = SageMaker().attach(remote.name)  # by name, as collect finds a job
    assert isinstance(attached, TrainingJob) and attached.status == remote.status

    mine, theirs = local.describe(), remote.describe()
    assert set(mine) >= DESCRIBED and set(theirs) >= DESCRIBED
    assert mine["TrainingJobStatus"] == theirs["TrainingJobStatus"] == "Completed"
    assert local.status == remote.status == "Completed"
    assert mine["TrainingJobName"] == local.name and theirs["TrainingJobName"] == remote.name
    for key in ("ResourceConfig", "OutputDataConfig"):
        assert set(mine[key]) == set(theirs[key]), key  # the same request, echoed
    assert set(mine["AlgorithmSpecification"]) <= set(theirs["AlgorithmSpecification"])
    assert set(theirs["HyperParameters"]) <= set(mine["HyperParameters"])  # + its reuse key
    assert mine["TrainingTimeInSeconds"] >= 1 and mine["TrainingWallSeconds"] > 0

    assert set(local.outputs) == set(remote.outputs)
    for job in (local, remote):
        assert job.outputs["model"].endswith(f"/{job.name}/output/model/")
    assert local.outputs["model"] == ran["layer_dir"]
    assert local.region == remote.region == "us-east-1"  # the config's; the ARN's
    assert (local.billed, remote.billed) == (False, True)
    assert Path(local.model_dir).is_dir() and remote.model_dir == ""

    # Log events: the same keys; a local log file records no times.
    events = {"local": local.log_events(), "remote": remote.log_events()}
    for side, found in events.items():
        assert found and all(set(e) >= {"timestamp", "message"} for e in found), side
    assert all(e["timestamp"] is None for e in events["local"])
    assert all(isinstance(e["timestamp"], int) for e in events["remote"])
    assert any("analysis" in e["message"].lower() for e in events["local"])
    assert local.log_events() == [] and remote.log_events() == []  # nothing new since
    again = local.log_events(from_start=True)
    assert [e["message"] for e in again] == [e["message"] for e in events["local"]]

    # wait: a finished job returns at once, with its description.
    started = time.monotonic()
    assert local.wait(logs=False)["TrainingJobStatus"] == "Completed"
    assert remote.wait(logs=False, poll_s=0.01)["TrainingJobStatus"] == "Completed"
    assert time.monotonic() - started < 5

    # The analysis's outputs, read from the S3 the local runner uploaded to.
    layers = local.layer_file()
    assert layers and all(isinstance(entry, str) for entry in layers)
    table = local.snr_table()
    assert table and all(set(row) >= {"snr", "type"} for row in table.values())

    # A finished job cannot be stopped, here or there.
    with pytest.raises(SpectrumError, match="cannot stop job"):
        local.stop()
    with pytest.raises(SpectrumError, match="cannot stop job"):
        remote.stop()
    with pytest.raises(SpectrumError, match="no local job nope"):
        here.attach("nope")


def _code_channel(bucket: str, script: str) -> str:
    """A code channel whose entrypoints/launch.py is ``script`` (a stand-in job)."""
    boto3.client("s3").put_object(
        Bucket=bucket, Key="code/entrypoints/launch.py", Body=script.encode()
    )
    return f"s3://{bucket}/code/"


def _request(name: str, bucket: str, code: str) -> dict:
    channel = {"S3DataType": "S3Prefix", "S3Uri": code, "S3DataDistributionType": "FullyReplicated"}
    return {
        "TrainingJobName": name,
        "AlgorithmSpecification": {"ContainerArguments": []},
        "ResourceConfig": {"InstanceType": "ml.m5.xlarge", "InstanceCount": 1},
        "InputDataConfig": [{"ChannelName": "code", "DataSource": {"S3DataSource": channel}}],
        "OutputDataConfig": {"S3OutputPath": f"s3://{bucket}/out"},
        "HyperParameters": {},
        "Environment": {},
    }


FAILING = """\
import os
for i in range(30):
    print(f"line {i}", flush=True)
with open(os.path.join(os.environ["SM_OPT_ML"], "output", "failure"), "w") as f:
    f.write("AlgorithmError: layer file entries match nothing")
raise SystemExit(2)
"""


@pytest.mark.integration
def test_a_failed_local_job_raises_as_a_failed_sagemaker_job_does(moto_server, s3_bucket, tmp_path):
    """JobFailed with the FailureReason and the last log lines, from either handle."""
    code = _code_channel(s3_bucket, FAILING)
    local = run_local(_request("failing-1", s3_bucket, code), tmp_path, stream_logs=False)
    assert local.status == "Failed"  # launched: the handle reports it, wait raises
    config = load_pipeline(EXAMPLES / "qwen3-8b.yaml", [f"common.output_s3=s3://{s3_bucket}/q"])
    remote = submit(prepare_analysis(config.analysis, dry_run=False, local=False))
    set_job_status(remote.name, "Failed", "AlgorithmError: layer file entries match nothing")
    put_logs(remote.name, [f"line {i}" for i in range(30)])
    raised = {}
    for side, job in (("local", local), ("remote", remote)):
        with pytest.raises(JobFailed) as info:
            job.wait(logs=False, poll_s=0.01)
        raised[side] = info.value
    for side, exc in raised.items():
        assert exc.status == "Failed", side
        assert exc.reason == "AlgorithmError: layer file entries match nothing", side
        assert exc.log_tail[-1] == "line 29" and len(exc.log_tail) <= 40, side
    assert str(raised["local"]).replace(local.name, "JOB") == str(raised["remote"]).replace(
        remote.name, "JOB"
    )
    # A fresh handle on the finished job (another process, a later collect) says the same.
    with pytest.raises(JobFailed, match=r"last log lines:\n(.|\n)*line 29"):
        LocalJob(tmp_path / "failing-1").wait(logs=False)


SLEEPING = """\
import time
print("started", flush=True)
time.sleep(120)
"""


def _run_in_another_process(request: dict, workdir: Path) -> subprocess.Popen:
    code = (
        "import json, sys; from spectrum_sm.aws.local import run_local; "
        "run_local(json.loads(sys.argv[1]), sys.argv[2], stream_logs=False)"
    )
    return subprocess.Popen([sys.executable, "-c", code, json.dumps(request), str(workdir)])


def _until(predicate, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


@pytest.mark.integration
def test_a_running_local_job_is_followed_and_stopped_through_its_handle(
    moto_server, s3_bucket, tmp_path
):
    code = _code_channel(s3_bucket, SLEEPING)
    runner = _run_in_another_process(_request("sleeping-1", s3_bucket, code), tmp_path)
    job = LocalJob(tmp_path / "sleeping-1")
    try:
        _until(lambda: (job.folder / "description.json").is_file())
        _until(lambda: any(e["message"] == "started" for e in job.log_events(from_start=True)))
        assert job.status == "InProgress"
        with pytest.raises(SpectrumError, match="still InProgress"):
            job.wait(logs=False, poll_s=0.05, timeout_s=0.2)
        job.stop()  # as StopTrainingJob: the runner passes SIGTERM on and records Stopped
        assert runner.wait(timeout=60) == 0
    finally:
        if runner.poll() is None:
            runner.kill()
    with pytest.raises(JobFailed) as info:
        job.wait(logs=False)
    assert info.value.status == "Stopped" and "started" in info.value.log_tail
    assert job.describe()["FailureReason"] == "stopped on request"

    # A runner that dies without a word leaves no job "InProgress" for ever.
    runner = _run_in_another_process(_request("killed-1", s3_bucket, code), tmp_path)
    killed = LocalJob(tmp_path / "killed-1")
    try:
        _until(lambda: any(e["message"] == "started" for e in killed.log_events(from_start=True)))
        assert killed.status == "InProgress"
        os.kill(runner.pid, signal.SIGKILL)
        runner.wait(timeout=60)
    finally:
        if runner.poll() is None:
            runner.kill()
    assert killed.status == "Failed"
    assert "ended without recording" in killed.describe()["FailureReason"]


@pytest.mark.integration
def test_comparison_collects_a_local_job_through_its_handle(moto_server, s3_bucket, tmp_path):
    """A real local training job, compared then collected by name: the launcher is chosen once;
    the collection reads only the handles it gives."""
    from spectrum_sm.comparison import collect, compare

    here = Local(tmp_path / "jobs")
    overrides = _toy_overrides(tmp_path, s3_bucket)
    ran = compare(
        EXAMPLES / "compare-tiny.yaml",
        "full",
        overrides=overrides,
        launcher=here,
        output_dir=tmp_path / "ran",
        logs=False,
    )
    run = ran.runs[0]
    assert run.status == "completed", run.reason
    job = here.attach(run.job)
    description = job.describe()
    assert run.job_seconds == description["TrainingWallSeconds"]
    assert run.model_s3 == job.outputs["model"] and run.model_dir == job.model_dir
    assert not run.billed and "estimate" in run.cost_basis
    assert run.curves["eval"] and run.curve_source == "tensorboard"
    collected = collect([run.job], launcher=here, output_dir=tmp_path / "collected")
    assert [r.row() for r in collected.runs] == [r.row() for r in ran.runs]
    # The public keywords still choose the same place.
    by_flag = collect([run.job], local=True, workdir=tmp_path / "jobs", output_dir=tmp_path / "f")
    assert [r.row() for r in by_flag.runs] == [r.row() for r in ran.runs]


def test_the_launchers_plan_for_where_they_run(tmp_path):
    """What differs between the places is asked of the launcher, not of a ``local`` flag."""
    from spectrum_sm.aws.pipeline import launcher_for

    config = load_pipeline(EXAMPLES / "qwen3-8b.yaml").training  # ml.p4d.24xlarge: 8 GPUs
    here, there = Local(tmp_path), SageMaker()
    assert (here.needs_role, there.needs_role) == (False, True)
    assert (here.launch_waits, there.launch_waits) == (True, False)
    assert (here.processes_per_host(config), there.processes_per_host(config)) == (1, 8)
    assert here.place() == {"workdir": str(tmp_path.resolve())} and there.place() == {}
    assert isinstance(launcher_for(True, tmp_path), Local)
    assert isinstance(launcher_for(False), SageMaker)
    assert launcher_for(True, launcher=there) is there


# --- no local branch above the launcher --------------------------------------------------------


def _sources(*parts: str) -> dict[str, str]:
    files = []
    for part in parts:
        path = PACKAGE / part
        files += sorted(path.glob("*.py")) if path.is_dir() else [path]
    return {str(f.relative_to(PACKAGE)): f.read_text() for f in files}


def test_no_local_keyword_in_comparison():
    """No ``local=`` anywhere in comparison/: not passed on, not a parameter's default."""
    found = {
        name: [n + 1 for n, line in enumerate(text.splitlines()) if re.search(r"\blocal\s*=", line)]
        for name, text in _sources("comparison").items()
    }
    assert not any(found.values()), found


def _inside_launcher_for(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    """Whether ``node`` is an argument of a ``launcher_for(...)`` call, or in its definition."""
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.Call):
            called = node.func.attr if isinstance(node.func, ast.Attribute) else ""
            called = called or getattr(node.func, "id", "")
            if called == "launcher_for":
                return True
        if isinstance(node, ast.FunctionDef) and node.name == "launcher_for":
            return True  # where the choice is made
    return False


@pytest.mark.parametrize("part", ["comparison", "aws/pipeline.py", "cli.py"])
def test_local_is_only_ever_the_choice_of_a_launcher(part):
    """Above the launcher, a ``local`` flag (a public keyword, the CLI's --local) is read once,
    to choose the launcher (``launcher_for``); nothing else branches on it or passes it on."""
    for name, text in _sources(part).items():
        tree = ast.parse(text)
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            named = getattr(node, "id", None) or getattr(node, "attr", None)
            if isinstance(node, (ast.Name, ast.Attribute)) and named == "local":
                use = node
            elif isinstance(node, ast.keyword) and node.arg == "local":
                use = node.value
            else:
                continue
            where = f"{name}:{use.lineno}"
            assert _inside_launcher_for(use, parents), f"{where}: local read outside launcher_for"
