"""The scan's options, declared once, and the dataclass machinery every option set shares.

:class:`ScanOptions` is what ``spectrum_sm.scan``, ``spectrum-sm scan``, the analysis job's
config (``analysis:`` in the YAML), its request's hyperparameters, ``entrypoints/analyze.py``'s
parser and the analysis reuse key all read: a new scan option is one field here. Command lines
are generated from the fields (:func:`add_arguments`), their help text is the field's, and
:func:`type_problems` checks values against the annotations (``exact="false"`` is not false).
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .errors import SpectrumError
from .names import TOWERS
from .selection import DEFAULT_TOP_PERCENT

#: certified: float32 with error bounds, weights near a selection boundary recomputed in
#: float64 (the selection equals float64's); float64: everything in float64.
PRECISIONS = ("certified", "float64")
DEVICES = ("auto", "cpu", "cuda")
DEFAULT_CHUNK_MB = 64

#: Python type(s) each annotation (as a string: ``from __future__ import annotations``) allows.
TYPES: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
    "list[str]": (list,),
    "list[float]": (list,),
    "dict[str, str]": (dict,),
    "dict[str, Any]": (dict,),
}


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_percent(value: Any) -> bool:
    """A number in (0, 100] (a bool, a string or NaN is not)."""
    return is_number(value) and 0 < value <= 100


def type_problems(config: Any) -> list[str]:
    """Fields whose value is not of their declared type (a config built in Python:
    ``spot="false"`` is not false); the YAML loader refuses these as it reads them."""
    problems = []
    for f in dataclasses.fields(config):
        value, kind = getattr(config, f.name), str(f.type)
        allowed = TYPES.get(kind, (object,))
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            problems.append(f"{f.name} must be {kind}, got {value!r}")
        elif kind == "dict[str, str]" and not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            problems.append(f"{f.name} must map text to text, got {value!r}")
        elif kind.startswith("list[") and not all(
            isinstance(v, str) if kind == "list[str]" else is_number(v) for v in value
        ):
            problems.append(f"{f.name} must be {kind}, got {value!r}")
    return problems


def _help(text: str, metavar: str = "", **extra: Any) -> dict[str, Any]:
    return {"help": text, "metavar": metavar, **extra}


@dataclass
class ScanOptions:
    """How a checkpoint is scored and its layers selected (every field is a scan option)."""

    top_percent: float = field(
        default=DEFAULT_TOP_PERCENT,
        metadata=_help("share of each module type to train, in (0, 100]", metavar="P"),
    )
    include: list[str] = field(
        default_factory=list,
        metadata=_help("module types to keep, e.g. 'self_attn.*,mlp.*' (default: all)", "GLOB"),
    )
    exclude: list[str] = field(
        default_factory=list, metadata=_help("module types to leave out, e.g. '*norm*'", "GLOB")
    )
    embeddings: bool = field(
        default=True,
        metadata=_help(
            "write the output-head and input-embedding entries first in the layer file (as the "
            "reference does: ^lm_head.weight$ and ^model.embed_tokens.weight$ on Llama-style "
            "models)"
        ),
    )
    exact: bool = field(
        default=False,
        metadata=_help("float32 svdvals like the reference instead of the Gram method"),
    )
    precision: str = field(
        default="certified",
        metadata=_help(
            "certified: float32 with error bounds, weights near a selection boundary recomputed "
            "in float64, so the selection equals float64's; float64: all in float64",
            choices=PRECISIONS,
        ),
    )
    certify_percents: list[float] = field(
        default_factory=list,
        metadata=_help(
            "more percents whose selections must equal float64's (for select later)", "P"
        ),
    )
    towers: list[str] = field(
        default_factory=lambda: ["language"],
        metadata=_help(
            "multimodal models: which parts to scan (types never mix towers)",
            "T",
            choices=(*TOWERS, "all"),
        ),
    )
    device: str = field(
        default="auto",
        metadata=_help("where to compute: cuda when available", choices=DEVICES, result=False),
    )
    chunk_mb: int = field(
        default=DEFAULT_CHUNK_MB,
        metadata=_help("float64 chunk size in MB; bounds memory", "MB", result=False),
    )

    def __post_init__(self) -> None:
        if problems := self.scan_problems():
            raise SpectrumError("; ".join(problems))

    def scan_problems(self) -> list[str]:
        """Every way these options are wrong (types first: the other checks assume them)."""
        own = {f.name: f for f in scan_fields()}
        problems = [p for p in type_problems(self) if p.split(" ")[0] in own]
        if problems:
            return problems
        if not is_percent(self.top_percent):
            problems.append(f"top_percent must be in (0, 100], got {self.top_percent!r}")
        if not all(map(is_percent, self.certify_percents)):
            problems.append(f"certify_percents must be in (0, 100], got {self.certify_percents!r}")
        for name in ("precision", "device", "towers"):
            choices = own[name].metadata["choices"]
            value = getattr(self, name)
            values = value if isinstance(value, list) else [value]
            if not values or any(v not in choices for v in values):
                kind = "some of" if name == "towers" else "one of"
                problems.append(f"{name} must be {kind} {', '.join(choices)}, got {value!r}")
        if self.chunk_mb < 1:
            problems.append(f"chunk_mb must be at least 1, got {self.chunk_mb}")
        return problems

    def resolved_towers(self) -> list[str]:
        """The towers to scan: ``all`` is every one."""
        return list(TOWERS) if "all" in self.towers else list(self.towers)

    def settings(self) -> dict[str, Any]:
        """The options that decide the result (not where or in what chunks it is computed)."""
        return {
            f.name: getattr(self, f.name) for f in scan_fields() if f.metadata.get("result", True)
        }


def scan_fields() -> tuple[dataclasses.Field, ...]:
    return dataclasses.fields(ScanOptions)


def parse_bool(text: str) -> bool:
    value = str(text).strip().strip('"').lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off"}:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _listed(kind: str):
    def parse(text: str) -> list:
        items = [part.strip() for part in str(text).split(",") if part.strip()]
        try:
            return [float(item) for item in items] if kind == "list[float]" else items
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected numbers, got {text!r}") from None

    return parse


class JobParser(argparse.ArgumentParser):
    """argparse for a job's entrypoint: a bad argument is one :class:`SpectrumError` (the job's
    FailureReason), not a usage dump and exit 2."""

    def error(self, message: str):
        raise SpectrumError(f"invalid arguments: {message}")


def add_arguments(
    parser: argparse.ArgumentParser,
    fields: tuple[dataclasses.Field, ...],
    *,
    flags: bool,
    types: dict[str, Any] | None = None,
) -> None:
    """One argument per field, with its help and choices. ``flags``: a person's command line
    (``--top-percent``, ``--exact`` / ``--no-embeddings``, lists comma-separated or repeated);
    else a job's hyperparameters (``--top_percent 30``, ``--exact false``). Unset arguments
    are None: the dataclass keeps its default. ``types`` overrides the parser of a value (a list
    field's parser gets one comma-separated argument)."""
    for f in fields:
        kind, meta = str(f.type), f.metadata
        help_text = meta.get("help", "").replace("%", "%%")  # argparse %-formats help
        name = (meta.get("flag") or f.name.replace("_", "-")) if flags else f.name
        extra: dict[str, Any] = {"default": None, "help": help_text}
        if kind == "bool" and flags:
            if f.default:
                extra["help"] = f"do not {help_text} (on by default)"
            parser.add_argument(
                f"--no-{name}" if f.default else f"--{name}",
                dest=f.name,
                action="store_const",
                const=not f.default,
                **extra,
            )
            continue
        parse = (types or {}).get(f.name)
        if kind.startswith("list["):
            extra.update(type=parse or _listed(kind), action="append")
            if meta.get("choices"):
                extra["help"] = f"{help_text}: {', '.join(meta['choices'])}"
        else:
            extra["type"] = parse or {"int": int, "float": float, "bool": parse_bool}.get(kind, str)
            if meta.get("choices"):
                extra["choices"] = meta["choices"]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if default not in ("", [], None):
            shown = ",".join(map(str, default)) if isinstance(default, list) else default
            extra["help"] += f" (default: {shown})"
        if meta.get("metavar"):
            extra["metavar"] = meta["metavar"] + (",..." if kind.startswith("list[") else "")
        parser.add_argument(f"--{name}", **extra)


def given(namespace: argparse.Namespace, fields: tuple[dataclasses.Field, ...]) -> dict[str, Any]:
    """The fields set on a command line (repeated list arguments joined)."""
    values = {}
    for f in fields:
        value = getattr(namespace, f.name, None)
        if value is not None:
            joined = str(f.type).startswith("list[")
            values[f.name] = [item for part in value for item in part] if joined else value
    return values
