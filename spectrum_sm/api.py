"""The Python entry points users call: :func:`scan` and :func:`select`."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

from .core import selection as sel
from .core.atomic import ensure_output_dir, write_files_atomically
from .core.checkpoint import ShardSource, open_source
from .core.scanner import DEFAULT_CHUNK_MB, ScanResult, scan_source

log = logging.getLogger(__name__)


def scan(
    model: str | os.PathLike[str] | ShardSource,
    top_percent: float = 50,
    *,
    output_dir: str | os.PathLike[str] | None = None,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    embeddings: bool = True,
    exact: bool = False,
    device: str = "auto",
    name: str = "",
    revision: str | None = None,
    hash_files: bool = True,
    chunk_mb: int = DEFAULT_CHUNK_MB,
    show_progress: bool = True,
) -> ScanResult:
    """Score every weight of a safetensors checkpoint and pick the top ``top_percent`` per type.

    Args:
        model: a local folder or ``.safetensors`` file, an ``s3://`` prefix, or a Hub model id.
        top_percent: share of each module type to keep trainable, in (0, 100].
        output_dir: where to write the reference's files and our manifest (atomically).
        include / exclude: glob patterns on module types (``self_attn.*``, ``mlp.down_proj``).
        embeddings: write the two embedding entries first in the layer file (the reference does).
        exact: use float32 ``svdvals`` like the reference instead of the float64 Gram method.
        device: ``auto``, ``cpu`` or ``cuda``.
        name: model name for the output file names (default: Hub id or folder name).
        revision: Hub revision (branch, tag or commit).
        hash_files: record the sha256 of local shards in the manifest.
    """
    source = _open(model, name=name, revision=revision, hash_files=hash_files)
    try:
        return scan_source(
            source,
            top_percent,
            include=include,
            exclude=exclude,
            embeddings=embeddings,
            exact=exact,
            device=device,
            chunk_mb=chunk_mb,
            output_dir=output_dir,
            show_progress=show_progress,
        )
    finally:
        close = getattr(source, "close", None)
        if close is not None:
            close()


def _open(model, *, name: str, revision: str | None, hash_files: bool) -> ShardSource:
    if isinstance(model, str) and model.startswith("s3://"):
        from .aws.s3 import S3Source

        return S3Source(model, name=name)
    return open_source(model, name=name, revision=revision, hash_files=hash_files)


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

    Works with our results and with the reference repository's ``model_snr_results/`` files.
    Returns the path of the layer file.
    """
    top_percent = sel.check_percent(top_percent)
    table = sel.load_results(results)
    chosen = sel.select_layers(table, top_percent, include, exclude)
    slug = sel.model_slug(name) if name else sel.slug_from_results_path(results)
    out = ensure_output_dir(output_dir if output_dir is not None else Path(results).parent)
    file_name = sel.layer_file_name(slug, top_percent)
    write_files_atomically(out, {file_name: sel.layer_file_text(chosen, embeddings)})
    kept = sum(len(v) for v in chosen.values())
    log.info("selected %d of %d modules at %s%%", kept, len(table), top_percent)
    return out / file_name
