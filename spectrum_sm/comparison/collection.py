"""What finished jobs left: each run's report, job description, cost and loss curves (from
TensorBoard files in S3, else the metric lines of its log: :mod:`spectrum_sm.training.metrics`),
all read through the job's handle (:class:`~spectrum_sm.aws.jobs.JobHandle`), wherever it ran."""

from __future__ import annotations

import datetime as dt
import json
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..aws.jobs import JobHandle, Launcher
from ..aws.s3 import download_prefix, read_object
from ..core.errors import SpectrumError
from ..core.selection import percent_in_path
from ..prices import PriceTable, job_cost, load_prices
from ..training.metrics import STEP_LINE
from .methods import METHODS, Method, Run
from .render import Comparison, write_outputs

log = logging.getLogger(__name__)


def collect(
    jobs: Sequence[str],
    *,
    local: bool = False,
    workdir: str | Path = "spectrum-sm-jobs",
    output_dir: str | Path | None = None,
    prices: str | Path | PriceTable | None = None,
    region: str = "",
    launcher: Launcher | None = None,
) -> Comparison:
    """The comparison of finished training jobs, by name: each job's method and percent come
    from its own request, its numbers from its report, curves and description. The jobs ran
    here (``local``, in folders under ``workdir``) or on SageMaker; ``launcher``
    (:func:`~spectrum_sm.aws.pipeline.launcher_for`) stands for both."""
    from ..aws.pipeline import launcher_for

    if not jobs:
        raise SpectrumError("--collect needs at least one training job name")
    launcher = launcher_for(local, workdir, launcher)
    table = prices if isinstance(prices, PriceTable) else load_prices(prices)
    runs = [_describe_run(launcher.attach(name), region=region) for name in jobs]
    _collect_all(runs, table, launcher)
    result = Comparison(runs, table)
    stamp = dt.datetime.now().strftime("%Y%m%d%H%M%S")
    write_outputs(result, Path(output_dir) if output_dir else Path("spectrum-sm-compare") / stamp)
    return result


def _collect_all(runs: list[Run], table: PriceTable, launcher: Launcher) -> None:
    """Collect every completed run; one that cannot be read is marked failed, the others go on."""
    for run in runs:
        if run.status != "completed":
            continue
        try:
            _collect_run(run, table, launcher.attach(run.job))
        except SpectrumError as exc:
            run.status, run.reason = "failed", f"cannot collect its results: {exc}"
            log.error("%s: %s", run.method.label, run.reason)


def _describe_run(job: JobHandle, *, region: str) -> Run:
    """A Run for an existing job, from the request and status its description echoes."""
    request = description = job.describe()
    status = description["TrainingJobStatus"]
    method_name = request.get("HyperParameters", {}).get("method", "")
    if method_name not in METHODS:
        raise SpectrumError(
            f"job {job.name} is not a spectrum-sm training job (method {method_name!r})"
        )
    percent = None
    if method_name == "spectrum":
        channels = {c["ChannelName"]: c for c in request.get("InputDataConfig", [])}
        uri = channels.get("spectrum", {}).get("DataSource", {}).get("S3DataSource", {})
        percent = percent_in_path(uri.get("S3Uri", ""))
    resources = request.get("ResourceConfig", {})
    run = Run(
        Method(method_name, percent),
        job=job.name,
        region=region or job.region or "us-east-1",
        instance_type=resources.get("InstanceType", ""),
        instance_count=int(resources.get("InstanceCount", 1)),
        request=request,
        description=description,
    )
    if status == "Completed":
        run.status, run.model_s3 = "completed", job.outputs["model"]
    elif status in ("Failed", "Stopped"):
        run.status = "failed"
        run.reason = f"{status}: {description.get('FailureReason', 'no reason given')}"
    else:
        run.status, run.reason = "submitted", f"still {status}"
    return run


def _collect_run(run: Run, table: PriceTable, job: JobHandle) -> None:
    """Fill a completed run's numbers from its report, description, curves; price it: billed
    jobs by their billable seconds, the others (local) by wall seconds, as an estimate."""
    uri = run.model_s3 + "training_report.json"
    try:
        run.report = json.loads(read_object(uri))
    except ValueError as exc:
        raise SpectrumError(f"{uri}: not valid JSON ({exc})") from exc
    description = run.description or job.describe()
    run.model_dir, run.billed = job.model_dir, job.billed
    # A local run records its wall time to the millisecond; SageMaker whole seconds.
    run.job_seconds = description.get(
        "TrainingWallSeconds", description.get("TrainingTimeInSeconds")
    )
    run.billable_seconds = description.get("BillableTimeInSeconds") if job.billed else None
    if run.method.name == "spectrum" and run.method.percent is None:
        run.method = Method("spectrum", percent_in_path(str(run.report.get("layer_file") or "")))
    seconds = run.billable_seconds if job.billed else run.job_seconds
    run.cost_usd, run.cost_basis = job_cost(
        table, run.region, run.instance_type, run.instance_count, seconds, billed=run.billed
    )
    run.curves, run.curve_source = _curves(run, _epoch(description.get("TrainingStartTime")), job)


def _epoch(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        return value.timestamp()
    return dt.datetime.fromisoformat(str(value)).timestamp()


def _curves(
    run: Run, started: float | None, job: JobHandle
) -> tuple[dict[str, list[list[float]]], str]:
    """``{"train": [[seconds, step, loss]...], "eval": [...]}``, seconds since the job started:
    from its TensorBoard files in S3, else from the metric lines of its log."""
    tensorboard = (run.request or {}).get("TensorBoardOutputConfig", {}).get("S3OutputPath")
    points = _tensorboard_points(tensorboard) if tensorboard else None
    source = "tensorboard"
    if not points:
        points, source = _log_points(job), "log lines"
    curves: dict[str, list[list[float]]] = {"train": [], "eval": []}
    timed = started is not None and all(p[0] is not None for p in points)
    if not timed:  # no time stamps: the run's training seconds spread over its steps
        source += " (time by step)"
    total_steps = max((p[1] for p in points), default=0) or 1
    train_seconds = float(run.report.get("seconds") or 0)
    for wall, step, kind, loss in sorted(points, key=lambda p: (p[2], p[1], p[0] or 0)):
        seconds = wall - started if timed else step / total_steps * train_seconds
        curves[kind].append([round(seconds, 3), step, loss])
    return curves, source


def _tensorboard_points(uri: str) -> list[tuple[float | None, int, str, float]] | None:
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        log.warning("tensorboard is not installed: loss curves from the logs instead")
        return None
    with tempfile.TemporaryDirectory(prefix="spectrum-tb-") as tmp:
        try:
            download_prefix(uri, Path(tmp))
        except SpectrumError:
            return None
        points = []
        for folder in sorted({p.parent for p in Path(tmp).rglob("events.out.tfevents*")}):
            events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
            events.Reload()
            tags = events.Tags().get("scalars", [])
            for tag, kind in (("train/loss", "train"), ("eval/loss", "eval")):
                if tag in tags:
                    points += [(e.wall_time, e.step, kind, e.value) for e in events.Scalars(tag)]
    return points


def _log_points(job: JobHandle) -> list[tuple[float | None, int, str, float]]:
    """The ``step=N train_loss=X`` / ``eval_loss=X`` lines train.py writes (:data:`STEP_LINE`),
    from the job's log events, each with its time in seconds where the log has one (CloudWatch
    does; a local job's log file does not)."""
    try:
        events = job.log_events(from_start=True)
    except Exception as exc:
        log.warning("cannot read the logs of %s: %s", job.name, exc)
        return []
    points = []
    for event in events:
        stamp = event.get("timestamp")
        wall = None if stamp is None else stamp / 1000
        for match in STEP_LINE.finditer(event["message"]):
            kind = "train" if match.group(2) == "train_loss" else "eval"
            points.append((wall, int(match.group(1)), kind, float(match.group(3))))
    return points
