"""Atomic file output: readers never see a half-written file."""

from __future__ import annotations

import contextlib
import os
import re
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


@contextlib.contextmanager
def output_lock(
    directory: Path,
    *,
    wait: bool = True,
    holder: str = "another scan",
    option: str = "--output-dir",
):
    """Lock ``directory`` itself (``flock`` on the folder, so no lock file is left in it): one
    writer at a time, so two runs into one folder never leave a mixed set of files. The kernel
    drops the lock when its process dies, so a dead run's folder is free at once. With
    ``wait=False`` a busy folder is an error at once. Not re-entrant within a process."""
    import fcntl

    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError as exc:
        raise SpectrumError(f"cannot lock folder {str(directory)!r}: {exc.strerror}") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            raise SpectrumError(
                f"{holder} is writing into {str(directory)!r}; wait for it to end or choose "
                f"another {option}"
            ) from None
        yield Path(directory)
    finally:
        os.close(fd)  # releases the lock


def write_error(exc: BaseException, what: str) -> SpectrumError | None:
    """One line for a failed write (disk full, a file-size limit, no permission), or None when
    ``exc`` is not a write failure. safetensors reports its I/O errors as its own type."""
    found = re.search(r"\(os error (\d+)\)", str(exc))
    if isinstance(exc, OSError):
        reason = exc.strerror or str(exc)
    elif type(exc).__name__ == "SafetensorError" and found:
        reason = os.strerror(int(found.group(1)))
    else:
        return None
    return SpectrumError(f"{what} failed: {reason}; nothing was replaced")


def write_files_atomically(directory: Path, files: Mapping[str, str]) -> None:
    """Write every ``name -> text`` into ``directory``, all or nothing.

    Each file is written to a temporary name in the same directory, flushed, then renamed, so a
    crash leaves either the old file or the complete new one. Temporaries are removed on failure
    (a full disk included); files get the usual permissions (0666 less the umask).
    """
    staged: list[tuple[str, Path]] = []
    # os.umask can only be read by setting it; restore it at once.
    mask = os.umask(0o022)
    os.umask(mask)
    try:
        for name, text in files.items():
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
            staged.append((name, Path(tmp)))
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            os.chmod(tmp, 0o666 & ~mask)
        for name, tmp in staged:
            os.replace(tmp, directory / name)
    except OSError as exc:
        raise SpectrumError(
            f"cannot write {', '.join(files)} into {str(directory)!r}: "
            f"{exc.strerror or exc}; nothing was written"
        ) from exc
    finally:
        for _, tmp in staged:
            tmp.unlink(missing_ok=True)
