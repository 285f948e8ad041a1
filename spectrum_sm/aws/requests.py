"""CreateTrainingJob requests as plain data, built apart from sending and validated first.

The validator walks a request against botocore's own SageMaker service model (required members,
string lengths and patterns, list and map sizes, numeric ranges, enums): botocore checks none of
the maximums or patterns when sending, so this is the only guard before money is spent.
"""

from __future__ import annotations

import datetime as _dt
import logging
import re
import secrets
from typing import Any

from ..core.errors import SpectrumError
from ..core.instances import has_instance_storage, instance
from ..core.options import scan_fields
from ..core.secrets import secret_fields, secret_message
from ..training.metrics import METRIC_DEFINITIONS
from .config import (
    LOCAL_ROLE,
    AnalysisConfig,
    JobConfig,
    TrainingConfig,
    hyperparameter_string,
    sagemaker_service_model,
    validate,
)
from .images import default_image

log = logging.getLogger(__name__)

LAUNCHER = "/opt/ml/input/data/code/entrypoints/launch.py"
CODE_CHANNEL = "code"
#: ``SPECTRUM_SM_SECRET_<VAR>=<secret ARN>``: launch.py reads the secret with the job's role and
#: hands it to the script as ``<VAR>``; only the ARN is ever in the request.
SECRET_PREFIX = "SPECTRUM_SM_SECRET_"
#: Where SageMaker uploads the job's checkpoint folder (told to train.py for its stop message).
CHECKPOINT_S3_ENV = "SPECTRUM_SM_CHECKPOINT_S3"
#: A training job's data channels and the config fields that name them.
DATA_CHANNELS = {
    "train": "train_data",
    "validation": "validation_data",
    "chat_template": "chat_template",
}


def job_name(base: str, kind: str) -> str:
    """``<base>-<kind>-<random>-<YYYYmmddHHMMSS>``: unique per launch, even within one second.

    The SageMaker SDK names a job ``<base_job_name>-<local time to the second>``; everything before
    the time is ours (see :func:`spectrum_sm.aws.sdk.sdk_base_name`), the random part included.
    """
    stamp = _dt.datetime.now().strftime("%Y%m%d%H%M%S")
    suffix = secrets.token_hex(3)
    room = 63 - len(kind) - len(stamp) - len(suffix) - 3
    return f"{base[:room].rstrip('-')}-{kind}-{suffix}-{stamp}"


def s3_channel(name: str, uri: str) -> dict[str, Any]:
    return {
        "ChannelName": name,
        "DataSource": {
            "S3DataSource": {
                "S3DataType": "S3Prefix",
                "S3Uri": uri,
                "S3DataDistributionType": "FullyReplicated",
            }
        },
        "InputMode": "File",
    }


def _common(config: JobConfig, name: str | None, checked: bool) -> dict[str, Any]:
    if not checked:
        validate(config, need_role=True)
    analysis = isinstance(config, AnalysisConfig)
    name = name or job_name(config.base_job_name, "analysis" if analysis else "train")
    output = analysis_prefix(config) if analysis else f"{config.output_s3.rstrip('/')}/training"
    job = "analysis" if analysis else "training"
    image = config.image_uri or default_image(config.region, config.instance_type, job=job)
    request: dict[str, Any] = {
        "TrainingJobName": name,
        # Local mode needs no role; a placeholder keeps the request well-formed.
        "RoleArn": config.role or LOCAL_ROLE,
        "AlgorithmSpecification": {
            "TrainingImage": image,
            "TrainingInputMode": "File",
            "ContainerEntrypoint": ["python3", LAUNCHER],
            "ContainerArguments": ["analyze" if analysis else "train"],
        },
        "HyperParameters": {},
        "InputDataConfig": [
            s3_channel(CODE_CHANNEL, f"{config.output_s3.rstrip('/')}/code/{name}/")
        ],
        "OutputDataConfig": {"S3OutputPath": output + "/", "CompressionType": "NONE"},
        "ResourceConfig": {
            "InstanceType": config.instance_type,
            "InstanceCount": config.instance_count,
            "VolumeSizeInGB": config.volume_size_gb,
        },
        "StoppingCondition": {"MaxRuntimeInSeconds": config.max_runtime_s},
        "Environment": {k: str(v) for k, v in config.environment.items()},
        "EnableNetworkIsolation": config.network_isolation,
        "EnableInterContainerTrafficEncryption": config.encrypt_inter_container,
    }
    if config.output_kms_key:
        request["OutputDataConfig"]["KmsKeyId"] = config.output_kms_key
    if config.volume_kms_key:
        if has_instance_storage(config.instance_type):
            log.info(
                "%s has local NVMe storage, encrypted by the instance itself; volume_kms_key is "
                "not sent (CreateTrainingJob refuses it there)",
                config.instance_type,
            )
        else:
            request["ResourceConfig"]["VolumeKmsKeyId"] = config.volume_kms_key
    if config.subnets or config.security_group_ids:
        request["VpcConfig"] = {
            "Subnets": config.subnets,
            "SecurityGroupIds": config.security_group_ids,
        }
    if config.tags:
        request["Tags"] = [{"Key": k, "Value": str(v)} for k, v in config.tags.items()]
    for key, arn in config.secret_environment.items():
        request["Environment"][SECRET_PREFIX + key] = arn
    return request


def analysis_prefix(config: AnalysisConfig) -> str:
    return config.output_s3.rstrip("/") + "/analysis"


def analysis_output_uri(config: AnalysisConfig, name: str) -> str:
    """Where the service puts the layer file (``CompressionType: NONE`` keeps files as they are)."""
    return f"{analysis_prefix(config)}/{name}/output/model/"


def build_analysis_request(
    config: AnalysisConfig,
    *,
    name: str | None = None,
    reuse_key: str = "",
    stage_model_s3: str = "",
    checked: bool = False,
) -> dict[str, Any]:
    """The analysis job's CreateTrainingJob request (validated). ``reuse_key`` (model content,
    settings, scanner version) goes to the job's manifest; ``stage_model_s3`` is where the job
    copies a Hub checkpoint for the training job. ``checked``: the caller validated ``config``
    already (the pipeline does, once, before any lookup)."""
    request = _common(config, name, checked)
    # Every scan option travels under its own name: analyze.py's parser is generated from the
    # same fields. An empty list is its default and stays out of the request.
    hps: dict[str, Any] = {
        f.name: getattr(config, f.name) for f in scan_fields() if getattr(config, f.name) != []
    }
    s3_model = config.model.startswith("s3://")
    hps["model_name"] = config.model.rstrip("/").rsplit("/", 1)[-1] if s3_model else config.model
    optional = {
        "layer_percents": config.layer_percents,
        "reuse_key": reuse_key,
        "stage_model_s3": stage_model_s3,
        # a bucket that requires SSE-KMS takes the staged copy too
        "stage_kms_key": config.output_kms_key if stage_model_s3 else "",
        "revision": config.revision,
    }
    hps.update({k: v for k, v in optional.items() if v})
    if s3_model:
        request["InputDataConfig"].append(s3_channel("model", config.model))
    else:
        hps["model_name_or_path"] = config.model
    request["HyperParameters"] = _hyperparameters(config, hps)
    validate_request(request)
    return request


def resolve_distribution(config: TrainingConfig, args=None) -> dict[str, Any]:
    """The distribution the job will use, with the memory planner's numbers; a configuration
    the planner says will not fit is refused (``force: true`` sends it anyway). ``args``: the
    hyperparameters parsed already (:meth:`~.config.TrainingConfig.train_args`)."""
    from ..training.memory import Step, plan_distribution
    from .s3 import model_config

    total = config.gpus_per_host() * config.instance_count
    row = instance(config.instance_type)
    gpu_gib = row.gpu_gib if row and row.gpus else None
    if gpu_gib is None:
        choice = config.distribution if config.distribution != "auto" else "ddp"
        return {"distribution": choice, "reason": f"no GPU table entry for {config.instance_type}"}
    # The step train.py will run, read from the hyperparameters by its own parser.
    args = args or config.train_args()
    step = Step.of(args, "bf16" if args.precision == "auto" else args.precision)
    try:
        plan = plan_distribution(
            model_config(config.model),
            method=config.method,
            percent=config.top_percent,
            gpus=total,
            gpu_gib=gpu_gib,
            step=step,
        )
    except SpectrumError as exc:
        choice = config.distribution if config.distribution != "auto" else "fsdp"
        log.warning("memory planner unavailable (%s); distribution %s", exc, choice)
        return {"distribution": "ddp" if total == 1 else choice, "reason": str(exc)}
    chosen = plan["distribution"] if config.distribution == "auto" else config.distribution
    needed = plan[f"{chosen}_gib"]
    fits = needed <= 0.9 * gpu_gib
    if not fits and not config.force:
        # Only what would change the answer: sharding helps across GPUs, checkpointing when off.
        remedies = ["distribution fsdp"] if chosen != "fsdp" and total > 1 else []
        remedies += ["an instance with more (or larger) GPUs", "a smaller batch"]
        if not step.checkpointing:
            remedies.append("hyperparameters.gradient_checkpointing: true")
        raise DoesNotFit(
            f"{config.method} on {config.instance_type} x{config.instance_count} with "
            f"distribution {chosen} needs ~{needed} GiB per GPU, more than 90% of its "
            f"{gpu_gib} GiB ({plan['reason']}); use {', '.join(remedies)}, or set force: true"
        )
    log.info("training distribution %s: %s", chosen, plan["reason"])
    return {**plan, "distribution": chosen, "fits": fits}


class DoesNotFit(SpectrumError):
    """The memory planner says the training job cannot fit its instance."""


def _hyperparameters(config: JobConfig, hps: dict[str, Any]) -> dict[str, str]:
    """``hps`` as they travel, once a Hub model is known to be reachable from the job."""
    if config.network_isolation and "model_name_or_path" in hps:
        raise SpectrumError(
            "network_isolation blocks downloads from the Hugging Face Hub; put the model in S3 "
            "and give its s3:// prefix as model"
        )
    return {k: hyperparameter_string(v) for k, v in hps.items()}


def build_training_request(
    config: TrainingConfig,
    *,
    spectrum_uri: str | None = None,
    name: str | None = None,
    distribution: dict[str, Any] | None = None,
    checked: bool = False,
) -> dict[str, Any]:
    """The training job's CreateTrainingJob request (validated).

    ``spectrum_uri`` is the S3 prefix holding the layer file (the analysis job's output); the
    layer list itself never travels as a hyperparameter. ``distribution`` is
    :func:`resolve_distribution`'s answer when the caller planned already; ``checked``, that
    the caller validated ``config`` already.
    """
    request = _common(config, name, checked)
    name = request["TrainingJobName"]
    spectrum = spectrum_uri or config.spectrum_config
    if config.method == "spectrum" and not spectrum:
        raise SpectrumError(
            "a spectrum training job needs a layer file: set training.spectrum_config (an s3:// "
            "URI or a local path), or use spectrum-sm run, which makes one with the analysis"
        )
    channels = {channel: getattr(config, key) for channel, key in DATA_CHANNELS.items()}
    channels["spectrum"] = spectrum if config.method == "spectrum" else ""
    hps: dict[str, Any] = {"method": config.method, **config.hyperparameters}
    if config.model.startswith("s3://"):
        channels["model"] = config.model
    else:
        hps["model_name_or_path"] = config.model
    for channel, uri in channels.items():
        if uri:
            if not uri.startswith("s3://"):
                raise SpectrumError(
                    f"{channel} must be an s3:// URI for a SageMaker job, got "
                    f"{uri!r} (spectrum_sm.aws.pipeline uploads local paths first)"
                )
            request["InputDataConfig"].append(s3_channel(channel, uri))
    hps["distribution"] = (distribution or resolve_distribution(config))["distribution"]
    if config.resume_from:
        # train.py reads the channel's folder from SM_CHANNEL_RESUME, wherever the job's root
        # is (/opt/ml in SageMaker, a work folder in local mode).
        request["InputDataConfig"].append(s3_channel("resume", config.resume_from))
    request["HyperParameters"] = _hyperparameters(config, hps)
    request["Environment"]["SPECTRUM_SM_NPROC_PER_HOST"] = str(config.gpus_per_host())
    request["AlgorithmSpecification"]["MetricDefinitions"] = METRIC_DEFINITIONS
    if config.tensorboard:
        request["TensorBoardOutputConfig"] = {
            "LocalPath": "/opt/ml/output/tensorboard",
            "S3OutputPath": f"{config.output_s3.rstrip('/')}/tensorboard/{name}/",
        }
    if config.spot:
        request["EnableManagedSpotTraining"] = True
        request["StoppingCondition"]["MaxWaitTimeInSeconds"] = (
            config.max_wait_s or 2 * config.max_runtime_s
        )
    if config.spot or int(config.hyperparameters.get("save_steps", 0) or 0) > 0:
        # One prefix per run: SageMaker restores it into the job (a spot restart resumes), and
        # no other run ever finds it. Continuing another run is explicit (resume_from).
        checkpoints = config.checkpoint_s3 or f"{config.output_s3.rstrip('/')}/checkpoints/{name}/"
        request["CheckpointConfig"] = {"S3Uri": checkpoints, "LocalPath": "/opt/ml/checkpoints"}
        # so a stopped job can say where its work is kept
        request["Environment"][CHECKPOINT_S3_ENV] = checkpoints
    validate_request(request)
    return request


# --- validation against botocore's service model -------------------------------------------


def validate_request(request: dict[str, Any]) -> None:
    """Raise :class:`SpectrumError` listing every way ``request`` breaks the service's limits."""
    # Secret references travel as SPECTRUM_SM_SECRET_<VAR>=<ARN>: names, not values.
    environment = request.get("Environment", {})
    sent = {
        **request,
        "Environment": {k: v for k, v in environment.items() if not k.startswith(SECRET_PREFIX)},
    }
    if leaks := secret_fields(sent):  # a second guard: configs refuse these already
        raise SpectrumError("; ".join(secret_message(f"request {place}") for place in leaks))
    problems: list[str] = []
    shape = sagemaker_service_model().operation_model("CreateTrainingJob").input_shape
    _walk(shape, request, "request", problems)
    if problems:
        raise SpectrumError("invalid CreateTrainingJob request: " + "; ".join(problems[:10]))


#: What a value of each shape type must be, and how the problem says it is not.
_EXPECTED = {
    "structure": (dict, "an object"),
    "list": (list, "a list"),
    "map": (dict, "a mapping"),
    "string": (str, "a string"),
    "integer": (int, "an integer"),
    "long": (int, "an integer"),
    "boolean": (bool, "true or false"),
}


def _walk(shape, value, where: str, problems: list[str]) -> None:
    meta, kind = shape.metadata, shape.type_name
    expected, called = _EXPECTED.get(kind, (object, ""))
    # bool is an int in Python, never in the API
    if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
        problems.append(f"{where}: expected {called}")
        return
    if kind == "structure":
        for member in shape.required_members:
            if member not in value:
                problems.append(f"{where}.{member}: required")
        for key, item in value.items():
            if key not in shape.members:
                problems.append(f"{where}.{key}: not a CreateTrainingJob field")
                continue
            _walk(shape.members[key], item, f"{where}.{key}", problems)
    elif kind == "list":
        _size(meta, len(value), where, "items", problems)
        for index, item in enumerate(value):
            _walk(shape.member, item, f"{where}[{index}]", problems)
    elif kind == "map":
        _size(meta, len(value), where, "entries", problems)
        for key, item in value.items():
            _walk(shape.key, key, f"{where} key {key!r}", problems)
            _walk(shape.value, item, f"{where}[{key!r}]", problems)
    elif kind == "string":
        _size(meta, len(value), where, "characters", problems)
        if shape.enum and value not in shape.enum:
            choices = (
                ", ".join(shape.enum) if len(shape.enum) <= 12 else f"{len(shape.enum)} values"
            )
            problems.append(f"{where}: {value!r} is not one of {choices}")
        pattern = meta.get("pattern")
        if pattern and not _full_match(pattern, value):
            problems.append(f"{where}: {value[:80]!r} does not match {pattern}")
    elif kind in ("integer", "long"):
        _size(meta, value, where, "", problems)


def _size(meta: dict, size: int, where: str, unit: str, problems: list[str]) -> None:
    low, high = meta.get("min"), meta.get("max")
    label = f" {unit}" if unit else ""
    if low is not None and size < low:
        problems.append(f"{where}: {size}{label}, at least {low} allowed")
    if high is not None and size > high:
        problems.append(f"{where}: {size}{label}, at most {high} allowed")


def _full_match(pattern: str, value: str) -> bool:
    try:
        return re.fullmatch(pattern, value, flags=re.DOTALL) is not None
    except re.error:  # a Java-only construct: the length checks still apply
        return True
