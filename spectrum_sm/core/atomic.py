"""Atomic file output: readers never see a half-written file."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

from .errors import SpectrumError


def ensure_output_dir(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` as a directory (parents too) or fail clearly if it cannot be one."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise SpectrumError(f"output path {str(out)!r} exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SpectrumError(f"cannot create output directory {str(out)!r}: {exc.strerror}") from exc
    if not os.access(out, os.W_OK):
        raise SpectrumError(f"output directory {str(out)!r} is not writable")
    return out


def write_files_atomically(directory: Path, files: Mapping[str, str]) -> list[Path]:
    """Write every ``name -> text`` into ``directory``, all or nothing.

    Each file is written to a temporary name in the same directory, flushed, then renamed, so a
    crash leaves either the old file or the complete new one. Temporaries are removed on failure.
    """
    staged: list[tuple[str, Path]] = []
    try:
        for name, text in files.items():
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            staged.append((name, Path(tmp)))
        written = []
        for name, tmp in staged:
            target = directory / name
            os.replace(tmp, target)
            written.append(target)
        return written
    finally:
        for _, tmp in staged:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
