"""Layer selection and the reference's output files (results JSON, sorted JSON, layer YAML)."""

from __future__ import annotations

import fnmatch
import json
import logging
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .errors import SpectrumError

log = logging.getLogger(__name__)

#: The two embedding entries the reference always writes first (Llama-style names; the scan
#: writes the names of the model at hand, see :meth:`spectrum_sm.core.names.ModelNames`).
EMBEDDING_ENTRIES = ("^lm_head.weight$", "^model.embed_tokens.weight$")
RESULTS_PREFIX = "snr_results_"

Scores = Mapping[str, Mapping[str, Any]]  # module -> {"snr": float, "type": str}


#: The share of each type a scan keeps when none is given (the reference's default), for every
#: command and API that takes one.
DEFAULT_TOP_PERCENT = 50


def check_percent(percent: float) -> float:
    """Validate a top percent: a number in (0, 100] (``True`` is not 1)."""
    if isinstance(percent, bool):
        raise SpectrumError(f"top percent must be a number, got {percent!r}")
    try:
        value = float(percent)
    except (TypeError, ValueError):
        raise SpectrumError(f"top percent must be a number, got {percent!r}") from None
    if not math.isfinite(value) or not 0 < value <= 100:
        raise SpectrumError(f"top percent must be in (0, 100], got {percent}")
    return int(value) if value.is_integer() else value


def format_percent(percent: float) -> str:
    """``30`` for 30 or 30.0 (like the reference's int argument), ``12.5`` otherwise."""
    return str(check_percent(percent))


def model_slug(model_name: str) -> str:
    """The reference's file-name slug: ``/`` and ``_`` become ``-``. A name that is blank or
    holds control characters (a tab, a newline) would make file names no one can type: refused."""
    if not model_name.strip() or any(ord(c) < 32 or ord(c) == 127 for c in model_name):
        raise SpectrumError(
            f"model name {model_name!r} cannot name files: give --name with visible characters"
        )
    return model_name.replace("/", "-").replace("_", "-")


def results_file_name(slug: str) -> str:
    return f"{RESULTS_PREFIX}{slug}.json"


def sorted_file_name(slug: str) -> str:
    return f"{RESULTS_PREFIX}{slug}_sorted.json"


def layer_file_name(slug: str, percent: float) -> str:
    return f"{RESULTS_PREFIX}{slug}_unfrozenparameters_{format_percent(percent)}percent.yaml"


def layer_file_glob(slug: str) -> str:
    """A glob matching :func:`layer_file_name` of ``slug`` at every percent."""
    import glob

    return f"{RESULTS_PREFIX}{glob.escape(slug)}_unfrozenparameters_*percent.yaml"


def layer_folder(percent: float) -> str:
    """The sub-folder of an analysis output holding one more percent's layer file
    (``percent-10``): a training job's ``spectrum`` channel points at one such folder."""
    return f"percent-{format_percent(percent)}"


def percent_in_path(path: str) -> float | None:
    """The percent a layer file's name (:func:`layer_file_name`) or its folder
    (:func:`layer_folder`) says, or None."""
    match = re.search(r"(?:percent-([0-9.]+)/?$|_([0-9.]+)percent\.ya?ml$)", path)
    return check_percent(match.group(1) or match.group(2)) if match else None


def manifest_file_name(slug: str) -> str:
    return f"scan_manifest_{slug}.json"


def filter_types(
    types: Iterable[str], include: Iterable[str] | None = None, exclude: Iterable[str] | None = None
) -> list[str]:
    """Types kept by ``include``/``exclude`` globs; a glob that matches no type is an error."""
    types = list(types)
    include = [g for g in (include or []) if g]
    exclude = [g for g in (exclude or []) if g]
    for glob in include + exclude:
        if not fnmatch.filter(types, glob):
            raise SpectrumError(
                f"type filter {glob!r} matches no module type; types are: {', '.join(types)}"
            )
    kept = [t for t in types if not include or any(fnmatch.fnmatchcase(t, g) for g in include)]
    kept = [t for t in kept if not any(fnmatch.fnmatchcase(t, g) for g in exclude)]
    if not kept:
        raise SpectrumError("the type filters leave no module type to select")
    return kept


def _rank_key(item: tuple[str, float]) -> float:
    # A NaN score (the reference gives one to weights left on the meta device) ranks last.
    return -math.inf if math.isnan(item[1]) else item[1]


def select_layers(
    scores: Scores,
    percent: float,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
) -> dict[str, list[str]]:
    """Per type, the top ``int(count * percent / 100)`` modules by score (stable for ties)."""
    percent = check_percent(percent)
    ranked = sorted_results(scores)
    kept = filter_types(ranked, include, exclude)
    return {t: list(ranked[t])[: int(len(ranked[t]) * percent / 100)] for t in kept}


def sorted_results(scores: Scores) -> dict[str, dict[str, float]]:
    """The reference's ``_sorted.json``: per type, modules by descending score."""
    grouped: dict[str, list[tuple[str, float]]] = {}
    for module, info in scores.items():
        grouped.setdefault(info["type"], []).append((module, float(info["snr"])))
    return {
        layer_type: dict(sorted(layers, key=_rank_key, reverse=True))
        for layer_type, layers in grouped.items()
    }


def layer_file_text(
    selection: Mapping[str, list[str]],
    embeddings: bool = True,
    *,
    embedding_entries: Iterable[str] | None = None,
    entries: Mapping[str, str] | None = None,
) -> str:
    """The reference's layer YAML (also what axolotl's ``unfrozen_parameters`` reads).

    ``embedding_entries`` replaces the reference's two fixed strings with the model's own
    names; ``entries`` maps a module to its entry where the two differ (a fused expert slice).
    """
    lines = ["unfrozen_parameters:"]
    if embeddings:
        chosen = EMBEDDING_ENTRIES if embedding_entries is None else tuple(embedding_entries)
        lines += [f"- {entry}" for entry in chosen]
    entries = entries or {}
    for layer_type, modules in selection.items():
        lines.append(f"# {layer_type} layers")
        lines += [f"- {entries.get(module, module)}" for module in modules]
    return "\n".join(lines) + "\n"


def results_json_text(scores: Scores) -> str:
    """Our results JSON; ``Infinity`` and ``NaN`` are written as the reference's files have them."""
    data = {m: {"snr": float(i["snr"]), "type": i["type"]} for m, i in scores.items()}
    return json.dumps(data, indent=4) + "\n"


def _score(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SpectrumError(f"{where}: the score {value!r} is not a number")
    try:
        score = float(value)
    except OverflowError:
        raise SpectrumError(f"{where}: the score {str(value)[:20]}... is too large") from None
    # A ratio of singular-value sums is never negative; Infinity (no noise above the threshold)
    # and NaN (an all-zero weight) are what the reference and our scan write.
    if score < 0:
        raise SpectrumError(f"{where}: the score {score} is negative; an SNR never is")
    return score


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for key, value in pairs:
        if key in data:
            raise SpectrumError(f"module or type {key!r} appears twice")
        data[key] = value
    return data


def load_results(path: str | Path) -> dict[str, dict[str, Any]]:
    """Read a results JSON: ours, or either layout of the reference's ``model_snr_results/``.

    ``{module: {"snr": x, "type": t}}`` is the reference's results file; ``{type: {module: x}}``
    is its ``_sorted.json`` layout (the layout of its published Llama-3.1-8B-Instruct and
    Llama-3.1-Storm-8B results). Both come back as the first, in file order.
    """
    path = Path(path)
    if path.is_dir():
        raise SpectrumError(
            f"results file {str(path)!r} is a folder; give its {RESULTS_PREFIX}<model>.json"
        )
    if not path.is_file():
        raise SpectrumError(f"results file {str(path)!r} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"), object_pairs_hook=_unique_object)
    except SpectrumError as exc:  # a repeated key: which score the file means is unknown
        raise SpectrumError(f"{path}: {exc}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SpectrumError(f"{path}: not a valid JSON file ({exc})") from exc
    except (ValueError, RecursionError) as exc:  # e.g. an integer too long to parse
        raise SpectrumError(f"{path}: unreadable JSON ({str(exc).splitlines()[0]})") from exc
    if not isinstance(data, dict) or not data:
        raise SpectrumError(f"{path}: expected a non-empty object of module -> {{snr, type}}")
    first = next(iter(data.values()))
    if isinstance(first, dict) and "snr" not in first and "type" not in first:
        table = _from_sorted_layout(data, path)
    else:
        table = {}
        for module, info in data.items():
            if not isinstance(info, dict) or not isinstance(info.get("type"), str):
                raise SpectrumError(
                    f"{path}: entry {module!r} is not of the form {{'snr': number, 'type': str}}"
                )
            table[module] = {
                "snr": _score(info.get("snr"), f"{path}: {module}"),
                "type": info["type"],
            }
    if all(math.isnan(i["snr"]) for i in table.values()):
        log.warning("%s: every score is NaN; the selection follows file order", path)
    return table


def _from_sorted_layout(data: dict[str, Any], path: Path) -> dict[str, dict[str, Any]]:
    table: dict[str, dict[str, Any]] = {}
    for layer_type, modules in data.items():
        if not isinstance(modules, dict):
            raise SpectrumError(f"{path}: type {layer_type!r} does not map modules to scores")
        for module, value in modules.items():
            if module in table:
                raise SpectrumError(f"{path}: module {module!r} appears under two types")
            table[module] = {"snr": _score(value, f"{path}: {module}"), "type": layer_type}
    if not table:
        raise SpectrumError(f"{path}: no scores in the file")
    return table


def slug_from_results_path(path: str | Path) -> str:
    return Path(path).stem.removeprefix(RESULTS_PREFIX)
