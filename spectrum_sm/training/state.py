"""Resumable training state: checkpoints that load safely, verify, and belong to one run.

A checkpoint ``checkpoint-<step>/`` holds, per rank, ``rank-<r>.safetensors`` (its trainable
weights: all of them on rank 0 under DDP, its own shards under FSDP; its optimizer state; its RNG
states) and ``rank-<r>.json`` (the non-tensor parts and the size and sha256 of the rank's
safetensors file), plus ``state.json`` from rank 0 (step, data position, run fingerprint,
scheduler). Nothing in it is pickled: loading a checkpoint cannot run code.

Each host's first process creates the folder on its host (SageMaker syncs every host's
``/opt/ml/checkpoints`` to one S3 prefix and restores the union to every host); every rank writes
its own files in parallel into ``.tmp-checkpoint-<step>``, which is renamed once all are done. On
resume every rank checks its own files against their recorded sizes and hashes; the ranks agree
on the newest checkpoint that verifies everywhere, and fall back to the previous one, saying so.
A checkpoint whose fingerprint (model, layer file, data, method and the hyperparameters that
change results) differs from this run's is refused with the difference named, unless the run
asks for it explicitly (``--resume_from``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import SpectrumError
from ..core.weights import sha256_file as file_digest
from ..core.weights import visible_files
from .args import with_role

log = logging.getLogger(__name__)
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "state.json"


@dataclass
class TrainingState:
    """Where the run is: optimizer steps done and the next micro-batch of the current epoch."""

    step: int = 0
    epoch: int = 0
    micro_batch: int = 0
    tokens_seen: int = 0
    trainable: list[str] | None = None
    fingerprint: dict[str, Any] = field(default_factory=dict)
    world_size: int = 1
    scheduler: dict[str, Any] = field(default_factory=dict)
    #: The mean training loss of the last logged window, so that a run resumed at its last
    #: step reports the loss it measured (None before the first window).
    last_loss: float | None = None


# -- run fingerprint -------------------------------------------------------------------------


def folder_digest(path: str | Path | None) -> str | None:
    """sha256 over a file's or folder's files (names and contents), hidden files left out."""
    if not path or not Path(path).exists():
        return None
    digest = hashlib.sha256()
    for rel, file in visible_files(Path(path)):  # the files an upload of ``path`` would send
        digest.update(rel.encode() + b"\0" + file_digest(file).encode() + b"\0")
    return digest.hexdigest()


def model_identity(model: str) -> str:
    """A local model folder by its config and weight index; a Hub id by its name."""
    path = Path(model)
    if not path.is_dir():
        return model
    digest = hashlib.sha256()
    for name in ("config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (path / name).is_file():
            digest.update(name.encode() + (path / name).read_bytes())
    for shard in sorted(path.glob("*.safetensors")):
        digest.update(shard.name.encode() + str(shard.stat().st_size).encode())
    return digest.hexdigest()


def run_fingerprint(args, world_size: int) -> dict[str, Any]:
    """What makes two runs the same run: resuming a checkpoint is only right between these."""
    fingerprint = {
        "model": model_identity(str(args.model_name_or_path)),
        "layer_file": folder_digest(args.spectrum_config) if args.method == "spectrum" else None,
        # A Hub dataset id has no local files to hash: its name stands for it.
        "train_data": folder_digest(args.train_data) or str(args.train_data),
        "processes": world_size,
        # The hyperparameters that change what a run computes (the role is declared on TrainArgs).
        **{name: getattr(args, name) for name in with_role("fingerprint")},
    }
    if getattr(args, "validation_share", 0):  # it removes rows from training; absent when 0,
        fingerprint["validation_share"] = args.validation_share  # as checkpoints before it
    if getattr(args, "chat_template_path", None):  # likewise: what the rows render as
        fingerprint["chat_template"] = folder_digest(args.chat_template_path)
    return fingerprint


def fingerprint_difference(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    return [
        f"{k}: {saved.get(k)!r} there, {current.get(k)!r} here"
        for k in sorted(set(saved) | set(current))
        if saved.get(k) != current.get(k)
    ]


# -- RNG states without pickle ---------------------------------------------------------------


def _rng_tensors_and_json() -> tuple[dict[str, Any], dict[str, Any]]:
    import numpy
    import torch

    version, internal, gauss = random.getstate()
    tensors = {"rng/torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors.update({f"rng/cuda/{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    kind, keys, pos, has_gauss, cached = numpy.random.get_state()
    tensors["rng/numpy"] = torch.from_numpy(numpy.asarray(keys, dtype=numpy.int64))
    meta = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, int(pos), int(has_gauss), float(cached)],
    }
    return tensors, meta


def _restore_rng(tensors: dict[str, Any], meta: dict[str, Any]) -> None:
    import numpy
    import torch

    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(tensors["rng/torch"])
    cuda = sorted(k for k in tensors if k.startswith("rng/cuda/"))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    kind, pos, has_gauss, cached = meta["numpy"]
    keys = tensors["rng/numpy"].numpy().astype(numpy.uint32)
    numpy.random.set_state((kind, keys, pos, has_gauss, cached))


# -- the pieces of model and optimizer this rank owns ----------------------------------------


def local_shard(tensor):
    """A DTensor's local shard (FSDP2), or the tensor itself."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if to_local is not None else tensor


def _trainable(model) -> list[tuple[str, Any]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _optimizer_payload(optimizer, params: list[Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Optimizer state as tensors keyed ``optim/<param index>/<name>`` and JSON for the rest."""
    index_of = {id(p): i for i, p in enumerate(params)}
    tensors, scalars = {}, {}
    for param, state in optimizer.state.items():
        index = index_of.get(id(param))
        if index is None:
            continue
        for key, value in state.items():
            if hasattr(value, "dtype"):
                tensors[f"optim/{index}/{key}"] = local_shard(value).detach().cpu().contiguous()
            else:
                scalars[f"{index}/{key}"] = value
    groups = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    return tensors, {"optimizer_scalars": scalars, "param_groups": groups}


def _restore_optimizer(optimizer, params, tensors, meta) -> None:
    import torch

    by_index: dict[int, dict[str, Any]] = {}
    saved = [(k.removeprefix("optim/"), v) for k, v in tensors.items() if k.startswith("optim/")]
    for key, value in saved + list(meta["optimizer_scalars"].items()):  # "<index>/<name>"
        index, name = key.split("/", 1)
        by_index.setdefault(int(index), {})[name] = value
    for index, state in by_index.items():
        param = params[index]
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                value = value.to(local_shard(param).device)
                if hasattr(param, "device_mesh") and value.ndim > 0:
                    from torch.distributed.tensor import DTensor

                    # The parameter's global shape, given: FSDP2 shards unevenly (a 1-row slice
                    # tensor over 2 ranks is 1 row and 0 rows), which from_local cannot infer.
                    value = DTensor.from_local(
                        value,
                        param.device_mesh,
                        param.placements,
                        run_check=False,
                        shape=param.shape,
                        stride=param.stride(),
                    )
                state[name] = value
        optimizer.state[param] = state
    for group, saved in zip(optimizer.param_groups, meta["param_groups"], strict=True):
        for key, value in saved.items():
            group[key] = tuple(value) if isinstance(group.get(key), tuple) else value


# -- save ------------------------------------------------------------------------------------


def save_checkpoint(run) -> Path:
    """Write this rank's part of checkpoint ``run.state.step`` (every rank calls it) into
    ``run.args.checkpoint_dir``; ``run``: the :class:`~.recipe.Recipe`."""
    from safetensors.torch import save_file

    directory, state, dist = Path(run.args.checkpoint_dir), run.state, run.dist
    final = directory / f"checkpoint-{state.step:08d}"
    tmp = directory / f".tmp-checkpoint-{state.step:08d}"
    if dist.is_local_main:
        directory.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    trainable = _trainable(run.unwrapped)
    tensors, meta = _rng_tensors_and_json()
    if run.sharded or dist.rank == 0:  # under DDP rank 0 saves the weights and optimizer alone
        for name, param in trainable:
            tensors[f"param/{name}"] = local_shard(param).detach().cpu().contiguous()
        opt_tensors, opt_meta = _optimizer_payload(run.optimizer, [p for _, p in trainable])
        tensors.update(opt_tensors)
        meta.update(opt_meta)
    stem = f"rank-{dist.rank:05d}"
    weights = tmp / f"{stem}.safetensors"
    save_file(tensors, str(weights))
    meta["files"] = {weights.name: {"size": weights.stat().st_size, "sha256": file_digest(weights)}}
    if dist.rank == 0:
        state.scheduler = {k: v for k, v in run.scheduler.state_dict().items() if _jsonable(v)}
        (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=2))
    # The rank's JSON last: its presence marks the rank's part complete.
    (tmp / f"{stem}.json").write_text(json.dumps(meta))
    dist.barrier()
    if dist.is_local_main:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        complete = _numbered(directory)  # the newest save_total_limit stay (at least one)
        for _, path in complete[: max(0, len(complete) - max(1, run.args.save_total_limit))]:
            shutil.rmtree(path, ignore_errors=True)
        log.info("saved checkpoint %s", final)
    dist.barrier()
    return final


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def _numbered(directory: Path) -> list[tuple[int, Path]]:
    """``checkpoint-<step>`` folders as (step, path), oldest first."""
    return sorted(
        (int(m.group(1)), p) for p in directory.iterdir() if (m := CHECKPOINT_RE.match(p.name))
    )


# -- find, verify, load ----------------------------------------------------------------------


def checkpoints(directory: str | Path | None) -> list[Path]:
    """Complete-looking checkpoints, newest first."""
    if not directory or not Path(directory).is_dir():
        return []
    return [p for _, p in reversed(_numbered(Path(directory))) if (p / STATE_FILE).is_file()]


def _verify_rank(path: Path, rank: int) -> str | None:
    """Why this rank's part of ``path`` is unusable, or None."""
    stem = f"rank-{rank:05d}"
    try:
        meta = json.loads((path / f"{stem}.json").read_text())
        for name, record in meta["files"].items():
            file = path / name
            if not file.is_file():
                return f"{name} is missing"
            if file.stat().st_size != record["size"]:
                return f"{name} has {file.stat().st_size} bytes, {record['size']} were written"
            if file_digest(file) != record["sha256"]:
                return f"{name} does not match its sha256"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{stem}.json is unreadable ({exc})"
    return None


def find_resumable(directory, dist, fingerprint: dict[str, Any], *, explicit: bool) -> Path | None:
    """The newest checkpoint in ``directory`` that verifies on every rank and belongs to this
    run (any run when ``explicit``: ``--resume_from``). All ranks return the same answer."""
    for path in checkpoints(directory):
        try:
            saved = TrainingState(**json.loads((path / STATE_FILE).read_text()))
        except (OSError, ValueError, TypeError) as exc:
            reason = f"state.json unreadable ({exc})"
        else:
            if saved.world_size != dist.world_size:
                raise SpectrumError(
                    f"checkpoint {path} was written by {saved.world_size} processes, this run has "
                    f"{dist.world_size}; resume with the same number of processes"
                )
            difference = [] if explicit else fingerprint_difference(saved.fingerprint, fingerprint)
            if difference:
                raise SpectrumError(
                    f"checkpoint {path} belongs to another run ({'; '.join(difference)}); use "
                    "another checkpoint folder, or --resume_from to continue that run on purpose"
                )
            reason = _verify_rank(path, dist.rank)
        if dist.all_agree(reason is None):
            return path
        log.warning(
            "checkpoint %s is damaged (%s on rank %d or another); falling back to the previous one",
            path.name,
            reason or "a file",
            dist.rank,
        )
    return None


def load_checkpoint(path: Path, run) -> TrainingState:
    """Restore what :func:`save_checkpoint` wrote into ``run`` (the :class:`~.recipe.Recipe`'s
    model, optimizer and scheduler); the run then continues bit for bit."""
    import torch
    from safetensors.torch import load_file

    dist, state = run.dist, TrainingState(**json.loads((path / STATE_FILE).read_text()))
    trainable = _trainable(run.unwrapped)
    if state.trainable is not None and sorted(state.trainable) != sorted(n for n, _ in trainable):
        raise SpectrumError(
            f"checkpoint {path} trained other parameters than this run; use another "
            "checkpoint folder"
        )
    own = load_file(str(path / f"rank-{dist.rank:05d}.safetensors"))
    meta = json.loads((path / f"rank-{dist.rank:05d}.json").read_text())
    source, source_meta = own, meta
    if not run.sharded and dist.rank != 0:  # under DDP rank 0 saved the weights and optimizer
        source = load_file(str(path / "rank-00000.safetensors"))
        source_meta = json.loads((path / "rank-00000.json").read_text())
    with torch.no_grad():
        for name, param in trainable:
            local_shard(param).copy_(source[f"param/{name}"])
    _restore_optimizer(run.optimizer, [p for _, p in trainable], source, source_meta)
    run.scheduler.load_state_dict({**run.scheduler.state_dict(), **state.scheduler})
    if "rng/torch" not in own:
        raise SpectrumError(f"checkpoint {path}: rank {dist.rank} has no RNG state")
    _restore_rng(own, meta)
    log.info("resumed from %s (step %d)", path, state.step)
    return state
