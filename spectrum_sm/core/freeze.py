"""Freezing: train exactly the parameters a Spectrum layer file names, nothing else.

Pattern semantics follow axolotl's ``unfrozen_parameters`` so the same file works in both:
each entry is a regular expression in which a ``.`` is a literal dot (except in ``.+``), matched at
the start of the parameter name, optionally followed by a slice of the parameter's first dimension
(``^name$[7]``, ``[0:32]``; axolotl's syntax). We add ``[7, 0:32]``: rows ``0:32`` of dimension 1
inside expert 7 of a fused 3-D expert parameter (the gate half of ``gate_up_proj``).

We are stricter than axolotl: an entry that matches no parameter is an error naming it and the
closest real names, and a plain module name must end at a name boundary (``model.layers.1``
matches ``model.layers.1.*``, never ``model.layers.10.*``). An entry in the checkpoint's naming
(``model.layers.0.block_sparse_moe.experts.3.w1``, as the reference's published Mixtral results
have it) is translated to the loaded model's parameter and slice by transformers' own mapping.
A sliced parameter trains only its slices (:mod:`spectrum_sm.core.slices`): the fused parameter
is frozen and its selected elements become one trainable parameter beside it, so the optimizer
holds state for them only and the other elements never change. ``state_dict()`` (and so
``save_pretrained``) folds the trained values back into the fused weight;
:func:`spectrum_sm.core.slices.merge_slices` makes the model plain again.
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


def find_layer_file(path: str | Path) -> Path:
    """The layer file itself: ``path``, or the one ``*unfrozenparameters*.yaml`` in a folder."""
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
    return path


def read_layer_file(path: str | Path) -> list[str]:
    """Entries of a layer file: the reference's YAML (``unfrozen_parameters:``), a YAML list, or
    one entry per line. A folder must hold exactly one ``*unfrozenparameters*.yaml``."""
    import yaml

    path = find_layer_file(path)
    text = path.read_text()
    if path.suffix == ".json":  # a scan's results (scores), not the layers chosen from them
        raise SpectrumError(
            f"{path} is a results file (SNR scores), not a layer file: make one with "
            f"spectrum-sm select {path} --top-percent P, and pass that .yaml"
        )
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
    data = [] if data is None else data
    if not isinstance(data, list) or not all(isinstance(e, str) for e in data if e is not None):
        raise SpectrumError(f"{path}: expected a list of parameter patterns")
    entries = [e.strip() for e in data if e and e.strip() and not e.strip().startswith("#")]
    if not entries:
        raise SpectrumError(f"{path}: the layer file names no parameters")
    return entries


_SLICE = re.compile(r"^(?P<pattern>.+?)\[(?P<spec>[0-9]*(?::[0-9]*)?(?:, *[0-9]*:[0-9]*)?)\]$")


def split_slice(entry: str) -> tuple[str, tuple[slice, ...] | None]:
    """``"^w$[7, 0:32]"`` -> ``("^w$", (slice(7, 8), slice(0, 32)))``; no slice -> ``None``."""
    match = _SLICE.match(entry)
    if match is None:
        return entry, None
    index = []
    for part in (p.strip() for p in match.group("spec").split(",")):
        if ":" in part:
            start, stop = part.split(":")
            index.append(slice(int(start) if start else 0, int(stop) if stop else None))
        elif part:
            index.append(slice(int(part), int(part) + 1))
        else:
            raise SpectrumError(f"layer file entry {entry!r}: empty slice")
    return match.group("pattern"), tuple(index)


def compile_entry(entry: str, name_prefix: str | None = None) -> re.Pattern[str]:
    """Turn one layer-file entry (without its slice) into the regular expression matched
    against parameter names."""
    body = entry[1:] if entry.startswith("^") else entry
    if name_prefix and body.startswith("model.") and not body.startswith(name_prefix):
        body = name_prefix + body[len("model.") :]
    escaped = re.sub(r"(?<!\\)\.(?!\+)", r"\\.", body)
    if not escaped.endswith(("$", r"\.", ".+")):
        escaped += r"(?:\.|$)"  # a module name ends at a name boundary
    try:
        return re.compile("^" + escaped)
    except re.error as exc:
        raise SpectrumError(f"layer file entry {entry!r} is not a valid pattern ({exc})") from exc


@dataclass
class FreezeReport:
    """What :func:`freeze_except` did. ``partial`` maps a parameter that trains only in parts
    to those parts (index tuples); ``translated`` maps checkpoint-named entries to the entries
    they became."""

    trainable: list[str]
    trainable_params: int
    all_params: int
    tied: list[str] = field(default_factory=list)
    partial: dict[str, list[tuple[slice, ...]]] = field(default_factory=dict)
    translated: dict[str, str] = field(default_factory=dict)

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
    """Set ``requires_grad`` so exactly the parameters (or slices) matching ``entries`` train.

    ``entries`` is a list of layer-file entries or the path of a layer file. ``name_prefix``
    rewrites a leading ``model.`` in every entry that does not already carry it (rarely needed:
    checkpoint names are translated to the loaded model's). Raises :class:`SpectrumError`
    naming every entry that matches nothing.
    """
    from .names import translator
    from .slices import install_slices, installed_slices, merge_slices

    if isinstance(entries, (str, Path)):
        entries = read_layer_file(entries)
    if installed_slices(model):  # frozen before: start from the plain model again
        merge_slices(model)
    # Aliases too: a tied lm_head.weight appears only with remove_duplicate=False.
    named = list(model.named_parameters(remove_duplicate=False))
    canonical = {id(p): n for n, p in model.named_parameters()}
    translate = None
    whole: set[int] = set()
    parts: dict[int, list[tuple[slice, ...]]] = {}
    unmatched, tied, translated = [], [], {}
    for entry in entries:
        body, index = split_slice(entry)
        pattern = compile_entry(body, name_prefix)
        hits = [(n, p) for n, p in named if pattern.match(n)]
        if not hits and index is None and re.fullmatch(r"\^?[A-Za-z0-9_.]+\$?", body):
            translate = translate or translator(model)
            target = translate(body.strip("^$") + ".weight")
            if target is not None:
                translated[entry] = target.entry()
                body, index = split_slice(target.entry())
                hits = [(n, p) for n, p in named if compile_entry(body).match(n)]
        if not hits:
            unmatched.append(entry)
        for name, param in hits:
            if index is None:
                whole.add(id(param))
            else:
                _check_index(entry, name, param, index)
                parts.setdefault(id(param), []).append(index)
            if canonical[id(param)] != name:
                tied.append(f"{name} is tied to {canonical[id(param)]}")
    if unmatched:
        raise SpectrumError(_unmatched_message(unmatched, [n for n, _ in named], name_prefix))
    for _, param in named:
        param.requires_grad_(id(param) in whole)
    all_params = sum(p.numel() for p in model.parameters())  # before the slices join the model
    # A whole-parameter entry wins over its slices.
    partial = {canonical[i]: regions for i, regions in parts.items() if i not in whole}
    install_slices(model, partial)
    report = FreezeReport(
        trainable=[n for n, p in model.named_parameters() if p.requires_grad],
        # Counted on the model object: what the optimizer will hold state for.
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        all_params=all_params,
        tied=sorted(set(tied)),
        partial=partial,
        translated=translated,
    )
    for note in report.tied:
        log.warning("%s: unfreezing it trains the shared weight (input and output embedding)", note)
    if translated:
        log.info(
            "%d layer-file entries use the checkpoint's names and were translated to the loaded "
            "model's, e.g. %s -> %s",
            len(translated),
            *next(iter(translated.items())),
        )
    log.info("%s", report.summary())
    return report


def _check_index(entry: str, name: str, param, index: tuple[slice, ...]) -> None:
    for dim, part in enumerate(index):
        size = param.shape[dim] if dim < param.ndim else 0
        stop = size if part.stop is None else part.stop
        if dim >= param.ndim or part.start >= stop or stop > size:
            raise SpectrumError(
                f"layer file entry {entry!r}: slice out of range for {name} of shape "
                f"{list(param.shape)}"
            )


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
