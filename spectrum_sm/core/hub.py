"""Local paths and Hugging Face Hub ids told apart by the Hub's own rule, and Hub lookups that
fail in seconds when the Hub cannot be reached.

A repo id is ``name`` or ``org/name``: letters, digits, ``-``, ``_`` and ``.``, at most 96
characters, no ``--`` or ``..``, not starting or ending with ``-`` or ``.``
(``huggingface_hub.utils.validate_repo_id``). An existing file or folder always wins.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

from .errors import SpectrumError, first_sentence

_PART = re.compile(r"^[\w\-.]+$")
#: Seconds a Hub reachability probe may take: long enough for a slow route, short enough that
#: no user waits on huggingface_hub's retries to learn there is no network.
PROBE_SECONDS = 3.0


def is_hub_id(text: str) -> bool:
    """Whether ``text`` is a valid Hub repo id (``name`` or ``org/name``)."""
    parts = text.split("/")
    return (
        1 <= len(parts) <= 2
        and len(text) <= 96
        and "--" not in text
        and ".." not in text
        and all(_PART.match(p) and p[0] not in "-." and p[-1] not in "-." for p in parts)
    )


def is_local(text: str, what: str = "model") -> bool:
    """True for an existing local path, False for a Hub id; anything else is refused at once,
    naming ``what``: a typo'd folder is never sent to the Hub to fail minutes later."""
    path = Path(text).expanduser()
    if path.exists():
        return True
    if text.startswith((".", "/", "~")) or not is_hub_id(text):
        raise SpectrumError(
            f"{what} {text!r} does not exist (and is no Hub id, which is name or org/name)"
        )
    first = text.split("/")[0]
    if "/" in text and Path(first).is_dir():
        raise SpectrumError(
            f"{what} {text!r} does not exist ({first}/ is a local folder, so this is read as a "
            "path, not as the Hub id org/name)"
        )
    return False


def hub_offline() -> bool:
    """HF_HUB_OFFLINE is set: huggingface_hub reads its cache only (and fails fast itself)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def hub_unreachable() -> str | None:
    """Why the Hub cannot be asked now (offline mode, no route), or None when it answers."""
    if hub_offline():
        return "HF_HUB_OFFLINE is set"
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    port = url.port or (80 if url.scheme == "http" else 443)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=PROBE_SECONDS):
            return None
    except OSError as exc:
        return f"{url.hostname}:{port} does not answer ({exc.strerror or first_sentence(exc)})"


def require_hub(what: str) -> None:
    """Refuse in one line, within seconds, when the Hub cannot be reached for ``what``."""
    if reason := hub_unreachable():
        raise SpectrumError(
            f"cannot reach the Hugging Face Hub for {what}: {reason}; give a local folder or an "
            "s3:// prefix, or check the network (HF_ENDPOINT for a mirror)"
        )


def hub_file(repo_id: str, filename: str, *, revision: str | None = None) -> Path:
    """A file of a Hub repo: from the local cache when it is there (no network), else
    downloaded after a fast reachability check."""
    from huggingface_hub import hf_hub_download

    with contextlib.suppress(Exception):  # not cached: ask the Hub
        return Path(hf_hub_download(repo_id, filename, revision=revision, local_files_only=True))
    require_hub(f"{repo_id!r}")
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision))
    except Exception as exc:
        raise SpectrumError(
            f"cannot get {filename} of {repo_id!r} from the Hub: {first_sentence(exc)}"
        ) from exc
