"""spectrum-sm compare: methods side by side on the same data, measured from the runs' own
outputs (training_report.json, TensorBoard files, job descriptions), priced from a dated table.

The end-to-end test runs examples/compare-tiny.yaml's header command as written: an analysis and
four real training jobs (local mode, real subprocesses) against our moto server over HTTP.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import shlex
import shutil
from pathlib import Path

import boto3
import pytest
from factories import run_cli
from test_jobs import EXAMPLES
from test_train import changed_tensors, model_tensors

from spectrum_sm.aws.config import load_pipeline
from spectrum_sm.comparison import (
    Method,
    Run,
    compare,
    parse_methods,
    qlora_problem,
    render_table,
)
from spectrum_sm.comparison.run import _common_recipe
from spectrum_sm.core.errors import SpectrumError
from spectrum_sm.prices import AS_OF, job_cost, load_prices

ROLE = "arn:aws:iam::123456789012:role/SageMakerRole"


# --- methods, prices, table ----------------------------------------------------------------


def test_methods_parse_with_percents_and_defaults():
    methods = parse_methods("spectrum:10, spectrum:12.5,lora,QLoRA,full", default_percent=30)
    assert [m.label for m in methods] == ["spectrum:10", "spectrum:12.5", "lora", "qlora", "full"]
    assert methods[1].slug == "spectrum-12p5"  # job names allow no dot
    assert parse_methods(["spectrum", "full"], default_percent=30)[0] == Method("spectrum", 30)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("lorra", "did you mean 'lora'"),
        ("lora:30", "only spectrum takes a percent"),
        ("spectrum:0", "(0, 100]"),
        ("spectrum:abc", "must be a number"),
        ("spectrum:30,spectrum:30.0", "named twice"),
        (" , ", "names no method"),
    ],
)
def test_bad_methods_are_refused_by_name(spec, message):
    with pytest.raises(SpectrumError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_methods(spec, default_percent=30)


def test_shipped_prices_are_dated_and_cost_follows_billable_seconds():
    table = load_prices()
    assert table.as_of == AS_OF and "aws.amazon.com/sagemaker/pricing" in table.source
    cost, basis = job_cost(table, "us-east-1", "ml.g5.xlarge", 2, 1800, billed=True)
    assert cost == pytest.approx(1.408)  # half an hour on two instances at $1.408/h
    assert basis.startswith("billable seconds x 2 x $1.408/h ml.g5.xlarge us-east-1")
    cost, basis = job_cost(table, "eu-west-1", "ml.g5.xlarge", 1, 60, billed=True)
    assert cost is None and "no price for ml.g5.xlarge in eu-west-1" in basis
    cost, basis = job_cost(table, "us-east-1", "ml.g5.xlarge", 1, 60, billed=False)
    assert "estimate" in basis


def test_the_figure_prices_a_run_as_its_row_does():
    """The cost-against-loss curve is :func:`job_cost` at each point, like the row's cost: a
    billed run's billable share of its time (spot savings) throughout, nothing without a price."""
    from spectrum_sm.comparison.render import _cost_curve

    table = load_prices()
    run = Run(
        Method("full"),
        region="us-east-1",
        instance_type="ml.g5.xlarge",
        instance_count=2,
        job_seconds=400,
        billable_seconds=360,
        billed=True,
    )
    run.cost_usd, _ = job_cost(table, run.region, run.instance_type, 2, 360, billed=True)
    assert run.cost_usd == pytest.approx(360 * 2 * 1.408 / 3600)
    curve = _cost_curve(run, [0.0, 200.0, 400.0], table)
    assert curve == [0.0, pytest.approx(run.cost_usd / 2), run.cost_usd]  # its end: its row
    unpriced = Run(Method("full"), region="eu-west-1", instance_type="ml.g5.xlarge")
    assert _cost_curve(unpriced, [0.0, 60.0], table) is None


def test_the_lines_train_py_writes_are_the_lines_compare_reads(tmp_path):
    """One grammar: the metric lines of :mod:`spectrum_sm.training.metrics`, as train.py logs
    them, are what compare reads from a log without TensorBoard files."""
    from spectrum_sm.comparison.collection import STEP_LINE, _log_points
    from spectrum_sm.training import metrics

    assert STEP_LINE is metrics.STEP_LINE
    log = tmp_path / "job-1" / "output" / "job.log"
    log.parent.mkdir(parents=True)
    stamp = "2026-12-07 05:40:10,123 INFO "  # train.py's logging format
    lines = [
        metrics.train_line(1, 2.5, 1e-3, 0.75, 1234.5, 1.25),
        metrics.train_line(2, 0.5, 2.5e-4, 1e-8, 1200.0, 1.25),
        metrics.eval_line(2, 1.875),
    ]
    log.write_text("loading the model\n" + "".join(f"{stamp}{line}\n" for line in lines))
    from spectrum_sm.aws.local import LocalJob

    points = _log_points(LocalJob(tmp_path / "job-1"))
    assert points == [
        (None, 1, "train", 2.5),
        (None, 2, "train", 0.5),
        (None, 2, "eval", 1.875),
    ]


def test_a_price_file_overrides_the_table(tmp_path):
    flat = tmp_path / "flat.yaml"
    flat.write_text("ml.g5.xlarge: 1.0\n")
    assert load_prices(flat).hourly("ap-south-1", "ml.g5.xlarge") == 1.0  # any region
    regional = tmp_path / "regional.json"
    regional.write_text(
        json.dumps({"as_of": "2026-11-01", "regions": {"eu-west-1": {"ml.g5.xlarge": 1.6}}})
    )
    table = load_prices(regional)
    assert table.hourly("eu-west-1", "ml.g5.xlarge") == 1.6
    assert table.hourly("us-east-1", "ml.g5.xlarge") == 1.408  # the rest of the table stays
    assert table.as_of == "2026-11-01"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("- 1\n", "expected a mapping"),
        ("ml.g5.xlarge: -1\n", "must be a number >= 0"),
        ("ml.g5.xlarge: cheap\n", "must be a number >= 0"),
        ("g5.xlarge: 1\n", "expected ml.<type>"),
        ("regions: 3\n", "regions must map"),
        ("a: [\n", "not valid JSON or YAML"),
    ],
)
def test_bad_price_files_are_refused(tmp_path, text, message):
    path = tmp_path / "prices.yaml"
    path.write_text(text)
    with pytest.raises(SpectrumError, match=re_escape(message)):
        load_prices(path)
    with pytest.raises(SpectrumError, match="does not exist"):
        load_prices(tmp_path / "none.yaml")


def re_escape(text: str) -> str:
    import re

    return re.escape(text)


def _row(method, percent, **values):
    row = dict.fromkeys(
        [
            "trainable_params",
            "all_params",
            "final_eval_loss",
            "train_seconds",
            "job_seconds",
            "billable_seconds",
            "peak_memory_bytes",
            "tokens_per_sec",
            "cost_usd",
        ]
    )
    row.update({"method": method, "top_percent": percent, "cost_basis": "", "status": "completed"})
    row.update(values)
    return row


def test_the_table_renders_as_text_markdown_and_csv():
    rows = [
        _row(
            "spectrum",
            30,
            trainable_params=300,
            all_params=1000,
            final_eval_loss=1.23456,
            peak_memory_bytes=3 * 1024**3,
            cost_usd=0.5,
            cost_basis="billable seconds x 1 x $1.408/h ml.g5.xlarge us-east-1 (x)",
        ),
        _row("qlora", None, status="skipped", reason="QLoRA needs a CUDA GPU"),
    ]
    table = load_prices()
    text = render_table(rows, "text", table)
    assert "spectrum:30" in text and "300 (30.0%)" in text and "1.2346" in text and "3.00" in text
    assert "qlora skipped: QLoRA needs a CUDA GPU" in text
    assert f"prices as of {AS_OF}" in text
    markdown = render_table(rows, "markdown", table)
    assert markdown.splitlines()[0].startswith("| method | trainable params | final eval loss")
    assert markdown.count("\n|") == 3  # separator and two rows
    parsed = list(csv.DictReader(io.StringIO(render_table(rows, "csv", table))))
    assert [r["method"] for r in parsed] == ["spectrum", "qlora"]
    assert parsed[0]["final_eval_loss"] == "1.23456" and parsed[1]["reason"]
    with pytest.raises(SpectrumError, match="text, markdown or csv"):
        render_table(rows, "html", table)
    twin = _row("spectrum", 50, trainable_params=300, all_params=1000)
    assert "spectrum:30 and spectrum:50 trained the same 300 parameters" in render_table(
        [*rows, twin], "text", table
    )


# --- planning ------------------------------------------------------------------------------


def test_the_common_recipe_has_held_out_rows_and_a_validation_curve():
    config = load_pipeline(EXAMPLES / "qwen3-8b.yaml").training
    import dataclasses

    held = _common_recipe(dataclasses.replace(config, validation_data=""))
    assert held.hyperparameters["validation_share"] == 0.05  # no validation data: held out
    steps = dataclasses.replace(config, hyperparameters={"max_steps": 80}, tensorboard=False)
    recipe = _common_recipe(steps)
    assert recipe.hyperparameters == {"max_steps": 80, "eval_steps": 10} and recipe.tensorboard
    mine = dataclasses.replace(config, hyperparameters={"max_steps": 80, "eval_steps": 5})
    assert _common_recipe(mine).hyperparameters["eval_steps"] == 5


def test_qlora_needs_a_gpu_where_it_runs(tmp_path):
    from spectrum_sm.aws.jobs import SageMaker
    from spectrum_sm.aws.local import Local

    assert qlora_problem("ml.g5.xlarge") is None  # SageMaker unless told otherwise
    assert qlora_problem("ml.p4d.24xlarge", SageMaker()) is None
    assert "has none" in qlora_problem("ml.m5.xlarge")
    assert "has none" in qlora_problem("ml.trn1.2xlarge")
    import torch

    if not torch.cuda.is_available():  # this machine's, whatever the instance type says
        assert "CUDA" in qlora_problem("ml.g5.xlarge", Local(tmp_path))


def _toy_overrides(tmp_path: Path, bucket: str = "", *, role: bool = False) -> list[str]:
    """A tiny model and chat data under ``tmp_path``, as --set overrides of compare-tiny.yaml
    (plus a bucket for output_s3 and a role for SageMaker requests, when asked)."""
    from spectrum_sm.toy import make_toy_training_setup

    paths = make_toy_training_setup(tmp_path / "toy", layers=2, rows=8)
    return [
        *([f"common.role={ROLE}"] if role else []),
        *([f"common.output_s3=s3://{bucket}/cmp"] if bucket else []),
        f"analysis.model={paths['model']}",
        f"training.model={paths['model']}",
        f"training.train_data={paths['train']}",
        f"training.validation_data={paths['validation']}",
    ]


def test_dry_run_builds_one_validated_request_per_method_and_uploads_nothing(
    moto_server, s3_bucket, tmp_path
):
    from spectrum_sm.aws.requests import validate_request

    proc = run_cli(
        "compare",
        str(EXAMPLES / "compare-tiny.yaml"),
        "--methods",
        "spectrum:25,spectrum:50,lora,full,qlora",
        "--dry-run",
        "--set",
        f"common.role={ROLE}",
        "--set",
        f"common.output_s3=s3://{s3_bucket}/cmp",
        *(a for o in _toy_overrides(tmp_path) for a in ("--set", o)),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = json.loads(proc.stdout)
    assert set(printed["runs"]) == {"spectrum:25", "spectrum:50", "lora", "full", "qlora"}
    assert printed["skipped"] == {}  # QLoRA on ml.g5.xlarge: a GPU instance
    analysis = printed["analysis"]
    validate_request(analysis)
    # 50 is the analysis's own percent (its top-level layer file): only 25 needs a folder.
    assert analysis["HyperParameters"]["top_percent"] == "50"
    assert analysis["HyperParameters"]["layer_percents"] == "25"
    assert analysis["HyperParameters"]["certify_percents"] == "25"
    layer_dir = f"s3://{s3_bucket}/cmp/analysis/{analysis['TrainingJobName']}/output/model/"
    names = set()
    for label, request in printed["runs"].items():
        validate_request(request)
        names.add(request["TrainingJobName"])
        channels = {
            c["ChannelName"]: c["DataSource"]["S3DataSource"]["S3Uri"]
            for c in request["InputDataConfig"]
        }
        method = label.split(":")[0]
        assert request["HyperParameters"]["method"] == method
        assert request["TrainingJobName"].startswith(f"tiny-{label.replace(':', '-')}-")
        if label == "spectrum:25":
            assert channels["spectrum"] == layer_dir + "percent-25/"
        elif label == "spectrum:50":
            assert channels["spectrum"] == layer_dir
        else:
            assert "spectrum" not in channels
        # Same data, same recipe: only the method (and its layer file) differs.
        assert request["HyperParameters"]["eval_steps"] == "2"
        assert "TensorBoardOutputConfig" in request
    same = {
        json.dumps(
            {
                "hps": {k: v for k, v in r["HyperParameters"].items() if k != "method"},
                "data": [c for c in r["InputDataConfig"] if c["ChannelName"] in ("train", "model")],
                "resources": r["ResourceConfig"],
            },
            sort_keys=True,
        )
        for r in printed["runs"].values()
    }
    assert len(same) == 1 and len(names) == 5
    listed = boto3.client("s3").list_objects_v2(Bucket=s3_bucket)
    assert listed["KeyCount"] == 0  # nothing uploaded


def test_a_method_that_cannot_run_where_asked_is_skipped_with_its_reason():
    # One 48 GB GPU: LoRA of Qwen3-8B fits, full fine-tuning does not (the memory planner).
    overrides = ["training.instance_type=ml.g6e.2xlarge", "training.spot=false"]
    result = compare(EXAMPLES / "qwen3-8b.yaml", "lora,full", overrides=overrides, dry_run=True)
    status = {run.method.label: (run.status, run.reason) for run in result.runs}
    assert status["lora"] == ("planned", "")
    assert status["full"][0] == "skipped" and "GiB per GPU" in status["full"][1]
    # Spectrum at 30% does not fit either: no analysis, and LoRA is not pointed at the
    # checkpoint that analysis would have staged (it reads the Hub itself).
    pinned = [*overrides, "analysis.revision=" + "a" * 40]  # a known commit: staging planned
    result = compare(EXAMPLES / "qwen3-8b.yaml", "spectrum:30,lora", overrides=pinned, dry_run=True)
    spectrum, lora = result.runs
    assert spectrum.status == "skipped" and "GiB per GPU" in spectrum.reason
    assert result.analysis == {} and lora.status == "planned"
    assert "model" not in {c["ChannelName"] for c in lora.request["InputDataConfig"]}
    assert lora.request["HyperParameters"]["model_name_or_path"] == "Qwen/Qwen3-8B"
    cpu = ["training.instance_type=ml.m5.24xlarge", "training.spot=false"]
    result = compare(EXAMPLES / "qwen3-8b.yaml", "qlora", overrides=cpu, dry_run=True)
    assert result.runs[0].status == "skipped" and "ml.m5.24xlarge has none" in result.runs[0].reason


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "compare needs CONFIG"),
        (["--collect"], "expected at least one argument"),
        ([str(EXAMPLES / "qwen3-8b.yaml"), "--collect", "job-1"], "--collect takes job names"),
        ([str(EXAMPLES / "qwen3-8b.yaml"), "--methods", "lorra"], "did you mean 'lora'"),
        (
            [
                str(EXAMPLES / "qwen3-8b.yaml"),
                "--dry-run",
                "--set",
                "training.hyperparameters.validation_share=0.1",
            ],
            "with validation_data set, leave it out",
        ),
        (
            [str(EXAMPLES / "qwen3-8b.yaml"), "--method-set", "qlora.max_steps=3"],
            "max_steps is shared by every run",
        ),
    ],
)
def test_compare_errors_are_one_line(args, message):
    proc = run_cli("compare", *args)
    assert proc.returncode in (1, 2)
    assert message in proc.stderr and "Traceback" not in proc.stderr


# --- end to end, locally ---------------------------------------------------------------------


def _download(uri: str, folder: Path) -> Path:
    from spectrum_sm.aws.local import download_prefix

    download_prefix(uri, folder)
    return folder


def _report(uri: str) -> dict:
    bucket, key = uri[5:].split("/", 1)
    body = boto3.client("s3").get_object(Bucket=bucket, Key=key + "training_report.json")["Body"]
    return json.loads(body.read())


@pytest.mark.integration
def test_compare_runs_four_methods_locally_and_collect_rebuilds_it(moto_server, tmp_path):
    from spectrum_sm.core.freeze import compile_entry, read_layer_file
    from spectrum_sm.toy import make_toy_training_setup

    # The example's header command, as written, from a folder laid out like the demo's.
    make_toy_training_setup(tmp_path / "work" / "demo" / "inputs", layers=2, rows=64)
    (tmp_path / "examples").mkdir()
    shutil.copy(EXAMPLES / "compare-tiny.yaml", tmp_path / "examples")
    s3 = boto3.client("s3")
    with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou):
        s3.create_bucket(Bucket="spectrum-sm-local")
    header = (EXAMPLES / "compare-tiny.yaml").read_text().splitlines()[0].removeprefix("# ")
    command = shlex.split(header)
    assert command[:2] == ["spectrum-sm", "compare"]
    proc = run_cli("-q", *command[1:], "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    rows = {f"{r['method']}:{r['top_percent']}".replace(":None", ""): r for r in summary["runs"]}
    assert set(rows) == {"spectrum:25", "spectrum:50", "lora", "full"}

    # One analysis for both percents, its layer files in one folder each.
    jobs = tmp_path / "spectrum-sm-jobs"
    assert len(list(jobs.glob("tiny-analysis-*"))) == 1
    layer_dir = summary["analysis"]["layer_dir"]
    base = model_tensors(tmp_path / "work" / "demo" / "inputs" / "model")
    model_size = sum(t.numel() for t in base.values())
    tokens_seen = set()
    for label, row in rows.items():
        assert row["status"] == "completed"
        # Every field the issue names, equal to what the run itself reported.
        report = _report(row["model_s3"])
        for key in ("trainable_params", "final_eval_loss", "tokens_per_sec", "peak_memory_bytes"):
            assert row[key] == report[key], (label, key)
        assert row["train_seconds"] == report["seconds"]
        assert row["cost_usd"] == pytest.approx(row["job_seconds"] * 1.408 / 3600, abs=1e-6)
        assert "estimate" in row["cost_basis"] and row["billable_seconds"] is None
        assert report["steps"] == 8
        tokens_seen.add(report["tokens_seen"])
        trained = _download(row["model_s3"], tmp_path / "models" / label.replace(":", "-"))
        assert Path(row["model_dir"]).is_dir()
        changed = changed_tensors(tmp_path / "work" / "demo" / "inputs" / "model", trained)
        if label.startswith("spectrum"):
            uri = layer_dir if label == "spectrum:50" else f"{layer_dir}percent-25/"
            folder = _download(uri, tmp_path / "layers" / label[9:])
            patterns = [compile_entry(e) for e in read_layer_file(folder)]
            selected = {n for n in base if any(p.match(n) for p in patterns)}
            assert changed == selected, label  # only its own layers trained
            assert report["trainable_params"] == sum(base[n].numel() for n in selected)
        elif label == "full":
            assert report["trainable_params"] == report["all_params"] == model_size
            assert changed == set(base)
        else:  # LoRA, merged: only the adapted linear weights moved
            assert changed and all(n.endswith("proj.weight") for n in changed)
    assert len(tokens_seen) == 1  # same data, order, steps and batch: the same tokens
    assert rows["spectrum:25"]["trainable_params"] < rows["spectrum:50"]["trainable_params"]
    # The README's reading of its table: at one budget and learning rate, more trained weights,
    # lower validation loss.
    losses = [rows[m]["final_eval_loss"] for m in ("full", "spectrum:50", "spectrum:25")]
    assert losses == sorted(losses)

    # The table and the figure, locally and next to the outputs in S3.
    table, figure = Path(summary["table"]), Path(summary["figure"])
    assert table.read_text().count("| completed |") == 4
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(summary["csv"]) as handle:
        assert len(list(csv.DictReader(handle))) == 4
    details = json.loads((table.parent / "comparison.json").read_text())
    for label in rows:
        assert details["curve_sources"][label] == "tensorboard"
        assert [p[1] for p in details["curves"][label]["eval"]] == [2, 4, 6, 8]
        assert details["curves"][label]["eval"][-1][2] == pytest.approx(
            rows[label]["final_eval_loss"], rel=1e-6
        )
    bucket, prefix = summary["s3"][5:].split("/", 1)
    copied = {o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]}
    assert {k.rsplit("/", 1)[1] for k in copied} >= {"comparison.png", "comparison.md"}

    # --collect rebuilds the same rows from the finished jobs alone.
    names = [row["job"] for row in summary["runs"]]
    proc = run_cli(
        "-q",
        "compare",
        "--local",
        "--collect",
        *names,
        "--output-dir",
        str(tmp_path / "collected"),
        "--json",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = json.loads(proc.stdout.strip().splitlines()[-1])
    assert again["runs"] == summary["runs"]
    assert Path(again["figure"]).parent == tmp_path / "collected"


@pytest.mark.integration
def test_collect_reads_sagemaker_jobs_billable_time_and_tensorboard(
    moto_server, s3_bucket, tmp_path
):
    """The SageMaker side against moto: jobs sent in parallel, then collected from what the
    service leaves (the model folder's report, TensorBoard files, the job's description)."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.sagemaker.models import sagemaker_backends
    from torch.utils.tensorboard import SummaryWriter

    from spectrum_sm.aws.local import upload_folder
    from spectrum_sm.comparison import collect

    overrides = _toy_overrides(tmp_path, s3_bucket, role=True)
    result = compare(
        EXAMPLES / "compare-tiny.yaml", "spectrum:25,full", overrides=overrides, wait=False
    )
    assert [run.status for run in result.runs] == ["submitted", "submitted"]
    backend = sagemaker_backends[DEFAULT_ACCOUNT_ID]["us-east-1"]
    for number, run in enumerate(result.runs):
        job = backend.training_jobs[run.job]
        job.billable_time_in_seconds, job.training_time_in_seconds = 360 + number, 400
        output = f"s3://{s3_bucket}/cmp/training/{run.job}/output/model/"
        report = {"trainable_params": 10 + number, "final_eval_loss": 1.5, "seconds": 300.0}
        folder = tmp_path / run.job
        folder.mkdir()
        (folder / "training_report.json").write_text(json.dumps(report))
        upload_folder(folder, output)
        if run.method.name == "spectrum":  # TensorBoard files, as the tracker writes them
            events = tmp_path / "tb" / run.job
            with SummaryWriter(str(events)) as writer:
                for step, loss in ((2, 2.0), (4, 1.5)):
                    writer.add_scalar("eval/loss", loss, step)
            upload_folder(events, run.request["TensorBoardOutputConfig"]["S3OutputPath"])
        else:  # no TensorBoard (an image without it): the metric lines in CloudWatch
            _put_log_lines(run.job, ["step=2 eval_loss=2.500000", "step=4 train_loss=1.000000"])
    collected = collect([run.job for run in result.runs], output_dir=tmp_path / "out")
    spectrum, full = collected.runs
    assert (spectrum.method, full.method) == (Method("spectrum", 25), Method("full"))
    assert spectrum.billed and spectrum.billable_seconds == 360
    assert spectrum.cost_usd == pytest.approx(360 * 1.408 / 3600)
    assert "billable seconds x 1 x $1.408/h" in spectrum.cost_basis
    assert spectrum.curve_source == "tensorboard"
    assert [p[1:] for p in spectrum.curves["eval"]] == [[2, 2.0], [4, 1.5]]
    assert full.row()["trainable_params"] == 11
    assert full.curve_source == "log lines"
    assert full.curves["eval"] == [[60.0, 2, 2.5]] and full.curves["train"] == [[120.0, 4, 1.0]]
    assert (tmp_path / "out" / "comparison.png").is_file()


def _put_log_lines(job: str, lines: list[str]) -> None:
    """A job's log stream as SageMaker writes it, one line a minute after the job started."""
    from spectrum_sm.aws.jobs import LOG_GROUP, TrainingJob

    logs = boto3.client("logs")
    with contextlib.suppress(logs.exceptions.ResourceAlreadyExistsException):
        logs.create_log_group(logGroupName=LOG_GROUP)
    stream = f"{job}/algo-1-1700000000"
    logs.create_log_stream(logGroupName=LOG_GROUP, logStreamName=stream)
    started = TrainingJob(job).describe()["TrainingStartTime"].timestamp()
    events = [
        {"timestamp": int((started + 60 * (i + 1)) * 1000), "message": line}
        for i, line in enumerate(lines)
    ]
    logs.put_log_events(logGroupName=LOG_GROUP, logStreamName=stream, logEvents=events)


def test_a_method_can_have_its_own_learning_rate_but_never_its_own_budget():
    from spectrum_sm.comparison import parse_method_settings

    methods = parse_methods("spectrum:25,spectrum:50,lora,full")
    chosen = parse_method_settings(
        ["lora.learning_rate=2e-4", "spectrum.weight_decay=0.01", "spectrum:50.max_grad_norm=0.5"],
        methods,
    )
    assert chosen[Method("lora")] == {"learning_rate": 2e-4}
    assert chosen[Method("spectrum", 25)] == {"weight_decay": 0.01}
    assert chosen[Method("spectrum", 50)] == {"weight_decay": 0.01, "max_grad_norm": 0.5}
    assert chosen[Method("full")] == {}
    for setting, message in (
        ("lora.max_steps=5", "max_steps is shared by every run"),
        ("lora.seed=1", "seed is shared by every run"),
        ("qlora.learning_rate=1", "'qlora' is none of the compared methods"),
        ("lora=1", "METHOD.KEY=VALUE"),
    ):
        with pytest.raises(SpectrumError, match=re_escape(message)):
            parse_method_settings([setting], methods)


def test_per_method_settings_reach_only_their_requests_and_are_checked_by_train_py(tmp_path):

    overrides = _toy_overrides(tmp_path, role=True)
    result = compare(
        EXAMPLES / "compare-tiny.yaml",
        "spectrum:50,lora",
        overrides=overrides,
        method_settings=["lora.learning_rate=2e-4"],
        dry_run=True,
    )
    rates = {
        run.method.label: run.request["HyperParameters"]["learning_rate"] for run in result.runs
    }
    assert rates == {"spectrum:50": "0.001", "lora": "0.0002"}
    assert [run.learning_rate for run in result.runs] == [1e-3, 2e-4]
    with pytest.raises(SpectrumError, match="did you mean 'learning_rate'"):
        compare(
            EXAMPLES / "compare-tiny.yaml",
            "lora",
            overrides=overrides,
            method_settings=["lora.learning_rat=2e-4"],
            dry_run=True,
        )


def test_a_comparison_at_the_analysis_percent_alone_reuses_a_plain_analysis(
    moto_server, s3_bucket, tmp_path
):
    """Same model bytes and scan settings: the pipeline's analysis key, so no second scan."""
    from spectrum_sm.aws.pipeline import analysis_key, model_fingerprint

    overrides = _toy_overrides(tmp_path, s3_bucket)
    config = load_pipeline(EXAMPLES / "compare-tiny.yaml", overrides)
    result = compare(config, "spectrum:50,lora", local=True, dry_run=True)
    request = result.analysis["request"]
    assert "layer_percents" not in request["HyperParameters"]
    key = analysis_key(config.analysis, model_fingerprint(config.analysis.model))
    assert request["HyperParameters"]["reuse_key"] == key
    channels = {c["ChannelName"]: c for c in result.runs[0].request["InputDataConfig"]}
    assert (
        channels["spectrum"]["DataSource"]["S3DataSource"]["S3Uri"] == result.analysis["layer_dir"]
    )


@pytest.mark.integration
def test_sagemaker_jobs_are_sent_together_and_followed_until_each_ends(
    moto_server, s3_bucket, tmp_path, monkeypatch
):
    """All jobs are submitted before any is waited for; one that fails is reported with its
    reason while the others complete."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.sagemaker.models import sagemaker_backends

    from spectrum_sm.aws.jobs import SageMaker, TrainingJob
    from spectrum_sm.comparison.run import _run_all

    overrides = _toy_overrides(tmp_path, s3_bucket, role=True)
    runs = compare(
        EXAMPLES / "compare-tiny.yaml", "lora,full", overrides=overrides, dry_run=True
    ).runs
    backend = sagemaker_backends[DEFAULT_ACCOUNT_ID]["us-east-1"].training_jobs
    described: list[str] = []
    real = TrainingJob.describe

    def describe(self):
        # Each job is "InProgress" when first asked; then "full" fails, "lora" completes.
        assert set(backend) >= {run.job for run in runs}  # every job sent before any wait
        first = self.name not in described
        described.append(self.name)
        job = backend[self.name]
        if first:
            job.training_job_status = "InProgress"
        else:
            failed = "-full-" in self.name
            job.training_job_status = "Failed" if failed else "Completed"
            job.failure_reason = "CUDA out of memory" if failed else None
        return real(self)

    monkeypatch.setattr(TrainingJob, "describe", describe)
    _run_all(runs, SageMaker(), wait=True, poll_s=0.01)
    lora, full = runs
    assert lora.status == "completed" and lora.model_s3.endswith(f"/{lora.job}/output/model/")
    assert full.status == "failed" and full.reason == "Failed: CUDA out of memory"
    assert described.count(lora.job) >= 2 and described.count(full.job) >= 2


def test_collect_marks_a_run_whose_outputs_are_gone_and_shows_the_rest(
    moto_server, s3_bucket, tmp_path
):
    from spectrum_sm.comparison import collect

    overrides = _toy_overrides(tmp_path, s3_bucket)
    result = compare(
        EXAMPLES / "compare-tiny.yaml", "full", overrides=overrides, local=True, dry_run=True
    )
    request = result.runs[0].request
    folder = tmp_path / "jobs" / request["TrainingJobName"]
    folder.mkdir(parents=True)
    (folder / "job.json").write_text(json.dumps(request))
    (folder / "description.json").write_text(json.dumps({"TrainingJobStatus": "Completed"}))
    collected = collect(
        [request["TrainingJobName"]],
        local=True,
        workdir=tmp_path / "jobs",
        output_dir=tmp_path / "o",
    )
    run = collected.runs[0]
    assert run.method == Method("full") and run.status == "failed"
    assert "cannot collect its results" in run.reason and "training_report.json" in run.reason
    assert (tmp_path / "o" / "comparison.md").read_text().count("| failed |") == 1
    with pytest.raises(SpectrumError, match="no local job nope"):
        collect(["nope"], local=True, workdir=tmp_path / "jobs")


def test_a_method_may_run_on_its_own_instance_with_the_same_global_batch():
    """QLoRA's case is fewer resources: a smaller instance, the same tokens per step."""
    overrides = ["training.spot=false"]  # p4d: 8 GPUs, batch 2, accumulation 4
    result = compare(
        EXAMPLES / "qwen3-8b.yaml",
        "spectrum:30,qlora",
        overrides=overrides,
        method_settings=["qlora.instance_type=ml.g6e.2xlarge"],
        dry_run=True,
    )
    spectrum, qlora = (run.request for run in result.runs)
    assert spectrum["ResourceConfig"]["InstanceType"] == "ml.p4d.24xlarge"
    assert qlora["ResourceConfig"]["InstanceType"] == "ml.g6e.2xlarge"
    assert spectrum["HyperParameters"]["gradient_accumulation_steps"] == "4"
    assert qlora["HyperParameters"]["gradient_accumulation_steps"] == "32"  # 8 x 4 / 1
    assert [run.row()["instance_type"] for run in result.runs] == [
        "ml.p4d.24xlarge",
        "ml.g6e.2xlarge",
    ]
    with pytest.raises(SpectrumError, match="cannot be split over 8"):
        compare(  # 4 GPUs x accumulation 1 cannot become 8 GPUs
            EXAMPLES / "qwen3-8b.yaml",
            "spectrum:30,qlora",
            overrides=[
                *overrides,
                "training.instance_type=ml.g5.12xlarge",
                "training.hyperparameters.gradient_accumulation_steps=1",
            ],
            method_settings=["qlora.instance_type=ml.p4d.24xlarge"],
            dry_run=True,
        )
    for setting, message in (
        ("qlora.instance_count=abc", "instance_count must be int"),
        ("qlora.train_data=s3://b/other/", "train_data is shared by every run"),
        ("qlora.instance_type=ml.nope", "not a SageMaker training instance type"),
    ):
        with pytest.raises(SpectrumError, match=re_escape(message)):
            compare(
                EXAMPLES / "qwen3-8b.yaml",
                "spectrum:30,qlora",
                overrides=overrides,
                method_settings=[setting],
                dry_run=True,
            )


def test_an_analysis_is_reused_only_with_a_layer_file_for_every_percent(moto_server, s3_bucket):
    import dataclasses

    from spectrum_sm.aws.config import AnalysisConfig
    from spectrum_sm.aws.pipeline import find_reusable_analysis, record_analysis

    config = AnalysisConfig(
        model="s3://x/model/", output_s3=f"s3://{s3_bucket}/r", layer_percents=[25]
    )
    layer_dir = f"s3://{s3_bucket}/r/analysis/job-1/output/model/"
    record_analysis(config, "k1", "job-1", layer_dir)
    s3 = boto3.client("s3")
    prefix = "r/analysis/job-1/output/model/"
    s3.put_object(Bucket=s3_bucket, Key=prefix + "snr_results_m_unfrozenparameters_50percent.yaml")
    assert find_reusable_analysis(config, "k1") is None  # percent-25/ is missing
    key = prefix + "percent-25/snr_results_m_unfrozenparameters_25percent.yaml"
    s3.put_object(Bucket=s3_bucket, Key=key)
    assert find_reusable_analysis(config, "k1")["job"] == "job-1"
    plain = dataclasses.replace(config, layer_percents=[])
    s3.delete_object(
        Bucket=s3_bucket, Key=prefix + "snr_results_m_unfrozenparameters_50percent.yaml"
    )
    assert find_reusable_analysis(plain, "k1") is None  # its own top-level file is gone
