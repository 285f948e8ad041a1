"""Analysis then training: stage inputs in S3, build both requests, run them here or on SageMaker.

``dry_run`` builds and validates the requests and touches nothing (no credentials needed). Local
paths in a config (model folder, data) are uploaded to ``<output_s3>/inputs/<job>/<channel>/``
first, so the requests only ever hold S3 URIs, locally and remotely alike.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..core.errors import SpectrumError
from .config import AnalysisConfig, PipelineConfig, TrainingConfig, to_yaml
from .requests import (
    analysis_output_uri,
    analysis_prefix,
    build_analysis_request,
    build_training_request,
    job_name,
    resolve_distribution,
    validate_request,
)
from .s3 import describe_client_error, s3_client, split_s3_uri

log = logging.getLogger(__name__)
PACKAGE_ROOT = Path(__file__).resolve().parents[2]
CODE_PARTS = ("spectrum_sm", "entrypoints")


def _staged_uri(config, name: str, channel: str) -> str:
    return f"{config.output_s3.rstrip('/')}/inputs/{name}/{channel}/"


def _resolve_inputs(config, name: str, fields: dict[str, str], dry_run: bool) -> dict[str, str]:
    """Map each field to an S3 URI, uploading local paths (not in a dry run)."""
    from .local import upload_folder

    resolved = {}
    for channel, value in fields.items():
        if not value or value.startswith("s3://"):
            if value and not dry_run:
                require_s3(value)
            resolved[channel] = value
            continue
        path = Path(value).expanduser()
        if not path.exists():
            if channel == "model" and "/" in value and not value.startswith((".", "/")):
                resolved[channel] = value  # a Hub id
                continue
            raise SpectrumError(
                f"{channel}: {value!r} is neither an s3:// URI nor an existing path"
            )
        uri = _staged_uri(config, name, channel)
        if not dry_run:
            if path.is_file():
                staging = Path(tempfile.mkdtemp(prefix="spectrum-stage-"))
                shutil.copy2(path, staging / path.name)
                upload_folder(staging, uri)
                shutil.rmtree(staging)
            else:
                upload_folder(path, uri)
        resolved[channel] = uri
    return resolved


def require_s3(uri: str) -> None:
    """Fail before any job starts when an S3 input does not exist."""
    bucket, key = split_s3_uri(uri)
    try:
        found = s3_client().list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1)
    except Exception as exc:
        raise describe_client_error(exc, uri) from exc
    if not found.get("KeyCount"):
        raise SpectrumError(f"{uri}: no such S3 object or prefix")


def upload_code(uri: str) -> None:
    """The job's code channel: spectrum_sm/ and entrypoints/ as plain files."""
    from .local import upload_folder

    staging = Path(tempfile.mkdtemp(prefix="spectrum-code-"))
    try:
        for part in CODE_PARTS:
            shutil.copytree(
                PACKAGE_ROOT / part,
                staging / part,
                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
            )
        upload_folder(staging, uri)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def prepare_analysis(config: AnalysisConfig, *, dry_run: bool, local: bool) -> dict[str, Any]:
    name = job_name(config.base_job_name, "analysis")
    inputs = _resolve_inputs(config, name, {"model": config.model}, dry_run)
    staged = dataclasses.replace(config, model=inputs["model"])
    request = build_analysis_request(staged, name=name, need_role=not local)
    if not dry_run:
        upload_code(request["InputDataConfig"][0]["DataSource"]["S3DataSource"]["S3Uri"])
        _write_config(staged, request)
    return request


def prepare_training(
    config: TrainingConfig, *, spectrum_uri: str | None, dry_run: bool, local: bool
) -> dict[str, Any]:
    name = job_name(config.base_job_name, "train")
    # The planner reads config.json where the user put the model, before any upload.
    planned = resolve_distribution(config)
    fields = {
        "model": config.model,
        "train": config.train_data,
        "validation": config.validation_data,
    }
    if spectrum_uri is None and config.spectrum_config:
        fields["spectrum"] = config.spectrum_config
    inputs = _resolve_inputs(config, name, fields, dry_run)
    staged = dataclasses.replace(
        config,
        model=inputs["model"],
        train_data=inputs["train"],
        validation_data=inputs["validation"],
        spectrum_config=spectrum_uri or inputs.get("spectrum", ""),
    )
    request = build_training_request(staged, name=name, need_role=not local, distribution=planned)
    if local:
        # This machine, not the instance type's GPU count, sets the local process count.
        request["Environment"]["SPECTRUM_SM_NPROC_PER_HOST"] = str(config.processes_per_host or 1)
    if not dry_run:
        upload_code(request["InputDataConfig"][0]["DataSource"]["S3DataSource"]["S3Uri"])
        _write_config(staged, request)
    return request


def _write_config(config, request: dict[str, Any]) -> None:
    """The config travels with the job: next to its outputs in S3."""
    output = request["OutputDataConfig"]["S3OutputPath"].rstrip("/")
    bucket, key = split_s3_uri(f"{output}/{request['TrainingJobName']}/spectrum-sm-config.yaml")
    try:
        s3_client().put_object(Bucket=bucket, Key=key, Body=to_yaml(config).encode())
    except Exception as exc:
        raise describe_client_error(exc, f"s3://{bucket}/{key}") from exc


def analysis_key(config: AnalysisConfig) -> str:
    """Same model, revision and settings -> same key: the analysis can be reused."""
    fields = {
        k: getattr(config, k)
        for k in (
            "model",
            "revision",
            "top_percent",
            "include",
            "exclude",
            "embeddings",
            "exact",
            "precision",
            "towers",
            "certify_percents",
        )
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]


def _index_uri(config: AnalysisConfig) -> str:
    return f"{analysis_prefix(config)}/index/{analysis_key(config)}.json"


def find_reusable_analysis(config: AnalysisConfig) -> dict[str, str] | None:
    """A finished analysis of the same model and settings whose layer file is still in S3."""
    bucket, key = split_s3_uri(_index_uri(config))
    client = s3_client()
    try:
        record = json.loads(client.get_object(Bucket=bucket, Key=key)["Body"].read())
        layer_bucket, layer_key = split_s3_uri(record["layer_dir"])
        listing = client.list_objects_v2(Bucket=layer_bucket, Prefix=layer_key)
    except Exception:  # no record, or it points nowhere: run the analysis
        return None
    if not any(o["Key"].endswith("percent.yaml") for o in listing.get("Contents", [])):
        return None
    log.info(
        "reusing analysis %s (same model and settings): %s", record["job"], record["layer_dir"]
    )
    return record


def record_analysis(config: AnalysisConfig, job: str, layer_dir: str) -> None:
    bucket, key = split_s3_uri(_index_uri(config))
    body = json.dumps({"job": job, "layer_dir": layer_dir, "model": config.model})
    try:
        s3_client().put_object(Bucket=bucket, Key=key, Body=body.encode())
    except Exception as exc:
        raise describe_client_error(exc, f"s3://{bucket}/{key}") from exc


def launch_options(config) -> Any:
    """How the SageMaker SDK is driven for this job (role validation, telemetry)."""
    from .sdk import LaunchOptions

    return LaunchOptions(validate_role=config.validate_role, telemetry=config.telemetry)


def execute(
    request: dict[str, Any],
    config: AnalysisConfig | TrainingConfig,
    *,
    local: bool,
    workdir: str | Path = "spectrum-sm-jobs",
    wait: bool = True,
    logs: bool = True,
) -> dict[str, str]:
    """Run a prepared request here (local) or on SageMaker (through the SDK v3, driven by the
    job's ``config``: role validation, telemetry).

    Returns the job's name (on SageMaker, the SDK's: the prepared name with its own time) and the
    S3 prefix of its model folder.
    """
    if local:
        from .local import run_local

        job = run_local(request, workdir)
        return {"job": job.name, "model_s3": job.model_s3}
    from .jobs import submit

    handle = submit(request, launch_options(config))
    if wait:
        handle.wait(logs=logs)
    return {"job": handle.name, "model_s3": handle.outputs["model"]}


def launch_analysis(
    config: AnalysisConfig,
    *,
    local: bool,
    workdir: str | Path = "spectrum-sm-jobs",
    logs: bool = True,
    reuse: bool = True,
) -> dict[str, Any]:
    """Run (or reuse) the analysis job; returns its name and the S3 prefix of the layer file."""
    reused = find_reusable_analysis(config) if reuse else None
    if reused:
        return {"job": reused["job"], "layer_dir": reused["layer_dir"], "reused": True}
    request = prepare_analysis(config, dry_run=False, local=local)
    ran = execute(request, config, local=local, workdir=workdir, logs=logs)
    record_analysis(config, ran["job"], ran["model_s3"])
    return {"job": ran["job"], "layer_dir": ran["model_s3"], "reused": False}


def launch_training(
    config: TrainingConfig,
    spectrum_uri: str | None,
    *,
    local: bool,
    workdir: str | Path = "spectrum-sm-jobs",
    wait: bool = True,
    logs: bool = True,
) -> dict[str, Any]:
    """Run the training job on a layer file in S3; returns its name and model location."""
    request = prepare_training(config, spectrum_uri=spectrum_uri, dry_run=False, local=local)
    ran = execute(request, config, local=local, workdir=workdir, wait=wait, logs=logs)
    return {"job": ran["job"], "model_s3": ran["model_s3"]}


def _point_at_layer_file(training: dict[str, Any], layer_dir: str) -> None:
    """The analysis ran under another name than planned (the SDK's time): follow it."""
    for channel in training["InputDataConfig"]:
        if channel["ChannelName"] == "spectrum":
            channel["DataSource"]["S3DataSource"]["S3Uri"] = layer_dir
    validate_request(training)


def _with_percent(config: PipelineConfig) -> TrainingConfig:
    """The training config, told the analysis's percent (the memory planner counts it)."""
    return dataclasses.replace(config.training, top_percent=config.analysis.top_percent)


def run_pipeline(
    config: PipelineConfig,
    *,
    local: bool,
    dry_run: bool,
    workdir: str | Path = "spectrum-sm-jobs",
    wait: bool = True,
    logs: bool = True,
) -> dict[str, Any]:
    """Analysis, then training on its layer file.

    ``dry_run``: build and validate both requests, send nothing, return them. ``local``: run both
    here through the container contract. Otherwise submit to SageMaker (training waits when
    ``wait``). A finished analysis of the same model and settings is reused when
    ``config.reuse_analysis``. Both jobs are staged and validated before the first is submitted.
    """
    if dry_run:
        analysis = prepare_analysis(config.analysis, dry_run=True, local=local)
        spectrum_uri = analysis_output_uri(config.analysis, analysis["TrainingJobName"])
        training = prepare_training(
            _with_percent(config), spectrum_uri=spectrum_uri, dry_run=True, local=local
        )
        return {"analysis": analysis, "training": training}
    reused = find_reusable_analysis(config.analysis) if config.reuse_analysis else None
    analysis = None
    if reused:
        analysis_name, spectrum_uri = reused["job"], reused["layer_dir"]
    else:
        analysis = prepare_analysis(config.analysis, dry_run=False, local=local)
        analysis_name = analysis["TrainingJobName"]
        spectrum_uri = analysis_output_uri(config.analysis, analysis_name)
    training = prepare_training(
        _with_percent(config), spectrum_uri=spectrum_uri, dry_run=False, local=local
    )
    if analysis is not None:
        ran = execute(analysis, config.analysis, local=local, workdir=workdir, logs=logs)
        analysis_name = ran["job"]
        if ran["model_s3"] != spectrum_uri:
            spectrum_uri = ran["model_s3"]
            _point_at_layer_file(training, spectrum_uri)
        record_analysis(config.analysis, analysis_name, spectrum_uri)
    trained = execute(training, config.training, local=local, workdir=workdir, wait=wait, logs=logs)
    result = {
        "analysis_job": analysis_name,
        "analysis_reused": bool(reused),
        "layer_file_s3": spectrum_uri,
        "training_job": trained["job"],
        "model_s3": trained["model_s3"],
    }
    if local:
        result["workdir"] = str(Path(workdir).resolve())
    return result
