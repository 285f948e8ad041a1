"""The training recipe: data, model and freezing, optimizer, loop, finish, in that order.

``entrypoints/train.py`` parses the arguments and calls :func:`run`; everything else is here, as
plain steps in the spirit of torchtune's recipes and accelerate's examples. What is ours is what
the libraries lack: frozen weights kept in their stored dtype with float32 masters only for the
trainable ones, exact slice freezing, trainable-only checkpoints that load safely and verify,
run fingerprints, and guards that stop a run instead of letting it save NaN weights.

Distribution (``--distribution``): ``ddp`` (one full copy per process, accelerate's DDP), ``fsdp``
(FSDP2: ``fully_shard`` on every decoder layer and the root; per-parameter sharding, so frozen
weights cost no gradient or optimizer memory; applied here rather than through accelerate's
plugin, which refuses CPUs), or ``auto`` (the planner's choice for this GPU). The loss is the
token mean over the whole global batch (every process and accumulation step), so N processes and
one process with N times the batch train the same model.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import logging
import math
import os
import shutil
import signal
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..core.atomic import ensure_output_dir, output_lock, write_error
from ..core.container import write_failure
from ..core.errors import SpectrumError, first_sentence, unknown_model
from ..core.freeze import FreezeReport, find_layer_file, freeze_except, read_layer_file
from ..core.hub import hub_offline, is_local, require_hub
from ..core.names import model_class_for
from ..core.selection import DEFAULT_TOP_PERCENT, percent_in_path
from ..core.slices import installed_slices, merge_slices, merged_state_dict
from . import metrics
from .data import collate, data_options, default_num_proc, hold_out, load_split, prepare_split
from .loading import dequantized_load_kwargs
from .memory import Step, load_config, plan_distribution
from .state import (
    TrainingState,
    find_resumable,
    load_checkpoint,
    local_shard,
    run_fingerprint,
    save_checkpoint,
)

log = logging.getLogger("spectrum_sm.train")
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


class Stopped(Exception):
    """SIGTERM arrived (StopTrainingJob, spot interruption); carries the step reached."""


@dataclass
class Dist:
    """This process's place in the job, and the few collective operations the recipe needs."""

    rank: int
    world_size: int
    local_rank: int
    device: Any

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        return self.local_rank == 0

    def barrier(self) -> None:
        import torch.distributed as td

        if self.world_size > 1:
            td.barrier()

    def sum(self, values: list[float]) -> list[float]:
        import torch
        import torch.distributed as td

        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world_size > 1:
            td.all_reduce(tensor)
        return tensor.tolist()

    def all_agree(self, flag: bool) -> bool:
        """True when ``flag`` is true on every process."""
        return self.sum([0.0 if flag else 1.0])[0] == 0.0

    def local_main_first(self, work):
        """``work()`` on each host's main process first, then on the others (which then find its
        cached results). An error on a main process fails every process, with its message."""
        error: SpectrumError | None = None
        result = None
        if self.is_local_main:
            try:
                result = work()
            except SpectrumError as exc:
                error = exc
        if not self.all_agree(error is None):
            raise error or SpectrumError("another process failed to prepare the data; see its log")
        if not self.is_local_main:
            result = work()
        return result

    def from_main(self, compute):
        """``compute()`` run on the main process only, its (JSON-like) result given to all."""
        import torch.distributed as td

        value = [compute() if self.is_main else None]
        if self.world_size > 1:
            td.broadcast_object_list(value, src=0)
        return value[0]


def resolve_precision(precision: str) -> str:
    import torch

    if precision != "auto":
        return precision
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


class Recipe:
    """One training run. :meth:`run` calls the steps in order."""

    def __init__(self, args) -> None:
        self.args = args
        self.started = time.perf_counter()

    # -- runtime ---------------------------------------------------------------------------

    def setup_runtime(self) -> None:
        import torch
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        args = self.args
        self.precision = resolve_precision(args.precision)
        if self.precision == "fp16" and not torch.cuda.is_available():
            raise SpectrumError(
                "precision fp16 needs a CUDA GPU (fp16 autocast and its gradient scaler); on "
                "CPU use --precision bf16 or fp32"
            )
        tracker = "tensorboard" if args.tensorboard_dir and _has_tensorboard() else None
        self.accelerator = Accelerator(
            mixed_precision={"bf16": "bf16", "fp16": "fp16", "fp32": "no"}[self.precision],
            # Without a GPU, accelerate only goes multi-process (gloo) when told it runs on CPU.
            cpu=not torch.cuda.is_available(),
            log_with=tracker,
            project_dir=args.tensorboard_dir or None,
        )
        acc = self.accelerator
        self.dist = Dist(acc.process_index, acc.num_processes, acc.local_process_index, acc.device)
        if not self.dist.is_main:
            logging.getLogger().setLevel(logging.WARNING)
        set_seed(args.seed)
        if args.distribution == "zero3":
            raise SpectrumError(
                "distribution zero3 (DeepSpeed) is not supported by train.py; use fsdp, which "
                "shards the same state"
            )
        self.distribution = (
            args.distribution if args.distribution != "auto" else auto_distribution(args, self.dist)
        )
        if self.distribution == "fsdp" and self.precision == "fp16":
            raise SpectrumError("fsdp trains in bf16 or fp32; fp16 needs a gradient scaler (ddp)")
        if tracker:
            acc.init_trackers("")
        base, out = Path(str(args.model_name_or_path)).resolve(), Path(args.output_dir).resolve()
        if base.is_dir() and (out == base or base in out.parents):
            raise SpectrumError(
                f"output_dir {args.output_dir!r} is the base model's folder (or inside it): "
                "saving would overwrite the model being trained; choose another output_dir"
            )

    def lock_folders(self) -> None:
        """Hold the output and checkpoint folders for the whole run (each host's main process):
        a second run into either is refused at once instead of mixing or replacing files."""
        self.locks = contextlib.ExitStack()
        if not self.dist.is_local_main:
            return
        args, held = self.args, set()
        for option in ("--output_dir", "--checkpoint_dir"):
            folder = getattr(args, option.removeprefix("--"))
            if not folder or Path(folder).resolve() in held:
                continue
            created = not Path(folder).exists()
            path = ensure_output_dir(folder)
            held.add(path.resolve())
            if created:  # a run that fails leaves no empty folder behind (rmdir: empty only)
                self.locks.callback(_remove_if_empty, path)
            self.locks.enter_context(
                output_lock(path, wait=False, holder="another training run", option=option)
            )

    # -- data ------------------------------------------------------------------------------

    def setup_data(self) -> None:
        from transformers import AutoConfig, AutoTokenizer

        args = self.args
        if not is_local(str(args.model_name_or_path), "model_name_or_path") and not hub_offline():
            require_hub(f"model {args.model_name_or_path!r}")  # seconds, not retries
        trust = {"trust_remote_code": args.trust_remote_code}
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(args.model_name_or_path, **trust)
            self.config = AutoConfig.from_pretrained(args.model_name_or_path, **trust)
        except OSError as exc:
            raise SpectrumError(f"cannot load {args.model_name_or_path!r}: {exc}") from exc
        except (ValueError, KeyError) as exc:  # a model_type this transformers does not know
            raise unknown_model(
                str(args.model_name_or_path),
                _config_dict(args.model_name_or_path),
                exc,
                can_trust=not args.trust_remote_code,
            ) from exc
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.pad_id = self.tokenizer.pad_token_id
        text_config = getattr(self.config, "get_text_config", None)
        vocab = getattr(text_config() if text_config else self.config, "vocab_size", None)
        if vocab is not None and len(self.tokenizer) > vocab:
            raise SpectrumError(
                f"the tokenizer has {len(self.tokenizer)} tokens but the model's embedding has "
                f"{vocab} rows: token ids past {vocab - 1} would fail; use the model's own "
                "tokenizer"
            )
        options = data_options(args)
        num_proc = args.num_proc or default_num_proc()

        def prepare(source: str, split: str, packing: bool):
            return prepare_split(
                load_split(source, split=split, name=args.dataset_config or None),
                self.tokenizer,
                options,
                split=split,
                packing=packing,
                num_proc=num_proc,
            )

        # Tokenized once per host, by its main process; every rank memory-maps the result.
        self.train_examples, train_counts = self.dist.local_main_first(
            lambda: prepare(args.train_data, args.train_split, args.packing)
        )
        self.data_counts = {"train": asdict(train_counts)}
        self.eval_examples = []
        if args.validation_data and args.validation_share:
            raise SpectrumError(
                "validation_share holds out training rows when there is no validation data; "
                "there is some: leave validation_share at 0"
            )
        if args.validation_share:
            self.train_examples, self.eval_examples = hold_out(
                self.train_examples, args.validation_share, args.seed
            )
            self.data_counts["validation"] = {
                "held_out_from_train": len(self.eval_examples),
                "share": args.validation_share,
            }
            log.info(
                "validating on %d held-out training rows (validation_share %s)",
                len(self.eval_examples),
                args.validation_share,
            )
        if args.validation_data:
            self.eval_examples, eval_counts = self.dist.local_main_first(
                lambda: prepare(args.validation_data, args.validation_split, False)
            )
            self.data_counts["validation"] = asdict(eval_counts)
        per_epoch = self.micro_batches_per_epoch()
        if per_epoch == 0:
            raise SpectrumError(
                f"not enough data for one optimizer step: {len(self.train_examples)} examples "
                f"< batch {args.per_device_train_batch_size} x {self.dist.world_size} processes "
                f"x {args.gradient_accumulation_steps} accumulation steps"
            )
        self.steps_per_epoch = per_epoch // args.gradient_accumulation_steps
        self.total_steps = (
            args.max_steps
            if args.max_steps > 0
            else math.ceil(args.num_train_epochs * self.steps_per_epoch)
        )

    def micro_batches_per_epoch(self) -> int:
        args = self.args
        per_global = args.per_device_train_batch_size * self.dist.world_size
        accumulation = args.gradient_accumulation_steps
        return len(self.train_examples) // per_global // accumulation * accumulation

    def micro_batches(self, epoch: int, start: int):
        """This process's micro-batches of one epoch, from ``start``, in a seeded order.

        The order depends only on the seed and the epoch, so a resumed run sees exactly the
        batches the interrupted one would have; a global batch is the same set of examples
        whatever the number of processes. A trailing partial accumulation group is dropped.
        """
        import torch

        args = self.args
        order = torch.randperm(
            len(self.train_examples), generator=torch.Generator().manual_seed(args.seed + epoch)
        )
        size = args.per_device_train_batch_size
        per_global = size * self.dist.world_size
        for index in range(start, self.micro_batches_per_epoch()):
            first = index * per_global + self.dist.rank * size
            chosen = order[first : first + size].tolist()
            yield index, collate([self.train_examples[i] for i in chosen], self.pad_id)

    # -- model -----------------------------------------------------------------------------

    def setup_model(self) -> None:
        import torch

        args = self.args
        self.sharded = self.distribution == "fsdp"
        model = load_model(args, DTYPES[self.precision], self.config)
        self.save_dtype = checkpoint_dtype(self.config, getattr(torch, DTYPES[self.precision]))
        model, self.freeze_report, self.layer_file = select_trainable(model, args)
        if args.method in ("lora", "qlora") and self.sharded:
            raise SpectrumError(f"method {args.method} trains with ddp; set distribution ddp")
        # Frozen weights stay in the dtype they were loaded in; trainable ones get float32
        # master copies (autocast or FSDP's mixed precision casts the compute).
        if args.method in ("spectrum", "full"):
            with torch.no_grad():
                for param in model.parameters():
                    if param.requires_grad and param.dtype != torch.float32:
                        param.data = param.data.float()
        if args.gradient_checkpointing:
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False}
            )
            model.config.use_cache = False
        if self.sharded:
            self.model = shard_model(model, self.dist, self.precision)
        else:
            self.model = self.accelerator.prepare_model(model)
        self.model.train()
        log.info(
            "distribution %s over %d process(es), precision %s",
            self.distribution,
            self.dist.world_size,
            self.precision,
        )

    @property
    def unwrapped(self):
        return self.model if self.sharded else self.accelerator.unwrap_model(self.model)

    # -- optimizer -------------------------------------------------------------------------

    def setup_optimizer(self) -> None:
        import torch
        from transformers import get_cosine_schedule_with_warmup

        args = self.args
        # Fused expert slices are parameters of their own (core.slices): the optimizer holds
        # state for the selected elements only, and their frozen fused weights get none.
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.trainable, lr=args.learning_rate, weight_decay=args.weight_decay
        )
        if not self.sharded:
            # accelerate's wrapper unscales fp16 gradients; it steps on every call here because
            # the loop does its own accumulation.
            self.optimizer = self.accelerator.prepare_optimizer(self.optimizer)
        warmup = int(args.warmup_ratio * self.total_steps)
        self.scheduler = get_cosine_schedule_with_warmup(self.optimizer, warmup, self.total_steps)

    # -- resume ----------------------------------------------------------------------------

    def resume(self) -> None:
        args = self.args
        # Hashing the data once, not once per process (8 ranks reading a big dataset 8 times).
        self.fingerprint = self.dist.from_main(lambda: run_fingerprint(args, self.dist.world_size))
        self.state = TrainingState(
            trainable=self.freeze_report.trainable,
            fingerprint=self.fingerprint,
            world_size=self.dist.world_size,
        )
        self.resumed_from = None
        source, explicit = args.checkpoint_dir, False
        if args.resume_from:
            # Continue another run on purpose: its checkpoints, this run's own from then on.
            own = find_resumable(args.checkpoint_dir, self.dist, self.fingerprint, explicit=False)
            source, explicit = (args.checkpoint_dir, False) if own else (args.resume_from, True)
            if not own and not Path(args.resume_from).is_dir():
                raise SpectrumError(f"resume_from {args.resume_from!r} is not a folder")
        found = find_resumable(source, self.dist, self.fingerprint, explicit=explicit)
        if found is None:
            if explicit:
                raise SpectrumError(f"resume_from {args.resume_from!r} holds no usable checkpoint")
            return
        self.state = load_checkpoint(found, self)
        self.state.fingerprint = self.fingerprint
        self.resumed_from = self.state.step
        report = Path(args.output_dir) / "training_report.json"
        if self.state.step >= self.total_steps and report.is_file():
            raise SpectrumError(
                f"this run is finished: {found} holds its last step ({self.state.step}) and "
                f"{args.output_dir!r} its model; to train again, delete {source!r} or pass "
                "another --checkpoint_dir (and --output_dir to keep this model)"
            )

    # -- loop ------------------------------------------------------------------------------

    def train(self) -> None:
        args, dist, state = self.args, self.dist, self.state
        # SIGTERM (spot interruption, StopTrainingJob) asks for a checkpoint and a clean exit.
        terminated: list[int] = []
        signal.signal(signal.SIGTERM, lambda signum, _frame: terminated.append(signum))
        self.model.train()
        log.info(
            "training %d steps (%d per epoch), %d examples",
            self.total_steps,
            self.steps_per_epoch,
            len(self.train_examples),
        )
        self.eval_loss, self.eval_step = None, -1
        self.tokens_at_start, self.train_started = state.tokens_seen, time.perf_counter()
        window_tokens, window_start = 0, time.perf_counter()
        window_loss, window_steps = 0.0, 0
        self.step_seconds: list[float] = []
        last_step_end = time.perf_counter()
        while state.step < self.total_steps:
            batches = self.micro_batches(state.epoch, state.micro_batch)
            # Accumulation groups: zip draws n consecutive micro-batches from the one generator
            # and drops a trailing partial group (a resumed epoch starts at a group boundary).
            for group in zip(*[batches] * args.gradient_accumulation_steps, strict=False):
                step_lr = self.scheduler.get_last_lr()[0]  # the rate this step uses
                loss_sum, tokens = self._step(group)
                state.micro_batch = group[-1][0] + 1
                state.tokens_seen += tokens
                window_tokens += tokens
                self.scheduler.step()
                state.step += 1
                now = time.perf_counter()
                self.step_seconds.append(now - last_step_end)
                last_step_end = now
                window_loss += loss_sum
                window_steps += 1
                if state.step % args.logging_steps == 0 or state.step == self.total_steps:
                    state.last_loss = window_loss / window_steps
                    rate = window_tokens / max(time.perf_counter() - window_start, 1e-9)
                    gib = metrics.peak_memory_bytes() / 1024**3
                    line = metrics.train_line(
                        state.step, state.last_loss, step_lr, self.grad_norm, rate, gib
                    )
                    log.info("%s", line)
                    scalars = {
                        "train/loss": state.last_loss,
                        "train/learning_rate": step_lr,
                        "train/grad_norm": self.grad_norm,
                        "train/tokens_per_sec": rate,
                    }
                    self.accelerator.log(scalars, step=state.step)
                    window_loss, window_steps = 0.0, 0
                    window_tokens, window_start = 0, time.perf_counter()
                if self.eval_examples and args.eval_steps and state.step % args.eval_steps == 0:
                    self._evaluate()
                stop = not dist.all_agree(not terminated)
                if args.checkpoint_dir and (
                    stop or (args.save_steps and state.step % args.save_steps == 0)
                ):
                    save_checkpoint(self)
                if stop:
                    raise Stopped(state.step)
                if state.step >= self.total_steps:
                    break
            else:
                state.epoch += 1
                state.micro_batch = 0

    def _step(self, group) -> tuple[float, int]:
        """One optimizer step over an accumulation group; returns (mean loss, tokens)."""
        import torch

        dist = self.dist
        local_items = sum(int((b["labels"][:, 1:] != -100).sum()) for _, b in group)
        local_tokens = sum(int(b["attention_mask"].sum()) for _, b in group)
        global_items, global_tokens = dist.sum([float(local_items), float(local_tokens)])
        if global_items == 0:
            raise SpectrumError(
                f"a global batch at step {self.state.step + 1} has no token with loss; check "
                "max_seq_length and the data"
            )
        # Each process's loss is scaled so that averaging gradients over processes gives the
        # token mean over the whole global batch.
        items = torch.tensor(global_items / dist.world_size, device=dist.device)
        loss_total = 0.0
        for position, (_, batch) in enumerate(group):
            last = position == len(group) - 1
            batch = {k: v.to(dist.device) for k, v in batch.items()}
            with self._sync(last), self.accelerator.autocast():
                loss = self.model(**batch, num_items_in_batch=items).loss
                self.accelerator.backward(loss)
            loss_total += float(loss.detach())
        (mean_loss,) = dist.sum([loss_total / dist.world_size])
        grad_norm = self._clip()
        if not (math.isfinite(mean_loss) and math.isfinite(grad_norm)):
            raise SpectrumError(
                f"the training diverged at step {self.state.step + 1}: loss {mean_loss}, "
                f"gradient norm {grad_norm} (learning rate {self.scheduler.get_last_lr()[0]:g}); "
                "nothing was saved. Lower learning_rate or max_grad_norm"
            )
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.grad_norm = grad_norm
        return mean_loss, int(global_tokens)

    def _sync(self, last: bool):
        """Gradient synchronisation only on an accumulation group's last micro-batch."""
        if self.sharded:
            self.model.set_requires_gradient_sync(last)
        if self.sharded or last or self.dist.world_size == 1:
            return contextlib.nullcontext()
        return self.model.no_sync()

    def _clip(self) -> float:
        import torch

        if not self.sharded:  # accelerate unscales fp16 gradients first
            return float(self.accelerator.clip_grad_norm_(self.trainable, self.args.max_grad_norm))
        norm = torch.nn.utils.clip_grad_norm_(self.trainable, self.args.max_grad_norm)
        full = getattr(norm, "full_tensor", None)  # a DTensor: its full value
        return float(full() if full is not None else norm)

    def _evaluate(self) -> None:
        """Token-weighted mean loss over the validation set, shared across processes."""
        import torch

        dist, model, examples = self.dist, self.model, self.eval_examples
        model.eval()
        mine = examples[dist.rank :: dist.world_size]
        size = self.args.per_device_eval_batch_size
        rounds = math.ceil(len(examples) / dist.world_size / size)
        total, count = 0.0, 0.0
        with torch.no_grad():
            for index in range(rounds):
                chunk = mine[index * size : (index + 1) * size]
                # FSDP needs every process in every forward: an empty share runs a dummy batch.
                batch = collate(chunk or examples[:1], self.pad_id)
                batch = {k: v.to(dist.device) for k, v in batch.items()}
                with self.accelerator.autocast():
                    loss = model(**batch).loss
                tokens = int((batch["labels"][:, 1:] != -100).sum()) if chunk else 0
                total += float(loss) * tokens
                count += tokens
        total, count = dist.sum([total, count])
        model.train()
        self.eval_loss = total / count if count > 0 else float("nan")
        self.eval_step = self.state.step
        log.info("%s", metrics.eval_line(self.state.step, self.eval_loss))
        # accelerate's log is a no-op without trackers (and off the main process).
        self.accelerator.log({"eval/loss": self.eval_loss}, step=self.state.step)

    # -- finish ----------------------------------------------------------------------------

    def finish(self) -> dict[str, Any]:
        args, state = self.args, self.state
        if self.eval_examples and self.eval_step != state.step:  # not twice at the last step
            self._evaluate()
        seconds = time.perf_counter() - self.started
        trained = time.perf_counter() - self.train_started
        tokens = state.tokens_seen - self.tokens_at_start  # trained by this process
        report = self.freeze_report
        result = {
            "method": args.method,
            "distribution": self.distribution,
            "layer_file": self.layer_file,
            "trainable_params": report.trainable_params,
            "all_params": report.all_params,
            "trainable_percent": round(report.trainable_percent, 4),
            "tied": report.tied,
            "optimizer_state_bytes": optimizer_state_bytes(self.optimizer),
            "steps": state.step,
            "epochs_started": state.epoch + 1,
            "resumed_from_step": self.resumed_from,
            "final_train_loss": state.last_loss,
            "final_eval_loss": self.eval_loss,
            "tokens_seen": state.tokens_seen,
            "data": self.data_counts,
            # Measured over this process's steps only (null when it trained none: resumed at
            # the last step), never tokens of an earlier process over this one's time.
            "tokens_per_sec": round(tokens / trained, 2) if self.step_seconds else None,
            # The first two steps include warm-up (allocations, autotuning); the median skips them.
            "median_step_seconds": statistics.median(self.step_seconds[2:] or self.step_seconds)
            if self.step_seconds
            else None,
            "peak_memory_bytes": metrics.peak_memory_bytes(),
            "precision": self.precision,
            "processes": self.dist.world_size,
            "seconds": round(seconds, 2),
        }
        self.dist.barrier()
        full_state = None
        if self.sharded:  # the full state dict, gathered to rank 0's CPU
            from torch.distributed.checkpoint import state_dict as dist_state

            options = dist_state.StateDictOptions(full_state_dict=True, cpu_offload=True)
            full_state = dist_state.get_model_state_dict(self.model, options=options)
        if self.dist.is_main:  # (the gathered state is rank 0's alone: empty elsewhere)
            # The trained slices go back into their fused weights.
            if full_state is not None:
                full_state = merged_state_dict(full_state, installed_slices(self.unwrapped))
            else:
                merge_slices(self.unwrapped)
            save_model(
                self.unwrapped,
                self.tokenizer,
                Path(args.output_dir),
                self.save_dtype,
                args.method,
                result,
                full_state,
            )
            log.info("model saved to %s", args.output_dir)
            print(json.dumps(result))
        self.dist.barrier()
        self.accelerator.end_training()  # closes the trackers, and the process group too
        return result


def _has_tensorboard() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        log.warning("tensorboard is not installed: no TensorBoard output")
        return False
    return True


def auto_distribution(args, dist) -> str:
    """ddp when a full copy of the training state fits one GPU (the planner's estimate), else
    fsdp. On one process or on CPU (tests, local runs) ddp."""
    import torch

    if dist.world_size == 1 or not torch.cuda.is_available():
        return "ddp"
    percent = DEFAULT_TOP_PERCENT
    if args.method == "spectrum":
        # The planner counts the share the layer file's name says it holds (a file named
        # otherwise: the default share).
        percent = percent_in_path(str(find_layer_file(args.spectrum_config))) or percent
    gib = torch.cuda.get_device_properties(dist.device).total_memory / 1024**3
    choice = plan_distribution(
        load_config(str(args.model_name_or_path)),
        method=args.method,
        percent=percent,
        gpus=dist.world_size,
        gpu_gib=gib,
        step=Step.of(args, resolve_precision(args.precision)),
    )
    log.info("distribution auto: %s (%s)", choice["distribution"], choice["reason"])
    return choice["distribution"]


def load_model(args, dtype_name: str, config):
    """The base model; for QLoRA, 4-bit weights (needs CUDA and bitsandbytes). Vision-language
    models load with their image-text class (AutoModelForCausalLM refuses their configs) and
    train on text."""
    import torch
    import transformers

    dtype = getattr(torch, dtype_name)
    key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    kwargs = {key: dtype, "trust_remote_code": args.trust_remote_code}
    # MXFP4 (gpt-oss) loads dequantized, trainable; packed for Triton kernels it would not be.
    kwargs.update(dequantized_load_kwargs(config))
    if args.method == "qlora":
        if "quantization_config" in kwargs:
            raise SpectrumError(
                "method qlora cannot load an MXFP4 checkpoint (it would quantize it a second "
                "time); use spectrum, full or lora"
            )
        if not torch.cuda.is_available():
            raise SpectrumError("method qlora needs a CUDA GPU (bitsandbytes 4-bit kernels)")
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as exc:
            raise SpectrumError(
                "method qlora needs bitsandbytes: pip install bitsandbytes"
            ) from exc
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    try:
        return model_class_for(config).from_pretrained(args.model_name_or_path, **kwargs)
    except OSError as exc:
        raise SpectrumError(f"cannot load model {args.model_name_or_path!r}: {exc}") from exc


def checkpoint_dtype(config, fallback):
    """The dtype the base checkpoint was stored in, so the output is saved the same way."""
    import torch

    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) and value.is_floating_point else fallback


def select_trainable(model, args):
    """Freeze per method; returns (model, freeze report, layer file path or None)."""
    if args.method == "spectrum":
        entries = read_layer_file(args.spectrum_config)
        report = freeze_except(model, entries, name_prefix=args.name_prefix or None)
        # The file itself, not the channel folder: its name says the percent (for compare).
        return model, report, str(find_layer_file(args.spectrum_config))
    if args.method == "full":
        model.requires_grad_(True)
    else:
        from peft import LoraConfig, get_peft_model

        if args.method == "qlora":
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=args.gradient_checkpointing
            )
        targets = args.lora_target_modules.strip()
        names = [t.strip() for t in targets.split(",") if t.strip()]
        if not names:
            raise SpectrumError("lora_target_modules is empty: name modules or use all-linear")
        config = LoraConfig(
            r=args.lora_r,
            lora_alpha=args.lora_alpha,
            lora_dropout=args.lora_dropout,
            target_modules=targets if targets == "all-linear" else names,
            task_type="CAUSAL_LM",
        )
        try:
            model = get_peft_model(model, config)
        except ValueError as exc:  # PEFT: no module matches (its NoMatchingPeftModuleError)
            linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                             if type(m).__name__ == "Linear"})  # fmt: skip
            raise SpectrumError(
                f"lora_target_modules {targets!r} match no module of the model ("
                f"{first_sentence(exc)}); its linear layers: {', '.join(linear[:12])}"
            ) from exc
    unique = {id(p): p for p in model.parameters()}
    report = FreezeReport(
        trainable=[n for n, p in model.named_parameters() if p.requires_grad],
        trainable_params=sum(p.numel() for p in unique.values() if p.requires_grad),
        all_params=sum(p.numel() for p in unique.values()),
    )
    log.info("%s", report.summary())
    return model, report, None


def shard_model(model, dist, precision: str):
    """FSDP2: ``fully_shard`` each decoder layer, then the root. Parameters are sharded one by
    one (no flat buffers), so frozen and trainable weights of one layer, in different dtypes,
    shard side by side and the frozen ones get no gradient or optimizer state."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    device_type = "cuda" if torch.cuda.is_available() else "cpu"
    mesh = init_device_mesh(device_type, (dist.world_size,))
    policy = MixedPrecisionPolicy()
    if precision == "bf16" and device_type == "cuda":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    blocks = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in blocks]
    if not layers:
        raise SpectrumError(f"fsdp: no decoder layers found in {type(model).__name__}")
    for layer in layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def optimizer_state_bytes(optimizer) -> int:
    """Bytes of optimizer state this process holds (its own shards under FSDP)."""
    import torch

    states = getattr(optimizer, "optimizer", optimizer).state.values()
    tensors = [v for s in states for v in s.values() if isinstance(v, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in map(local_shard, tensors))


def save_model(
    model, tokenizer, output_dir: Path, save_dtype, method: str, report: dict, state_dict=None
) -> None:
    """A Hugging Face model folder, written beside and then moved into ``output_dir``;
    ``state_dict`` carries the gathered weights of a sharded (FSDP) model."""
    import torch

    if state_dict is not None:
        state_dict = {
            k: v.to(save_dtype) if v.is_floating_point() else v for k, v in state_dict.items()
        }
    elif method != "qlora":  # qlora saves the adapter alone: its 4-bit base cannot be merged
        if method == "lora":
            model = model.merge_and_unload()
        with torch.no_grad():
            for param in model.parameters():
                if param.is_floating_point() and param.dtype != save_dtype:
                    param.data = param.data.to(save_dtype)  # saved as the checkpoint was stored
    output_dir.mkdir(parents=True, exist_ok=True)
    staging = output_dir / STAGING
    if staging.exists():  # the folder is locked: no live run owns it
        log.warning("removing %s, left by a run that died while saving", staging)
        shutil.rmtree(staging, ignore_errors=True)
    try:
        model.save_pretrained(staging, state_dict=state_dict, max_shard_size="5GB")
        tokenizer.save_pretrained(staging)
        (staging / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    except Exception as exc:
        shutil.rmtree(staging, ignore_errors=True)
        error = write_error(exc, f"saving the model into {str(output_dir)!r}")
        if error is None:
            raise
        raise error from exc
    new = {item.name for item in staging.iterdir()}
    for item in staging.iterdir():
        target = output_dir / item.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(item, target)
    staging.rmdir()
    # An older model's files the new one does not have (shards of another count, an index, an
    # adapter) would be read with it: remove them.
    for old in output_dir.iterdir():
        model_file = any(fnmatch.fnmatch(old.name, pattern) for pattern in MODEL_FILES)
        if old.name not in new and old.is_file() and model_file:
            log.info("removing %s, a file of the model that was here before", old.name)
            old.unlink()


def stop_message(step: int, checkpoint_dir: str | None, checkpoint_s3: str | None) -> str:
    """What a stopped run tells its user: whether and how the work can be resumed."""
    if not checkpoint_dir:
        return (
            f"not resumable: no checkpoint folder was set (--checkpoint_dir), so the {step} "
            "steps done are lost"
        )
    if checkpoint_s3:  # a job (SageMaker or local): its folder is synced to S3
        return (
            f"resumable: step {step} was saved to {checkpoint_dir}, which the job keeps in "
            f"{checkpoint_s3}; a spot restart resumes from it, and a new job continues it with "
            f"training.resume_from: {checkpoint_s3}"
        )
    return f"resumable: step {step} was saved to {checkpoint_dir}; run the same command to resume"


def _config_dict(model: str) -> dict[str, Any]:
    """A local model's config.json as data (empty for a Hub id or an unreadable file)."""
    try:
        return json.loads((Path(str(model)) / "config.json").read_text())
    except (OSError, ValueError):
        return {}


def _remove_if_empty(path: Path) -> None:
    with contextlib.suppress(OSError):  # not empty: the run wrote into it
        path.rmdir()


STAGING = ".tmp-model"
#: Files a Hugging Face model folder is made of (weights, their index, adapters, tokenizer).
MODEL_FILES = (
    "*.safetensors",
    "*.safetensors.index.json",
    "pytorch_model*.bin",
    "*.bin.index.json",
    "adapter_config.json",
    "adapter_model.*",
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "chat_template.*",
    "training_report.json",
)


def run(args) -> int:
    """The whole recipe; returns the process's exit code (143 after a SIGTERM stop)."""
    recipe = Recipe(args)
    recipe.setup_runtime()
    recipe.lock_folders()
    with recipe.locks:
        recipe.setup_data()  # a bad row fails before minutes of model loading
        recipe.setup_model()
        recipe.setup_optimizer()
        recipe.resume()
        try:
            recipe.train()
        except Stopped as stop:
            step = stop.args[0]
            s3 = os.environ.get("SPECTRUM_SM_CHECKPOINT_S3")
            where = stop_message(step, args.checkpoint_dir, s3)
            log.warning("SIGTERM: stopped at step %d; %s", step, where)
            write_failure(f"stopped by SIGTERM at step {step}; {where}")
            recipe.accelerator.end_training()
            return 143
        recipe.finish()
        return 0
