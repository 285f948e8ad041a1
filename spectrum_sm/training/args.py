"""Training-job arguments: one dataclass with help text, parsed from ``--name value`` pairs.

SageMaker passes hyperparameters as ``--name value`` (non-strings JSON-encoded); defaults for the
paths come from the container contract (``SM_CHANNEL_*``, ``SM_MODEL_DIR``, /opt/ml/checkpoints).
Unknown arguments are an error.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..core.container import default_checkpoint_dir, env_path
from ..core.errors import SpectrumError, did_you_mean
from ..core.options import JobParser, parse_bool

METHODS = ("spectrum", "full", "lora", "qlora")
#: What a model computes in; ``auto`` picks bf16 where the GPU has it.
COMPUTE_PRECISIONS = ("bf16", "fp16", "fp32")
PRECISIONS = ("auto", *COMPUTE_PRECISIONS)
DISTRIBUTIONS = ("auto", "ddp", "fsdp", "zero3")
#: What a job may ask for: train.py refuses zero3 (DeepSpeed) with a message pointing to fsdp,
#: which shards the same state, so a job request never carries it.
JOB_DISTRIBUTIONS = tuple(d for d in DISTRIBUTIONS if d != "zero3")
#: Help texts for the choices, built from the tuples above (train.py's and the job config's).
METHOD_HELP = " | ".join(METHODS)
DISTRIBUTION_HELP = (
    " | ".join(JOB_DISTRIBUTIONS) + " (fsdp: FSDP2; auto: the planner's choice for the GPU; "
    "zero3 is refused, use fsdp)"
)
PRECISION_HELP = " | ".join(PRECISIONS) + " (auto: bf16 on a capable GPU)"
#: Shorter windows leave a chat row hardly any assistant token to learn from.
MIN_SEQ_LENGTH = 16


def _arg(default: Any, help: str, *roles: str) -> Any:
    """A TrainArgs field: its default (a callable one is called per instance, so the container's
    environment is read when the arguments are), its help text and its roles (:func:`with_role`)."""
    metadata = {"help": help, "roles": roles}
    if callable(default):
        return field(default_factory=default, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class TrainArgs:
    model_name_or_path: str | None = _arg(
        lambda: env_path("SM_CHANNEL_MODEL"),
        "model folder or Hub id (default: the 'model' channel)",
        "job",
    )
    spectrum_config: str | None = _arg(
        lambda: env_path("SM_CHANNEL_SPECTRUM"),
        "layer file, or a folder holding one (default: the 'spectrum' channel)",
        "job",
    )
    train_data: str | None = _arg(
        lambda: env_path("SM_CHANNEL_TRAIN"),
        "jsonl/json/parquet/csv/arrow file or folder, save_to_disk folder or Hub "
        "dataset id (default: the 'train' channel)",
        "job",
    )
    validation_data: str | None = _arg(
        lambda: env_path("SM_CHANNEL_VALIDATION"),
        "validation data (default: the 'validation' channel, if any)",
        "job",
    )
    output_dir: str = _arg(
        lambda: env_path("SM_MODEL_DIR") or "output",
        "where the fine-tuned model goes (default: SM_MODEL_DIR)",
        "job",
    )
    checkpoint_dir: str | None = _arg(
        default_checkpoint_dir,
        "checkpoints for resume (default: /opt/ml/checkpoints in a job)",
        "job",
    )
    tensorboard_dir: str = _arg(
        lambda: env_path("SM_TENSORBOARD_DIR") or "",
        "write TensorBoard scalars here (default: the job's tensorboard dir)",
        "job",
    )
    resume_from: str = _arg(
        lambda: env_path("SM_CHANNEL_RESUME") or "",
        "continue another run from its checkpoint folder (on purpose; default: the "
        "job's 'resume' channel)",
    )
    method: str = _arg("spectrum", METHOD_HELP, "fingerprint")
    distribution: str = _arg("auto", DISTRIBUTION_HELP)
    max_steps: int = _arg(-1, "optimizer steps; -1: use epochs", "fingerprint", "budget")
    num_train_epochs: float = _arg(1.0, "epochs when max_steps < 0", "fingerprint", "budget")
    save_steps: int = _arg(0, "checkpoint every N steps (0: never)")
    save_total_limit: int = _arg(2, "checkpoints kept")
    learning_rate: float = _arg(2e-5, "peak learning rate", "fingerprint")
    weight_decay: float = _arg(0.0, "AdamW weight decay", "fingerprint")
    warmup_ratio: float = _arg(0.03, "share of steps for warmup", "fingerprint")
    max_grad_norm: float = _arg(1.0, "gradient clipping norm", "fingerprint")
    per_device_train_batch_size: int = _arg(1, "micro-batch size", "fingerprint", "budget")
    per_device_eval_batch_size: int = _arg(1, "eval batch size", "budget")
    gradient_accumulation_steps: int = _arg(1, "micro-batches/step", "fingerprint", "budget")
    max_seq_length: int = _arg(2048, "tokens per example", "fingerprint", "budget", "data")
    precision: str = _arg("auto", PRECISION_HELP, "fingerprint")
    gradient_checkpointing: bool = _arg(False, "non-reentrant")
    packing: bool = _arg(False, "concatenate examples into blocks", "fingerprint", "budget")
    train_split: str = _arg(
        "train", "split of a Hub dataset or a DatasetDict folder", "fingerprint", "budget"
    )
    validation_split: str = _arg("validation", "split of the validation data", "budget")
    validation_share: float = _arg(
        0.0,
        "without validation data: hold out this share of the training rows (the "
        "same rows for the same data and seed) and validate on them",
        "budget",
    )
    dataset_config: str = _arg("", "a Hub dataset's config name", "fingerprint", "data")
    columns: str = _arg(
        "", "rename fields, e.g. prompt=question,completion=answer", "fingerprint", "data"
    )
    prompt_template: str = _arg(
        "", "format string over a row's fields, e.g. '{question}'", "fingerprint", "data"
    )
    completion_template: str = _arg(
        "", "format string for the answer, e.g. '{answers[text][0]}'", "fingerprint", "data"
    )
    system_prompt: str = _arg(
        "", "system message for rows built from templates", "fingerprint", "data"
    )
    num_proc: int = _arg(0, "tokenizing processes per host (0: its cores, at most 8)")
    assistant_only_loss: bool = _arg(
        True,
        "put the loss only on what the assistant writes (messages rows), as TRL masks it",
        "fingerprint",
        "data",
    )
    chat_template_path: str | None = _arg(
        lambda: env_path("SM_CHANNEL_CHAT_TEMPLATE"),
        "a .jinja chat template (or a folder holding one) used instead of the "
        "tokenizer's to render and mask chat rows, e.g. one with {% generation %} blocks "
        "(default: the 'chat_template' channel, if any)",
        "job",
        "data",
    )
    seed: int = _arg(42, "seed for data order and init", "fingerprint", "budget")
    logging_steps: int = _arg(10, "log every N steps")
    eval_steps: int = _arg(0, "evaluate every N steps (0: at end)", "budget")
    name_prefix: str = _arg("", "rewrite 'model.' in layer entries (multimodal models)")
    lora_r: int = _arg(16, "LoRA rank", "fingerprint")
    lora_alpha: int = _arg(32, "LoRA alpha", "fingerprint")
    lora_dropout: float = _arg(0.0, "LoRA dropout", "fingerprint")
    lora_target_modules: str = _arg(
        "all-linear", "LoRA targets (comma list or all-linear)", "fingerprint"
    )
    trust_remote_code: bool = _arg(False, "for custom models")

    def __post_init__(self) -> None:
        problems = []
        if self.method not in METHODS:
            problems.append(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        for name, choices in (("precision", PRECISIONS), ("distribution", DISTRIBUTIONS)):
            if getattr(self, name) not in choices:
                problems.append(f"{name} must be one of {', '.join(choices)}")
        if not self.model_name_or_path:
            problems.append("no model: pass --model_name_or_path or provide a 'model' channel")
        if not self.train_data:
            problems.append("no training data: pass --train_data or provide a 'train' channel")
        if self.method == "spectrum" and not self.spectrum_config:
            problems.append("method spectrum needs --spectrum_config or a 'spectrum' channel")
        problems += self._range_problems()
        if problems:
            raise SpectrumError("; ".join(problems))

    def _range_problems(self) -> list[str]:
        """Values that would train nothing or train wrongly (exit 0 with a broken model)."""
        problems = []
        for name in [f.name for f in dataclasses.fields(self) if f.type == "float"]:
            if not math.isfinite(getattr(self, name)):
                problems.append(f"{name} must be a finite number, got {getattr(self, name)}")
        if problems:
            return problems
        checks = [
            (
                0 < self.learning_rate <= 1,
                f"learning_rate must be in (0, 1], got {self.learning_rate}",
            ),
            (
                self.max_grad_norm > 0,
                f"max_grad_norm must be positive, got {self.max_grad_norm} (a negative norm "
                "flips the gradient)",
            ),
            (
                self.max_seq_length >= MIN_SEQ_LENGTH,
                f"max_seq_length must be at least {MIN_SEQ_LENGTH}, got {self.max_seq_length}: "
                "shorter windows leave (almost) no token to learn from",
            ),
            (
                not self.save_steps or bool(self.checkpoint_dir),
                f"save_steps {self.save_steps} saves into checkpoint_dir, which is not set: pass "
                "--checkpoint_dir DIR (a SageMaker job sets it) or leave save_steps at 0",
            ),
            (self.save_total_limit >= 1, "save_total_limit must be at least 1"),
            (
                bool(self.prompt_template) == bool(self.completion_template),
                "prompt_template and completion_template go together",
            ),
            (self.lora_r >= 1, f"lora_r must be at least 1, got {self.lora_r}"),
            (
                self.lora_alpha > 0,
                f"lora_alpha must be positive, got {self.lora_alpha} (the adapter's scale: "
                "0 trains nothing, a negative one flips it)",
            ),
            (
                0 <= self.seed < 2**32,
                f"seed must be in [0, 2**32), got {self.seed} (numpy's and torch's range)",
            ),
        ]
        problems = [message for ok, message in checks if not ok]
        for name in ("weight_decay", "warmup_ratio", "validation_share", "lora_dropout"):
            if not 0 <= getattr(self, name) < 1:
                problems.append(f"{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("save_steps", "eval_steps", "num_proc"):
            if getattr(self, name) < 0:
                problems.append(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in (
            "per_device_train_batch_size",
            "per_device_eval_batch_size",
            "gradient_accumulation_steps",
            "logging_steps",
        ):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1")
        if self.max_steps == 0 or (self.max_steps < 0 and self.num_train_epochs <= 0):
            problems.append("nothing to train: set max_steps > 0 or num_train_epochs > 0")
        if self.columns:
            from .data import parse_columns

            try:  # before a job is paid for: the job parses it with the data
                parse_columns(self.columns)
            except SpectrumError as exc:
                problems.append(str(exc))
        # Output folders that would mix or fail: the model and the checkpoints in one tree (a
        # checkpoint's optimizer state saved as part of the model), a file where a folder goes.
        for name in ("output_dir", "checkpoint_dir", "tensorboard_dir"):
            folder = getattr(self, name)
            if folder and Path(folder).expanduser().is_file():
                problems.append(f"{name} {folder!r} is a file; give a folder")
        if self.output_dir and self.checkpoint_dir:
            out = Path(self.output_dir).expanduser().resolve()
            ckpt = Path(self.checkpoint_dir).expanduser().resolve()
            if out == ckpt or out in ckpt.parents or ckpt in out.parents:
                problems.append(
                    f"output_dir {self.output_dir!r} and checkpoint_dir {self.checkpoint_dir!r} "
                    "overlap: checkpoints would be saved into the model (or the model into a "
                    "checkpoint); give two separate folders"
                )
        return problems


def _str(text: str) -> str:
    # SageMaker SDK v3 JSON-encodes non-strings; a JSON string stays quoted in some paths.
    return text[1:-1] if len(text) >= 2 and text[0] == text[-1] == '"' else text


def build_parser() -> JobParser:
    parser = JobParser(
        prog="train.py",
        allow_abbrev=False,
        description="Spectrum / full / LoRA fine-tuning with accelerate",
    )
    for item in dataclasses.fields(TrainArgs):
        # Annotations are strings here ("int", "str | None", ...).
        kind: Any = {"int": int, "float": float, "bool": parse_bool}.get(
            str(item.type).split(" ")[0], _str
        )
        # argparse %-formats help text; a template's literal "{% ... %}" must reach it escaped.
        help_text = item.metadata.get("help", "").replace("%", "%%")
        parser.add_argument(f"--{item.name}", type=kind, default=None, help=help_text)
    return parser


def parse_args(argv: list[str] | None = None) -> TrainArgs:
    """Parse ``--name value`` pairs; unset ones keep their (container) defaults."""
    namespace = build_parser().parse_args(argv)
    return TrainArgs(**{k: v for k, v in vars(namespace).items() if v is not None})


def with_role(role: str) -> tuple[str, ...]:
    """The TrainArgs fields that carry a role in their metadata: ``fingerprint`` (changes what a
    run computes: resuming is only right between equal ones), ``budget`` (what makes compared
    runs comparable: one method may not change it), ``job`` (set by the job itself from its
    channels and config, never by hyperparameters) or ``data`` (how rows become examples)."""
    return tuple(
        f.name for f in dataclasses.fields(TrainArgs) if role in f.metadata.get("roles", ())
    )


JOB_SET = with_role("job")
#: How rows become examples: what data-check and the client's data check take, by these names.
DATA_SETTINGS = with_role("data")
#: What the client's checks give the paths a job fills in from its channels.
_STAND_INS = {k: f"/opt/ml/job-set/{k}" for k in JOB_SET}


def data_settings(given: dict[str, Any], where: str = "data settings") -> TrainArgs:
    """train.py's arguments with the ``given`` data settings (:data:`DATA_SETTINGS` by name;
    None keeps the default) validated as train.py validates them: what data-check and the
    client's check of a job's data read."""
    unknown = sorted(set(given) - set(DATA_SETTINGS))
    if unknown:
        hint = did_you_mean(unknown[0], DATA_SETTINGS)
        raise SpectrumError(
            f"{where}: {unknown[0]!r} is not a data setting{hint}; they are: "
            + ", ".join(DATA_SETTINGS)
        )
    values = {k: v for k, v in given.items() if v is not None}
    try:
        return TrainArgs(**{**_STAND_INS, "chat_template_path": "", **values})
    except SpectrumError as exc:
        raise SpectrumError(f"{where}: {exc}") from None


def check_hyperparameters(
    hyperparameters: dict[str, str], where: str = "hyperparameters"
) -> TrainArgs:
    """Parse a job's hyperparameters exactly as train.py will (names, types, ranges), on the
    client, so a typo fails before anything is uploaded or paid for. Paths the job fills in from
    its channels are stood in for."""
    known = {f.name for f in dataclasses.fields(TrainArgs)}
    for name in hyperparameters:
        if name not in known:
            hint = did_you_mean(name, known)
            raise SpectrumError(f"{where}: train.py has no argument {name!r}{hint}")
    argv = [part for name, value in hyperparameters.items() for part in (f"--{name}", value)]
    try:
        namespace = build_parser().parse_args(argv)
        given = {k: v for k, v in vars(namespace).items() if v is not None}
        return TrainArgs(**{**_STAND_INS, **given})
    except SpectrumError as exc:
        raise SpectrumError(f"{where}: {exc}") from None
