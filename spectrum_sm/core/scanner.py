"""The streaming Spectrum scan: read tensors shard by shard, score each, write the reference files.

A fetch thread brings shards in (downloading the next one while this one is scored); a pool of
workers, one per core, each reads one weight in chunks along its long side with plain positioned
reads, builds its float64 Gram matrix and takes the eigenvalues. Memory follows the chunk size
and the number of workers, not the model size.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import threading
import time
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import selection as sel
from .atomic import ensure_output_dir, write_files_atomically
from .checkpoint import (
    DTYPE_BYTES,
    FLOAT_DTYPES,
    ShardSource,
    TensorInfo,
    read_config,
    read_header,
    read_header_and_offset,
    shard_files,
    tensors_from_header,
)
from .errors import SpectrumError
from .progress import Progress
from .snr import (
    GramAccumulator,
    as_matrix_shape,
    module_type,
    natural_key,
    singular_values_exact,
    snr_from_singular_values,
)

log = logging.getLogger(__name__)

EMBED_SUFFIXES = (
    "embed_tokens.weight",
    "wte.weight",
    "word_embeddings.weight",
    "embed_in.weight",
    "tok_embeddings.weight",
)
LM_HEAD = "lm_head.weight"
DEFAULT_CHUNK_MB = 64


def _torch_dtypes() -> dict[str, Any]:
    import torch

    return {
        "F64": torch.float64,
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "F8_E4M3": torch.float8_e4m3fn,
        "F8_E5M2": torch.float8_e5m2,
    }


class _TorchDtypes(dict):
    def __missing__(self, key: str) -> Any:
        self.update(_torch_dtypes())
        return self[key]


TORCH_DTYPES: dict[str, Any] = _TorchDtypes()


@dataclass
class TensorScore:
    """The score of one weight and what it cost."""

    module: str
    type: str
    snr: float
    shape: tuple[int, ...]
    dtype: str
    seconds: float


@dataclass
class ScanResult:
    """Everything a scan produced; ``files`` lists what was written (empty without output)."""

    model_name: str
    slug: str
    scores: dict[str, TensorScore]
    method: str
    device: str
    top_percent: float
    include: list[str]
    exclude: list[str]
    embeddings: bool
    tied_embeddings: bool
    provenance: dict[str, Any]
    config: dict[str, Any] | None
    seconds: float
    skipped: list[str] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)

    def snr_table(self) -> dict[str, dict[str, Any]]:
        """``{module: {"snr": float, "type": str}}`` in model order (the reference's JSON)."""
        return {m: {"snr": s.snr, "type": s.type} for m, s in self.scores.items()}

    def selection(self, percent: float | None = None) -> dict[str, list[str]]:
        """Per type, the modules to train at ``percent`` (default: the scan's percent)."""
        return sel.select_layers(self.snr_table(), percent or self.top_percent)

    def layer_file_text(self, percent: float | None = None) -> str:
        return sel.layer_file_text(self.selection(percent), self.embeddings)

    def manifest(self) -> dict[str, Any]:
        import torch

        from .. import __version__

        config = self.config or {}
        return {
            "spectrum_sm_version": __version__,
            "torch_version": torch.__version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "model": {
                "name": self.model_name,
                "slug": self.slug,
                "source": self.provenance,
                "model_type": config.get("model_type"),
                "architectures": config.get("architectures"),
            },
            "method": self.method,
            "device": self.device,
            "top_percent": self.top_percent,
            "include": self.include,
            "exclude": self.exclude,
            "embeddings": self.embeddings,
            "tied_embeddings": self.tied_embeddings,
            "skipped": self.skipped,
            "seconds": round(self.seconds, 3),
            "tensors": {
                m: {
                    "snr": s.snr,
                    "type": s.type,
                    "shape": list(s.shape),
                    "dtype": s.dtype,
                    "seconds": round(s.seconds, 4),
                }
                for m, s in self.scores.items()
            },
            "files": {k: p.name for k, p in self.files.items()},
        }

    def write(self, output_dir: str | Path) -> dict[str, Path]:
        """Write the reference's three files and our manifest, atomically."""
        out = ensure_output_dir(output_dir)
        names = {
            "results": sel.results_file_name(self.slug),
            "sorted": sel.sorted_file_name(self.slug),
            "layers": sel.layer_file_name(self.slug, self.top_percent),
            "manifest": sel.manifest_file_name(self.slug),
        }
        self.files = {key: out / name for key, name in names.items()}
        table = self.snr_table()
        texts = {
            names["results"]: sel.results_json_text(table),
            names["sorted"]: json.dumps(sel.sorted_results(table), indent=4) + "\n",
            names["layers"]: self.layer_file_text(),
            names["manifest"]: json.dumps(self.manifest(), indent=2) + "\n",
        }
        write_files_atomically(out, texts)
        return self.files


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is usable, else ``cpu``."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SpectrumError(f"--device {device} asked for, but CUDA is not available here")
    if device != "cpu" and not device.startswith("cuda"):
        raise SpectrumError(f"unknown device {device!r}; use auto, cpu or cuda")
    return device


@dataclass
class _Plan:
    tensors: list[TensorInfo]
    tied: bool
    skipped: list[str]


def _plan(
    source: ShardSource,
    shards: list[str],
    include: list[str],
    exclude: list[str],
    config: dict[str, Any] | None,
    headers: dict[str, dict[str, Any]],
) -> _Plan:
    """Choose the weights to score from the shard headers."""
    everything: list[TensorInfo] = []
    for shard in shards:
        everything += tensors_from_header(headers[shard], shard)
    embedding = _input_embedding(everything, config)
    has_lm_head = any(t.name == LM_HEAD or t.name.endswith("." + LM_HEAD) for t in everything)
    # Tied checkpoints store the shared matrix once, as the input embedding.
    tied = embedding is not None and (
        not has_lm_head or bool((config or {}).get("tie_word_embeddings", False))
    )
    skipped = []
    weights = []
    for info in everything:
        if not info.name.endswith(".weight"):
            continue
        module = info.name[: -len(".weight")]
        if tied and (info.name == LM_HEAD or info.name.endswith("." + LM_HEAD)):
            skipped.append(f"{module}: tied to the input embedding, scored once")
            continue
        if info.dtype not in FLOAT_DTYPES:
            skipped.append(f"{module}: {info.dtype} is not a floating-point weight")
            continue
        if len(info.shape) not in (1, 2) or info.numel == 0:
            skipped.append(f"{module}: shape {list(info.shape)} is not a 1-D or 2-D weight")
            continue
        weights.append(info)
    types = list(dict.fromkeys(module_type(t.name[: -len(".weight")]) for t in weights))
    if not types:
        raise SpectrumError(f"{source.location}: no floating-point 1-D or 2-D weights to scan")
    kept = set(sel.filter_types(types, include, exclude))
    weights = [t for t in weights if module_type(t.name[: -len(".weight")]) in kept]
    if tied:
        log.info(
            "lm_head is tied to %s (tie_word_embeddings): it is scored once, as the embedding",
            embedding.removesuffix(".weight"),
        )
    for reason in skipped:
        log.info("skipped %s", reason)
    return _Plan(weights, tied, skipped)


def _input_embedding(tensors: list[TensorInfo], config: dict[str, Any] | None) -> str | None:
    """The input embedding's tensor name: by its usual names, else the one 2-D weight whose
    first dimension is the vocabulary size."""
    named = sorted(t.name for t in tensors if t.name.endswith(EMBED_SUFFIXES))
    if named:
        return named[0]
    vocab = (config or {}).get("vocab_size")
    by_shape = [
        t.name
        for t in tensors
        if len(t.shape) == 2 and t.shape[0] == vocab and not t.name.endswith(LM_HEAD)
    ]
    return by_shape[0] if len(by_shape) == 1 else None


def _cost(info: TensorInfo) -> float:
    n, m = as_matrix_shape(info.shape)
    short, long_ = min(n, m), max(n, m)
    return long_ * short * short + short**3


class _Stopped(Exception):
    """Raised inside a worker when another worker has failed."""


def _read_rows(handle, offset: int, rows: int, m: int, row_bytes: int, dtype, info: TensorInfo):
    # Plain positioned reads, not mmap: mapped pages would count towards the process's memory
    # and grow with the model, while reads stay bounded by the chunk size.
    import torch

    buffer = bytearray(rows * row_bytes)
    handle.seek(offset)
    if handle.readinto(buffer) != len(buffer):
        raise SpectrumError(f"{info.shard}: tensor {info.name!r} is cut short (file truncated?)")
    return torch.frombuffer(buffer, dtype=dtype).view(rows, m)


def _chunks(handle, offset: int, info: TensorInfo, chunk_elements: int, whole: bool):
    """The weight as ``(k, short)`` blocks along its long side (or whole, for exact mode)."""
    n, m = as_matrix_shape(info.shape)
    dtype = TORCH_DTYPES[info.dtype]
    row_bytes = m * DTYPE_BYTES[info.dtype]
    if whole or n < m:
        # Wide weights are read whole (at most the largest tensor) and cut into transposed
        # column blocks.
        weight = _read_rows(handle, offset, n, m, row_bytes, dtype, info)
        if whole:
            yield weight
            return
        step = max(1, chunk_elements // n)
        for start in range(0, m, step):
            yield weight[:, start : start + step].T
        return
    step = max(1, chunk_elements // m)
    for start in range(0, n, step):
        rows = min(step, n - start)
        yield _read_rows(handle, offset + start * row_bytes, rows, m, row_bytes, dtype, info)


def _score_tensor(
    path: Path,
    offset: int,
    info: TensorInfo,
    *,
    device: str,
    exact: bool,
    chunk_elements: int,
    stop: threading.Event,
) -> TensorScore:
    """Read one weight chunk by chunk and score it (runs in a worker thread)."""
    import torch

    started = time.perf_counter()
    module = info.name[: -len(".weight")]
    n, m = as_matrix_shape(info.shape)
    with torch.no_grad(), open(path, "rb", buffering=0) as handle:
        acc = None if exact else GramAccumulator(min(n, m), device=device)
        whole = None
        for chunk in _chunks(handle, offset, info, chunk_elements, exact):
            if stop.is_set():
                raise _Stopped
            if acc is None:
                whole = chunk
            else:
                acc.add(chunk)
        try:
            values = (
                singular_values_exact(whole.to(device)) if acc is None else acc.singular_values()
            )
            score = snr_from_singular_values(values, n, m)
        except (ValueError, RuntimeError) as exc:  # torch.linalg errors are RuntimeErrors
            raise SpectrumError(f"{info.shard}: tensor {info.name!r}: {exc}") from exc
    return TensorScore(
        module, module_type(module), score, info.shape, info.dtype, time.perf_counter() - started
    )


def _worker_count(device: str) -> int:
    import torch

    # On CPU, one single-threaded BLAS call per core beats one call spread over all cores for
    # these sizes (measured: 8% at 1024, 15% at 4096 on 2 cores); a GPU runs one at a time.
    return 1 if device != "cpu" else max(1, torch.get_num_threads())


def _run_pipeline(
    source: ShardSource,
    plan: _Plan,
    *,
    device: str,
    exact: bool,
    chunk_elements: int,
    progress: Progress,
) -> dict[str, TensorScore]:
    """Fetch shards one ahead, score their weights on a pool of workers, release shards."""
    import torch

    by_shard: dict[str, list[TensorInfo]] = {}
    for info in plan.tensors:
        by_shard.setdefault(info.shard, []).append(info)
    shards = list(by_shard)
    workers = _worker_count(device)
    threads_before = torch.get_num_threads()
    stop = threading.Event()
    scores: dict[str, TensorScore] = {}
    fetcher = ThreadPoolExecutor(1, thread_name_prefix="spectrum-fetch")
    pool = ThreadPoolExecutor(workers, thread_name_prefix="spectrum-worker")
    if workers > 1:
        torch.set_num_threads(1)
    try:
        fetches: dict[str, Future] = {shards[0]: fetcher.submit(source.fetch, shards[0])}
        in_flight: list[tuple[str, dict[Future, TensorInfo]]] = []
        for index, shard in enumerate(shards):
            path = fetches.pop(shard).result()
            if index + 1 < len(shards):
                nxt = shards[index + 1]
                fetches[nxt] = fetcher.submit(source.fetch, nxt)
            header, data_start = read_header_and_offset(path, f"{source.location}/{shard}")
            # Largest first, so the pool does not end on one big weight with idle cores.
            tasks = sorted(by_shard[shard], key=_cost, reverse=True)
            futures = {
                pool.submit(
                    _score_tensor,
                    path,
                    data_start + header[t.name]["data_offsets"][0],
                    t,
                    device=device,
                    exact=exact,
                    chunk_elements=chunk_elements,
                    stop=stop,
                ): t
                for t in tasks
            }
            in_flight.append((shard, futures))
            while len(in_flight) > 1 or (in_flight and index == len(shards) - 1):
                done_shard, done = in_flight.pop(0)
                for future in as_completed(done):
                    score = future.result()
                    scores[score.module] = score
                    progress.update(_cost(done[future]), score.module)
                source.release(done_shard)
    except BaseException:
        stop.set()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        fetcher.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(threads_before)
    return scores


def scan_source(
    source: ShardSource,
    top_percent: float = 50,
    *,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    embeddings: bool = True,
    exact: bool = False,
    device: str = "auto",
    chunk_mb: int = DEFAULT_CHUNK_MB,
    output_dir: str | Path | None = None,
    show_progress: bool = True,
) -> ScanResult:
    """Scan a checkpoint source; see :func:`spectrum_sm.scan` for the arguments."""

    started = time.perf_counter()
    top_percent = sel.check_percent(top_percent)
    include, exclude = list(include or []), list(exclude or [])
    if output_dir is not None:
        ensure_output_dir(output_dir)  # fail before an hour of work, not after
    device = resolve_device(device)
    if chunk_mb <= 0:
        raise SpectrumError(f"chunk size must be positive, got {chunk_mb} MB")

    shards = shard_files(source)
    config = read_config(source)
    headers: dict[str, dict[str, Any]] = {}
    for shard in shards:
        # Local shards are validated up front; remote ones again when they arrive.
        remote_header = getattr(source, "read_header", None)
        if remote_header is not None:
            headers[shard] = remote_header(shard)
        else:
            headers[shard] = read_header(source.fetch(shard), f"{source.location}/{shard}")
    plan = _plan(source, shards, include, exclude, config, headers)
    method = "svdvals-float32" if exact else "gram-float64-eigvalsh"
    log.info(
        "scanning %d weights of %s (%d shard%s) on %s with %s",
        len(plan.tensors),
        source.location,
        len(shards),
        "" if len(shards) == 1 else "s",
        device,
        method,
    )
    progress = Progress(
        sum(_cost(t) for t in plan.tensors), len(plan.tensors), "SNR scan", show_progress
    )
    try:
        scores = _run_pipeline(
            source,
            plan,
            device=device,
            exact=exact,
            chunk_elements=chunk_mb * 1024 * 1024 // 8,
            progress=progress,
        )
    finally:
        progress.close()
    ordered = {m: scores[m] for m in sorted(scores, key=natural_key)}
    result = ScanResult(
        model_name=source.name,
        slug=sel.model_slug(source.name),
        scores=ordered,
        method=method,
        device=device,
        top_percent=top_percent,
        include=include,
        exclude=exclude,
        embeddings=embeddings,
        tied_embeddings=plan.tied,
        provenance=source.provenance(),
        config=config,
        seconds=time.perf_counter() - started,
        skipped=plan.skipped,
    )
    if output_dir is not None:
        result.write(output_dir)
    log.info("scanned %d weights in %.1f s", len(ordered), result.seconds)
    return result
