"""The Python entry points users call: :func:`scan`, :func:`select` and :func:`check_data`."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .core import selection as sel
from .core.atomic import ensure_output_dir, write_files_atomically
from .core.errors import SpectrumError, did_you_mean
from .core.options import ScanOptions, scan_fields
from .core.scanner import ScanResult, TensorScore, scan_source, uncertain_weights
from .core.weights import ShardSource, open_source

log = logging.getLogger(__name__)


def _globs(patterns: Iterable[str] | str | None, name: str) -> list[str] | None:
    """Type globs as a list: one string is one glob (``"self_attn.*"``), not its characters."""
    if patterns is None:
        return None
    if isinstance(patterns, str):
        return [patterns]
    patterns = list(patterns)
    if not all(isinstance(p, str) for p in patterns):
        raise SpectrumError(f"{name} must be glob strings, got {patterns!r}")
    return patterns


def scan(
    model: str | os.PathLike[str] | ShardSource,
    top_percent: float = sel.DEFAULT_TOP_PERCENT,
    *,
    output_dir: str | os.PathLike[str] | None = None,
    name: str = "",
    revision: str | None = None,
    hash_files: bool = True,
    show_progress: bool = True,
    **options: Any,
) -> ScanResult:
    """Score every weight of a checkpoint and pick the top ``top_percent`` per type.

    Args:
        model: a local folder or ``.safetensors`` / ``.bin`` file, an ``s3://`` prefix, or a Hub
            model id.
        top_percent: share of each module type to keep trainable, in (0, 100].
        output_dir: where to write the reference's files and our manifest (atomically).
        name: model name for the output file names (default: Hub id or folder name).
        revision: Hub revision (branch, tag or commit).
        hash_files: record the sha256 of local shards in the manifest.
        options: any other field of :class:`spectrum_sm.core.options.ScanOptions` (``include``,
            ``exclude``, ``embeddings``, ``exact``, ``precision``, ``certify_percents``,
            ``towers``, ``device``, ``chunk_mb``; each field's help says what it does). One
            string is one glob or tower (``include="self_attn.*"``, ``towers="all"``).
    """
    if not isinstance(model, (str, os.PathLike)) and not hasattr(model, "list_files"):
        raise SpectrumError(f"model must be a path, an s3:// prefix or a Hub id, got {model!r}")
    scan_options = scan_options_from(top_percent, options)
    if isinstance(model, str) and model.startswith("s3://"):
        from .aws.s3 import S3Source

        source = S3Source(model, name=name)
    else:
        source = open_source(model, name=name, revision=revision, hash_files=hash_files)
    try:
        return scan_source(source, scan_options, output_dir=output_dir, show_progress=show_progress)
    finally:
        if (close := getattr(source, "close", None)) is not None:
            close()


def scan_options_from(top_percent: float, options: dict[str, Any]) -> ScanOptions:
    """:class:`ScanOptions` from Python keywords: an unknown one is named, with its nearest."""
    known = [f.name for f in scan_fields()]
    for key in options:
        if key not in known:
            raise SpectrumError(f"scan has no option {key!r}{did_you_mean(key, known)}")
    for key in ("include", "exclude"):
        if key in options:
            options[key] = _globs(options[key], key) or []
    for key in ("towers", "certify_percents"):
        if isinstance(options.get(key), (str, int, float)) and not isinstance(options[key], bool):
            options[key] = [options[key]]
        elif isinstance(options.get(key), tuple):
            options[key] = list(options[key])
    return ScanOptions(top_percent=top_percent, **options)


def select(
    results: str | os.PathLike[str],
    top_percent: float,
    *,
    output_dir: str | os.PathLike[str] | None = None,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    embeddings: bool = True,
    name: str = "",
) -> Path:
    """Write the layer file for another percent from an existing results JSON, without a rescan.

    Works with our results and with either layout of the reference repository's
    ``model_snr_results/`` files. When our scan manifest lies beside the results, its entries
    (the model's own embedding names, fused expert slices) are used, and a selection that its
    float32 bounds leave open is refused rather than guessed. Returns the layer file's path.
    """
    top_percent = sel.check_percent(top_percent)
    include, exclude = _globs(include, "include"), _globs(exclude, "exclude")
    table = sel.load_results(results)
    chosen = sel.select_layers(table, top_percent, include, exclude)
    slug = sel.model_slug(name) if name else sel.slug_from_results_path(results)
    manifest = _manifest_beside(Path(results), table)
    text_options: dict = {}
    if manifest is not None:
        _check_certified(manifest, table, top_percent, set(chosen))
        text_options = {
            "embedding_entries": manifest.get("embedding_entries"),
            "entries": {m: t["entry"] for m, t in manifest["tensors"].items() if "entry" in t},
        }
    out = ensure_output_dir(output_dir if output_dir is not None else Path(results).parent)
    file_name = sel.layer_file_name(slug, top_percent)
    text = sel.layer_file_text(chosen, embeddings, **text_options)
    write_files_atomically(out, {file_name: text})
    kept = sum(len(v) for v in chosen.values())
    log.info("selected %d of %d modules at %s%%", kept, len(table), top_percent)
    return out / file_name


def _manifest_beside(results: Path, table: dict) -> dict | None:
    """Our scan manifest for these results (same folder, same modules), if there is one."""
    path = results.parent / sel.manifest_file_name(sel.slug_from_results_path(results))
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        tensors = manifest["tensors"]
    except (OSError, ValueError, KeyError, TypeError):
        log.warning("%s: unreadable scan manifest, ignored", path)
        return None
    if set(tensors) != set(table):
        log.warning("%s: describes other modules than %s, ignored", path.name, results.name)
        return None
    return manifest


def _check_certified(manifest, table, percent, kept: set[str]) -> None:
    """Refuse a selection (of the types ``kept``) that the float32 bounds leave open."""
    tensors = manifest["tensors"]
    if not any("bounds" in t and t.get("precision") == "float32" for t in tensors.values()):
        return
    scores = {
        m: TensorScore(
            m,
            t["type"],
            float(table[m]["snr"]),
            (),
            "",
            0.0,
            precision=t.get("precision", "float64"),
            bounds=tuple(t["bounds"]) if "bounds" in t else (table[m]["snr"],) * 2,
        )
        for m, t in tensors.items()
        if table[m]["type"] in kept
    }
    if doubtful := uncertain_weights(scores, [percent]):
        certified = ", ".join(str(p) for p in manifest.get("certified_percents", [])) or "none"
        raise SpectrumError(
            f"at {percent}% the float32 scores of {', '.join(doubtful[:3])} are within their "
            f"error bounds of the selection boundary, so this selection could differ from the "
            f"float64 method's (certified percents of this scan: {certified}); rescan with "
            f"--top-percent {percent} or --precision float64"
        )


def check_data(data: str, model: str, **options):
    """What the loss sees (:func:`spectrum_sm.training.datacheck.check_data`, same options) for
    local data, a Hub dataset or an ``s3://`` prefix (downloaded first, as the job's channel
    would hold it)."""
    from .training.datacheck import check_data as check_local

    if not str(data).startswith("s3://"):
        return check_local(data, model, **options)
    from .aws.s3 import download_prefix

    with tempfile.TemporaryDirectory(prefix="spectrum-data-") as scratch:
        folder = Path(scratch) / "data"
        download_prefix(str(data), folder)
        return check_local(str(folder), model, **options)
