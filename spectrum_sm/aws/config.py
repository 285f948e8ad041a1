"""Job configs: one dataclass per job and one for the pipeline, validated at construction.

Loadable from YAML (unknown keys are errors), overridable with ``key=value`` strings, and written
next to every output. Nothing here talks to AWS.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..core.errors import SpectrumError, did_you_mean
from ..core.hub import is_local
from ..core.instances import has_cuda, instance
from ..core.options import TYPES, ScanOptions, is_number, is_percent, type_problems
from ..core.secrets import secret_fields, secret_message
from ..core.selection import DEFAULT_TOP_PERCENT
from ..core.yamlio import load_yaml
from ..training.args import DISTRIBUTION_HELP, JOB_DISTRIBUTIONS, JOB_SET, METHOD_HELP, METHODS

ROLE_ARN = re.compile(r"^arn:aws[a-z\-]*:iam::\d{12}:role/[\w+=,.@\-/]{1,512}$")
S3_URI = re.compile(r"^s3://[^/]+(/.*)?$")
#: A secret's name is letters, digits and /_+=.@-: ``*`` or ``?`` would grant other secrets too.
SECRET_ARN = re.compile(
    r"^arn:aws[a-z\-]*:secretsmanager:[a-z0-9\-]+:\d{12}:secret:[A-Za-z0-9/_+=.@\-]+$"
)
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,511}$")
LOCAL_ROLE = "arn:aws:iam::000000000000:role/spectrum-sm-local"
JOB_BASE = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,40}$")


def training_instance_types() -> list[str]:
    """Every instance type CreateTrainingJob accepts, from botocore's service model (offline)."""
    return list(sagemaker_service_model().shape_for("TrainingInstanceType").enum)


@functools.lru_cache(maxsize=1)
def sagemaker_service_model():
    """botocore's SageMaker service model (offline), loaded once: it costs ~0.13 s and configs
    and requests are validated against it several times per launch."""
    import botocore.session

    return botocore.session.get_session().get_service_model("sagemaker")


def hyperparameter_string(value: Any) -> str:
    """How a hyperparameter travels: a string (booleans lowercase, lists comma-joined)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


def _location_problems(fields: dict[str, str]) -> list[str]:
    """Each input is an s3:// URI, an existing local path or (the model) a Hub id, told apart
    by the Hub's rule without asking the network."""
    problems = []
    for name, value in fields.items():
        if not value or value.startswith("s3://"):
            continue
        try:
            if name == "model":
                is_local(value, name)
            elif not Path(value).expanduser().exists():
                problems.append(f"{name} {value!r} does not exist (an s3:// URI or a local path)")
        except SpectrumError as exc:
            problems.append(str(exc))
    return problems


def tag_problem(key: str, value: str) -> str | None:
    """Why SageMaker would refuse this tag (after the uploads), or None."""
    import unicodedata

    if not 1 <= len(key) <= 128 or len(value) > 256:
        return "keys are 1-128 characters and values at most 256"
    if key.lower().startswith("aws:"):
        return "keys starting with aws: are reserved for AWS"
    # The service's pattern ^([\p{L}\p{Z}\p{N}_.:/=+\-@]*)$ (letters, spaces, digits of any
    # script and _.:/=+-@), which the request check cannot run (Python's re has no \p{...}).
    if not all(c in "_.:/=+-@" or unicodedata.category(c)[0] in "LNZ" for c in key + value):
        return "tags hold letters, digits, spaces and _ . : / = + - @ only"
    return None


def _check(problems: list[str], ok: bool, message: str) -> None:
    if not ok:
        problems.append(message)


def partition(region: str) -> str:
    """The AWS partition a region belongs to (``aws``, ``aws-cn``, ``aws-us-gov``, ...)."""
    for prefix, name in (
        ("cn-", "aws-cn"),
        ("us-gov-", "aws-us-gov"),
        ("us-isob-", "aws-iso-b"),
        ("us-iso-", "aws-iso"),
        ("eu-isoe-", "aws-iso-e"),
        ("us-isof-", "aws-iso-f"),
    ):
        if region.startswith(prefix):
            return name
    return "aws"


def bucket_problem(uri: str) -> str | None:
    """Why S3 would reject the bucket of ``uri`` (its naming rules), or None."""
    if not uri.startswith("s3://"):
        return f"not an s3://bucket/prefix URI: {uri!r}"
    bucket = uri[5:].split("/", 1)[0]
    rules = [
        (3 <= len(bucket) <= 63, "3 to 63 characters"),
        (re.fullmatch(r"[a-z0-9.\-]+", bucket) is not None, "lowercase letters, digits, . and -"),
        (re.fullmatch(r"[a-z0-9].*[a-z0-9]", bucket) is not None, "starts and ends alphanumeric"),
        (".." not in bucket and ".-" not in bucket and "-." not in bucket, "no '..', '.-', '-.'"),
        (re.fullmatch(r"\d+\.\d+\.\d+\.\d+", bucket) is None, "not an IP address"),
        (
            not bucket.startswith(("xn--", "sthree-", "amzn-s3-demo-"))
            and not bucket.endswith(("-s3alias", "--ol-s3", ".mrap", "--x-s3")),
            "no reserved prefix or suffix",
        ),
    ]
    broken = [rule for ok, rule in rules if not ok]
    if broken:
        return f"{uri!r}: S3 refuses the bucket name {bucket!r} ({'; '.join(broken)})"
    return None


def secret_problems(config: Any) -> list[str]:
    """Credentials written in a config (any field but secret_environment's ARNs): they would show
    in DescribeTrainingJob, job names, S3 keys and the config copy written next to the outputs,
    so they are refused, named by field only."""
    return [secret_message(place) for place in secret_fields(config)]


def _setting(default: Any, help: str) -> Any:
    """A config field with an immutable default and its help text."""
    return field(default=default, metadata={"help": help})


@dataclass
class JobConfig:
    """What both jobs share: where, on what, with which permissions."""

    role: str = _setting("", "IAM role ARN the job runs as")
    region: str = _setting("us-east-1", "AWS region")
    output_s3: str = _setting("", "s3:// prefix for job outputs")
    instance_type: str = _setting("ml.g5.2xlarge", "ML instance type")
    instance_count: int = _setting(1, "instances (multi-node training)")
    volume_size_gb: int = _setting(200, "EBS volume per instance")
    max_runtime_s: int = _setting(24 * 3600, "stop after this long")
    image_uri: str = _setting("", "training image (default: official HF/PyTorch image)")
    base_job_name: str = _setting("spectrum", "job name prefix")
    environment: dict[str, str] = field(
        default_factory=dict, metadata={"help": "env vars (no credentials: secret_environment)"}
    )
    secret_environment: dict[str, str] = field(
        default_factory=dict,
        metadata={
            "help": "env var -> Secrets Manager secret ARN, read inside the job with its role "
            "(e.g. HF_TOKEN for a gated Hub model)"
        },
    )
    tags: dict[str, str] = field(default_factory=dict, metadata={"help": "resource tags"})
    subnets: list[str] = field(default_factory=list, metadata={"help": "VPC subnets"})
    security_group_ids: list[str] = field(default_factory=list, metadata={"help": "VPC SGs"})
    volume_kms_key: str = _setting("", "KMS key for the EBS volume (ignored on NVMe instances)")
    output_kms_key: str = _setting("", "KMS key for outputs and our uploads (SSE-KMS)")
    network_isolation: bool = _setting(False, "no network in the job")
    encrypt_inter_container: bool = _setting(False, "between nodes")
    validate_role: bool = _setting(
        False,
        "check with IAM (GetRole) that the role exists and trusts SageMaker before "
        "launching; needs iam:GetRole",
    )

    def problems(self, need_role: bool) -> list[str]:
        """Every way this config is wrong. A credential in it is the only problem reported:
        the other messages quote values."""
        return secret_problems(self) or type_problems(self) or self._problems(need_role)

    def _problems(self, need_role: bool) -> list[str]:
        p: list[str] = []
        _check(
            p,
            not need_role or bool(ROLE_ARN.match(self.role)),
            f"role must be an IAM role ARN (arn:aws:iam::123456789012:role/Name), "
            f"got {self.role!r}",
        )
        if need_role or self.output_s3:
            _check(
                p,
                bool(S3_URI.match(self.output_s3)),
                f"output_s3 must be an s3://bucket/prefix URI, got {self.output_s3!r}",
            )
        if self.output_s3.startswith("s3://"):
            problem = bucket_problem(self.output_s3)
            _check(p, problem is None, f"output_s3 {problem}")
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
        region_ok = bool(re.match(r"^[a-z]{2}(-[a-z]+)+-\d$", self.region))
        _check(p, region_ok, f"region looks wrong: {self.region!r}")
        if region_ok:
            region_partition = partition(self.region)
            for what, arn in (
                ("role", self.role),
                ("volume_kms_key", self.volume_kms_key),
                ("output_kms_key", self.output_kms_key),
                *((f"secret_environment.{k}", v) for k, v in self.secret_environment.items()),
            ):
                arn_partition = arn.split(":")[1] if arn.startswith("arn:") else region_partition
                _check(
                    p,
                    arn_partition == region_partition,
                    f"{what} {arn!r} is in partition {arn_partition!r}, but region "
                    f"{self.region!r} is in {region_partition!r}",
                )
        for key, value in self.tags.items():
            problem = tag_problem(str(key), str(value))
            _check(p, problem is None, f"tags.{key}: {problem}")
        for key in self.environment:
            _check(
                p,
                not str(key).startswith("SPECTRUM_SM_"),
                f"environment.{key}: SPECTRUM_SM_* variables are set by spectrum-sm from the "
                "config (processes_per_host, checkpoints, secrets); set those settings instead",
            )
        for key, arn in self.secret_environment.items():
            _check(p, bool(ENV_NAME.match(key)), f"secret_environment: {key!r} is no env name")
            _check(
                p,
                bool(SECRET_ARN.match(str(arn))),
                f"secret_environment.{key} must be one Secrets Manager secret ARN "
                "(arn:aws:secretsmanager:REGION:ACCOUNT:secret:NAME, no wildcards: they grant "
                "every matching secret; the value is not shown)",
            )
        return p


@dataclass
class AnalysisConfig(JobConfig, ScanOptions):
    """The analysis job: the SNR scan on a GPU instance (a CPU one works: the scan streams).
    Its scan settings are the fields of :class:`ScanOptions`, written flat under ``analysis:``."""

    model: str = _setting("", "Hub id or s3:// prefix of the weights")
    revision: str = _setting("", "Hub revision")
    layer_percents: list[float] = field(
        default_factory=list,
        metadata={
            "help": "more layer files from the same scan, one folder each (percent-<P>/), "
            "certified like certify_percents (spectrum-sm compare sets them)"
        },
    )
    max_runtime_s: int = _setting(4 * 3600, "stop after this long")
    stage_model: bool = _setting(
        True,
        "a Hub model: the analysis job (which reads every byte anyway) also copies "
        "the checkpoint to S3, and training reads it from there (no token, no internet, one "
        "download per instance)",
    )

    def _problems(self, need_role: bool) -> list[str]:
        p = super()._problems(need_role)
        _check(p, bool(self.model), "analysis needs a model (Hub id, s3:// prefix or folder)")
        p += _location_problems({"model": self.model})
        _check(
            p,
            not self.revision
            or not (self.model.startswith("s3://") or Path(self.model).expanduser().exists()),
            f"revision {self.revision!r} applies to Hub models; model {self.model!r} is not one",
        )
        p += self.scan_problems()
        _check(p, self.instance_count == 1, "the analysis runs on one instance")
        if self.model.startswith("s3://"):
            _check(p, bucket_problem(self.model) is None, f"model {bucket_problem(self.model)}")
        values = self.layer_percents
        _check(
            p,
            isinstance(values, (list, tuple)) and all(map(is_percent, values)),
            f"layer_percents must be a list of numbers in (0, 100], got {values!r}",
        )
        return p

    def __post_init__(self) -> None:
        """Not ScanOptions' refusal at construction: :func:`validate` reports every problem of
        the job at once (the YAML loader already refused wrong types)."""


@dataclass
class TrainingConfig(JobConfig):
    """The training job: train.py on one or more GPU instances, spot optional."""

    model: str = _setting("", "Hub id, s3:// prefix or folder")
    train_data: str = _setting("", "s3:// prefix, file or folder")
    validation_data: str = _setting("", "optional validation data")
    spectrum_config: str = _setting("", "layer file location (the pipeline fills it in)")
    chat_template: str = _setting(
        "",
        "a .jinja chat template (file or s3:// URI) that renders and masks chat "
        "rows instead of the tokenizer's, e.g. one with {% generation %} blocks",
    )
    method: str = _setting("spectrum", METHOD_HELP)
    hyperparameters: dict[str, Any] = field(
        default_factory=dict, metadata={"help": "train.py arguments, e.g. max_steps: 500"}
    )
    processes_per_host: int = _setting(0, "0: one per GPU")
    distribution: str = _setting("auto", DISTRIBUTION_HELP)
    top_percent: float = _setting(
        DEFAULT_TOP_PERCENT, "the layer file's percent, for the memory planner"
    )
    force: bool = _setting(False, "send a job the memory planner says will not fit")
    resume_from: str = _setting("", "s3:// checkpoints of another run to continue on purpose")
    spot: bool = _setting(False, "managed spot training")
    max_wait_s: int = _setting(0, "spot: total wait (0: 2x runtime)")
    checkpoint_s3: str = _setting("", "spot checkpoints (default: auto)")
    tensorboard: bool = _setting(True, "upload TensorBoard output")
    instance_type: str = _setting("ml.p4d.24xlarge", "ML instance type")

    def _problems(self, need_role: bool) -> list[str]:
        p = super()._problems(need_role)
        _check(p, bool(self.model), "training needs a model")
        _check(p, bool(self.train_data), "training needs train_data")
        precision = str(self.hyperparameters.get("precision", ""))
        if need_role and not has_cuda(self.instance_type):  # SageMaker, not a local run
            _check(
                p,
                self.method != "qlora" and precision != "fp16",
                f"{'method qlora' if self.method == 'qlora' else 'precision fp16'} needs a CUDA "
                f"GPU; {self.instance_type} has none (use a g or p instance type)",
            )
        names = ("model", "train_data", "validation_data", "spectrum_config", "chat_template")
        inputs = {name: getattr(self, name) for name in names}
        # Not spectrum_config's path: a run replaces it with the analysis's layer file, and
        # plan_training refuses a missing one when it stages it.
        p += _location_problems({k: v for k, v in inputs.items() if k != "spectrum_config"})
        _check(
            p,
            self.method in METHODS,
            f"method must be one of {', '.join(METHODS)}, got {self.method!r}",
        )
        _check(p, self.processes_per_host >= 0, "processes_per_host must be >= 0")
        _check(
            p,
            is_percent(self.top_percent),
            f"top_percent must be in (0, 100], got {self.top_percent!r}",
        )
        _check(
            p,
            self.distribution in JOB_DISTRIBUTIONS,
            f"distribution must be one of {', '.join(JOB_DISTRIBUTIONS)}, "
            f"got {self.distribution!r}",
        )
        # train.py's paths the job fills in from its channels (JOB_SET), and what the config sets
        for key in ("distribution", "resume_from", *JOB_SET, "method"):
            _check(
                p,
                key not in self.hyperparameters,
                f"hyperparameter {key!r} is set by the job itself; use the config field",
            )
        _check(
            p,
            not self.spot or self.max_wait_s == 0 or self.max_wait_s >= self.max_runtime_s,
            "max_wait_s must be at least max_runtime_s for spot training",
        )
        for uri in (self.checkpoint_s3, self.resume_from):
            if uri:
                _check(p, bucket_problem(uri) is None, str(bucket_problem(uri)))
        for name, uri in inputs.items():
            if uri.startswith("s3://"):
                _check(p, bucket_problem(uri) is None, f"{name} {bucket_problem(uri)}")
        _check(
            p,
            not (self.validation_data and self.hyperparameters.get("validation_share")),
            "hyperparameters.validation_share holds out training rows when there is no "
            "validation data; with validation_data set, leave it out",
        )
        if not any("set by the job itself" in problem for problem in p):
            try:  # train.py's own parser: names, types and ranges, before anything is uploaded
                self.train_args()
            except SpectrumError as exc:
                p.append(str(exc))
        return p

    def train_args(self):
        """The hyperparameters parsed by train.py's own parser, as the job will parse them."""
        from ..training.args import check_hyperparameters

        return check_hyperparameters(
            {k: hyperparameter_string(v) for k, v in self.hyperparameters.items()}
        )

    def gpus_per_host(self) -> int:
        if self.processes_per_host:
            return self.processes_per_host
        known = instance(self.instance_type)
        return known.gpus if known and known.gpus else 1


@dataclass
class PipelineConfig:
    """Analysis then training, the second reading the first's layer file from S3."""

    analysis: AnalysisConfig
    training: TrainingConfig
    reuse_analysis: bool = True
    #: ``training.top_percent`` as the file or ``--set`` gave it (None: not given). In a run
    #: the training job trains the analysis's layer file, so a different one is refused.
    training_percent_given: float | None = field(default=None, repr=False, compare=False)

    def percent_conflict(self) -> str:
        """Why the two jobs' percents disagree ("" when they do not)."""
        given = self.training_percent_given
        if given is None or given == self.analysis.top_percent:
            return ""
        return (
            f"training.top_percent is {given:g} but analysis.top_percent is "
            f"{self.analysis.top_percent:g}: a run trains the analysis's layer file, so set "
            "analysis.top_percent (or common.top_percent) to choose the percent"
        )


def validate(config: JobConfig, *, need_role: bool) -> None:
    problems = config.problems(need_role)
    if problems:
        raise SpectrumError(f"invalid {type(config).__name__}: " + "; ".join(problems))


def _from_dict(cls, data: dict[str, Any], where: str, given: dict[str, str] | None = None):
    """Build ``cls`` from YAML data: unknown keys and wrong types are errors; an empty value
    (``key:`` or ``--set key=``) means the default. ``given`` names where a key's value came
    from when not from ``where`` (an override: ``--set analysis.top_percent``)."""
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
        place = (given or {}).get(key, where)
        if isinstance(value, dict):  # an empty entry (``KEY:`` or ``--set ...KEY=``): not set
            value = {k: v for k, v in value.items() if v is not None}
        kind = str(fields[key].type)
        allowed = TYPES.get(kind, (object,))
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            raise SpectrumError(f"{place}: {key} must be {kind}, got {value!r}")
        if kind == "list[str]" and not all(isinstance(v, str) for v in value):
            raise SpectrumError(f"{place}: {key} must be a list of strings")
        if kind == "dict[str, str]":
            for name, item in value.items():
                if not isinstance(item, str):
                    raise SpectrumError(
                        f"{place}: {key}.{name} must be text, got the YAML value {item!r}: quote "
                        f'it as you mean it ("{item}" may not be what you typed)'
                    )
        if kind == "list[float]" and not all(map(is_number, value)):
            raise SpectrumError(f"{place}: {key} must be a list of numbers, got {value!r}")
        values[key] = value
    return cls(**values)


def replace_checked(config, changes: dict[str, Any], where: str):
    """``dataclasses.replace`` with the YAML loader's checks: unknown keys and wrong types are
    errors naming ``where``."""
    return _from_dict(type(config), {**dataclasses.asdict(config), **changes}, where)


TOP_LEVEL = ("common", "analysis", "training", "reuse_analysis")
#: Fields that hold a mapping: ``--set training.hyperparameters.max_steps=5`` goes one deeper.
MAPPINGS = ("hyperparameters", "environment", "secret_environment", "tags")
#: Mappings whose values are text (the others' values are typed YAML).
TEXT_MAPPINGS = ("environment", "secret_environment", "tags")


def section_fields(section: str) -> set[str]:
    """The keys a section accepts (``common``: those both jobs have)."""
    analysis = {f.name for f in dataclasses.fields(AnalysisConfig)}
    training = {f.name for f in dataclasses.fields(TrainingConfig)}
    return {"common": analysis & training, "analysis": analysis, "training": training}[section]


def load_pipeline(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    """Read a pipeline YAML (common, analysis, training) plus ``section.key=value`` overrides.

    Unknown sections and keys (in the file or in an override) are errors naming the nearest
    known one; booleans must be true or false, not strings."""
    path = Path(path)
    if path.is_dir():
        raise SpectrumError(f"config file {str(path)!r} is a folder; give the YAML file")
    if not path.is_file():
        raise SpectrumError(f"config file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SpectrumError(f"config file {str(path)!r} cannot be read ({exc})") from exc
    data = load_yaml(text, str(path)) or {}
    if not isinstance(data, dict):
        raise SpectrumError(f"{path}: expected a mapping at the top")
    unknown = sorted(set(data) - set(TOP_LEVEL))
    if unknown:
        raise SpectrumError(
            f"{path}: unknown key(s) {', '.join(unknown)}{did_you_mean(unknown[0], TOP_LEVEL)}; "
            "known: common, analysis, training, reuse_analysis"
        )
    given: dict[str, dict[str, str]] = {"analysis": {}, "training": {}}
    for override in overrides or []:
        section, key = _apply_override(data, override)
        for job in ("analysis", "training") if section == "common" else (section,):
            if job in given:  # errors about this key name the override, not the file
                given[job][key] = f"--set {override.partition('=')[0].strip()}"
    common = data.get("common") or {}
    if not isinstance(common, dict):
        raise SpectrumError(f"{path}: common must be a mapping of settings")
    stray = sorted(set(common) - section_fields("common"))
    if stray:
        raise SpectrumError(
            f"{path}: common: {stray[0]!r} is not a setting both jobs have"
            f"{did_you_mean(stray[0], section_fields('common'))}; put it under analysis or training"
        )
    analysis, training = (
        _from_dict(cls, _merged(common, data, job), f"{path}: {job}", given[job])
        for cls, job in ((AnalysisConfig, "analysis"), (TrainingConfig, "training"))
    )
    reuse = data.get("reuse_analysis", True)
    if not isinstance(reuse, bool):
        raise SpectrumError(f"{path}: reuse_analysis must be true or false, got {reuse!r}")
    given = (data.get("training") or {}).get("top_percent")
    return PipelineConfig(
        analysis, training, reuse, None if given is None else training.top_percent
    )


def _merged(common: dict[str, Any], data: dict[str, Any], job: str) -> dict[str, Any]:
    """A job's settings over the common ones; mappings merge key by key, the job's keys winning."""
    settings = data.get(job) or {}
    if not isinstance(settings, dict):
        raise SpectrumError(f"{job} must be a mapping of settings")
    merged = {**common, **settings}
    for key in MAPPINGS:
        if isinstance(common.get(key), dict) and isinstance(settings.get(key), dict):
            merged[key] = {**common[key], **settings[key]}
    return merged


def _apply_override(data: dict[str, Any], override: str) -> tuple[str, str]:
    """``section.key=value`` (or ``section.mapping.key=value``), checked against the schema;
    returns the section and the key it set."""
    key, sep, raw = override.partition("=")
    parts = key.strip().split(".")
    if not sep or not key or not all(parts):
        raise SpectrumError(f"--set {override!r} is not of the form section.key=value")
    section = parts[0]
    if section not in TOP_LEVEL:
        raise SpectrumError(
            f"--set {override!r}: no section {section!r}{did_you_mean(section, TOP_LEVEL)}; "
            "sections: common, analysis, training (and reuse_analysis)"
        )
    value = load_yaml(raw, f"--set {override!r}: the value")
    if len(parts) == 3 and parts[1] in TEXT_MAPPINGS:
        value = raw or None  # environment and tags are text, as typed (1.10 stays 1.10)
    if section == "reuse_analysis":
        if len(parts) != 1:
            raise SpectrumError(f"--set {override!r}: reuse_analysis has no keys")
        data[section] = value
        return section, ""
    if len(parts) == 1:
        raise SpectrumError(
            f"--set {override!r}: {section} is a section; use --set {section}.KEY=VALUE"
        )
    known = section_fields(section)
    if parts[1] not in known:
        either = section_fields("training") | section_fields("analysis")
        if section == "common" and parts[1] in either:
            raise SpectrumError(
                f"--set {override!r}: {parts[1]!r} is not a setting both jobs have; "
                "put it under analysis or training"
            )
        raise SpectrumError(
            f"--set {override!r}: {section} has no setting {parts[1]!r}"
            f"{did_you_mean(parts[1], known)}"
        )
    if len(parts) > 2 and (parts[1] not in MAPPINGS or len(parts) > 3):
        raise SpectrumError(
            f"--set {override!r}: {section}.{parts[1]} has no sub-keys"
            if parts[1] not in MAPPINGS
            else f"--set {override!r}: {section}.{parts[1]} takes one sub-key"
        )
    target = data.get(section)
    if target is None:
        target = data[section] = {}
    if not isinstance(target, dict):
        raise SpectrumError(f"--set {override!r}: {section} is not a mapping in the file")
    if len(parts) == 3:
        mapping = target.get(parts[1])
        if mapping is None:
            mapping = target[parts[1]] = {}
        if not isinstance(mapping, dict):
            raise SpectrumError(f"--set {override!r}: {section}.{parts[1]} is not a mapping")
        mapping[parts[2]] = value
    else:
        target[parts[1]] = value
    if section == "common":  # the command line wins over the file's sections too
        for settings in (data.get("analysis"), data.get("training")):
            if not isinstance(settings, dict) or parts[1] not in settings:
                continue
            if len(parts) == 2:
                settings[parts[1]] = value
            elif isinstance(settings[parts[1]], dict):
                settings[parts[1]][parts[2]] = value
    return section, parts[1]


def to_yaml(config) -> str:
    return yaml.safe_dump(dataclasses.asdict(config), sort_keys=False)
