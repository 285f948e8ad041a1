"""Freezing: train exactly the parameters a Spectrum layer file names, nothing else.

Pattern semantics follow axolotl's ``unfrozen_parameters`` so the same file works in both:
each entry is a regular expression in which a ``.`` is a literal dot (except in ``.+``), matched at
the start of the parameter name. We are stricter in two ways: an entry that matches no parameter is
an error naming it and the closest real names, and a plain module name must end at a name
boundary (``model.layers.1`` matches ``model.layers.1.*``, never ``model.layers.10.*``).
"""

from __future__ import annotations

import difflib
import logging
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import SpectrumError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def read_layer_file(path: str | Path) -> list[str]:
    """Entries of a layer file: the reference's YAML (``unfrozen_parameters:``), a YAML list, or
    one entry per line. A folder must hold exactly one ``*unfrozenparameters*.yaml``."""
    import yaml

    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob("*unfrozenparameters*.y*ml")) or sorted(path.glob("*.y*ml"))
        if len(found) != 1:
            names = ", ".join(p.name for p in found) or "none"
            raise SpectrumError(
                f"{path}: expected one layer file (*.yaml) in the folder, found {names}"
            )
        path = found[0]
    if not path.is_file():
        raise SpectrumError(f"layer file {str(path)!r} does not exist")
    text = path.read_text()
    if path.suffix not in (".yaml", ".yml"):
        data = text.splitlines()  # a plain list: one entry per line
    else:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise SpectrumError(f"{path}: not valid YAML ({exc})") from exc
        if isinstance(data, dict):
            if "unfrozen_parameters" not in data:
                raise SpectrumError(f"{path}: no 'unfrozen_parameters' key")
            data = data["unfrozen_parameters"]
    if data is None:
        data = []
    if not isinstance(data, list) or not all(isinstance(e, str) for e in data if e is not None):
        raise SpectrumError(f"{path}: expected a list of parameter patterns")
    entries = [e.strip() for e in data if e and e.strip() and not e.strip().startswith("#")]
    if not entries:
        raise SpectrumError(f"{path}: the layer file names no parameters")
    return entries


def compile_entry(entry: str, name_prefix: str | None = None) -> re.Pattern[str]:
    """Turn one layer-file entry into the regular expression matched against parameter names."""
    body = entry[1:] if entry.startswith("^") else entry
    if name_prefix and body.startswith("model."):
        body = name_prefix + body[len("model.") :]
    anchored_end = body.endswith("$")
    if anchored_end:
        body = body[:-1]
    escaped = re.sub(r"(?<!\\)\.(?!\+)", r"\\.", body)
    if anchored_end:
        escaped += "$"
    elif not escaped.endswith((r"\.", ".+")):
        escaped += r"(?:\.|$)"  # a module name ends at a name boundary
    try:
        return re.compile("^" + escaped)
    except re.error as exc:
        raise SpectrumError(f"layer file entry {entry!r} is not a valid pattern ({exc})") from exc


@dataclass
class FreezeReport:
    """What :func:`freeze_except` did."""

    trainable: list[str]
    trainable_params: int
    all_params: int
    tied: list[str] = field(default_factory=list)

    @property
    def trainable_percent(self) -> float:
        return 100.0 * self.trainable_params / self.all_params if self.all_params else 0.0

    def summary(self) -> str:
        """PEFT's one-line report."""
        return (
            f"trainable params: {self.trainable_params:,} || all params: {self.all_params:,} "
            f"|| trainable%: {self.trainable_percent:.4f}"
        )


def freeze_except(
    model: torch.nn.Module, entries: Sequence[str] | str | Path, *, name_prefix: str | None = None
) -> FreezeReport:
    """Set ``requires_grad`` so exactly the parameters matching ``entries`` train.

    ``entries`` is a list of layer-file entries or the path of a layer file. ``name_prefix``
    rewrites a leading ``model.`` in every entry (``"model.language_model."`` for multimodal
    checkpoints whose text model is nested). Raises :class:`SpectrumError` naming every entry that
    matches nothing.
    """
    if isinstance(entries, (str, Path)):
        entries = read_layer_file(entries)
    patterns = [(entry, compile_entry(entry, name_prefix)) for entry in entries]
    # Aliases too: a tied lm_head.weight appears only with remove_duplicate=False.
    named = list(model.named_parameters(remove_duplicate=False))
    canonical = {id(p): n for n, p in model.named_parameters()}
    matched_ids: set[int] = set()
    unmatched = []
    tied = []
    for entry, pattern in patterns:
        hits = [(n, p) for n, p in named if pattern.match(n)]
        if not hits:
            unmatched.append(entry)
        for name, param in hits:
            matched_ids.add(id(param))
            if canonical[id(param)] != name:
                tied.append(f"{name} is tied to {canonical[id(param)]}")
    if unmatched:
        raise SpectrumError(_unmatched_message(unmatched, [n for n, _ in named], name_prefix))
    for _, param in named:
        param.requires_grad_(id(param) in matched_ids)
    unique = {id(p): p for _, p in named}
    report = FreezeReport(
        trainable=[n for n, p in model.named_parameters() if id(p) in matched_ids],
        trainable_params=sum(p.numel() for i, p in unique.items() if i in matched_ids),
        all_params=sum(p.numel() for p in unique.values()),
        tied=sorted(set(tied)),
    )
    for note in report.tied:
        log.warning("%s: unfreezing it trains the shared weight (input and output embedding)", note)
    log.info("%s", report.summary())
    return report


def _unmatched_message(unmatched: Iterable[str], names: list[str], prefix: str | None) -> str:
    modules = sorted({n.rsplit(".", 1)[0] for n in names} | set(names))
    parts = []
    for entry in unmatched:
        probe = entry.strip("^$").replace("\\", "")
        close = difflib.get_close_matches(probe, modules, n=3, cutoff=0.5)
        parts.append(f"{entry!r} (closest: {', '.join(close) if close else 'none'})")
    hint = ""
    if not prefix and any(".language_model." in n for n in names):
        hint = "; parameters are nested under a prefix: pass name_prefix='model.language_model.'"
    return "layer file entries match no parameter: " + "; ".join(parts) + hint
