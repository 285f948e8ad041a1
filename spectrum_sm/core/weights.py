"""Finding and streaming the tensors of a checkpoint, without building the model.

A *source* hands out shard files one at a time (a local folder, the Hugging Face Hub, or S3 from
the jobs layer); :func:`read_header` validates each safetensors shard before anything is
computed, so a truncated or corrupt file fails fast with its name in the message. Legacy
``pytorch_model*.bin`` shards are opened with ``torch.load(mmap=True, weights_only=True)``: memory
mapped, and unable to run code from the file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import struct
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from .errors import SpectrumError, first_sentence
from .hub import is_local, require_hub

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
BIN_INDEX_FILE = "pytorch_model.bin.index.json"
BIN_SINGLE_FILE = "pytorch_model.bin"
# The header of a safetensors file is bounded (100 MB in the reference implementation).
MAX_HEADER_BYTES = 100 * 1024 * 1024
_HASH_BLOCK = 8 * 1024 * 1024
#: Floats meaningful as stored; 8-bit floats (F8_E4M3, F8_E5M2) come with a scale, like integers.
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
#: safetensors dtype -> (torch dtype name, bytes per value); unsigned 16-64 bit integers have
#: no torch reader here.
_DTYPES = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
    "U16": (None, 2),
    "U32": (None, 4),
    "U64": (None, 8),
}
DTYPE_BYTES = {name: size for name, (_, size) in _DTYPES.items()}
_TORCH_TO_SAFETENSORS = {t: name for name, (t, _) in _DTYPES.items() if t}


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as its shard's header describes it."""

    name: str
    shard: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


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
            header_len = header_length(handle.read(8), size, label)
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
            numel = math.prod(int(dim) for dim in shape)
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
    """The shard files of a checkpoint, from its index when it has one.

    safetensors first; a folder with only ``pytorch_model*.bin`` files (many older Hub models)
    gives those.
    """
    files = source.list_files()
    for index_file, single, pre, ext in (
        (INDEX_FILE, SINGLE_FILE, "", ".safetensors"),
        (BIN_INDEX_FILE, BIN_SINGLE_FILE, "pytorch_model", ".bin"),
    ):
        if index_file in files:
            return _indexed_shards(source, index_file, files)
        if single in files:
            return [single]
        shards = sorted(f for f in files if f.startswith(pre) and f.endswith(ext) and "/" not in f)
        if shards:
            return shards
    raise SpectrumError(
        f"{source.location}: no weights found (expected {SINGLE_FILE}, {INDEX_FILE}, "
        f"{BIN_SINGLE_FILE} or {BIN_INDEX_FILE})"
    )


def _indexed_shards(source: ShardSource, index_file: str, files: list[str]) -> list[str]:
    index_path = source.fetch(index_file)
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SpectrumError(f"{source.location}: unreadable {index_file} ({exc})") from exc
    shards = sorted(set(weight_map.values()))
    missing = [s for s in shards if s not in files]
    if missing:
        raise SpectrumError(
            f"{source.location}: {index_file} names shards that are missing: " + ", ".join(missing)
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


def visible_files(path: Path) -> list[tuple[str, Path]]:
    """``(relative name, path)`` of a file, or of every file below a folder except hidden ones
    (``.ipynb_checkpoints/``, ``.git/``), sorted: what is uploaded and what a fingerprint covers."""
    if path.is_file():
        return [(path.name, path)]
    return [
        (p.relative_to(path).as_posix(), p)
        for p in sorted(path.rglob("*"))
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
    ]


def sha256_file(path: Path, digest: Any = None, offset: int = 0) -> str:
    """The sha256 of a file, or of its rest from ``offset`` into a ``digest`` of the start."""
    digest = hashlib.sha256() if digest is None else digest
    with open(path, "rb") as handle:
        handle.seek(offset)
        while chunk := handle.read(_HASH_BLOCK):
            digest.update(chunk)
    return digest.hexdigest()


class BackgroundHasher:
    """sha256 of files on one background thread while the process is otherwise single-threaded
    (importing torch, reading headers), paused before the BLAS workers start: a busy extra
    thread stalls them far more than hashing costs. :meth:`finish` hashes the rest, one file per
    core (hashlib releases the GIL)."""

    def __init__(self, paths: list[Path]) -> None:
        self._paths = list(paths)
        self._done: dict[Path, str] = {}
        self._partial: tuple[Path, Any, int] | None = None
        self._pause = threading.Event()
        self._thread = threading.Thread(target=self._run, name="spectrum-hash", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for path in self._paths:
            digest = hashlib.sha256()
            try:
                with open(path, "rb") as handle:
                    while chunk := handle.read(_HASH_BLOCK):
                        digest.update(chunk)
                        if self._pause.is_set():
                            self._partial = (path, digest, handle.tell())
                            return
            except OSError:
                return  # finish() hashes it again and reports the error
            self._done[path] = digest.hexdigest()
            if self._pause.is_set():
                return

    def pause(self) -> None:
        self._pause.set()
        self._thread.join()

    def finish(self) -> dict[Path, str]:
        self.pause()
        if self._partial is not None:
            path, digest, offset = self._partial
            self._done[path] = sha256_file(path, digest, offset)
            self._partial = None
        rest = [p for p in self._paths if p not in self._done]
        if rest:
            with ThreadPoolExecutor(max(1, min(len(rest), os.cpu_count() or 1))) as pool:
                self._done.update(zip(rest, pool.map(sha256_file, rest), strict=True))
        return dict(self._done)


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
        if self._single and self.path.suffix not in (".safetensors", ".bin"):
            raise SpectrumError(
                f"{str(self.path)!r} is not a .safetensors or .bin file or a folder"
            )
        self.name = self.name or (self.path.parent if self._single else self.path).resolve().name
        self.location = str(self.path)
        self._hasher = BackgroundHasher(self._hashed_paths()) if self.hash_files else None

    def _hashed_paths(self) -> list[Path]:
        names = [n for n in self.list_files() if n.endswith((".safetensors", ".bin", ".json"))]
        return [self.fetch(n) for n in names]

    def pause_hashing(self) -> None:
        """Called before the BLAS workers start (see :class:`BackgroundHasher`)."""
        if self._hasher is not None:
            self._hasher.pause()

    def list_files(self) -> list[str]:
        if self._single:
            return [self.path.name]
        return sorted(p.name for p in self.path.iterdir() if p.is_file())

    def fetch(self, filename: str) -> Path:
        return self.path if self._single else self.path / filename

    def release(self, filename: str) -> None:
        """Local files stay where they are."""

    def provenance(self) -> dict[str, Any]:
        hashes = self._hasher.finish() if self._hasher is not None else {}
        files = []
        for path in self._hashed_paths():
            entry: dict[str, Any] = {"name": path.name, "size": path.stat().st_size}
            if path in hashes:
                entry["sha256"] = hashes[path]
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
            require_hub(f"model {self.repo_id!r}")
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
    if is_local(text, "model path"):
        if revision:  # a folder has one version: scanning it is not scanning that revision
            raise SpectrumError(
                f"--revision {revision!r} applies to Hub models; {text!r} is a local path"
            )
        return LocalSource(Path(text).expanduser(), name=name, hash_files=hash_files)
    return HubSource(text, revision=revision, name=name)


# -- Opened shards: the tensors they hold and reads of their rows --------------------------------


def torch_dtype(name: str) -> Any:
    """The torch dtype of a safetensors dtype name (``BF16`` -> ``torch.bfloat16``)."""
    import torch

    for torch_name, st_name in _TORCH_TO_SAFETENSORS.items():
        if st_name == name:
            return getattr(torch, torch_name)
    raise SpectrumError(f"unsupported tensor dtype {name}")


class SafetensorsShard:
    """A validated safetensors file; each :meth:`reader` has its own file handle.

    Reads are plain positioned reads, not mmap: mapped pages count towards the process's memory
    and grow with the model, while reads stay bounded by the chunk size.
    """

    def __init__(self, path: Path, label: str) -> None:
        self.path, self.label = path, label
        self.header, self.data_start = read_header_and_offset(path, label)
        self.tensors = tensors_from_header(self.header, path.name)

    @contextlib.contextmanager
    def reader(self):
        with open(self.path, "rb", buffering=0) as handle:
            yield _SafetensorsReader(self, handle)

    def close(self) -> None:
        """Nothing is held open between reads."""


class _SafetensorsReader:
    def __init__(self, shard: SafetensorsShard, handle) -> None:
        self.shard, self.handle = shard, handle

    def rows(self, info: TensorInfo, start: int, count: int):
        """Rows ``start:start+count`` of the last dimension, the leading ones flattened (one
        expert of a fused ``[experts, n, m]`` tensor is rows ``e*n`` to ``(e+1)*n``)."""
        import torch

        m = info.shape[-1] if info.shape else 1
        row_bytes = m * DTYPE_BYTES[info.dtype]
        offset = self.shard.data_start + self.shard.header[info.name]["data_offsets"][0]
        buffer = bytearray(count * row_bytes)
        self.handle.seek(offset + start * row_bytes)
        if self.handle.readinto(buffer) != len(buffer):
            raise SpectrumError(
                f"{self.shard.label}: tensor {info.name!r} is cut short (file truncated?)"
            )
        if not buffer:
            return torch.empty(0, m, dtype=torch_dtype(info.dtype))
        return torch.frombuffer(buffer, dtype=torch_dtype(info.dtype)).view(count, m)


class TorchBinShard:
    """A ``pytorch_model*.bin`` shard, loaded with ``weights_only=True`` (no code runs) and
    memory-mapped where the file allows it (the zip format of torch >= 1.6)."""

    def __init__(self, path: Path, label: str) -> None:
        import pickle

        import torch

        self.path, self.label = path, label
        try:
            try:
                state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
            except RuntimeError as exc:
                if "mmap" not in str(exc):
                    raise
                log.info("%s: legacy (non-zip) format, loaded without mmap", label)
                state = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
            raise SpectrumError(
                f"{label}: cannot be loaded safely: torch.load(weights_only=True) refuses it "
                f"({first_sentence(exc)}; a pickle that needs code to load, or a damaged file); "
                "convert the checkpoint to safetensors where you trust it"
            ) from exc
        if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
        ):
            raise SpectrumError(f"{label}: not a state dict of named tensors")
        self._state = state
        self.tensors = []
        for name, tensor in state.items():
            dtype = _TORCH_TO_SAFETENSORS.get(str(tensor.dtype).removeprefix("torch."))
            if dtype is None:
                raise SpectrumError(
                    f"{label}: tensor {name!r} has unsupported dtype {tensor.dtype}"
                )
            self.tensors.append(TensorInfo(name, path.name, dtype, tuple(tensor.shape)))

    @contextlib.contextmanager
    def reader(self):
        yield self

    def rows(self, info: TensorInfo, start: int, count: int):
        """Rows of the last dimension, the leading ones flattened (as safetensors reads do)."""
        tensor = self._state[info.name]
        matrix = tensor.reshape(1, -1) if tensor.ndim <= 1 else tensor.reshape(-1, tensor.shape[-1])
        return matrix[start : start + count]

    def close(self) -> None:
        self._state = {}


def open_shard(path: Path, label: str):
    """An opened shard of either format."""
    return (SafetensorsShard if path.name.endswith(".safetensors") else TorchBinShard)(path, label)
