"""The streaming Spectrum scan: read tensors shard by shard, score each, write the reference files.

A fetch thread brings shards in (downloading the next one while this one is scored); a pool of
workers, one per core, each reads one weight in chunks along its long side, builds its Gram
matrix and takes the eigenvalues. Memory follows the chunk size and the number of workers, not
the model size.

Precision (``precision="certified"``, the default): the Gram matrix and its eigenvalues are
computed in float32, each score with an interval that holds the float64 method's score (see
:func:`spectrum_sm.core.snr.float32_eigenvalue_bound`). Once every weight is scored, the weights
whose interval could move them across their type's selection boundary are recomputed in float64,
until the selection provably equals the float64 method's. ``precision="float64"`` computes
everything in float64; ``exact=True`` uses float32 ``svdvals`` like the reference.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import functools
import itertools
import json
import logging
import math
import threading
import time
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import mxfp4
from . import selection as sel
from .atomic import ensure_output_dir, output_lock, write_files_atomically
from .errors import SpectrumError
from .names import EXPERT_BIAS_SUFFIX, ModelNames, model_names
from .options import ScanOptions
from .progress import Progress
from .snr import (
    GramAccumulator,
    as_matrix_shape,
    float32_eigenvalue_bound,
    module_type,
    natural_key,
    singular_values_exact,
    snr_bounds,
    snr_from_singular_values,
)
from .weights import (
    FLOAT_DTYPES,
    ShardSource,
    TensorInfo,
    open_shard,
    read_config,
    read_header,
    shard_files,
    tensors_from_header,
)

log = logging.getLogger(__name__)

#: Weights whose short side is at most this are computed in float64 straight away: their
#: eigenvalues cost next to nothing, and 1-D norms all score alike (1.0), so they tie.
FLOAT64_BELOW = 128
#: From this short side on, the float32 Gram matrix is solved in float64: the float32
#: eigensolver saves only ~25% there (1.3x at 4096, against 1.7x at 1024), while its error
#: bound, which grows with n, would send most weights to a float64 recheck.
FLOAT64_EIGEN_FROM = 2048
#: The scan method a result records, by precision (``exact`` records ``svdvals-float32``).
_METHODS = {"certified": "gram-float32-certified", "float64": "gram-float64-eigvalsh"}
#: Quantization methods whose weights cannot be scored from the checkpoint as stored (MXFP4
#: experts can: they are dequantized, see :mod:`spectrum_sm.core.mxfp4`).
_PACKED_QUANTIZATION = {"gptq", "awq", "bitsandbytes", "hqq", "aqlm", "eetq", "quanto"}


@dataclass
class TensorScore:
    """The score of one weight and what it cost.

    ``bounds`` holds the float64 method's score (a point for ``precision == "float64"``);
    ``error`` is the absolute bound on each Gram eigenvalue behind it.
    """

    module: str
    type: str
    snr: float
    shape: tuple[int, ...]
    dtype: str
    seconds: float
    precision: str = "float64"
    bounds: tuple[float, float] | None = None
    error: float = 0.0
    tower: str = "language"
    stored: str = ""
    entry: str = ""


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
    towers: list[str] = field(default_factory=lambda: ["language"])
    embedding_entries: list[str] = field(default_factory=lambda: list(sel.EMBEDDING_ENTRIES))
    names_source: str = "checkpoint names"
    certified_percents: list[float] = field(default_factory=list)
    recomputed: list[str] = field(default_factory=list)

    def snr_table(self) -> dict[str, dict[str, Any]]:
        """``{module: {"snr": float, "type": str}}`` in model order (the reference's JSON)."""
        return {m: {"snr": s.snr, "type": s.type} for m, s in self.scores.items()}

    def entries(self) -> dict[str, str]:
        """Module -> layer-file entry, where they differ (fused expert slices)."""
        return {m: s.entry for m, s in self.scores.items() if s.entry and s.entry != m}

    def selection(self, percent: float | None = None) -> dict[str, list[str]]:
        """Per type, the modules to train at ``percent`` (default: the scan's percent)."""
        chosen = self.top_percent if percent is None else sel.check_percent(percent)
        return sel.select_layers(self.snr_table(), chosen)

    def layer_file_text(self, percent: float | None = None) -> str:
        return sel.layer_file_text(
            self.selection(percent),
            self.embeddings,
            embedding_entries=self.embedding_entries,
            entries=self.entries(),
        )

    def manifest(self) -> dict[str, Any]:
        import torch

        from .version import __version__

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
            "certified_percents": self.certified_percents,
            "include": self.include,
            "exclude": self.exclude,
            "towers": self.towers,
            "embeddings": self.embeddings,
            "embedding_entries": self.embedding_entries,
            "tied_embeddings": self.tied_embeddings,
            "names": self.names_source,
            "skipped": self.skipped,
            "recomputed_in_float64": self.recomputed,
            "seconds": round(self.seconds, 3),
            "tensors": {m: _tensor_record(s) for m, s in self.scores.items()},
            "files": {k: p.name for k, p in self.files.items()},
        }

    def write(self, output_dir: str | Path, *, lock: bool = True) -> dict[str, Path]:
        """Write the reference's three files and our manifest, atomically, as one set
        (``lock=False`` when the caller already holds the folder's lock)."""
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
        with output_lock(out) if lock else contextlib.nullcontext():
            previous = out / names["results"]
            replaced = previous.is_file() and previous.read_text() != texts[names["results"]]
            write_files_atomically(out, texts)
            if replaced:
                self._remove_stale_layer_files(out, set(texts))
        return self.files

    def _remove_stale_layer_files(self, out: Path, written: set[str]) -> None:
        """Layer files of this name at other percents were selected from the results just
        replaced (another model saved under the same name, or other settings): training on one
        would silently train the wrong layers. One that these scores select too stays: a rescan
        of the same weights may differ in the last bits (threaded float sums), not in layers."""
        for stale in sorted(out.glob(sel.layer_file_glob(self.slug))):
            percent = sel.percent_in_path(stale.name)
            if percent is not None and stale.read_text() == self.layer_file_text(percent):
                continue
            if stale.name not in written:
                log.warning(
                    "removing %s: it was selected from the %s this scan replaced",
                    stale.name,
                    sel.results_file_name(self.slug),
                )
                stale.unlink()


def _tensor_record(score: TensorScore) -> dict[str, Any]:
    record: dict[str, Any] = {
        "snr": score.snr,
        "type": score.type,
        "shape": list(score.shape),
        "dtype": score.dtype,
        "seconds": round(score.seconds, 4),
        "precision": score.precision,
    }
    if score.bounds is not None:
        record["bounds"] = list(score.bounds)
        record["eigenvalue_error"] = score.error
    if score.tower != "language":
        record["tower"] = score.tower
    if score.stored and score.stored != f"{score.module}.weight":
        record["stored"] = score.stored
    if score.entry and score.entry != score.module:
        record["entry"] = score.entry
    return record


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
class _Weight:
    """One weight to score: where it is stored and how to read it."""

    info: TensorInfo
    module: str
    type: str
    tower: str
    entry: str
    scale: TensorInfo | None = None  # the dequantization scale of an FP8 or integer weight
    block: tuple[int, int] | None = None  # its block shape, when the scale is per block
    expert: int | None = None  # one expert of a fused 3-D expert tensor (gpt-oss)
    mxfp4: bool = False  # that tensor is MXFP4 blocks, ``scale`` its E8M0 scales

    @property
    def shape(self) -> tuple[int, ...]:
        """The matrix scored: the stored weight, or one expert as the loaded model holds it."""
        if self.mxfp4:
            _, rows, groups, _ = self.info.shape
            return (groups * mxfp4.GROUP, rows)
        return self.info.shape if self.expert is None else self.info.shape[1:]

    @property
    def bf16_exact(self) -> bool:
        """Whether every value is a bf16 value: bf16 weights, and MXFP4 ones (an FP4 value has
        two significant bits, its scale is a power of two)."""
        return self.mxfp4 or (self.info.dtype == "BF16" and self.scale is None)


def _quantization(config: dict[str, Any] | None) -> tuple[str, tuple[int, int] | None]:
    """The checkpoint's quantization method and FP8 block size (packed integer formats refused)."""
    quant = (config or {}).get("quantization_config") or {}
    quant = quant if isinstance(quant, dict) else {}
    method = str(quant.get("quant_method", "")).lower()
    if method in _PACKED_QUANTIZATION or quant.get("load_in_4bit") or quant.get("load_in_8bit"):
        raise SpectrumError(
            f"the checkpoint is quantized with {method or 'bitsandbytes'}: its weights are packed "
            "integers, and Spectrum's scores need the real weights; scan the unquantized model "
            "(the scores apply to any of its quantized copies)"
        )
    block = quant.get("weight_block_size")
    if isinstance(block, (list, tuple)) and len(block) == 2:
        return method, (int(block[0]), int(block[1]))
    return method, None


def _plan(
    infos: list[TensorInfo],
    config: dict[str, Any] | None,
    *,
    include: list[str],
    exclude: list[str],
    towers: list[str],
    location: str,
) -> tuple[list[_Weight], ModelNames, list[str]]:
    """Choose the weights to score, with their loaded-model names, towers and types."""
    method, block_size = _quantization(config)
    by_name = {t.name: t for t in infos}
    names = model_names(config, {t.name: t.shape for t in infos})
    for note in names.notes:
        log.info("%s", note)
    skipped, weights, refused, malformed = [], [], [], []
    left_out: dict[str, int] = {}
    for info in infos:
        fused = _fused_experts(info, by_name, method == mxfp4.QUANT_METHOD)
        if fused is None and not info.name.endswith(".weight"):
            continue  # biases, buffers and the scales of quantized weights
        tower = names.tower(info.name)
        if fused is not None:
            kind, why = fused
            if tower not in towers:
                left_out[tower] = left_out.get(tower, 0) + info.shape[0]
            elif kind == "refused":
                refused.append(f"{info.name} ({info.dtype})")
            elif kind == "malformed":
                malformed.append(f"{info.name}: {why}")
            else:
                weights += _expert_weights(info, by_name, names, tower, kind == "mxfp4")
            continue
        stored_module = info.name[: -len(".weight")]
        target = names.target(info.name)
        if names.tied and target.param == names.output_head != names.input_embedding:
            skipped.append(f"{stored_module}: tied to the input embedding, scored once")
            continue
        if tower not in towers:
            left_out[tower] = left_out.get(tower, 0) + 1
            continue
        if len(info.shape) not in (1, 2) or info.numel == 0:
            skipped.append(f"{stored_module}: shape {list(info.shape)} is not a 1-D or 2-D weight")
            continue
        scale = block = None
        if info.dtype not in FLOAT_DTYPES:
            scale, block = _scale_of(info, by_name, block_size)
            if scale is None:
                refused.append(f"{info.name} ({info.dtype})")
                continue
        module = names.module(info.name)
        weights.append(
            _Weight(info, module, _type_of(module, tower), tower, target.entry(), scale, block)
        )
    if malformed:
        more = f"; and {len(malformed) - 3} more" if len(malformed) > 3 else ""
        raise SpectrumError(
            "MXFP4 tensors not in the layout this scan dequantizes (transformers' gpt-oss "
            f"experts): {'; '.join(malformed[:3])}{more}"
        )
    if refused:
        raise SpectrumError(
            f"{len(refused)} weights are stored as integers or 8-bit floats without a scale "
            f"this scan can apply, e.g. {', '.join(refused[:3])}; raw quantized values would give "
            "wrong scores. Scan the unquantized model, or --exclude their types"
        )
    for tower, count in sorted(left_out.items()):
        log.info(
            "left out %d %s weights (scanning towers: %s; --towers all includes them)",
            count,
            tower,
            ", ".join(towers),
        )
    types = list(dict.fromkeys(w.type for w in weights))
    if not types:
        raise SpectrumError(f"{location}: no 1-D or 2-D weights to scan in towers {towers}")
    kept = set(sel.filter_types(types, include, exclude))
    weights = [w for w in weights if w.type in kept]
    if names.tied:
        log.info("the output head is tied to the input embedding: it is scored once")
    for reason in skipped:
        log.info("skipped %s", reason)
    return weights, names, skipped


def _type_of(module: str, tower: str) -> str:
    """Its module's type, after its tower outside the language model (``vision:qkv``)."""
    kind = module_type(module)
    return kind if tower == "language" else f"{tower}:{kind}"


def _fused_experts(
    info: TensorInfo, by_name: dict[str, TensorInfo], packed: bool
) -> tuple[str, str] | None:
    """``(kind, why)`` for a stored tensor that holds every expert of a layer in one (gpt-oss
    stores ``mlp.experts.gate_up_proj`` ``[experts, hidden, 2 * inter]`` so, or as MXFP4
    ``gate_up_proj_blocks`` and ``_scales``); ``None`` for any other tensor (weights, biases,
    scales, buffers). ``kind``: ``float`` and ``mxfp4`` are scored, ``refused`` is stored as
    integers or FP8 without a scale we apply, ``malformed`` MXFP4 blocks say ``why``."""
    base = mxfp4.base_name(info.name)
    if info.name.endswith(mxfp4.BLOCKS_SUFFIX):
        scales = by_name.get(base + mxfp4.SCALES_SUFFIX)
        if not packed and (scales is None or info.dtype != "U8"):
            return None  # a tensor that merely ends in _blocks, in a checkpoint not MXFP4
        why = mxfp4.check_layout(info.shape, scales.shape if scales is not None else None)
        if why is None and (info.dtype, scales.dtype) != ("U8", "U8"):
            why = f"dtypes {info.dtype} and {scales.dtype}, not U8"
        if why is None and scales.shard != info.shard:
            why = f"its _scales are in another shard ({scales.shard})"
        return ("malformed", why) if why else ("mxfp4", "")
    parts = info.name.split(".")
    if (
        len(info.shape) != 3
        or len(parts) < 2
        or parts[-2] != "experts"
        or parts[-1] in ("weight", "bias")
        or parts[-1].endswith(EXPERT_BIAS_SUFFIX)
        or "scale" in parts[-1]  # the scales of quantized experts, read with their weights
        or info.numel == 0
    ):
        return None
    return ("float", "") if info.dtype in FLOAT_DTYPES else ("refused", "")


def _expert_weights(
    info: TensorInfo, by_name: dict[str, TensorInfo], names: ModelNames, tower: str, packed: bool
) -> list[_Weight]:
    """One weight per expert of a fused expert tensor, named as the reference named experts
    when they were modules; each selects the expert's row of the parameter (and of its bias)."""
    base = mxfp4.base_name(info.name) if packed else info.name
    with_bias = base + EXPERT_BIAS_SUFFIX in by_name
    scale = by_name[base + mxfp4.SCALES_SUFFIX] if packed else None
    weights = []
    for expert in range(info.shape[0]):
        module, target = names.expert(info.name, expert, with_bias)
        kind = _type_of(module, tower)
        weights.append(
            _Weight(info, module, kind, tower, target.entry(), scale, expert=expert, mxfp4=packed)
        )
    return weights


def _scale_of(
    info: TensorInfo, by_name: dict[str, TensorInfo], block: tuple[int, int] | None
) -> tuple[TensorInfo | None, tuple[int, int] | None]:
    """The dequantization scale stored beside a quantized weight, when its shape is one we
    apply: per tensor, per output row, or per block (DeepSeek / Qwen FP8: ``weight_scale_inv``
    of 128 x 128 blocks, the block size from ``quantization_config.weight_block_size`` or else
    dividing the weight exactly)."""
    for suffix in ("_scale_inv", "_scale"):
        scale = by_name.get(info.name + suffix)
        if scale is None or scale.shard != info.shard or len(info.shape) != 2:
            continue
        n, m = info.shape
        if scale.numel == 1 or scale.shape in ((n,), (n, 1)):
            return scale, None
        if len(scale.shape) != 2:
            continue
        rows, cols = scale.shape
        if block is None and n % rows == 0 and m % cols == 0:
            block = (n // rows, m // cols)
        if block is not None and (-(-n // block[0]), -(-m // block[1])) == (rows, cols):
            return scale, block
    return None, None


def _cost(weight: _Weight) -> float:
    n, m = as_matrix_shape(weight.shape)
    short = min(n, m)
    return max(n, m) * short * short + short**3


class _Stopped(Exception):
    """Raised inside a worker when another worker has failed."""


def _dequantize(rows, weight: _Weight, start: int, scale):
    """Rows ``start:start+len(rows)`` of a weight as float32, scaled back when quantized."""
    import torch

    values = rows.to(torch.float32)
    if scale is None:
        return values
    if scale.numel() == 1:
        return values * scale.reshape(())
    if scale.ndim == 1 or scale.shape[1] == 1:
        return values * scale.reshape(-1, 1)[start : start + values.shape[0]]
    block_n, block_m = weight.block
    row_index = torch.arange(start, start + values.shape[0]) // block_n
    return values * scale[row_index].repeat_interleave(block_m, dim=1)[:, : values.shape[1]]


def _chunks(reader, weight: _Weight, scale, chunk_elements: int, whole: bool):
    """The weight as ``(k, short)`` float32 blocks along its long side (or whole)."""
    info = weight.info
    n, m = as_matrix_shape(weight.shape)
    if weight.mxfp4:
        # One expert dequantized whole, as the loaded model holds it: the same blocks, in the
        # same order, as the bf16 checkpoint of the same values gives (so the same scores). Read
        # from its own blocks and scales alone: never the other experts.
        _, rows, groups, width = info.shape
        blocks = reader.rows(info, weight.expert * rows * groups, rows * groups)
        scales = reader.rows(weight.scale, weight.expert * rows, rows)
        expert = mxfp4.expert_matrix(
            blocks.reshape(rows, groups, width),
            scales.reshape(rows, groups),
            rows_per_step=chunk_elements // (groups * mxfp4.GROUP),
        )
        del blocks, scales  # not held while the expert is scored

        def read(start: int, count: int):
            return expert[start : start + count]
    else:
        first = 0 if weight.expert is None else weight.expert * n  # rows of earlier experts

        def read(start: int, count: int):
            return _dequantize(reader.rows(info, first + start, count), weight, start, scale)

    if whole:
        yield read(0, n)
    elif n < m:
        # Wide weights are read whole (at most the largest tensor) and cut into transposed
        # column blocks.
        matrix = read(0, n)
        step = max(1, chunk_elements // n)
        for start in range(0, m, step):
            yield matrix[:, start : start + step].T
    else:
        step = max(1, chunk_elements // m)
        for start in range(0, n, step):
            yield read(start, min(step, n - start))


def _score_tensor(
    shard,
    weight: _Weight,
    *,
    device: str,
    precision: str,
    exact: bool,
    chunk_elements: int,
    stop: threading.Event,
) -> TensorScore:
    """Read one weight chunk by chunk and score it (runs in a worker thread)."""
    import torch

    started = time.perf_counter()
    info = weight.info
    n, m = as_matrix_shape(weight.shape)
    short, long = min(n, m), max(n, m)
    float32 = precision == "certified" and short > FLOAT64_BELOW and not exact
    bounds, error, label = None, 0.0, "float64"
    with torch.no_grad(), shard.reader() as reader:
        scale = None
        if weight.scale is not None and not weight.mxfp4:
            # Rows of its last dimension, as readers count them: one for a 0-D or 1-D scale.
            rows = reader.rows(weight.scale, 0, math.prod(weight.scale.shape[:-1]))
            scale = rows.to(torch.float32).reshape(weight.scale.shape)
        dtype = torch.float32 if float32 else torch.float64
        acc = None if exact else GramAccumulator(short, device=device, dtype=dtype)
        whole = None
        for chunk in _chunks(reader, weight, scale, chunk_elements, exact):
            if stop.is_set():
                raise _Stopped
            if acc is None:
                whole = chunk
            else:
                acc.add(chunk)
        try:
            if acc is None:
                score = snr_from_singular_values(singular_values_exact(whole.to(device)), n, m)
                label = "svdvals-float32"
            elif float32:
                if short >= FLOAT64_EIGEN_FROM:  # the float32 Gram, solved in float64
                    eigenvalues, shifted_norm, label = acc.eigenvalues(), None, "float32-gram"
                else:
                    (eigenvalues, shifted_norm), label = acc.shifted_eigenvalues(), "float32"
                error = float32_eigenvalue_bound(float(eigenvalues[0]), shifted_norm, short, long)
                score = snr_from_singular_values(eigenvalues.clamp_min(0.0).sqrt(), n, m)
                bounds = snr_bounds(eigenvalues, error, n, m)
            else:
                score = snr_from_singular_values(acc.singular_values(), n, m)
                bounds = (score, score)
        except (ValueError, RuntimeError) as exc:  # torch.linalg errors are RuntimeErrors
            where = info.name if weight.expert is None else f"{info.name} (expert {weight.expert})"
            raise SpectrumError(f"{info.shard}: tensor {where!r}: {exc}") from exc
    return TensorScore(
        weight.module,
        weight.type,
        score,
        tuple(weight.shape),
        "MXFP4" if weight.mxfp4 else info.dtype,
        time.perf_counter() - started,
        precision=label,
        bounds=bounds,
        error=error,
        tower=weight.tower,
        stored=info.name,
        entry=weight.entry,
    )


@contextlib.contextmanager
def _bf16_exact_matmul(enabled: bool):
    """Let float32 matrix products of bf16-stored weights run on bf16 units (AMX, tensor
    cores). Their inputs are bf16 values, so nothing is rounded on the way in, and products
    accumulate in float32 as before; measured 2-4x faster for the Gram on CPUs with AMX.
    Any other input dtype keeps IEEE float32 (float16 or dequantized values would be rounded)."""
    import torch

    mkldnn = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
    before = getattr(mkldnn, "fp32_precision", None)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        if before is not None:  # so mkldnn is not None either
            mkldnn.fp32_precision = "bf16" if enabled else "ieee"
        torch.backends.cuda.matmul.allow_tf32 = enabled  # tf32 holds bf16 values exactly too
        yield
    finally:
        if before is not None:
            mkldnn.fp32_precision = before
        torch.backends.cuda.matmul.allow_tf32 = tf32


def _worker_count(device: str) -> int:
    import torch

    # On CPU, one single-threaded BLAS call per core beats one call spread over all cores for
    # these sizes (measured: 8% at 1024, 15% at 4096 on 2 cores); a GPU runs one at a time.
    return 1 if device != "cpu" else max(1, torch.get_num_threads())


def _run_pipeline(
    source: ShardSource,
    weights: list[_Weight],
    *,
    device: str,
    precision: str,
    exact: bool,
    chunk_elements: int,
    label: str,
    show_progress: bool,
    opened: dict[str, Any],
) -> dict[str, TensorScore]:
    """Fetch shards one ahead, score their weights on a pool of workers, release shards
    (behind a progress bar or log lines named ``label``); ``opened`` shards stay open."""
    import torch

    by_shard: dict[str, list[_Weight]] = {}
    for weight in weights:
        by_shard.setdefault(weight.info.shard, []).append(weight)
    shards = list(by_shard)
    if not shards:
        return {}
    workers = _worker_count(device)
    threads_before = torch.get_num_threads()
    stop = threading.Event()
    scores: dict[str, TensorScore] = {}
    fetcher = ThreadPoolExecutor(1, thread_name_prefix="spectrum-fetch")
    pool = ThreadPoolExecutor(workers, thread_name_prefix="spectrum-worker")
    if workers > 1:
        torch.set_num_threads(1)
    bf16_only = all(w.bf16_exact for w in weights) and precision == "certified"

    def fetch_and_open(shard: str):
        if shard in opened:
            return opened[shard]
        return open_shard(source.fetch(shard), f"{source.location}/{shard}")

    score_one = functools.partial(
        _score_tensor,
        device=device,
        precision=precision,
        exact=exact,
        chunk_elements=chunk_elements,
        stop=stop,
    )
    progress = Progress(sum(_cost(w) for w in weights), len(weights), label, show_progress)
    with _bf16_exact_matmul(bf16_only):
        try:
            fetch = fetcher.submit(fetch_and_open, shards[0])
            in_flight: list[tuple[str, Any, dict[Future, _Weight]]] = []
            for index, shard in enumerate(shards):
                handle = fetch.result()
                if index + 1 < len(shards):
                    fetch = fetcher.submit(fetch_and_open, shards[index + 1])
                # Largest first, so the pool does not end on one big weight with idle cores.
                tasks = sorted(by_shard[shard], key=_cost, reverse=True)
                futures = {pool.submit(score_one, handle, w): w for w in tasks}
                in_flight.append((shard, handle, futures))
                while len(in_flight) > 1 or (in_flight and index == len(shards) - 1):
                    done_shard, done_handle, done = in_flight.pop(0)
                    for future in as_completed(done):
                        score = future.result()
                        scores[score.module] = score
                        progress.update(_cost(done[future]), score.module)
                    if done_shard not in opened:
                        done_handle.close()
                        source.release(done_shard)
        except BaseException:
            stop.set()
            raise
        finally:
            progress.close()
            pool.shutdown(wait=True, cancel_futures=True)
            fetcher.shutdown(wait=True, cancel_futures=True)
            torch.set_num_threads(threads_before)
    return scores


def uncertain_weights(scores: dict[str, TensorScore], percents: Iterable[float]) -> list[str]:
    """Weights whose score interval could move them across a selection boundary at one of
    ``percents``: recomputing these in float64 makes the selections the float64 method's.

    The top ``k`` of a type (by score, stable) is certain when every selected weight's lower
    bound is above every other weight's upper bound; two float64 scores compare exactly.
    """
    table = {m: {"snr": s.snr, "type": s.type} for m, s in scores.items()}
    doubtful: dict[str, None] = {}
    for percent in percents:
        for layer_type, chosen in sel.select_layers(table, percent).items():
            picked = set(chosen)
            rest = [m for m, s in scores.items() if s.type == layer_type and m not in picked]
            for i, j in itertools.product(chosen, rest):
                a, b = scores[i], scores[j]
                if not (a.precision == b.precision == "float64" or a.bounds[0] > b.bounds[1]):
                    doubtful |= dict.fromkeys(m for m in (i, j) if scores[m].precision != "float64")
    return list(doubtful)


def _read_headers(source: ShardSource, shards: list[str]) -> tuple[list[TensorInfo], dict]:
    """Every tensor of the checkpoint, from the safetensors headers (remote ones by ranged
    reads); ``.bin`` shards have no header and are opened (memory-mapped) here."""
    infos: list[TensorInfo] = []
    opened: dict[str, Any] = {}
    for shard in shards:
        label = f"{source.location}/{shard}"
        if not shard.endswith(".safetensors"):
            opened[shard] = open_shard(source.fetch(shard), label)
            infos += opened[shard].tensors
        elif hasattr(source, "read_header"):  # a remote source reads the header alone
            infos += tensors_from_header(source.read_header(shard), shard)
        else:
            infos += tensors_from_header(read_header(source.fetch(shard), label), shard)
    return infos, opened


def scan_source(
    source: ShardSource,
    options: ScanOptions | None = None,
    *,
    output_dir: str | Path | None = None,
    show_progress: bool = True,
) -> ScanResult:
    """Scan a checkpoint source with :class:`ScanOptions` (validated when built)."""
    started = time.perf_counter()
    options = options or ScanOptions()
    top_percent = sel.check_percent(options.top_percent)
    percents = sorted({top_percent, *(sel.check_percent(p) for p in options.certify_percents)})
    # Fail before an hour of work, not after; and keep a second scan out of this folder.
    out = None if output_dir is None else ensure_output_dir(output_dir)
    with contextlib.nullcontext() if out is None else output_lock(out, wait=False):
        result = _scan(source, options, top_percent, percents, show_progress)
        result.seconds = time.perf_counter() - started
        if out is not None:
            result.write(out, lock=False)
    log.info("scanned %d weights in %.1f s", len(result.scores), result.seconds)
    return result


def _scan(
    source: ShardSource,
    options: ScanOptions,
    top_percent: float,
    percents: list[float],
    show_progress: bool,
) -> ScanResult:
    include, exclude = list(options.include), list(options.exclude)
    towers, device = options.resolved_towers(), resolve_device(options.device)
    exact, precision = options.exact, options.precision
    certified = precision == "certified" and not exact
    shards = shard_files(source)
    config = read_config(source)
    infos, opened = _read_headers(source, shards)
    # A source's background hashing of shards, where it has one (see BackgroundHasher).
    pause_hashing = getattr(source, "pause_hashing", lambda: None)
    try:
        weights, names, skipped = _plan(
            infos, config, include=include, exclude=exclude, towers=towers, location=source.location
        )
        method = "svdvals-float32" if exact else _METHODS[precision]
        log.info(
            "scanning %d weights of %s (%d shard%s) on %s with %s",
            len(weights),
            source.location,
            len(shards),
            "" if len(shards) == 1 else "s",
            device,
            method,
        )
        run = functools.partial(
            _run_pipeline,
            source,
            device=device,
            chunk_elements=options.chunk_mb * 1024 * 1024 // 8,
            show_progress=show_progress,
            opened=opened,
        )
        pause_hashing()  # before the BLAS workers start
        scores = run(weights, precision=precision, exact=exact, label="SNR scan")
        recomputed = _certify(run, weights, scores, percents) if certified else []
        provenance = source.provenance()
    finally:
        for handle in opened.values():
            handle.close()
        pause_hashing()  # a failed scan must not leave a hashing thread behind
    return ScanResult(
        model_name=source.name,
        slug=sel.model_slug(source.name),
        scores={m: scores[m] for m in sorted(scores, key=natural_key)},
        method=method,
        device=device,
        top_percent=top_percent,
        include=include,
        exclude=exclude,
        embeddings=options.embeddings,
        tied_embeddings=names.tied,
        provenance=provenance,
        config=config,
        seconds=0.0,
        skipped=skipped,
        towers=towers,
        embedding_entries=names.embedding_entries(),
        names_source=names.source,
        certified_percents=percents if certified else [],
        recomputed=recomputed,
    )


def _certify(
    run, weights: list[_Weight], scores: dict[str, TensorScore], percents: list[float]
) -> list[str]:
    """Recompute in float64 every weight whose bound leaves its selection open, until none
    does (each round only narrows intervals, so this ends)."""
    by_module = {w.module: w for w in weights}
    recomputed: list[str] = []
    while doubtful := uncertain_weights(scores, percents):
        log.info(
            "recomputing %d weight%s in float64: their float32 bounds overlap a selection "
            "boundary (%s)",
            len(doubtful),
            "" if len(doubtful) == 1 else "s",
            ", ".join(doubtful[:3]) + (", ..." if len(doubtful) > 3 else ""),
        )
        again = run(
            [by_module[m] for m in doubtful],
            precision="float64",
            exact=False,
            label="float64 recheck",
        )
        for module, score in again.items():
            low, high = scores[module].bounds
            if not low <= score.snr <= high:  # the error model failed: say so, loudly
                log.warning(
                    "%s: float64 score %r outside its float32 bounds [%r, %r]",
                    module,
                    score.snr,
                    low,
                    high,
                )
            score.seconds += scores[module].seconds
            scores[module] = score
        recomputed += doubtful
    return sorted(recomputed, key=natural_key)  # model order, not the workers' finishing order
