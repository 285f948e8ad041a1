"""Launching a prepared request through the SageMaker Python SDK v3 (``ModelTrainer``).

The request built and validated in :mod:`.requests` (what ``--dry-run`` prints) is mapped field by
field onto a ``ModelTrainer``; the code channel becomes its ``SourceCode`` and the container runs
``python3 entrypoints/launch.py analyze|train`` through the SDK's ``sm_train.sh`` driver. Before
the SDK's CreateTrainingJob leaves this process a botocore hook checks it again: it must pass the
service-model validation and carry every field of the prepared request unchanged. What the SDK
adds (its ``sm_drivers`` channel, its entrypoint, defaults from a SageMaker config file) is
allowed and logged.

The SDK's sharp edges, absorbed here: job names are ``<base>-<second>``, so our base ends in a
random part and two launches in one second do not collide; telemetry is off unless asked for;
role validation against IAM can be turned off (``validate_role: false``, e.g. for moto); the SDK
gets its own boto3 session and an explicit default bucket (no STS lookup).
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from typing import Any

from ..core.errors import SpectrumError
from .images import INSTALL_HINT, quiet_sdk
from .requests import CODE_CHANNEL, LAUNCHER, validate_request
from .s3 import split_s3_uri

log = logging.getLogger(__name__)
SDK_CHANNELS = {"sm_drivers"}
# The SDK replaces the entrypoint with its driver; everything else must arrive as prepared.
SDK_OWNED = {"TrainingJobName", "ContainerEntrypoint", "ContainerArguments", "InputDataConfig"}


@dataclass(frozen=True)
class LaunchOptions:
    """How the SDK is driven (not part of the request)."""

    validate_role: bool = True
    telemetry: bool = False


def _sdk():
    try:
        from sagemaker.core import shapes
        from sagemaker.core.helper.session_helper import Session
        from sagemaker.core.training import configs
        from sagemaker.train import ModelTrainer
    except ImportError as exc:
        raise SpectrumError(f"launching on SageMaker needs {INSTALL_HINT}") from exc
    return ModelTrainer, Session, configs, shapes


def sdk_base_name(job_name: str) -> str:
    """The ``base_job_name`` the SDK turns into ``job_name`` (it appends ``-<YYYYmmddHHMMSS>``)."""
    return job_name.rsplit("-", 1)[0]


def entry_command(request: dict[str, Any]) -> str:
    """The command our ContainerEntrypoint runs, relative to the code channel."""
    spec = request["AlgorithmSpecification"]
    script = os.path.relpath(LAUNCHER, f"/opt/ml/input/data/{CODE_CHANNEL}")
    # exec: the launcher replaces the driver's shell, so a stop's SIGTERM can reach it.
    return " ".join(["exec", "python3", script, *spec.get("ContainerArguments", [])])


def sagemaker_session(request: dict[str, Any], options: LaunchOptions, boto_session=None):
    """An SDK session on its own boto3 session, staging next to the job's code."""
    import boto3

    _, Session, _, _ = _sdk()
    boto_session = boto_session or boto3.Session()
    bucket, _ = split_s3_uri(_code_uri(request))
    with quiet_sdk():
        session = Session(boto_session=boto_session, default_bucket=bucket)
    if not options.telemetry:
        config = dict(session.sagemaker_config or {})
        config.setdefault("SchemaVersion", "1.0")
        sdk = config.setdefault("SageMaker", {}).setdefault("PythonSDK", {})
        sdk.setdefault("Modules", {})["TelemetryOptOut"] = True
        session.sagemaker_config = config
    return session


def _code_uri(request: dict[str, Any]) -> str:
    for channel in request["InputDataConfig"]:
        if channel["ChannelName"] == CODE_CHANNEL:
            return channel["DataSource"]["S3DataSource"]["S3Uri"]
    raise SpectrumError(f"request {request['TrainingJobName']} has no {CODE_CHANNEL} channel")


@contextlib.contextmanager
def _role_validation(enabled: bool):
    """The SDK reads this switch from the environment only."""
    if enabled:
        yield
        return
    previous = os.environ.get("SAGEMAKER_VALIDATE_ROLE")
    os.environ["SAGEMAKER_VALIDATE_ROLE"] = "false"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("SAGEMAKER_VALIDATE_ROLE", None)
        else:
            os.environ["SAGEMAKER_VALIDATE_ROLE"] = previous


def model_trainer(request: dict[str, Any], session, *, validate_role: bool = True):
    """A ``ModelTrainer`` that sends ``request`` (a validated CreateTrainingJob request)."""
    ModelTrainer, _, configs, shapes = _sdk()
    spec = request["AlgorithmSpecification"]
    resources = request["ResourceConfig"]
    stopping = request["StoppingCondition"]
    output = request["OutputDataConfig"]
    code_uri = _code_uri(request)
    _, code_key = split_s3_uri(code_uri)
    vpc = request.get("VpcConfig", {})
    channels = [
        configs.Channel(
            channel_name=c["ChannelName"],
            data_source=configs.DataSource(
                s3_data_source=configs.S3DataSource(
                    s3_data_type=c["DataSource"]["S3DataSource"]["S3DataType"],
                    s3_uri=c["DataSource"]["S3DataSource"]["S3Uri"],
                    s3_data_distribution_type=c["DataSource"]["S3DataSource"][
                        "S3DataDistributionType"
                    ],
                )
            ),
            input_mode=c["InputMode"],
        )
        for c in request["InputDataConfig"]
        if c["ChannelName"] != CODE_CHANNEL
    ]
    checkpoint = request.get("CheckpointConfig")
    with quiet_sdk(), _role_validation(validate_role):
        trainer = ModelTrainer(
            sagemaker_session=session,
            role=request["RoleArn"],
            base_job_name=sdk_base_name(request["TrainingJobName"]),
            # The SDK stages its driver files under <prefix>/<job>/input/sm_drivers/.
            input_s3_key_prefix=code_key.rstrip("/").rsplit("/", 1)[0] or "code",
            training_image=spec["TrainingImage"],
            training_input_mode=spec["TrainingInputMode"],
            source_code=configs.SourceCode(source_dir=code_uri, command=entry_command(request)),
            compute=configs.Compute(
                instance_type=resources["InstanceType"],
                instance_count=resources["InstanceCount"],
                volume_size_in_gb=resources["VolumeSizeInGB"],
                volume_kms_key_id=resources.get("VolumeKmsKeyId"),
                enable_managed_spot_training=request.get("EnableManagedSpotTraining"),
            ),
            networking=configs.Networking(
                subnets=vpc.get("Subnets"),
                security_group_ids=vpc.get("SecurityGroupIds"),
                enable_network_isolation=request["EnableNetworkIsolation"],
                enable_inter_container_traffic_encryption=request[
                    "EnableInterContainerTrafficEncryption"
                ],
            ),
            stopping_condition=configs.StoppingCondition(
                max_runtime_in_seconds=stopping["MaxRuntimeInSeconds"],
                max_wait_time_in_seconds=stopping.get("MaxWaitTimeInSeconds"),
            ),
            output_data_config=configs.OutputDataConfig(
                s3_output_path=output["S3OutputPath"],
                compression_type=output.get("CompressionType"),
                kms_key_id=output.get("KmsKeyId"),
            ),
            input_data_config=channels,
            checkpoint_config=configs.CheckpointConfig(
                s3_uri=checkpoint["S3Uri"], local_path=checkpoint["LocalPath"]
            )
            if checkpoint
            else None,
            environment=dict(request.get("Environment", {})),
            hyperparameters=dict(request.get("HyperParameters", {})),
            tags=[shapes.Tag(key=t["Key"], value=t["Value"]) for t in request.get("Tags", [])]
            or None,
        )
    if spec.get("MetricDefinitions"):
        trainer.with_metric_definitions(
            [
                shapes.MetricDefinition(name=m["Name"], regex=m["Regex"])
                for m in spec["MetricDefinitions"]
            ]
        )
    tensorboard = request.get("TensorBoardOutputConfig")
    if tensorboard:
        trainer.with_tensorboard_output_config(
            configs.TensorBoardOutputConfig(
                s3_output_path=tensorboard["S3OutputPath"], local_path=tensorboard["LocalPath"]
            )
        )
    return trainer


def differences(prepared: dict[str, Any], sent: dict[str, Any]) -> tuple[list[str], list[str]]:
    """How the request the SDK is about to send departs from the prepared one: the changes that
    forbid sending it, and the fields the SDK added."""
    problems: list[str] = []
    added: list[str] = []
    base = sdk_base_name(prepared["TrainingJobName"])
    if not sent.get("TrainingJobName", "").startswith(base + "-"):
        problems.append(
            f"TrainingJobName {sent.get('TrainingJobName')!r} does not start with {base!r}"
        )
    _compare(prepared, sent, "request", problems, added)
    ours = {c["ChannelName"]: c for c in prepared["InputDataConfig"]}
    theirs = {c["ChannelName"]: c for c in sent.get("InputDataConfig", [])}
    for name, channel in ours.items():
        if theirs.get(name) != channel:
            problems.append(f"channel {name!r}: prepared {channel}, sending {theirs.get(name)}")
    for name in sorted(set(theirs) - set(ours) - SDK_CHANNELS):
        problems.append(f"channel {name!r} was not prepared")
    return problems, added


def _compare(prepared: Any, sent: Any, where: str, problems: list[str], added: list[str]) -> None:
    if isinstance(prepared, dict) and isinstance(sent, dict):
        added += [f"{where}.{k}" for k in sent if k not in prepared and k not in SDK_OWNED]
        for key, value in prepared.items():
            if key in SDK_OWNED:
                continue
            if key not in sent:
                if value in ({}, [], None):  # the SDK leaves empty fields out
                    continue
                problems.append(f"{where}.{key}: prepared {value!r}, not sent")
            else:
                _compare(value, sent[key], f"{where}.{key}", problems, added)
    elif prepared != sent:
        problems.append(f"{where}: prepared {prepared!r}, sending {sent!r}")


def launch(request: dict[str, Any], options: LaunchOptions | None = None, boto_session=None):
    """Send ``request`` through ``ModelTrainer.train(wait=False)``; returns a job handle."""
    from .jobs import TrainingJob

    options = options or LaunchOptions()
    validate_request(request)
    session = sagemaker_session(request, options, boto_session)
    sent: dict[str, Any] = {}

    def check(params: dict[str, Any], **_: Any) -> None:
        problems, added = differences(request, params)
        if problems:
            raise SpectrumError(
                "the SageMaker SDK would send a different request than the one prepared: "
                + "; ".join(problems[:10])
            )
        validate_request(params)
        if added:
            log.info("the SageMaker SDK adds %s", ", ".join(added))
        sent.update(params)

    session.boto_session.events.register(
        "before-parameter-build.sagemaker.CreateTrainingJob", check
    )
    try:
        trainer = model_trainer(request, session, validate_role=options.validate_role)
    except Exception as exc:
        hint = (
            " (set validate_role: false to skip the SDK's IAM check, e.g. against moto)"
            if options.validate_role
            else ""
        )
        raise SpectrumError(
            f"the SageMaker SDK could not set up job {request['TrainingJobName']}: "
            f"{type(exc).__name__}: {_first_line(exc)}{hint}"
        ) from exc
    try:
        with quiet_sdk(), _no_hyperparameter_warning():
            trainer.train(wait=False, logs=False)
    except SpectrumError:
        raise
    except Exception as exc:
        code = getattr(exc, "response", {}).get("Error", {}).get("Code", type(exc).__name__)
        raise SpectrumError(
            f"SageMaker refused job {sent.get('TrainingJobName', request['TrainingJobName'])}: "
            f"{code}: {exc}"
        ) from exc
    name = sent["TrainingJobName"]
    log.info("submitted %s", name)
    return TrainingJob(name, sagemaker=session.boto_session.client("sagemaker"))


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else "no message"


class _DropHyperparameterNote(logging.Filter):
    # Our launch.py reads hyperparameters.json, so the SDK's "not passed to command" note misleads.
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Hyperparameters are set but are not passed")


@contextlib.contextmanager
def _no_hyperparameter_warning():
    target = logging.getLogger("sagemaker.core.utils.utils")  # ModelTrainer's logger
    note = _DropHyperparameterNote()
    target.addFilter(note)
    try:
        yield
    finally:
        target.removeFilter(note)
