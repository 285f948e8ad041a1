"""Spectrum at several percents against LoRA, QLoRA and full fine-tuning, on the same data.

:func:`compare` runs one training job per method with everything else equal (data, validation
set, sequence length, steps, batch, seed, instance), after one shared analysis that writes a
layer file per Spectrum percent from a single scan. Jobs run in parallel on SageMaker and one
after another locally. Each finished run is then *collected* from what the job itself left:
``training_report.json`` next to the model (trainable parameters, final validation loss,
tokens/s, peak memory), its TensorBoard files in S3 (loss curves; the metric lines of its log
when there are none) and the job's description (wall and billable seconds). Cost is billable
seconds x the instance's price from :mod:`spectrum_sm.prices`.

:func:`collect` rebuilds the same table and figure later from finished jobs' names.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import io
import json
import logging
import re
import subprocess
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .aws.config import (
    PipelineConfig,
    TrainingConfig,
    has_cuda,
    load_pipeline,
    training_instance_types,
)
from .core.errors import SpectrumError
from .core.selection import check_percent, format_percent, layer_folder, percent_in_path
from .core.yamlio import load_yaml
from .prices import PriceTable, job_cost, load_prices

log = logging.getLogger(__name__)

METHODS = ("spectrum", "lora", "qlora", "full")
DEFAULT_METHODS = "spectrum,qlora"  # Spectrum at the analysis's top_percent
#: Validation points per run when the config sets no ``eval_steps``: enough for a curve.
EVALS_PER_RUN = 8
STEP_LINE = re.compile(r"step=(\d+) (train_loss|eval_loss)=([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?\d+)?)")
#: What makes the runs comparable: a per-method setting may not change these.
SHARED_BUDGET = (
    "max_steps",
    "num_train_epochs",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "max_seq_length",
    "packing",
    "seed",
    "eval_steps",
    "per_device_eval_batch_size",
    "train_split",
    "validation_split",
    "validation_share",
)
#: Job settings one method may have on its own (QLoRA on a smaller GPU). A different process
#: count keeps the global batch: gradient accumulation is scaled to match.
INSTANCE_SETTINGS = (
    "instance_type",
    "instance_count",
    "processes_per_host",
    "distribution",
    "spot",
    "max_wait_s",
    "volume_size_gb",
    "max_runtime_s",
    "force",
)
#: Held out of the training rows when the config names no validation data.
VALIDATION_SHARE = 0.05


@dataclass(frozen=True)
class Method:
    """One arm of a comparison: ``spectrum`` at a percent, ``lora``, ``qlora`` or ``full``."""

    name: str
    percent: float | None = None

    @property
    def label(self) -> str:
        return self.name if self.percent is None else f"{self.name}:{format_percent(self.percent)}"

    @property
    def slug(self) -> str:
        """For job names (letters, digits, hyphens): ``spectrum-12p5``."""
        return self.label.replace(":", "-").replace(".", "p")


def parse_methods(spec: str | Iterable[str], default_percent: float | None = None) -> list[Method]:
    """``"spectrum:10,spectrum:30,lora,qlora,full"`` -> methods. ``spectrum`` alone takes
    ``default_percent`` (the analysis's ``top_percent``)."""
    items = [spec] if isinstance(spec, str) else list(spec)
    parts = [p.strip() for item in items for p in str(item).split(",") if p.strip()]
    if not parts:
        raise SpectrumError("--methods names no method; e.g. spectrum:30,lora,full")
    methods: list[Method] = []
    for part in parts:
        name, sep, percent = part.partition(":")
        name = name.strip().lower()
        if name not in METHODS:
            import difflib

            close = difflib.get_close_matches(name, METHODS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise SpectrumError(
                f"--methods: unknown method {name!r}{hint}; methods: spectrum:P, lora, qlora, full"
            )
        if name != "spectrum" and sep:
            raise SpectrumError(f"--methods: {part!r}: only spectrum takes a percent")
        if name == "spectrum":
            if sep:
                try:
                    value = check_percent(percent.strip())
                except SpectrumError as exc:
                    raise SpectrumError(f"--methods: {part!r}: {exc}") from None
            elif default_percent is not None:
                value = check_percent(default_percent)
            else:
                raise SpectrumError("--methods: spectrum needs a percent, e.g. spectrum:30")
            method = Method(name, value)
        else:
            method = Method(name)
        if method in methods:
            raise SpectrumError(f"--methods: {method.label} is named twice")
        methods.append(method)
    return methods


def parse_method_settings(
    settings: Sequence[str], methods: Sequence[Method]
) -> dict[Method, dict[str, Any]]:
    """``["lora.learning_rate=2e-4", "qlora.instance_type=ml.g5.2xlarge"]`` -> settings per
    method (``spectrum`` alone means every Spectrum percent): train.py hyperparameters, or the
    job's instance (:data:`INSTANCE_SETTINGS`). Settings that would change the shared budget
    (steps, batch, sequence length, seed, evaluation) or the data are refused: they would make
    the runs incomparable."""

    chosen: dict[Method, dict[str, Any]] = {m: {} for m in methods}
    for setting in settings:
        target, sep, raw = setting.partition("=")
        label, dot, key = target.rpartition(".")
        if not sep or not dot or not label or not key:
            raise SpectrumError(f"--method-set {setting!r} is not of the form METHOD.KEY=VALUE")
        matching = [m for m in methods if label in (m.label, m.name)]
        if not matching:
            raise SpectrumError(
                f"--method-set {setting!r}: {label!r} is none of the compared methods "
                f"({', '.join(m.label for m in methods)})"
            )
        if key in SHARED_BUDGET:
            raise SpectrumError(
                f"--method-set {setting!r}: {key} is shared by every run (same budget, data "
                f"and evaluation); set it with --set training.hyperparameters.{key}=..."
            )
        if key in {f.name for f in dataclasses.fields(TrainingConfig)} - set(INSTANCE_SETTINGS):
            raise SpectrumError(
                f"--method-set {setting!r}: {key} is shared by every run; per method only "
                f"train.py hyperparameters and {', '.join(INSTANCE_SETTINGS)}"
            )
        value = load_yaml(raw, f"--method-set {setting!r}: the value")
        for method in matching:
            chosen[method][key] = value
    return chosen


@dataclass
class Run:
    """One method's job and, once collected, what it measured."""

    method: Method
    status: str = "planned"  # planned | submitted | completed | failed | skipped
    reason: str = ""
    job: str = ""
    region: str = ""
    instance_type: str = ""
    instance_count: int = 1
    request: dict[str, Any] | None = None
    prepared: Any = None  # the PreparedJob (validated request and its uploads) while planned
    model_s3: str = ""
    model_dir: str = ""
    report: dict[str, Any] = field(default_factory=dict)
    description: dict[str, Any] = field(default_factory=dict)  # DescribeTrainingJob at its end
    job_seconds: float | None = None
    billable_seconds: float | None = None
    billed: bool = False
    curves: dict[str, list[list[float]]] = field(default_factory=dict)  # [seconds, step, loss]
    curve_source: str = ""
    cost_usd: float | None = None
    cost_basis: str = ""

    @property
    def learning_rate(self) -> float | None:
        """The peak learning rate the job was sent (train.py's default when not set)."""
        if not self.request:
            return None
        from .training.args import TrainArgs

        value = self.request.get("HyperParameters", {}).get("learning_rate")
        default = next(
            f.default for f in dataclasses.fields(TrainArgs) if f.name == "learning_rate"
        )
        return float(value) if value is not None else float(default)

    def row(self) -> dict[str, Any]:
        """The JSON row: the report's numbers, the job's times, the cost."""
        report = self.report
        row = {
            "method": self.method.name,
            "top_percent": self.method.percent,
            "trainable_params": report.get("trainable_params"),
            "all_params": report.get("all_params"),
            "final_eval_loss": report.get("final_eval_loss"),
            "final_train_loss": report.get("final_train_loss"),
            "train_seconds": report.get("seconds"),
            "job_seconds": self.job_seconds,
            "billable_seconds": self.billable_seconds,
            "peak_memory_bytes": report.get("peak_memory_bytes"),
            "tokens_per_sec": report.get("tokens_per_sec"),
            "learning_rate": self.learning_rate,
            "cost_usd": self.cost_usd,
            "cost_basis": self.cost_basis,
            "instance_type": self.instance_type,
            "instance_count": self.instance_count,
            "job": self.job,
            "status": self.status,
        }
        if self.model_s3:
            row["model_s3"] = self.model_s3
        if self.model_dir:
            row["model_dir"] = self.model_dir
        if self.reason:
            row["reason"] = self.reason
        return row


@dataclass
class Comparison:
    """Every run of a comparison and where its table and figure were written."""

    runs: list[Run]
    prices: PriceTable
    output_dir: Path | None = None
    analysis: dict[str, Any] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)
    s3_uri: str = ""  # the copy of the files next to the jobs' outputs

    @property
    def figure(self) -> Path | None:
        return self.files.get("figure")

    def rows(self) -> list[dict[str, Any]]:
        return [run.row() for run in self.runs]

    def summary(self) -> dict[str, Any]:
        """What ``--json`` prints as its last line."""
        return {
            "runs": self.rows(),
            "table": str(self.files.get("markdown", "")),
            "csv": str(self.files.get("csv", "")),
            "figure": str(self.files.get("figure", "")),
            "s3": self.s3_uri,
            "analysis": {k: v for k, v in self.analysis.items() if k != "request"},
            "prices": self.prices.describe(),
        }

    def table(self, fmt: str = "text") -> str:
        """The comparison as ``text`` (terminal), ``markdown`` or ``csv``."""
        return render_table(self.rows(), fmt, self.prices)

    @property
    def failed(self) -> list[Run]:
        return [run for run in self.runs if run.status == "failed"]


# --- running a comparison ----------------------------------------------------------------


def compare(
    config: PipelineConfig | str | Path,
    methods: str | Sequence[str] = DEFAULT_METHODS,
    *,
    overrides: Sequence[str] = (),
    method_settings: Sequence[str] = (),
    local: bool = False,
    dry_run: bool = False,
    workdir: str | Path = "spectrum-sm-jobs",
    output_dir: str | Path | None = None,
    prices: str | Path | PriceTable | None = None,
    wait: bool = True,
    logs: bool = True,
) -> Comparison:
    """Train each method on the same data after one shared analysis; collect and show them.

    ``config`` is a pipeline config (or its YAML path plus ``overrides``); its training section
    is the common recipe, and only ``method`` (and the layer file) differs between runs, plus
    ``method_settings`` such as ``"lora.learning_rate=2e-4"`` (never steps, batch, sequence
    length, seed or evaluation: the budget stays equal). It needs ``training.validation_data``:
    every method is scored on the same held-out tokens.
    ``dry_run`` builds and validates every request (``Run.request``) and uploads nothing.
    A method that cannot run where asked (QLoRA without CUDA, a job the memory planner says
    does not fit) is ``skipped`` with its reason; a run that fails is ``failed`` and the others
    go on. Unless ``dry_run`` (or ``wait`` is false on SageMaker), the table (text, markdown,
    CSV) and the figure are written to ``output_dir`` and next to the outputs in S3.
    """
    from .aws.pipeline import plan_analysis_step, stage
    from .aws.requests import job_name

    if not isinstance(config, PipelineConfig):
        config = load_pipeline(config, list(overrides))
    elif overrides:
        raise SpectrumError("overrides apply to a config file; change the PipelineConfig instead")
    if config.percent_conflict():  # compare's percents come from --methods and analysis
        raise SpectrumError(config.percent_conflict())
    table = prices if isinstance(prices, PriceTable) else load_prices(prices)
    chosen = parse_methods(methods, default_percent=config.analysis.top_percent)
    per_method = parse_method_settings(method_settings, chosen)
    training = _common_recipe(config.training)
    percents = sorted({m.percent for m in chosen if m.percent is not None})
    step = None
    if percents:
        # The analysis's own percent is its top-level layer file; only the others need a folder
        # each, so a comparison at that percent alone reuses a plain analysis of the model.
        extra = [p for p in percents if p != config.analysis.top_percent]
        analysis = dataclasses.replace(
            config.analysis,
            layer_percents=extra,
            certify_percents=sorted({*config.analysis.certify_percents, *extra}),
        )
        step = plan_analysis_step(
            analysis, reuse=config.reuse_analysis, dry_run=dry_run, local=local
        )

    def plan(method: Method) -> Run:
        return _plan_run(method, training, step, per_method[method], local=local, dry_run=dry_run)

    # Spectrum runs first: when none of them can run, the analysis is left out before the other
    # runs are pointed at the checkpoint it would have staged.
    spectrum = {m: plan(m) for m in chosen if m.name == "spectrum"}
    if step is not None and not any(run.prepared for run in spectrum.values()):
        log.warning("no Spectrum run can run here: the analysis is left out")
        step = None
    runs = [spectrum[m] if m in spectrum else plan(m) for m in chosen]
    result = Comparison(runs, table)
    if step is not None:
        result.analysis = {
            "job": step.name,
            "reused": step.reused is not None,
            "layer_dir": step.layer_dir,
            "request": step.job.request if step.job else None,
        }
    if dry_run:
        return result
    planned = [run for run in runs if run.status == "planned"]
    if not planned:
        raise SpectrumError(
            "no method can run here: "
            + "; ".join(f"{run.method.label}: {run.reason}" for run in runs)
        )
    # Everything validated above; only now the uploads, then the jobs.
    if step is not None:
        step.stage()
    for run in planned:
        stage(run.prepared)
    if step is not None:
        step.run(local=local, workdir=workdir, logs=logs)
    if local:
        _run_locally(planned, workdir, logs=logs)
    else:
        _run_on_sagemaker(planned, wait=wait)
        if not wait:
            return result
    compare_id = job_name(config.training.base_job_name, "compare")
    output = Path(output_dir) if output_dir else Path("spectrum-sm-compare") / compare_id
    _collect_all(runs, table, local=local, workdir=workdir)
    write_outputs(result, output)
    _upload_outputs(
        result,
        f"{config.training.output_s3.rstrip('/')}/compare/{compare_id}/",
        config.training.output_kms_key,
    )
    return result


def _common_recipe(training: TrainingConfig) -> TrainingConfig:
    """The training config every run shares: held-out rows (the config's validation data, else
    the same share of the training rows for every run), TensorBoard on (the curves), and a
    validation curve when the config asks for none."""
    hyperparameters = dict(training.hyperparameters)
    if not training.validation_data and not hyperparameters.get("validation_share"):
        hyperparameters["validation_share"] = VALIDATION_SHARE
        log.info(
            "no validation_data: every run holds out the same %d%% of the training rows "
            "(validation_share) and is scored on them",
            round(100 * VALIDATION_SHARE),
        )
    try:
        steps = int(hyperparameters.get("max_steps", -1))
        evaluating = int(hyperparameters.get("eval_steps", 0) or 0)
    except (TypeError, ValueError):
        return training  # train.py's parser names the bad value when the jobs are planned
    if not evaluating:
        if steps > 0:
            hyperparameters["eval_steps"] = max(1, steps // EVALS_PER_RUN)
            log.info(
                "eval_steps %d: a validation curve of %d points per run",
                hyperparameters["eval_steps"],
                steps // hyperparameters["eval_steps"],
            )
        else:
            log.warning("no max_steps and no eval_steps: validation only at the end of each run")
    return dataclasses.replace(training, hyperparameters=hyperparameters, tensorboard=True)


def _plan_run(
    method: Method,
    training: TrainingConfig,
    step,
    settings: dict[str, Any],
    *,
    local: bool,
    dry_run: bool,
) -> Run:
    from .aws.config import replace_checked, validate
    from .aws.pipeline import plan_training
    from .aws.requests import DoesNotFit

    own = {k: v for k, v in settings.items() if k in INSTANCE_SETTINGS}
    hyperparameters = {
        **training.hyperparameters,
        **{k: v for k, v in settings.items() if k not in INSTANCE_SETTINGS},
    }
    config = replace_checked(training, own, f"--method-set {method.label}") if own else training
    _keep_global_batch(hyperparameters, training, config, method, local=local)
    config = dataclasses.replace(
        config,
        method=method.name,
        top_percent=method.percent if method.percent is not None else training.top_percent,
        hyperparameters=hyperparameters,
    )
    run = Run(
        method,
        region=config.region,
        instance_type=config.instance_type,
        instance_count=config.instance_count,
    )
    if method.name == "qlora" and config.instance_type in training_instance_types():
        # where it cannot run (which validation would refuse): a skip; a typo is an error
        problem = qlora_problem(config.instance_type, local=local)
        if problem:
            run.status, run.reason = "skipped", problem
            log.warning("%s skipped: %s", method.label, problem)
            return run
    validate(config, need_role=not local)  # a wrong setting is an error, never a skip
    spectrum_uri = None
    if method.percent is not None:
        spectrum_uri = step.layer_dir
        if method.percent != step.config.top_percent:
            spectrum_uri = f"{step.layer_dir.rstrip('/')}/{layer_folder(method.percent)}/"
    try:
        prepared = plan_training(
            config, spectrum_uri=spectrum_uri, dry_run=dry_run, local=local, kind=method.slug
        )
    except DoesNotFit as exc:
        run.status, run.reason = "skipped", str(exc)
        log.warning("%s skipped: %s", method.label, exc)
        return run
    if step is not None:
        step.train_from_staged_model(prepared, config.model)
    run.prepared = prepared
    run.request = prepared.request
    run.job = prepared.request["TrainingJobName"]
    return run


def processes(config: TrainingConfig, *, local: bool) -> int:
    """How many training processes a job has: one per GPU on SageMaker; locally the config's
    ``processes_per_host`` (default 1) per host."""
    per_host = (config.processes_per_host or 1) if local else config.gpus_per_host()
    return per_host * config.instance_count


def _keep_global_batch(
    hyperparameters: dict[str, Any],
    common: TrainingConfig,
    own: TrainingConfig,
    method: Method,
    *,
    local: bool,
) -> None:
    """On a different number of processes, scale gradient accumulation so that every step
    still sees the common recipe's global batch (the same tokens per step, the same budget)."""
    mine, theirs = processes(own, local=local), processes(common, local=local)
    if mine == theirs:
        return
    try:
        accumulation = int(hyperparameters.get("gradient_accumulation_steps", 1))
    except (TypeError, ValueError):
        return  # train.py's parser names the bad value
    total = accumulation * theirs
    if total % mine:
        raise SpectrumError(
            f"--method-set: {method.label} runs {mine} processes, the others {theirs}; the "
            f"global batch of {theirs} x accumulation {accumulation} cannot be split over "
            f"{mine}: choose gradient_accumulation_steps (--set) so that {mine} divides "
            f"{theirs} x it"
        )
    hyperparameters["gradient_accumulation_steps"] = total // mine
    log.info(
        "%s: %d processes instead of %d, gradient accumulation %d instead of %d (same global "
        "batch)",
        method.label,
        mine,
        theirs,
        total // mine,
        accumulation,
    )


def qlora_problem(instance_type: str, *, local: bool) -> str | None:
    """Why QLoRA cannot run where asked (it needs CUDA and bitsandbytes), or None."""
    if not local:
        if not has_cuda(instance_type):
            return f"QLoRA needs a CUDA GPU; {instance_type} has none"
        return None
    from .aws.local import container_python

    probe = (
        "import importlib.util, torch; "
        "print(torch.cuda.is_available(), importlib.util.find_spec('bitsandbytes') is not None)"
    )
    try:
        out = subprocess.run(
            [container_python(), "-c", probe], capture_output=True, text=True, timeout=120
        ).stdout.split()
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot check for CUDA here ({exc})"
    if out[:1] != ["True"]:
        return "QLoRA needs a CUDA GPU (4-bit bitsandbytes weights); this machine has none"
    if out[1:2] != ["True"]:
        return "QLoRA needs bitsandbytes, which is not installed here"
    return None


def _run_locally(runs: list[Run], workdir: str | Path, *, logs: bool) -> None:
    """One after another: a failed run is recorded and the next one starts."""
    from .aws.jobs import JobFailed
    from .aws.local import run_local

    for run in runs:
        log.info("comparison: %s (%s)", run.method.label, run.job)
        try:
            job = run_local(run.request, workdir, stream_logs=logs)  # type: ignore[arg-type]
        except JobFailed as exc:
            run.status, run.reason = "failed", exc.reason.strip() or "failed"
            log.error("%s failed: %s", run.method.label, run.reason)
            continue
        run.status, run.model_s3 = "completed", job.model_s3


def _run_on_sagemaker(runs: list[Run], *, wait: bool, poll_s: float = 30.0) -> None:
    """Submit every job, then follow them all until each ends."""
    from .aws.jobs import TERMINAL, TrainingJob, submit

    handles: dict[str, TrainingJob] = {}
    for run in runs:
        try:
            handles[run.job] = submit(run.request)  # type: ignore[arg-type]
        except SpectrumError as exc:  # e.g. a quota: the jobs already sent go on
            run.status, run.reason = "failed", f"not submitted: {exc}"
            log.error("%s: %s", run.method.label, run.reason)
            continue
        run.status = "submitted"
        log.info("submitted %s: %s", run.method.label, run.job)
    if not wait:
        return
    pending = {run.job: run for run in runs if run.job in handles}
    try:
        while pending:
            for name, run in list(pending.items()):
                description = handles[name].describe()
                status = description["TrainingJobStatus"]
                if status not in TERMINAL:
                    continue
                del pending[name]
                run.description = description
                if status == "Completed":
                    run.status = "completed"
                    run.model_s3 = handles[name].outputs["model"]
                else:
                    run.status = "failed"
                    reason = description.get("FailureReason", "no reason given")
                    run.reason = f"{status}: {reason}"
                log.info("%s: %s (%d still running)", run.method.label, status, len(pending))
            if pending:
                time.sleep(poll_s)
    except KeyboardInterrupt:
        names = " ".join(handles)
        log.warning(
            "interrupted: the jobs keep running on SageMaker; when they end: spectrum-sm "
            "compare --collect %s",
            names,
        )
        raise


# --- collecting what finished jobs left --------------------------------------------------


def collect(
    jobs: Sequence[str],
    *,
    local: bool = False,
    workdir: str | Path = "spectrum-sm-jobs",
    output_dir: str | Path | None = None,
    prices: str | Path | PriceTable | None = None,
    region: str = "",
) -> Comparison:
    """The comparison of finished training jobs, by name: each job's method and percent come
    from its own request, its numbers from its report, curves and description."""
    if not jobs:
        raise SpectrumError("--collect needs at least one training job name")
    table = prices if isinstance(prices, PriceTable) else load_prices(prices)
    runs = [_describe_run(name, local=local, workdir=workdir, region=region) for name in jobs]
    _collect_all(runs, table, local=local, workdir=workdir)
    result = Comparison(runs, table)
    stamp = dt.datetime.now().strftime("%Y%m%d%H%M%S")
    write_outputs(result, Path(output_dir) if output_dir else Path("spectrum-sm-compare") / stamp)
    return result


def _collect_all(runs: list[Run], table: PriceTable, *, local: bool, workdir: str | Path) -> None:
    """Collect every completed run; one whose outputs cannot be read is marked failed (with why)
    and the others are still shown."""
    for run in runs:
        if run.status != "completed":
            continue
        try:
            _collect_run(run, table, local=local, workdir=workdir)
        except SpectrumError as exc:
            run.status, run.reason = "failed", f"cannot collect its results: {exc}"
            log.error("%s: %s", run.method.label, run.reason)


def _describe_run(name: str, *, local: bool, workdir: str | Path, region: str) -> Run:
    """A Run for an existing job, from its request (method, channels, instance) and status."""
    description = _describe(name, local=local, workdir=workdir)
    if local:
        folder = Path(workdir) / name
        if not (folder / "job.json").is_file():
            raise SpectrumError(f"no local job {name} in {Path(workdir).resolve()}")
        request = json.loads((folder / "job.json").read_text())
        status = description.get("TrainingJobStatus", "Failed")
        region = region or _config_region(request)
    else:
        request = description
        status = description["TrainingJobStatus"]
        region = region or description.get("TrainingJobArn", "::::").split(":")[3]
    hps = request.get("HyperParameters", {})
    method_name = hps.get("method", "")
    if method_name not in METHODS:
        raise SpectrumError(
            f"job {name} is not a spectrum-sm training job (method {method_name!r})"
        )
    percent = None
    if method_name == "spectrum":
        channels = {c["ChannelName"]: c for c in request.get("InputDataConfig", [])}
        uri = channels.get("spectrum", {}).get("DataSource", {}).get("S3DataSource", {})
        percent = percent_in_path(uri.get("S3Uri", ""))
    resources = request.get("ResourceConfig", {})
    run = Run(
        Method(method_name, percent),
        job=name,
        region=region or "us-east-1",
        instance_type=resources.get("InstanceType", ""),
        instance_count=int(resources.get("InstanceCount", 1)),
        request=request,
        description=description,
    )
    output = request["OutputDataConfig"]["S3OutputPath"].rstrip("/")
    if status == "Completed":
        run.status, run.model_s3 = "completed", f"{output}/{name}/output/model/"
    elif status in ("Failed", "Stopped"):
        run.status = "failed"
        run.reason = f"{status}: {description.get('FailureReason', 'no reason given')}"
    else:
        run.status, run.reason = "submitted", f"still {status}"
    return run


def _describe(job: str, *, local: bool, workdir: str | Path) -> dict[str, Any]:
    """What DescribeTrainingJob says of a job (a local one: its ``description.json``)."""
    if local:
        path = Path(workdir) / job / "description.json"
        return json.loads(path.read_text()) if path.is_file() else {}
    from .aws.jobs import TrainingJob

    return TrainingJob(job).describe()


def _config_region(request: dict[str, Any]) -> str:
    """The region of the config a local job was staged with (its copy next to the outputs), or
    the environment's."""
    import os

    import yaml

    output = request["OutputDataConfig"]["S3OutputPath"].rstrip("/")
    uri = f"{output}/{request['TrainingJobName']}/spectrum-sm-config.yaml"
    try:
        return str(yaml.safe_load(_read_object(uri)).get("region", ""))
    except Exception as exc:  # gone or unreadable: the region only prices the run
        log.info("no config copy at %s (%s); region from the environment", uri, exc)
        return os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION", "")


def _collect_run(run: Run, table: PriceTable, *, local: bool, workdir: str | Path) -> None:
    """Fill a completed run's numbers from its report, description, curves; price it."""
    run.report = _read_json(run.model_s3 + "training_report.json")
    description = run.description or _describe(run.job, local=local, workdir=workdir)
    if local:
        folder = Path(workdir) / run.job
        run.model_dir = str((folder / "model").resolve())
        run.job_seconds = description.get("TrainingWallSeconds")
        run.billable_seconds, run.billed = None, False
        started = _epoch(description.get("TrainingStartTime"))
        seconds_for_cost = run.job_seconds
    else:
        run.job_seconds = description.get("TrainingTimeInSeconds")
        run.billable_seconds = description.get("BillableTimeInSeconds")
        run.billed = True
        started = _epoch(description.get("TrainingStartTime"))
        seconds_for_cost = run.billable_seconds
    if run.method.name == "spectrum" and run.method.percent is None:
        percent = percent_in_path(str(run.report.get("layer_file") or ""))
        run.method = Method("spectrum", percent)
    run.cost_usd, run.cost_basis = job_cost(
        table,
        run.region,
        run.instance_type,
        run.instance_count,
        seconds_for_cost,
        billed=run.billed,
    )
    run.curves, run.curve_source = _curves(run, started, local=local, workdir=workdir)


def _epoch(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        return value.timestamp()
    return dt.datetime.fromisoformat(str(value)).timestamp()


def _read_object(uri: str) -> bytes:
    from .aws.s3 import describe_client_error, s3_client, split_s3_uri

    bucket, key = split_s3_uri(uri)
    try:
        return s3_client().get_object(Bucket=bucket, Key=key)["Body"].read()
    except Exception as exc:
        raise describe_client_error(exc, uri) from exc


def _read_json(uri: str) -> dict[str, Any]:
    try:
        return json.loads(_read_object(uri))
    except ValueError as exc:
        raise SpectrumError(f"{uri}: not valid JSON ({exc})") from exc


def _curves(
    run: Run, started: float | None, *, local: bool, workdir: str | Path
) -> tuple[dict[str, list[list[float]]], str]:
    """``{"train": [[seconds, step, loss]...], "eval": [...]}``, seconds since the job started:
    from its TensorBoard files in S3, else from the metric lines of its log."""
    request = run.request or {}
    tensorboard = request.get("TensorBoardOutputConfig", {}).get("S3OutputPath")
    points = _tensorboard_points(tensorboard) if tensorboard else None
    source = "tensorboard"
    if not points:
        points, source = _log_points(run, local=local, workdir=workdir), "log lines"
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
    from .aws.local import download_prefix

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


def _log_points(run: Run, *, local: bool, workdir: str | Path):
    """``step=N train_loss=X`` / ``eval_loss=X`` lines (:mod:`spectrum_sm.training.metrics`):
    the local job's log file, or CloudWatch with each event's time."""
    lines: list[tuple[float | None, str]] = []
    if local:
        path = Path(workdir) / run.job / "output" / "job.log"
        if path.is_file():
            lines = [(None, line) for line in path.read_text().splitlines()]
    else:
        lines = _cloudwatch_lines(run.job)
    points = []
    for wall, line in lines:
        for match in STEP_LINE.finditer(line):
            kind = "train" if match.group(2) == "train_loss" else "eval"
            points.append((wall, int(match.group(1)), kind, float(match.group(3))))
    return points


def _cloudwatch_lines(job: str) -> list[tuple[float | None, str]]:
    from .aws.jobs import TrainingJob

    try:
        events = TrainingJob(job).log_events()
    except Exception as exc:
        log.warning("cannot read the logs of %s: %s", job, exc)
        return []
    return [(event["timestamp"] / 1000, event["message"]) for event in events]


# --- showing it --------------------------------------------------------------------------

COLUMNS = [
    ("method", "method"),
    ("trainable", "trainable params"),
    ("eval", "final eval loss"),
    ("lr", "lr"),
    ("instance", "instance"),
    ("train_s", "train s"),
    ("job_s", "job s"),
    ("billable_s", "billable s"),
    ("memory", "peak memory GiB"),
    ("tokens", "tokens/s"),
    ("cost", "cost USD"),
    ("status", "status"),
]


def _cells(row: dict[str, Any]) -> dict[str, str]:
    def number(value, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    label = row["method"] + (
        f":{format_percent(row['top_percent'])}" if row["top_percent"] is not None else ""
    )
    trainable = row["trainable_params"]
    share = (
        f" ({100 * trainable / row['all_params']:.1f}%)"
        if trainable is not None and row.get("all_params")
        else ""
    )
    memory = row["peak_memory_bytes"]
    return {
        "method": label,
        "trainable": "-" if trainable is None else f"{trainable:,}{share}",
        "eval": number(row.get("final_eval_loss"), ".4f"),
        "lr": number(row.get("learning_rate"), ".0e"),
        "instance": (row.get("instance_type") or "-").removeprefix("ml.")
        + (f" x{row['instance_count']}" if (row.get("instance_count") or 1) > 1 else ""),
        "train_s": number(row["train_seconds"], ".1f"),
        "job_s": number(row["job_seconds"], ".1f"),
        "billable_s": number(row["billable_seconds"], ".0f"),
        "memory": "-" if memory is None else f"{memory / 1024**3:.2f}",
        "tokens": number(row["tokens_per_sec"], ",.0f"),
        "cost": number(row["cost_usd"], ".4f"),
        "status": row["status"],
    }


def render_table(rows: list[dict[str, Any]], fmt: str, prices: PriceTable) -> str:
    """``text``: aligned columns; ``markdown``: a pipe table; ``csv``: one row per run with the
    raw numbers."""
    if fmt == "csv":
        buffer = io.StringIO()
        names = list(dict.fromkeys(k for row in rows for k in row))
        writer = csv.DictWriter(buffer, fieldnames=names, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        return buffer.getvalue()
    cells = [_cells(row) for row in rows]
    heads = [head for _, head in COLUMNS]
    notes = [
        f"{c['method']} {row['status']}: {row['reason']}"
        for c, row in zip(cells, rows, strict=True)
        if row.get("reason")
    ]
    same: dict[int, list[str]] = {}
    for c, row in zip(cells, rows, strict=True):
        if row["method"] == "spectrum" and row["trainable_params"] is not None:
            same.setdefault(row["trainable_params"], []).append(c["method"])
    notes += [
        f"{' and '.join(labels)} trained the same {count:,} parameters: each type keeps "
        "int(layers x percent / 100) layers, the same number at these percents"
        for count, labels in same.items()
        if len(labels) > 1
    ]
    bases = dict.fromkeys(r["cost_basis"] for r in rows if r["cost_usd"] is not None)
    notes.append(f"cost: {'; '.join(bases) or 'n/a'}; prices as of {prices.as_of}, {prices.source}")
    if fmt == "markdown":
        lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
        lines += ["| " + " | ".join(c[k] for k, _ in COLUMNS) + " |" for c in cells]
        return "\n".join([*lines, "", *(f"- {n}" for n in notes)]) + "\n"
    if fmt != "text":
        raise SpectrumError(f"table format must be text, markdown or csv, got {fmt!r}")
    widths = [
        max(len(h), *(len(c[k]) for c in cells)) for (k, _), h in zip(COLUMNS, heads, strict=True)
    ]
    lines = ["  ".join(h.ljust(w) for h, w in zip(heads, widths, strict=True))]
    lines += [
        "  ".join(c[k].ljust(w) for (k, _), w in zip(COLUMNS, widths, strict=True)) for c in cells
    ]
    return "\n".join(line.rstrip() for line in [*lines, *notes]) + "\n"


def plot(result: Comparison, path: Path) -> Path:
    """One PNG: validation loss against time and against cost, and peak memory per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [run for run in result.runs if run.status == "completed"]
    figure, (by_time, by_cost, memory) = plt.subplots(1, 3, figsize=(16, 4.8))
    for run in done:
        label = run.method.label
        points = run.curves.get("eval") or []
        hourly = result.prices.hourly(run.region, run.instance_type)
        seconds = [p[0] for p in points]
        losses = [p[2] for p in points]
        line = by_time.plot(seconds, losses, marker="o", label=label)[0]
        if hourly is not None:
            # Billed runs: the job's billable share of its time (spot savings) applies throughout.
            share = 1.0
            if run.billed and run.billable_seconds and run.job_seconds:
                share = run.billable_seconds / run.job_seconds
            dollars = [s * run.instance_count * hourly * share / 3600 for s in seconds]
            by_cost.plot(dollars, losses, marker="o", color=line.get_color(), label=label)
    by_time.set(xlabel="seconds since the job started", ylabel="validation loss")
    by_time.set_title("validation loss vs time")
    estimate = any(not run.billed for run in done)
    by_cost.set(xlabel="USD" + (" (estimate)" if estimate else ""), ylabel="validation loss")
    by_cost.set_title("validation loss vs cost")
    labels = [run.method.label for run in done]
    gib = [(run.report.get("peak_memory_bytes") or 0) / 1024**3 for run in done]
    memory.bar(labels, gib, color=[f"C{i}" for i in range(len(done))])
    memory.set(ylabel="GiB", title="peak memory (accelerator, else process RSS)")
    memory.tick_params(axis="x", rotation=30)
    for axis in (by_time, by_cost):
        if done:
            axis.legend()
        axis.grid(alpha=0.3)
    skipped = [f"{r.method.label}: {r.status}" for r in result.runs if r.status != "completed"]
    if skipped:
        figure.text(0.01, 0.01, "not shown: " + "; ".join(skipped), fontsize=8)
    figure.tight_layout(rect=(0, 0.04 if skipped else 0, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def write_outputs(result: Comparison, output_dir: Path) -> None:
    """``comparison.{json,md,csv,png}`` in ``output_dir`` (each written whole, then renamed)."""
    from .core.atomic import write_files_atomically

    output_dir.mkdir(parents=True, exist_ok=True)
    result.output_dir = output_dir.resolve()
    names = {"json": "comparison.json", "markdown": "comparison.md", "csv": "comparison.csv"}
    result.files = {k: result.output_dir / v for k, v in names.items()}
    result.files["figure"] = plot(result, result.output_dir / "comparison.png")
    details = {
        **result.summary(),
        "curves": {run.method.label: run.curves for run in result.runs},
        "curve_sources": {run.method.label: run.curve_source for run in result.runs},
    }
    write_files_atomically(
        result.output_dir,
        {
            names["json"]: json.dumps(details, indent=2, default=str) + "\n",
            names["markdown"]: result.table("markdown"),
            names["csv"]: result.table("csv"),
        },
    )


def _upload_outputs(result: Comparison, uri: str, kms_key: str) -> None:
    """A copy next to the jobs' outputs, so a notebook finds it later."""
    from .aws.local import upload_folder
    from .aws.s3 import sse_arguments

    try:
        upload_folder(result.output_dir, uri, extra_args=sse_arguments(kms_key))  # type: ignore[arg-type]
    except SpectrumError as exc:
        log.warning("comparison not copied to %s: %s", uri, exc)
        return
    result.s3_uri = uri
