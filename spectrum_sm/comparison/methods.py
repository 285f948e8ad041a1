"""The methods a comparison trains (``--methods``, ``--method-set``) and the record of each run."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..aws.config import TrainingConfig
from ..core.errors import SpectrumError, did_you_mean
from ..core.selection import check_percent, format_percent
from ..core.yamlio import load_yaml
from ..training.args import METHODS, TrainArgs, with_role

DEFAULT_METHODS = "spectrum,qlora"  # Spectrum at the analysis's top_percent
#: What makes the runs comparable: a per-method setting may not change these (the role is
#: declared on TrainArgs' fields).
SHARED_BUDGET = with_role("budget")
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
            named = ", ".join("spectrum:P" if m == "spectrum" else m for m in METHODS)
            raise SpectrumError(
                f"--methods: unknown method {name!r}{did_you_mean(name, METHODS)}; methods: {named}"
            )
        if name != "spectrum" and sep:
            raise SpectrumError(f"--methods: {part!r}: only spectrum takes a percent")
        value = None
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
        value = self.request.get("HyperParameters", {}).get("learning_rate")
        return float(value if value is not None else TrainArgs.learning_rate)

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
        extra = {key: getattr(self, key) for key in ("model_s3", "model_dir", "reason")}
        return row | {key: value for key, value in extra.items() if value}  # where there is one
