"""Job configs: one dataclass per job and one for the pipeline, validated at construction.

Loadable from YAML (unknown keys are errors), overridable with ``key=value`` strings, and written
next to every output. Nothing here talks to AWS.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..core.errors import SpectrumError

ROLE_ARN = re.compile(r"^arn:aws[a-z\-]*:iam::\d{12}:role/[\w+=,.@\-/]{1,512}$")
S3_URI = re.compile(r"^s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?$")
LOCAL_ROLE = "arn:aws:iam::000000000000:role/spectrum-sm-local"
JOB_BASE = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,40}$")
#: GPUs per instance for the types this project recommends (others: set processes_per_host).
GPUS = {
    "ml.g5.xlarge": 1,
    "ml.g5.2xlarge": 1,
    "ml.g5.12xlarge": 4,
    "ml.g5.48xlarge": 8,
    "ml.g6e.xlarge": 1,
    "ml.g6e.2xlarge": 1,
    "ml.g6e.12xlarge": 4,
    "ml.g6e.48xlarge": 8,
    "ml.p4d.24xlarge": 8,
    "ml.p4de.24xlarge": 8,
    "ml.p5.48xlarge": 8,
    "ml.p5e.48xlarge": 8,
}


def training_instance_types() -> list[str]:
    """Every instance type CreateTrainingJob accepts, from botocore's service model (offline)."""
    import botocore.session

    model = botocore.session.get_session().get_service_model("sagemaker")
    return list(model.shape_for("TrainingInstanceType").enum)


def _check(problems: list[str], ok: bool, message: str) -> None:
    if not ok:
        problems.append(message)


@dataclass
class JobConfig:
    """What both jobs share: where, on what, with which permissions."""

    role: str = field(default="", metadata={"help": "IAM role ARN the job runs as"})
    region: str = field(default="us-east-1", metadata={"help": "AWS region"})
    output_s3: str = field(default="", metadata={"help": "s3:// prefix for job outputs"})
    instance_type: str = field(default="ml.g5.2xlarge", metadata={"help": "ML instance type"})
    instance_count: int = field(default=1, metadata={"help": "instances (multi-node training)"})
    volume_size_gb: int = field(default=200, metadata={"help": "EBS volume per instance"})
    max_runtime_s: int = field(default=24 * 3600, metadata={"help": "stop after this long"})
    image_uri: str = field(
        default="", metadata={"help": "training image (default: official HF/PyTorch image)"}
    )
    base_job_name: str = field(default="spectrum", metadata={"help": "job name prefix"})
    environment: dict[str, str] = field(default_factory=dict, metadata={"help": "env vars"})
    tags: dict[str, str] = field(default_factory=dict, metadata={"help": "resource tags"})
    subnets: list[str] = field(default_factory=list, metadata={"help": "VPC subnets"})
    security_group_ids: list[str] = field(default_factory=list, metadata={"help": "VPC SGs"})
    volume_kms_key: str = field(default="", metadata={"help": "KMS key for the volume"})
    output_kms_key: str = field(default="", metadata={"help": "KMS key for outputs"})
    network_isolation: bool = field(default=False, metadata={"help": "no network in the job"})
    encrypt_inter_container: bool = field(default=False, metadata={"help": "between nodes"})
    validate_role: bool = field(
        default=True,
        metadata={"help": "SDK: check the role's permissions with IAM before launching"},
    )
    telemetry: bool = field(
        default=False, metadata={"help": "SDK: let the SageMaker SDK send usage telemetry"}
    )

    def problems(self, need_role: bool) -> list[str]:
        p: list[str] = []
        if need_role:
            _check(
                p,
                bool(ROLE_ARN.match(self.role)),
                f"role must be an IAM role ARN (arn:aws:iam::123456789012:role/Name), "
                f"got {self.role!r}",
            )
            _check(
                p,
                bool(S3_URI.match(self.output_s3)),
                f"output_s3 must be an s3://bucket/prefix URI, got {self.output_s3!r}",
            )
        elif self.output_s3:
            _check(
                p,
                bool(S3_URI.match(self.output_s3)),
                f"output_s3 must be an s3://bucket/prefix URI, got {self.output_s3!r}",
            )
        _check(
            p,
            self.instance_type in training_instance_types(),
            f"instance_type {self.instance_type!r} is not a SageMaker training instance type "
            f"(e.g. ml.g5.2xlarge, ml.p4d.24xlarge)",
        )
        _check(p, 1 <= self.instance_count <= 100, "instance_count must be 1-100")
        _check(p, 1 <= self.volume_size_gb <= 16384, "volume_size_gb must be 1-16384")
        _check(
            p,
            1 <= self.max_runtime_s <= 28 * 24 * 3600,
            "max_runtime_s must be between 1 s and 28 days",
        )
        _check(
            p,
            bool(JOB_BASE.match(self.base_job_name)),
            f"base_job_name must be letters, digits and hyphens (at most 41), "
            f"got {self.base_job_name!r}",
        )
        _check(
            p,
            bool(re.match(r"^[a-z]{2}(-[a-z]+)+-\d$", self.region)),
            f"region looks wrong: {self.region!r}",
        )
        return p


@dataclass
class AnalysisConfig(JobConfig):
    """The analysis job: the SNR scan on a GPU instance (a CPU one works: the scan streams)."""

    model: str = field(default="", metadata={"help": "Hub id or s3:// prefix of the weights"})
    revision: str = field(default="", metadata={"help": "Hub revision"})
    top_percent: float = field(default=50, metadata={"help": "share per type, (0, 100]"})
    include: list[str] = field(default_factory=list, metadata={"help": "type globs to scan"})
    exclude: list[str] = field(default_factory=list, metadata={"help": "type globs to skip"})
    embeddings: bool = field(default=True, metadata={"help": "write the embedding entries"})
    exact: bool = field(default=False, metadata={"help": "float32 svdvals (reference)"})
    precision: str = field(
        default="certified", metadata={"help": "certified (float32 + float64 rechecks) or float64"}
    )
    towers: list[str] = field(
        default_factory=lambda: ["language"],
        metadata={"help": "multimodal models: language, vision, audio, projector or all"},
    )
    certify_percents: list[float] = field(
        default_factory=list, metadata={"help": "more percents whose selections are certified"}
    )
    max_runtime_s: int = field(default=4 * 3600, metadata={"help": "stop after this long"})

    def problems(self, need_role: bool) -> list[str]:
        p = super().problems(need_role)
        _check(p, bool(self.model), "analysis needs a model (Hub id, s3:// prefix or folder)")
        _check(
            p,
            0 < float(self.top_percent) <= 100,
            f"top_percent must be in (0, 100], got {self.top_percent}",
        )
        _check(p, self.instance_count == 1, "the analysis runs on one instance")
        _check(
            p,
            self.precision in ("certified", "float64"),
            f"precision must be certified or float64, got {self.precision!r}",
        )
        _check(
            p,
            bool(self.towers)
            and all(t in ("language", "vision", "audio", "projector", "all") for t in self.towers),
            f"towers must be some of language, vision, audio, projector, all; got {self.towers}",
        )
        _check(
            p,
            all(0 < float(x) <= 100 for x in self.certify_percents),
            f"certify_percents must be in (0, 100], got {self.certify_percents}",
        )
        return p


@dataclass
class TrainingConfig(JobConfig):
    """The training job: train.py on one or more GPU instances, spot optional."""

    model: str = field(default="", metadata={"help": "Hub id, s3:// prefix or folder"})
    train_data: str = field(default="", metadata={"help": "s3:// prefix, file or folder"})
    validation_data: str = field(default="", metadata={"help": "optional validation data"})
    spectrum_config: str = field(
        default="", metadata={"help": "layer file location (the pipeline fills it in)"}
    )
    method: str = field(default="spectrum", metadata={"help": "spectrum | full | lora | qlora"})
    hyperparameters: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "train.py arguments, e.g. max_steps: 500"}
    )
    processes_per_host: int = field(default=0, metadata={"help": "0: one per GPU"})
    distribution: str = field(
        default="auto",
        metadata={"help": "auto (the planner's choice) | ddp | fsdp (FSDP2 sharding)"},
    )
    top_percent: float = field(
        default=30, metadata={"help": "the layer file's percent, for the memory planner"}
    )
    force: bool = field(
        default=False, metadata={"help": "send a job the memory planner says will not fit"}
    )
    resume_from: str = field(
        default="", metadata={"help": "s3:// checkpoints of another run to continue on purpose"}
    )
    spot: bool = field(default=False, metadata={"help": "managed spot training"})
    max_wait_s: int = field(default=0, metadata={"help": "spot: total wait (0: 2x runtime)"})
    checkpoint_s3: str = field(default="", metadata={"help": "spot checkpoints (default: auto)"})
    tensorboard: bool = field(default=True, metadata={"help": "upload TensorBoard output"})
    instance_type: str = field(default="ml.p4d.24xlarge", metadata={"help": "ML instance type"})

    def problems(self, need_role: bool) -> list[str]:
        p = super().problems(need_role)
        _check(p, bool(self.model), "training needs a model")
        _check(p, bool(self.train_data), "training needs train_data")
        _check(
            p,
            self.method in ("spectrum", "full", "lora", "qlora"),
            f"method must be spectrum, full, lora or qlora, got {self.method!r}",
        )
        _check(p, self.processes_per_host >= 0, "processes_per_host must be >= 0")
        _check(
            p,
            self.distribution in ("auto", "ddp", "fsdp"),
            f"distribution must be auto, ddp or fsdp, got {self.distribution!r}",
        )
        for key in (
            "distribution",
            "resume_from",
            "model_name_or_path",
            "spectrum_config",
            "train_data",
            "validation_data",
            "output_dir",
            "checkpoint_dir",
            "method",
        ):
            _check(
                p,
                key not in self.hyperparameters,
                f"hyperparameter {key!r} is set by the job itself; use the config field",
            )
        if self.spot:
            _check(
                p,
                self.max_wait_s == 0 or self.max_wait_s >= self.max_runtime_s,
                "max_wait_s must be at least max_runtime_s for spot training",
            )
        for uri in (self.checkpoint_s3, self.resume_from):
            if uri:
                _check(p, bool(S3_URI.match(uri)), f"not an s3:// URI: {uri!r}")
        return p

    def gpus_per_host(self) -> int:
        if self.processes_per_host:
            return self.processes_per_host
        return GPUS.get(self.instance_type, 1)


@dataclass
class PipelineConfig:
    """Analysis then training, the second reading the first's layer file from S3."""

    analysis: AnalysisConfig
    training: TrainingConfig
    reuse_analysis: bool = True


def validate(config: JobConfig, *, need_role: bool) -> None:
    problems = config.problems(need_role)
    if problems:
        raise SpectrumError(f"invalid {type(config).__name__}: " + "; ".join(problems))


_TYPES = {
    "str": (str,),
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
    "list[str]": (list,),
    "dict[str, str]": (dict,),
    "dict[str, Any]": (dict,),
}


def _from_dict(cls, data: dict[str, Any], where: str):
    """Build ``cls`` from YAML data: unknown keys and wrong types are errors; an empty value
    (``key:`` or ``--set key=``) means the default."""
    if not isinstance(data, dict):
        raise SpectrumError(f"{where}: expected a mapping of settings")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise SpectrumError(
            f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(fields))}"
        )
    values = {}
    for key, value in data.items():
        if value is None:
            continue
        allowed = _TYPES.get(str(fields[key].type), (object,))
        wrong_bool = isinstance(value, bool) and bool not in allowed
        if not isinstance(value, allowed) or wrong_bool:
            raise SpectrumError(f"{where}: {key} must be {fields[key].type!s}, got {value!r}")
        if str(fields[key].type) == "list[str]" and not all(isinstance(v, str) for v in value):
            raise SpectrumError(f"{where}: {key} must be a list of strings")
        values[key] = value
    return cls(**values)


def load_pipeline(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    """Read a pipeline YAML (common, analysis, training) plus ``section.key=value`` overrides."""
    path = Path(path)
    if not path.is_file():
        raise SpectrumError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise SpectrumError(f"{path}: not valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise SpectrumError(f"{path}: expected a mapping at the top")
    unknown = sorted(set(data) - {"common", "analysis", "training", "reuse_analysis"})
    if unknown:
        raise SpectrumError(
            f"{path}: unknown key(s) {', '.join(unknown)}; "
            "known: common, analysis, training, reuse_analysis"
        )
    for override in overrides or []:
        _apply_override(data, override)
    common = data.get("common") or {}
    analysis = _from_dict(
        AnalysisConfig, {**common, **(data.get("analysis") or {})}, f"{path}: analysis"
    )
    training = _from_dict(
        TrainingConfig, {**common, **(data.get("training") or {})}, f"{path}: training"
    )
    return PipelineConfig(analysis, training, bool(data.get("reuse_analysis", True)))


def _apply_override(data: dict[str, Any], override: str) -> None:
    key, sep, raw = override.partition("=")
    if not sep or not key:
        raise SpectrumError(f"override {override!r} is not of the form section.key=value")
    parts = key.split(".")
    target = data
    for part in parts[:-1]:
        target = target.setdefault(part, {})
        if not isinstance(target, dict):
            raise SpectrumError(f"override {override!r}: {part!r} is not a section")
    target[parts[-1]] = yaml.safe_load(raw)


def to_yaml(config) -> str:
    return yaml.safe_dump(dataclasses.asdict(config), sort_keys=False)
