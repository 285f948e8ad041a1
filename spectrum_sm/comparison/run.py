"""Running a comparison: one shared analysis, then one training job per method with everything
else equal. Where they run is the launcher's business (chosen once, in :func:`compare`): every
job is launched, then every handle followed until its job ends; so they run in parallel on
SageMaker and one after another locally (a local launch returns when its job has ended)."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..aws.config import PipelineConfig, TrainingConfig, load_pipeline, training_instance_types
from ..aws.jobs import TERMINAL, JobHandle, Launcher, SageMaker
from ..core.errors import SpectrumError
from ..core.selection import layer_folder
from ..prices import PriceTable, load_prices
from .collection import _collect_all
from .methods import (
    DEFAULT_METHODS,
    INSTANCE_SETTINGS,
    Method,
    Run,
    parse_method_settings,
    parse_methods,
)
from .render import Comparison, _upload_outputs, write_outputs

log = logging.getLogger(__name__)

#: Validation points per run when the config sets no ``eval_steps``: enough for a curve.
EVALS_PER_RUN = 8
#: Held out of the training rows when the config names no validation data.
VALIDATION_SHARE = 0.05


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
    launcher: Launcher | None = None,
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
    The jobs run here (``local``, in folders under ``workdir``) or on SageMaker; ``launcher``
    (:func:`~spectrum_sm.aws.pipeline.launcher_for`) stands for both.
    """
    from ..aws.pipeline import launcher_for, plan_analysis_step
    from ..aws.requests import job_name

    launcher = launcher_for(local, workdir, launcher)
    if not isinstance(config, PipelineConfig):
        config = load_pipeline(config, list(overrides))
    elif overrides:
        raise SpectrumError("overrides apply to a config file; change the PipelineConfig instead")
    if conflict := config.percent_conflict():  # compare's percents come from --methods and analysis
        raise SpectrumError(conflict)
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
            analysis, reuse=config.reuse_analysis, dry_run=dry_run, launcher=launcher
        )

    def plan(method: Method) -> Run:
        return _plan_run(method, training, step, per_method[method], launcher, dry_run=dry_run)

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
        run.prepared.stage()
    if step is not None:
        step.submit(launcher, logs=logs)
    wait = wait or launcher.launch_waits
    _run_all(planned, launcher, wait=wait, logs=logs)
    if not wait:
        return result
    compare_id = job_name(config.training.base_job_name, "compare")
    output = Path(output_dir) if output_dir else Path("spectrum-sm-compare") / compare_id
    _collect_all(runs, table, launcher)
    write_outputs(result, output)
    uri = f"{config.training.output_s3.rstrip('/')}/compare/{compare_id}/"
    _upload_outputs(result, uri, config.training.output_kms_key)
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
            hyperparameters["eval_steps"] = every = max(1, steps // EVALS_PER_RUN)
            log.info(
                "eval_steps %d: a validation curve of %d points per run", every, steps // every
            )
        else:
            log.warning("no max_steps and no eval_steps: validation only at the end of each run")
    return dataclasses.replace(training, hyperparameters=hyperparameters, tensorboard=True)


def _plan_run(
    method: Method,
    training: TrainingConfig,
    step,
    settings: dict[str, Any],
    launcher: Launcher,
    *,
    dry_run: bool,
) -> Run:
    from ..aws.config import replace_checked
    from ..aws.pipeline import plan_training
    from ..aws.requests import DoesNotFit

    own = {k: v for k, v in settings.items() if k in INSTANCE_SETTINGS}
    hyperparameters = {
        **training.hyperparameters,
        **{k: v for k, v in settings.items() if k not in INSTANCE_SETTINGS},
    }
    config = replace_checked(training, own, f"--method-set {method.label}") if own else training
    _keep_global_batch(hyperparameters, training, config, method, launcher)
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
        problem = launcher.qlora_problem(config.instance_type)
        if problem:
            run.status, run.reason = "skipped", problem
            log.warning("%s skipped: %s", method.label, problem)
            return run
    spectrum_uri = None
    if method.percent is not None:
        spectrum_uri = step.layer_dir
        if method.percent != step.config.top_percent:
            spectrum_uri = f"{step.layer_dir.rstrip('/')}/{layer_folder(method.percent)}/"
    try:  # a wrong setting is an error (plan_training validates), never a skip
        prepared = plan_training(
            config, spectrum_uri=spectrum_uri, dry_run=dry_run, launcher=launcher, kind=method.slug
        )
    except DoesNotFit as exc:
        run.status, run.reason = "skipped", str(exc)
        log.warning("%s skipped: %s", method.label, exc)
        return run
    if step is not None:
        step.train_from_staged_model(prepared, config.model)
    run.prepared, run.request = prepared, prepared.request
    run.job = prepared.request["TrainingJobName"]
    return run


def _keep_global_batch(
    hyperparameters: dict[str, Any],
    common: TrainingConfig,
    own: TrainingConfig,
    method: Method,
    launcher: Launcher,
) -> None:
    """On a different number of processes (one per GPU on SageMaker; locally the config's
    ``processes_per_host``, per host), scale gradient accumulation so that every step still
    sees the common recipe's global batch (the same tokens per step, the same budget)."""
    mine, theirs = (
        launcher.processes_per_host(config) * config.instance_count for config in (own, common)
    )
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


def qlora_problem(instance_type: str, launcher: Launcher | None = None) -> str | None:
    """Why QLoRA cannot run on ``instance_type`` where ``launcher`` runs jobs (default:
    SageMaker; it needs CUDA and bitsandbytes), or None."""
    return (launcher or SageMaker()).qlora_problem(instance_type)


def _run_all(
    runs: list[Run], launcher: Launcher, *, wait: bool, logs: bool = True, poll_s: float = 30.0
) -> None:
    """Launch every job, then follow every handle until its job ends. A job that cannot be
    launched (e.g. a quota) or that fails is recorded with its reason and the others go on."""
    handles: dict[str, JobHandle] = {}
    for run in runs:
        log.info("comparison: %s (%s)", run.method.label, run.job)
        try:
            handles[run.job] = launcher.launch(run.request, logs=logs)  # type: ignore[arg-type]
        except SpectrumError as exc:  # the jobs already sent go on
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
                    run.status, run.model_s3 = "completed", handles[name].outputs["model"]
                else:
                    run.status = "failed"
                    run.reason = f"{status}: {description.get('FailureReason', 'no reason given')}"
                    log.error("%s failed: %s", run.method.label, run.reason)
                log.info("%s: %s (%d still running)", run.method.label, status, len(pending))
            if pending:
                time.sleep(poll_s)
    except KeyboardInterrupt:
        log.warning(
            "interrupted: the jobs that were sent keep running; when they end: spectrum-sm "
            "compare --collect %s",
            " ".join(handles),
        )
        raise
