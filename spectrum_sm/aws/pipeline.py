"""Analysis then training: validate everything, then stage inputs in S3, then run the jobs.

The order is the point: every check that can run on this machine (configs, train.py's own
argument parser, requests against the service model, S3 inputs that must exist, the role when
asked) runs before the first byte is uploaded, so a refused config leaves nothing in S3. Local
paths (model folder, data) are uploaded under ``<output_s3>/inputs/`` only then; a local model
is staged once per content (``inputs/model-<sha256>/``), not once per job.

``dry_run`` builds and validates the requests and touches nothing (no credentials needed); what
it prints is exactly what is sent, job names and prefixes included.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import SpectrumError
from ..core.hub import hub_unreachable, is_local
from ..core.selection import layer_folder
from .config import (
    AnalysisConfig,
    JobConfig,
    PipelineConfig,
    TrainingConfig,
    to_yaml,
    validate,
)
from .jobs import Launcher, SageMaker
from .requests import (
    DATA_CHANNELS,
    analysis_output_uri,
    analysis_prefix,
    build_analysis_request,
    build_training_request,
    job_name,
    resolve_distribution,
    s3_channel,
    validate_request,
)
from .s3 import (
    describe_client_error,
    error_code,
    s3_client,
    s3_errors,
    split_s3_uri,
    sse_arguments,
    staged_marker,
)

log = logging.getLogger(__name__)
PACKAGE_ROOT = Path(__file__).resolve().parents[2]
CODE_PARTS = ("spectrum_sm", "entrypoints")
#: Bumped whenever scores or selections may change for the same weights: old analyses are then
#: not reused.
SCANNER_VERSION = 2
HUB_SHA = re.compile(r"^[0-9a-f]{40}$")


@dataclass
class PreparedJob:
    """A validated request and what must be uploaded before it is sent."""

    request: dict[str, Any]
    config: AnalysisConfig | TrainingConfig  # as sent: local paths replaced by S3 URIs
    uploads: dict[str, Path] = field(default_factory=dict)  # S3 prefix -> local file or folder
    markers: dict[str, str] = field(default_factory=dict)  # S3 URI -> body, after the uploads

    def stage(self) -> None:
        """Upload the job's inputs (each content once), its code and its config."""
        from .s3 import upload_folder

        extra = sse_arguments(self.config.output_kms_key)
        for uri, path in self.uploads.items():
            marker = staged_marker(uri)
            if marker in self.markers and _exists(marker):
                log.info("%s already staged (same content)", uri)
                continue
            upload_folder(path, uri, extra_args=extra)  # a data file lands as <uri>/<its name>
            if marker in self.markers:
                _put(marker, self.markers[marker], self.config)
        with tempfile.TemporaryDirectory(
            prefix="spectrum-code-", ignore_cleanup_errors=True
        ) as tmp:
            write_code(Path(tmp), with_trl=isinstance(self.config, TrainingConfig))
            code = self.request["InputDataConfig"][0]["DataSource"]["S3DataSource"]["S3Uri"]
            upload_folder(Path(tmp), code, extra_args=extra)
        output = self.request["OutputDataConfig"]["S3OutputPath"].rstrip("/")
        name = self.request["TrainingJobName"]
        _put(f"{output}/{name}/spectrum-sm-config.yaml", to_yaml(self.config), self.config)

    def submit(self, launcher: Launcher, *, wait: bool = True, logs: bool = True) -> dict[str, str]:
        """Send the staged request where ``launcher`` runs jobs and, when ``wait``, follow its
        handle to the end (:class:`~.jobs.JobFailed` when it fails); returns its name, status
        (``Submitted`` when not waited for) and model prefix."""
        handle = launcher.launch(self.request, logs=logs)
        waits = wait or launcher.launch_waits
        status = handle.wait(logs=logs)["TrainingJobStatus"] if waits else "Submitted"
        return {"job": handle.name, "status": status, "model_s3": handle.outputs["model"]}


# --- what the model is: the content behind a path, for reuse and staging --------------------


_LOCAL_FINGERPRINTS: dict[tuple, dict[str, Any]] = {}


def _local_fingerprint(path: Path) -> dict[str, Any]:
    """sha256 per file (the files an upload sends); remembered in this process while no file's
    size or mtime changes."""
    from ..core.weights import sha256_file, visible_files

    files = visible_files(path)
    stamp = (str(path.resolve()), *((r, p.stat().st_size, p.stat().st_mtime_ns) for r, p in files))
    if stamp not in _LOCAL_FINGERPRINTS:
        _LOCAL_FINGERPRINTS[stamp] = {
            "kind": "local",
            "files": [[rel, p.stat().st_size, sha256_file(p)] for rel, p in files],
        }
    return _LOCAL_FINGERPRINTS[stamp]


def model_fingerprint(model: str, revision: str = "") -> dict[str, Any] | None:
    """What identifies the model's bytes: sha256 of local files, S3 sizes and ETags, or the Hub
    commit sha. ``None`` when the Hub cannot be asked (then nothing is reused)."""
    if model.startswith("s3://"):
        bucket, key = split_s3_uri(model)
        prefix = key.rstrip("/") + "/" if key.strip("/") else ""
        with s3_errors(model):
            pages = (
                s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
            )
            files = [
                [o["Key"][len(prefix) :], o["Size"], o.get("ETag", "").strip('"')]
                for page in pages
                for o in page.get("Contents", [])
            ]
        return {"kind": "s3", "files": sorted(files)}
    path = Path(model).expanduser()
    if path.exists():
        return _local_fingerprint(path)
    if HUB_SHA.match(revision):
        return {"kind": "hub", "id": model, "sha": revision}
    if unreachable := hub_unreachable():  # seconds, not huggingface_hub's retries
        log.warning(
            "cannot ask the Hub which commit %s is (%s); its analysis is not reused",
            model,
            unreachable,
        )
        return None
    try:
        from huggingface_hub import HfApi

        sha = HfApi().model_info(model, revision=revision or None).sha
    except Exception as exc:  # offline, gated without a login, no such repo
        log.warning(
            "cannot ask the Hub which commit %s%s is (%s: %s); its analysis is not reused",
            model,
            f"@{revision}" if revision else "",
            type(exc).__name__,
            str(exc).splitlines()[0][:200] if str(exc) else "",
        )
        return None
    return {"kind": "hub", "id": model, "sha": sha}


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def analysis_key(config: AnalysisConfig, fingerprint: dict[str, Any]) -> str:
    """Same bytes (:func:`model_fingerprint`), settings and scanner -> same key."""
    # What decides the results: every scan option but where and in what chunks it computes.
    settings = {**config.settings(), "layer_percents": config.layer_percents}
    if not config.layer_percents:  # keys written before the setting existed stay valid
        del settings["layer_percents"]
    return _digest({"model": fingerprint, "settings": settings, "scanner": SCANNER_VERSION})[:32]


# --- planning: everything that can be checked here, before any upload ---------------------


def _plan_inputs(
    config: JobConfig, fields: dict[str, str], *, dry_run: bool
) -> tuple[dict[str, str], dict[str, Path], dict[str, str]]:
    """Map each field to an S3 URI; local paths become planned uploads. S3 inputs must exist."""
    resolved: dict[str, str] = {}
    uploads: dict[str, Path] = {}
    markers: dict[str, str] = {}
    for channel, value in fields.items():
        if not value or value.startswith("s3://"):
            if value and not dry_run:
                require_s3(value)
            resolved[channel] = value
            continue
        path = Path(value).expanduser()
        if not path.exists():
            if channel == "model" and not is_local(value, "model"):
                resolved[channel] = value  # a Hub id
                continue
            raise SpectrumError(
                f"{channel}: {value!r} is neither an s3:// URI nor an existing path"
            )
        # Staged by content: the analysis and every training run (of a pipeline, a comparison
        # or a rerun) share one copy, and changed bytes get a new one.
        fingerprint = model_fingerprint(str(path))
        uri = f"{config.output_s3.rstrip('/')}/inputs/{channel}-{_digest(fingerprint)[:16]}/"
        markers[staged_marker(uri)] = json.dumps(fingerprint)
        uploads[uri] = path
        resolved[channel] = uri
    return resolved, uploads, markers


def require_s3(uri: str) -> None:
    """Fail before any job starts when an S3 input does not exist."""
    bucket, key = split_s3_uri(uri)
    with s3_errors(uri):
        found = s3_client().list_objects_v2(Bucket=bucket, Prefix=key, MaxKeys=1)
    if not found.get("KeyCount"):
        raise SpectrumError(f"{uri}: no such S3 object or prefix")


def check_role(role: str) -> None:
    """``validate_role``: the role exists and SageMaker may assume it (IAM GetRole only, so a
    least-privilege role is not refused for permissions it does not need)."""
    import boto3

    name = role.rsplit("/", 1)[-1]
    try:
        document = boto3.client("iam").get_role(RoleName=name)["Role"]["AssumeRolePolicyDocument"]
    except Exception as exc:
        code = error_code(exc) or type(exc).__name__
        raise SpectrumError(
            f"validate_role: cannot read role {role} ({code}); set validate_role: false to "
            "skip this check"
        ) from exc
    if isinstance(document, str):
        from urllib.parse import unquote

        document = json.loads(unquote(document))
    if "sagemaker.amazonaws.com" not in json.dumps(document):
        raise SpectrumError(
            f"validate_role: role {role} does not trust sagemaker.amazonaws.com; add it to the "
            "role's trust policy"
        )


def launcher_for(
    local: bool = False, workdir: str | Path = "spectrum-sm-jobs", launcher: Launcher | None = None
) -> Launcher:
    """Where jobs run, chosen once: ``launcher`` when given, else this machine (``local``, job
    folders under ``workdir``) or SageMaker. Everything after asks the launcher and reads the
    job handles it gives."""
    if launcher is not None:
        return launcher
    if local:
        from .local import Local

        return Local(workdir)
    return SageMaker()


def check_job(config: JobConfig, launcher: Launcher, *, dry_run: bool) -> None:
    """A job's config, validated for where it runs (and its role checked with IAM when it asks
    for that): once per job, before anything is looked up or uploaded for it."""
    validate(config, need_role=launcher.needs_role)
    if launcher.needs_role and not dry_run and config.validate_role:
        check_role(config.role)


def plan_analysis(
    config: AnalysisConfig,
    *,
    dry_run: bool,
    local: bool = False,
    launcher: Launcher | None = None,
    reuse_key: str | None = None,
    stage_model_s3: str = "",
    checked: bool = False,
) -> PreparedJob:
    """The analysis job, validated for where it runs (:func:`launcher_for`; ``checked``: by the
    caller, with :func:`check_job`); nothing uploaded. ``reuse_key`` (the model content and
    settings) travels to the job, whose manifest records it."""
    launcher = launcher_for(local, launcher=launcher)
    if not checked:
        check_job(config, launcher, dry_run=dry_run)
    inputs, uploads, markers = _plan_inputs(config, {"model": config.model}, dry_run=dry_run)
    staged = dataclasses.replace(config, model=inputs["model"])
    request = build_analysis_request(
        staged, reuse_key=reuse_key or "", stage_model_s3=stage_model_s3, checked=True
    )
    return PreparedJob(request, staged, uploads, markers)


def check_training_data(config: TrainingConfig, args) -> None:
    """Local training data read on the client as the job will read it, before anything is
    uploaded: its format, encoding and rows, and, when the model's tokenizer is here too, that
    some token carries loss with the job's own data settings (as ``spectrum-sm data-check``).
    ``args``: the hyperparameters as train.py parses them (:meth:`TrainingConfig.train_args`)."""
    from ..training.args import DATA_SETTINGS
    from ..training.data import load_split
    from ..training.datacheck import check_data

    settings = {name: getattr(args, name) for name in DATA_SETTINGS}
    # The job reads its template from the chat_template channel; here, the local file (if any).
    local_template = not config.chat_template.startswith("s3://")
    settings["chat_template_path"] = config.chat_template if local_template else ""
    for name, data, split in (
        ("train_data", config.train_data, args.train_split),
        ("validation_data", config.validation_data, args.validation_split),
    ):
        if not data or data.startswith("s3://") or not Path(data).expanduser().exists():
            continue  # S3 is checked by the job; a Hub dataset is read there
        error = ""
        try:
            if Path(config.model).expanduser().is_dir():
                report = check_data(data, config.model, rows=0, split=split, **settings)
                error = report.get("error") or ""
            else:  # no tokenizer here: the files only
                load_split(data, split=split, name=args.dataset_config or None)
        except SpectrumError as exc:
            error = str(exc)
        if error:
            raise SpectrumError(f"{name} {data!r}: {error}")


def plan_training(
    config: TrainingConfig,
    *,
    spectrum_uri: str | None,
    dry_run: bool,
    local: bool = False,
    launcher: Launcher | None = None,
    kind: str = "train",
    checked: bool = False,
) -> PreparedJob:
    """The training job, validated (hyperparameters with train.py's parser) for where it runs
    (:func:`launcher_for`; ``checked``: by the caller, with :func:`check_job`); nothing
    uploaded. ``kind`` is the job name's middle part (``<base>-<kind>-<random>-<time>``)."""
    launcher = launcher_for(local, launcher=launcher)
    if not checked:
        check_job(config, launcher, dry_run=dry_run)
    _check_trl()
    name = job_name(config.base_job_name, kind)
    args = config.train_args()  # parsed once, for the planner and the data check
    # The planner reads config.json where the user put the model, before any upload.
    planned = resolve_distribution(config, args)
    fields = {"model": config.model, **{c: getattr(config, k) for c, k in DATA_CHANNELS.items()}}
    if config.chat_template and not config.chat_template.startswith("s3://"):
        from ..training.chat import read_chat_template

        read_chat_template(config.chat_template)  # readable, before anything is uploaded
    check_training_data(config, args)
    if spectrum_uri is None and config.spectrum_config:
        fields["spectrum"] = config.spectrum_config
    inputs, uploads, markers = _plan_inputs(config, fields, dry_run=dry_run)
    staged = dataclasses.replace(
        config,
        model=inputs["model"],
        spectrum_config=spectrum_uri or inputs.get("spectrum", ""),
        **{key: inputs[channel] for channel, key in DATA_CHANNELS.items()},
    )
    request = build_training_request(staged, name=name, distribution=planned, checked=True)
    launcher.prepare_training(request, config)
    return PreparedJob(request, staged, uploads, markers)


def _check_trl() -> None:
    """A training job carries this machine's TRL (see :func:`write_code`): it must be here,
    at the pinned release or later."""
    from importlib.metadata import PackageNotFoundError, version

    from ..training.chat import TRL_VERSION, trl_is_recent

    try:
        found = version("trl")
    except PackageNotFoundError:
        found = ""
    if not trl_is_recent(found):
        have = f"trl {found} is installed" if found else "trl is not installed"
        raise SpectrumError(
            f"a training job carries TRL's chat templates (trl>={TRL_VERSION}, the loss masks "
            f"of chat data) from this machine, and {have} here: pip install 'spectrum-sm[train]'"
        )


# --- staging: uploads, only after everything validated -------------------------------------


def _exists(uri: str) -> bool:
    bucket, key = split_s3_uri(uri)
    try:
        s3_client().head_object(Bucket=bucket, Key=key)
    except Exception as exc:
        if error_code(exc) in ("404", "NoSuchKey"):
            return False
        raise describe_client_error(exc, uri) from exc
    return True


def _put(uri: str, body: str, config: JobConfig) -> None:
    bucket, key = split_s3_uri(uri)
    with s3_errors(uri):
        s3_client().put_object(
            Bucket=bucket, Key=key, Body=body.encode(), **sse_arguments(config.output_kms_key)
        )


def write_code(folder: Path, *, with_trl: bool) -> None:
    """The job's code channel into ``folder``: spectrum_sm/ and entrypoints/ as plain files;
    with ``with_trl`` (training jobs) also this machine's TRL modules and chat templates that
    the loss masks use. They come first on the job's path: the image's TRL (0.28.0 in the
    default image) has one training template, the pinned one all of them, and data-check here
    used the same."""
    from ..training.chat import trl_code_files

    for part in CODE_PARTS:
        shutil.copytree(
            PACKAGE_ROOT / part,
            folder / part,
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
        )
    for source, relative in trl_code_files() if with_trl else []:
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, folder / relative)


# --- reuse: an analysis of the same bytes and settings -------------------------------------


def _index_uri(config: AnalysisConfig, key: str) -> str:
    return f"{analysis_prefix(config)}/index/{key}.json"


def find_reusable_analysis(config: AnalysisConfig, key: str) -> dict[str, str] | None:
    """A finished analysis under ``key`` (:func:`analysis_key`) whose layer file is still in S3."""
    uri = _index_uri(config, key)
    bucket, object_key = split_s3_uri(uri)
    client = s3_client()
    try:
        record = json.loads(client.get_object(Bucket=bucket, Key=object_key)["Body"].read())
    except Exception as exc:
        if error_code(exc) in ("404", "NoSuchKey"):
            return None
        # Access denied or a broken endpoint is not "no analysis": say so, start nothing.
        raise describe_client_error(exc, uri) from exc
    layer_bucket, layer_key = split_s3_uri(record["layer_dir"])
    with s3_errors(record["layer_dir"]):
        listing = client.list_objects_v2(Bucket=layer_bucket, Prefix=layer_key)
    names = [o["Key"][len(layer_key) :].lstrip("/") for o in listing.get("Contents", [])]
    folders = {n.rsplit("/", 1)[0] if "/" in n else "" for n in names if n.endswith("percent.yaml")}
    missing = ({""} | {layer_folder(p) for p in config.layer_percents}) - folders
    if missing:
        log.info(
            "analysis %s left no layer file in %s; running a new one",
            record["job"],
            ", ".join(sorted(m or "its output" for m in missing)),
        )
        return None
    log.info(
        "reusing analysis %s (same model content and settings): %s",
        record["job"],
        record["layer_dir"],
    )
    return record


def record_analysis(config: AnalysisConfig, key: str | None, job: str, layer_dir: str) -> None:
    """Remember a finished analysis under its content key (nothing when the key is unknown)."""
    if key is None:
        return
    body = json.dumps({"job": job, "layer_dir": layer_dir, "model": config.model, "key": key})
    _put(_index_uri(config, key), body, config)


# --- running: the one path of every job ------------------------------------------------


def launch(
    config: PipelineConfig | AnalysisConfig | TrainingConfig,
    *,
    dry_run: bool = False,
    local: bool = False,
    workdir: str | Path = "spectrum-sm-jobs",
    wait: bool = True,
    logs: bool = True,
    reuse: bool | None = None,
    spectrum_uri: str | None = None,
    launcher: Launcher | None = None,
) -> dict[str, Any]:
    """Plan (validate, build the request), stage, submit and follow a job: the one path of
    ``spectrum-sm run``/``analyze``/``train``, the notebook and Python alike.

    ``config``: a :class:`PipelineConfig` (the analysis, then training on its layer file), an
    :class:`AnalysisConfig` or a :class:`TrainingConfig` (on the layer file at
    ``spectrum_uri``, else its ``spectrum_config``). ``dry_run``: build and validate the
    request(s), send nothing, return them. ``local``: run here through the container contract
    (job folders under ``workdir``); otherwise on SageMaker (``launcher`` stands for both,
    :func:`launcher_for`). ``wait``: follow the (training) job to its end. An analysis of the
    same model content and settings is reused when ``reuse`` (default: the pipeline's
    ``reuse_analysis``, else true); a Hub model is staged in S3 by the analysis job (unless
    ``analysis.stage_model`` is false) and the pipeline's training reads it from there, and a
    lone analysis returns the copy as ``model_s3``. Every job is validated before anything is
    looked up or uploaded, and staged before the first is submitted.
    """
    launcher = launcher_for(local, workdir, launcher)
    if reuse is None:
        reuse = config.reuse_analysis if isinstance(config, PipelineConfig) else True
    if isinstance(config, PipelineConfig):
        if conflict := config.percent_conflict():  # before any lookup or upload
            raise SpectrumError(conflict)
        check_job(config.training, launcher, dry_run=dry_run)
        step = plan_analysis_step(config.analysis, reuse=reuse, dry_run=dry_run, launcher=launcher)
        training = plan_training(
            # told the analysis's percent (the memory planner counts it)
            dataclasses.replace(config.training, top_percent=config.analysis.top_percent),
            spectrum_uri=step.layer_dir,
            dry_run=dry_run,
            launcher=launcher,
            checked=True,
        )
        staged_model = step.train_from_staged_model(training, config.training.model)
        if dry_run:
            return {"analysis": step.request, "training": training.request}
        step.stage()
        training.stage()
        step.submit(launcher, logs=logs)
        trained = training.submit(launcher, wait=wait, logs=logs)
        result = {
            "analysis_job": step.name,
            "analysis_reused": step.reused is not None,
            "layer_file_s3": step.layer_dir,
            "training_job": trained["job"],
            "model_s3": trained["model_s3"],
        }
        if staged_model:
            result["staged_model_s3"] = step.stage_uri
        return {**result, **launcher.place()}
    if isinstance(config, AnalysisConfig):
        job: AnalysisStep | PreparedJob = plan_analysis_step(
            config, reuse=reuse, dry_run=dry_run, launcher=launcher
        )
    else:
        job = plan_training(config, spectrum_uri=spectrum_uri, dry_run=dry_run, launcher=launcher)
    if dry_run:
        return job.request
    job.stage()
    return job.submit(launcher, wait=wait, logs=logs)


def hub_stage_uri(config: AnalysisConfig, fingerprint: dict[str, Any] | None) -> str:
    """Where a Hub checkpoint is staged for training: one prefix per repository commit."""
    if not config.stage_model or not fingerprint or fingerprint.get("kind") != "hub":
        return ""
    repo = fingerprint["id"].replace("/", "--")
    return f"{config.output_s3.rstrip('/')}/models/{repo}@{fingerprint['sha'][:12]}/"


@dataclass
class AnalysisStep:
    """The analysis a pipeline trains on: reused (same content and settings) or planned."""

    config: AnalysisConfig
    key: str | None  # the reuse key; None when the model's content is unknown
    stage_uri: str  # where a Hub checkpoint is (or will be) staged; "" for none
    staged_already: bool
    reused: dict[str, str] | None
    job: PreparedJob | None  # None when reused
    name: str
    layer_dir: str  # the S3 prefix of its layer file(s)

    def train_from_staged_model(self, training: PreparedJob, model: str) -> bool:
        """Point a training request of the same Hub model at the staged checkpoint, when there
        is (or will be) one; returns whether it was."""
        if not self.stage_uri or model != self.config.model:
            return False
        if self.job is None and not self.staged_already:
            log.info(
                "the reused analysis staged no checkpoint; training reads %s from the Hub", model
            )
            return False
        # the staged checkpoint as its ``model`` channel (no Hub, no token)
        training.request["HyperParameters"].pop("model_name_or_path", None)
        training.request["InputDataConfig"].append(s3_channel("model", self.stage_uri))
        validate_request(training.request)
        return True

    @property
    def request(self) -> dict[str, Any]:
        """The planned job's request (a reused analysis has none to send)."""
        if self.job is None:
            raise SpectrumError(f"analysis {self.name} is reused: there is no request to send")
        return self.job.request

    def stage(self) -> None:
        if self.job is not None:
            self.job.stage()

    def submit(self, launcher: Launcher, *, wait: bool = True, logs: bool = True) -> dict[str, Any]:
        """Run the staged analysis (nothing when reused) and remember it under its key once it
        finished; returns its name, status, layer file prefix and, for a staged Hub model,
        ``model_s3``."""
        if self.job is None:
            model = {"model_s3": self.stage_uri} if self.staged_already else {}
            return {"job": self.name, "layer_dir": self.layer_dir, "reused": True, **model}
        ran = self.job.submit(launcher, wait=wait, logs=logs)
        if ran["status"] == "Submitted":  # not finished: nothing to reuse yet
            log.info(
                "analysis %s submitted; not waiting, so it is not recorded for reuse", self.name
            )
        else:
            record_analysis(self.config, self.key, self.name, self.layer_dir)
            if ran["model_s3"] != self.layer_dir:  # one name end to end: never train on another's
                raise SpectrumError(
                    f"analysis {self.name} wrote to {ran['model_s3']}, not {self.layer_dir}"
                )
        model = {"model_s3": self.stage_uri} if self.stage_uri else {}
        return {
            "job": self.name,
            "status": ran["status"],
            "layer_dir": self.layer_dir,
            "reused": False,
            **model,
        }


def plan_analysis_step(
    config: AnalysisConfig, *, reuse: bool, dry_run: bool, launcher: Launcher
) -> AnalysisStep:
    """Find a reusable analysis (unless ``dry_run`` or not ``reuse``) or plan a new one."""
    check_job(config, launcher, dry_run=dry_run)  # before any Hub or S3 lookup uses it
    try:
        fingerprint = model_fingerprint(config.model, config.revision)
    except SpectrumError as exc:
        if not dry_run:
            raise
        log.warning("dry run: the reuse key is left out (%s)", exc)  # e.g. no S3 credentials
        fingerprint = None
    key = analysis_key(config, fingerprint) if fingerprint else None
    stage_uri = hub_stage_uri(config, fingerprint)
    staged_already = bool(stage_uri) and not dry_run and _exists(staged_marker(stage_uri))
    reused = find_reusable_analysis(config, key) if not dry_run and reuse and key else None
    if reused:
        job, name, layer_dir = None, reused["job"], reused["layer_dir"]
    else:
        job = plan_analysis(
            config,
            dry_run=dry_run,
            launcher=launcher,
            reuse_key=key,
            stage_model_s3="" if staged_already else stage_uri,
            checked=True,
        )
        name = job.request["TrainingJobName"]
        layer_dir = analysis_output_uri(config, name)
    return AnalysisStep(config, key, stage_uri, staged_already, reused, job, name, layer_dir)


#: The earlier name of :func:`launch` for a whole pipeline, kept for scripts that use it.
run_pipeline = launch
