"""Finding and streaming the tensors of a safetensors checkpoint, without building the model.

A *source* hands out shard files one at a time (a local folder, the Hugging Face Hub, or S3 from
the jobs layer); :func:`read_header` validates each shard before anything is computed, so a
truncated or corrupt file fails fast with its name in the message.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .errors import SpectrumError

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# The header of a safetensors file is bounded (100 MB in the reference implementation).
MAX_HEADER_BYTES = 100 * 1024 * 1024
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"}
DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "U16": 2,
    "U32": 4,
    "U64": 8,
}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as its shard's header describes it."""

    name: str
    shard: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count


class ShardSource(Protocol):
    """Where a checkpoint's files come from. Implementations: local, Hub, S3."""

    #: Human-readable location, e.g. ``/models/qwen`` or ``s3://bucket/prefix``.
    location: str
    #: Model name used for output file names (the reference's slug).
    name: str

    def list_files(self) -> list[str]:
        """Relative names of every file in the checkpoint folder."""

    def fetch(self, filename: str) -> Path:
        """A local path to ``filename``, downloading it if needed."""

    def release(self, filename: str) -> None:
        """Drop a fetched file that is no longer needed (no-op where nothing was downloaded)."""

    def provenance(self) -> dict[str, Any]:
        """What identifies this exact checkpoint (revision, ETags or hashes)."""


def read_header(path: Path, display_name: str | None = None) -> dict[str, Any]:
    """Parse and validate a local safetensors header; raise :class:`SpectrumError` on damage."""
    return read_header_and_offset(path, display_name)[0]


def read_header_and_offset(path: Path, display_name: str | None = None) -> tuple[dict, int]:
    """The validated header and the byte offset where the tensor data starts."""
    label = display_name or str(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            header_len = header_length(prefix, size, label)
            raw = handle.read(header_len)
    except OSError as exc:
        raise SpectrumError(f"{label}: cannot read ({exc.strerror})") from exc
    return parse_header(raw, header_len, size, label), 8 + header_len


def header_length(prefix: bytes, size: int, label: str) -> int:
    """The header length announced by a safetensors file's first 8 bytes, checked."""
    if len(prefix) < 8:
        raise SpectrumError(f"{label}: not a safetensors file (only {size} bytes)")
    (header_len,) = struct.unpack("<Q", prefix)
    if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
        raise SpectrumError(
            f"{label}: corrupt or truncated safetensors file "
            f"(header claims {header_len} bytes, file has {size})"
        )
    return header_len


def parse_header(raw: bytes, header_len: int, size: int, label: str) -> dict[str, Any]:
    """Decode a header and check every tensor lies inside a file of ``size`` bytes."""
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SpectrumError(f"{label}: corrupt safetensors header ({exc})") from exc
    if not isinstance(header, dict):
        raise SpectrumError(f"{label}: corrupt safetensors header (not a JSON object)")
    data_size = size - 8 - header_len
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            start, stop = entry["data_offsets"]
            dtype, shape = entry["dtype"], entry["shape"]
            numel = 1
            for dim in shape:
                numel *= int(dim)
        except (KeyError, TypeError, ValueError) as exc:
            raise SpectrumError(f"{label}: corrupt entry for tensor {name!r}") from exc
        if stop > data_size or start > stop:
            raise SpectrumError(
                f"{label}: truncated file: tensor {name!r} ends at byte {stop} "
                f"but the data section has only {data_size} bytes"
            )
        if dtype in DTYPE_BYTES and stop - start != numel * DTYPE_BYTES[dtype]:
            raise SpectrumError(
                f"{label}: corrupt entry for tensor {name!r}: {stop - start} bytes "
                f"for shape {shape} of {dtype}"
            )
    return header


def tensors_from_header(header: dict[str, Any], shard: str) -> list[TensorInfo]:
    return [
        TensorInfo(name, shard, entry["dtype"], tuple(entry["shape"]))
        for name, entry in header.items()
        if name != "__metadata__"
    ]


def shard_files(source: ShardSource) -> list[str]:
    """The shard files of a checkpoint, from its index when it has one."""
    files = source.list_files()
    if INDEX_FILE in files:
        index_path = source.fetch(INDEX_FILE)
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise SpectrumError(f"{source.location}: unreadable {INDEX_FILE} ({exc})") from exc
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if s not in files]
        if missing:
            raise SpectrumError(
                f"{source.location}: {INDEX_FILE} names shards that are missing: "
                + ", ".join(missing)
            )
        return shards
    if SINGLE_FILE in files:
        return [SINGLE_FILE]
    shards = sorted(f for f in files if f.endswith(".safetensors") and "/" not in f)
    if not shards:
        raise SpectrumError(
            f"{source.location}: no safetensors weights found "
            f"(expected {SINGLE_FILE} or {INDEX_FILE})"
        )
    return shards


def read_config(source: ShardSource) -> dict[str, Any] | None:
    """The model's ``config.json`` when the checkpoint has one."""
    if "config.json" not in source.list_files():
        return None
    try:
        config = json.loads(source.fetch("config.json").read_text())
    except (OSError, ValueError) as exc:
        raise SpectrumError(f"{source.location}: unreadable config.json ({exc})") from exc
    return config if isinstance(config, dict) else None


def sha256_file(path: Path, block: int = 8 * 1024 * 1024) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class LocalSource:
    """A checkpoint folder on this machine (or a single ``.safetensors`` file)."""

    path: Path
    name: str = ""
    hash_files: bool = True

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        if not self.path.exists():
            raise SpectrumError(f"model path {str(self.path)!r} does not exist")
        self._single = self.path.is_file()
        if self._single and self.path.suffix != ".safetensors":
            raise SpectrumError(f"{str(self.path)!r} is not a .safetensors file or a folder")
        if not self.name:
            self.name = (self.path.parent if self._single else self.path).resolve().name
        self.location = str(self.path)

    def list_files(self) -> list[str]:
        if self._single:
            return [self.path.name]
        return sorted(p.name for p in self.path.iterdir() if p.is_file())

    def fetch(self, filename: str) -> Path:
        return self.path if self._single else self.path / filename

    def release(self, filename: str) -> None:
        """Local files stay where they are."""

    def provenance(self) -> dict[str, Any]:
        # Hashing runs after the scan, not beside it (a busy extra thread stalls the BLAS
        # workers far more than hashing costs), one file per core (hashlib drops the GIL).
        names = [n for n in self.list_files() if n.endswith((".safetensors", ".json"))]
        paths = [self.fetch(n) for n in names]
        hashes: list[str | None] = [None] * len(paths)
        if self.hash_files:
            with ThreadPoolExecutor(max(1, min(len(paths), os.cpu_count() or 1))) as pool:
                hashes = list(pool.map(sha256_file, paths))
        files = []
        for name, path, digest in zip(names, paths, hashes, strict=True):
            entry: dict[str, Any] = {"name": name, "size": path.stat().st_size}
            if digest is not None:
                entry["sha256"] = digest
            files.append(entry)
        return {"kind": "local", "path": str(self.path.resolve()), "files": files}


@dataclass
class HubSource:
    """A model repository on the Hugging Face Hub (files land in the usual HF cache).

    The token comes from the environment (``HF_TOKEN``) or the HF login, never from arguments
    that would end up in job hyperparameters.
    """

    repo_id: str
    revision: str | None = None
    name: str = ""

    def __post_init__(self) -> None:
        self.name = self.name or self.repo_id
        self.location = f"hf://{self.repo_id}"
        self._files: list[str] | None = None
        self._sha: str | None = None

    def _hub_error(self, exc: Exception) -> SpectrumError:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes"}
        hint = " (HF_HUB_OFFLINE is set)" if offline else ""
        return SpectrumError(
            f"cannot reach model {self.repo_id!r} on the Hugging Face Hub{hint}: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip()
        )

    def list_files(self) -> list[str]:
        if self._files is None:
            try:
                from huggingface_hub import HfApi

                info = HfApi().model_info(
                    self.repo_id, revision=self.revision, files_metadata=False
                )
            except Exception as exc:  # network, auth, missing repo: all end the same way
                raise self._hub_error(exc) from exc
            self._sha = info.sha
            self._files = sorted(s.rfilename for s in (info.siblings or []))
        return self._files

    def fetch(self, filename: str) -> Path:
        try:
            from huggingface_hub import hf_hub_download

            return Path(
                hf_hub_download(self.repo_id, filename, revision=self._sha or self.revision)
            )
        except Exception as exc:
            raise self._hub_error(exc) from exc

    def read_header(self, filename: str) -> dict[str, Any]:
        """The shard's header without downloading the shard (HTTP range requests)."""
        try:
            from huggingface_hub import get_safetensors_metadata

            meta = get_safetensors_metadata(self.repo_id, revision=self._sha or self.revision)
        except Exception as exc:
            raise self._hub_error(exc) from exc
        if filename not in meta.files_metadata:
            raise SpectrumError(f"{self.location}: no safetensors header for {filename}")
        return {
            name: {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": list(t.data_offsets)}
            for name, t in meta.files_metadata[filename].tensors.items()
        }

    def release(self, filename: str) -> None:
        """Hub files stay in the HF cache, where the next run finds them."""

    def provenance(self) -> dict[str, Any]:
        return {"kind": "hub", "repo_id": self.repo_id, "revision": self._sha or self.revision}


def looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return (
        1 <= len(parts) <= 2
        and all(parts)
        and not spec.startswith((".", "/", "~"))
        and all(ch.isalnum() or ch in "-_." for p in parts for ch in p)
    )


def open_source(
    spec: str | os.PathLike[str] | ShardSource,
    *,
    name: str = "",
    revision=None,
    hash_files: bool = True,
) -> ShardSource:
    """A source for a local path or a Hub id (S3 prefixes are opened by the jobs layer)."""
    if not isinstance(spec, (str, os.PathLike)):
        return spec
    text = os.fspath(spec)
    if text.startswith("s3://"):
        raise SpectrumError("s3:// models are opened by spectrum_sm.scan (the jobs layer)")
    path = Path(text).expanduser()
    if path.exists() or not looks_like_hub_id(text):
        return LocalSource(path, name=name, hash_files=hash_files)
    return HubSource(text, revision=revision, name=name)
