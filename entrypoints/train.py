"""The training job's entrypoint: fine-tune the Spectrum-selected layers (or full / LoRA) with
accelerate, on one GPU, several, or several nodes; resumable from checkpoints.

    python entrypoints/train.py --model_name_or_path M --spectrum_config layers.yaml \
        --train_data data.jsonl --output_dir out --max_steps 100
    accelerate launch --config_file entrypoints/accelerate/fsdp.yaml entrypoints/train.py ...
    torchrun --nproc_per_node 8 entrypoints/train.py ...

Inside SageMaker every path defaults from the container contract (SM_CHANNEL_MODEL,
SM_CHANNEL_SPECTRUM, SM_CHANNEL_TRAIN, SM_CHANNEL_VALIDATION, SM_MODEL_DIR, /opt/ml/checkpoints);
a crash writes its reason to /opt/ml/output/failure. No SageMaker SDK is used here.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import statistics
import sys
import time
import traceback
from pathlib import Path

# The job's code folder ships spectrum_sm next to entrypoints/.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from spectrum_sm.core.container import write_failure
from spectrum_sm.core.errors import SpectrumError

log = logging.getLogger("spectrum_sm.train")
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def resolve_precision(precision: str) -> str:
    import torch

    if precision != "auto":
        if precision == "bf16" and not torch.cuda.is_available():
            return "bf16"  # CPU autocast supports bf16; slow but correct
        return precision
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def load_model(args, dtype_name: str, config):
    """The base model; for QLoRA, 4-bit weights (needs CUDA and bitsandbytes). Vision-language
    models load with their image-text class (AutoModelForCausalLM refuses their configs) and
    train on text."""
    import torch
    import transformers

    from spectrum_sm.core.names import model_class_for

    dtype = getattr(torch, dtype_name)
    # transformers 5 renamed torch_dtype to dtype.
    key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    kwargs = {key: dtype, "trust_remote_code": args.trust_remote_code}
    if args.method == "qlora":
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
    """Freeze per method; returns (model, freeze report or None, layer file path or None)."""
    from spectrum_sm.core.freeze import FreezeReport, freeze_except, read_layer_file

    if args.method == "spectrum":
        entries = read_layer_file(args.spectrum_config)
        report = freeze_except(model, entries, name_prefix=args.name_prefix or None)
        return model, report, str(args.spectrum_config)
    if args.method == "full":
        for param in model.parameters():
            param.requires_grad_(True)
    else:
        from peft import LoraConfig, get_peft_model

        if args.method == "qlora":
            from peft import prepare_model_for_kbit_training

            model = prepare_model_for_kbit_training(
                model, use_gradient_checkpointing=args.gradient_checkpointing
            )
        targets = args.lora_target_modules
        config = LoraConfig(
            r=args.lora_r,
            lora_alpha=args.lora_alpha,
            lora_dropout=args.lora_dropout,
            target_modules=targets if targets == "all-linear" else targets.split(","),
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, config)
    unique = {id(p): p for p in model.parameters()}
    trainable = sum(p.numel() for p in unique.values() if p.requires_grad)
    report = FreezeReport(
        trainable=[n for n, p in model.named_parameters() if p.requires_grad],
        trainable_params=trainable,
        all_params=sum(p.numel() for p in unique.values()),
    )
    log.info("%s", report.summary())
    return model, report, None


def cosine_with_warmup(optimizer, warmup: int, total: int):
    import torch

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class Scalars:
    """TensorBoard scalars from the main process; a no-op without a folder or the package."""

    def __init__(self, folder: str, enabled: bool) -> None:
        self.writer = None
        if not (folder and enabled):
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.warning("tensorboard is not installed: no TensorBoard output")
            return
        self.writer = SummaryWriter(folder)

    def add(self, step: int, **values: float) -> None:
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class Terminate:
    """SIGTERM (spot interruption, StopTrainingJob) asks for a checkpoint and a clean exit."""

    def __init__(self) -> None:
        self.requested = False
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True


def micro_batches(examples, epoch: int, start: int, args, accelerator, pad_id: int):
    """This process's micro-batches of one epoch, from ``start``, in a seeded order.

    The order depends only on the seed and the epoch, so a resumed run sees exactly the batches
    the interrupted one would have. A trailing partial accumulation group is dropped.
    """
    import torch

    from spectrum_sm.training.data import collate

    order = torch.randperm(
        len(examples), generator=torch.Generator().manual_seed(args.seed + epoch)
    )
    per_global = args.per_device_train_batch_size * accelerator.num_processes
    count = len(order) // per_global // args.gradient_accumulation_steps
    count *= args.gradient_accumulation_steps
    rank = accelerator.process_index
    for index in range(start, count):
        first = index * per_global + rank * args.per_device_train_batch_size
        chosen = order[first : first + args.per_device_train_batch_size].tolist()
        yield index, collate([examples[i] for i in chosen], pad_id)


def micro_batches_per_epoch(n_examples: int, args, accelerator) -> int:
    per_global = args.per_device_train_batch_size * accelerator.num_processes
    return (
        n_examples
        // per_global
        // args.gradient_accumulation_steps
        * args.gradient_accumulation_steps
    )


def evaluate(model, examples, args, accelerator, pad_id: int) -> float:
    """Token-weighted mean loss over the validation set, shared across processes."""
    import torch

    from spectrum_sm.training.data import collate

    model.eval()
    mine = examples[accelerator.process_index :: accelerator.num_processes]
    total = torch.zeros(2, dtype=torch.float64, device=accelerator.device)
    with torch.no_grad():
        for start in range(0, len(mine), args.per_device_eval_batch_size):
            batch = collate(mine[start : start + args.per_device_eval_batch_size], pad_id)
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            with accelerator.autocast():
                loss = model(**batch).loss
            tokens = int((batch["labels"][:, 1:] != -100).sum())
            total += torch.tensor(
                [float(loss) * tokens, tokens], dtype=torch.float64, device=accelerator.device
            )
    total = accelerator.reduce(total, reduction="sum")
    model.train()
    return float(total[0] / total[1]) if total[1] > 0 else float("nan")


def optimizer_state_bytes(optimizer) -> int:
    import torch

    inner = getattr(optimizer, "optimizer", optimizer)
    return sum(
        value.numel() * value.element_size()
        for state in inner.state.values()
        for value in state.values()
        if isinstance(value, torch.Tensor)
    )


def save_model(
    model, tokenizer, output_dir: Path, save_dtype, method: str, report: dict, state_dict=None
) -> None:
    """A Hugging Face model folder, written beside and then moved into ``output_dir``.

    ``state_dict`` carries the gathered weights of a sharded (FSDP / ZeRO-3) model.
    """
    import torch

    if state_dict is not None:
        state_dict = {
            k: v.to(save_dtype) if v.is_floating_point() else v for k, v in state_dict.items()
        }
    elif method in ("lora", "qlora"):
        model = model.merge_and_unload() if method == "lora" else model
    else:
        with torch.no_grad():
            for param in model.parameters():
                if param.is_floating_point() and param.dtype != save_dtype:
                    param.data = param.data.to(save_dtype)  # saved as the checkpoint was stored
    output_dir.mkdir(parents=True, exist_ok=True)
    staging = output_dir / ".tmp-model"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(
        staging, state_dict=state_dict, safe_serialization=True, max_shard_size="5GB"
    )
    tokenizer.save_pretrained(staging)
    (staging / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    for item in staging.iterdir():
        target = output_dir / item.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(item, target)
    staging.rmdir()


def train(args) -> int:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from transformers import AutoTokenizer

    from spectrum_sm.core.freeze import region_weight_decay
    from spectrum_sm.training import metrics
    from spectrum_sm.training.checkpoints import (
        TrainingState,
        latest_checkpoint,
        load_checkpoint,
        save_checkpoint,
    )
    from spectrum_sm.training.data import build_examples, load_rows

    precision = resolve_precision(args.precision)
    accelerator = Accelerator(
        mixed_precision={"bf16": "bf16", "fp16": "fp16", "fp32": "no"}[precision],
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        # Without a GPU, accelerate only goes multi-process (gloo) when told it runs on CPU.
        cpu=not torch.cuda.is_available(),
    )
    if not accelerator.is_main_process:
        logging.getLogger().setLevel(logging.WARNING)
    set_seed(args.seed)
    started = time.perf_counter()

    # Data first: a bad row should fail before minutes of model loading.
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            args.model_name_or_path, trust_remote_code=args.trust_remote_code
        )
    except OSError as exc:
        raise SpectrumError(
            f"cannot load a tokenizer from {args.model_name_or_path!r}: {exc}"
        ) from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    pad_id = tokenizer.pad_token_id
    train_examples = build_examples(
        load_rows(args.train_data),
        tokenizer,
        args.max_seq_length,
        assistant_only=args.assistant_only_loss,
        packing=args.packing,
    )
    eval_examples = (
        build_examples(
            load_rows(args.validation_data),
            tokenizer,
            args.max_seq_length,
            assistant_only=args.assistant_only_loss,
        )
        if args.validation_data
        else []
    )
    per_epoch = micro_batches_per_epoch(len(train_examples), args, accelerator)
    if per_epoch == 0:
        raise SpectrumError(
            f"not enough data for one optimizer step: {len(train_examples)} examples < batch "
            f"{args.per_device_train_batch_size} x {accelerator.num_processes} processes x "
            f"{args.gradient_accumulation_steps} accumulation steps"
        )
    steps_per_epoch = per_epoch // args.gradient_accumulation_steps
    total_steps = (
        args.max_steps if args.max_steps > 0 else math.ceil(args.num_train_epochs * steps_per_epoch)
    )

    # Frozen weights stay in the low-precision dtype they were loaded in; trainable ones get
    # float32 master copies (mixed precision autocasts the compute). FSDP needs one dtype per
    # flat parameter, so there everything is float32 and FSDP's mixed precision casts.
    from accelerate.utils import DistributedType

    uniform_fp32 = accelerator.distributed_type == DistributedType.FSDP
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    if sharded and args.method in ("lora", "qlora"):
        raise SpectrumError(
            f"method {args.method} with FSDP or DeepSpeed is not supported yet; "
            "use DDP (torchrun) for LoRA comparisons"
        )
    base_dtype_name = DTYPES["fp32" if precision == "fp32" or uniform_fp32 else precision]
    import transformers

    stored = transformers.AutoConfig.from_pretrained(
        args.model_name_or_path, trust_remote_code=args.trust_remote_code
    )
    model = load_model(args, base_dtype_name, stored)
    save_dtype = checkpoint_dtype(stored, getattr(torch, base_dtype_name))
    model, freeze_report, layer_file = select_trainable(model, args)
    if args.method in ("spectrum", "full"):
        with torch.no_grad():
            for param in model.parameters():
                if param.requires_grad and param.dtype != torch.float32:
                    param.data = param.data.float()
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    trainable = [p for p in model.parameters() if p.requires_grad]
    # Partly trained parameters (fused expert slices) get no decay from the optimizer: it would
    # shrink their frozen elements too. Their trained slices are decayed by hand below, and their
    # frozen elements see zero gradients and zero optimizer state, so they never change.
    partial = getattr(freeze_report, "partial", {}) or {}
    if partial and sharded:
        raise SpectrumError(
            "layer files with parameter slices (fused MoE experts) train with DDP only so far; "
            "use torchrun without an FSDP or DeepSpeed config"
        )
    partial_ids = {id(p) for n, p in model.named_parameters() if n in partial}
    groups = [
        {"params": [p for p in trainable if id(p) not in partial_ids]},
        {"params": [p for p in trainable if id(p) in partial_ids], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(
        [g for g in groups if g["params"]], lr=args.learning_rate, weight_decay=args.weight_decay
    )
    warmup = int(args.warmup_ratio * total_steps)
    scheduler = cosine_with_warmup(optimizer, warmup, total_steps)
    # The scheduler stays outside prepare(): accelerate would step it once per process.
    model, optimizer = accelerator.prepare(model, optimizer)

    state = TrainingState(trainable=freeze_report.trainable)
    resumed_from = None
    checkpoint = latest_checkpoint(args.checkpoint_dir)
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model, optimizer, scheduler, accelerator, sharded)
        resumed_from = state.step
    terminate = Terminate()
    scalars = Scalars(args.tensorboard_dir, accelerator.is_main_process)
    model.train()
    log.info(
        "training %d steps (%d per epoch), %d examples, precision %s, %d process(es)",
        total_steps,
        steps_per_epoch,
        len(train_examples),
        precision,
        accelerator.num_processes,
    )

    last_loss = float("nan")
    eval_loss = None
    window_tokens, window_start = 0, time.perf_counter()
    running_loss, running_count = 0.0, 0
    grad_norm = torch.tensor(0.0)
    step_seconds: list[float] = []
    last_step_end = time.perf_counter()
    while state.step < total_steps:
        for index, batch in micro_batches(
            train_examples, state.epoch, state.micro_batch, args, accelerator, pad_id
        ):
            batch = {k: v.to(accelerator.device) for k, v in batch.items()}
            with accelerator.accumulate(model):
                with accelerator.autocast():
                    loss = model(**batch).loss
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(trainable, args.max_grad_norm)
                    if partial and args.weight_decay:
                        region_weight_decay(
                            accelerator.unwrap_model(model),
                            partial,
                            1.0 - scheduler.get_last_lr()[0] * args.weight_decay,
                        )
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            running_loss += float(loss.detach())
            running_count += 1
            tokens = int(batch["attention_mask"].sum()) * accelerator.num_processes
            window_tokens += tokens
            state.tokens_seen += tokens
            state.micro_batch = index + 1
            if not accelerator.sync_gradients:
                continue
            step_lr = scheduler.get_last_lr()[0]  # the rate this step used
            scheduler.step()
            state.step += 1
            now = time.perf_counter()
            step_seconds.append(now - last_step_end)
            last_step_end = now
            if state.step % args.logging_steps == 0 or state.step == total_steps:
                mean = torch.tensor(running_loss / running_count, device=accelerator.device)
                last_loss = float(accelerator.reduce(mean, reduction="mean"))
                elapsed = time.perf_counter() - window_start
                log.info(
                    "%s",
                    metrics.train_line(
                        state.step,
                        last_loss,
                        step_lr,
                        float(grad_norm),
                        window_tokens / max(elapsed, 1e-9),
                        metrics.peak_memory_bytes() / 1024**3,
                    ),
                )
                scalars.add(
                    state.step,
                    **{
                        "train/loss": last_loss,
                        "train/learning_rate": step_lr,
                        "train/grad_norm": float(grad_norm),
                        "train/tokens_per_sec": window_tokens / max(elapsed, 1e-9),
                    },
                )
                running_loss, running_count = 0.0, 0
                window_tokens, window_start = 0, time.perf_counter()
            if eval_examples and args.eval_steps and state.step % args.eval_steps == 0:
                eval_loss = evaluate(model, eval_examples, args, accelerator, pad_id)
                log.info("%s", metrics.eval_line(state.step, eval_loss))
                scalars.add(state.step, **{"eval/loss": eval_loss})
            stop = torch.tensor(float(terminate.requested), device=accelerator.device)
            stop = bool(accelerator.reduce(stop, reduction="sum") > 0)
            if args.checkpoint_dir and (
                stop or (args.save_steps and state.step % args.save_steps == 0)
            ):
                save_checkpoint(
                    args.checkpoint_dir,
                    state,
                    model,
                    optimizer,
                    scheduler,
                    accelerator,
                    args.save_total_limit,
                    sharded,
                )
            if stop:
                log.warning(
                    "SIGTERM: stopped at step %d%s; run the same command to resume",
                    state.step,
                    " after a checkpoint" if args.checkpoint_dir else "",
                )
                scalars.close()
                return 143
            if state.step >= total_steps:
                break
        else:
            state.epoch += 1
            state.micro_batch = 0

    if eval_examples:
        eval_loss = evaluate(model, eval_examples, args, accelerator, pad_id)
        log.info("%s", metrics.eval_line(state.step, eval_loss))
        scalars.add(state.step, **{"eval/loss": eval_loss})
    scalars.close()
    seconds = time.perf_counter() - started
    report = {
        "method": args.method,
        "layer_file": layer_file,
        "trainable_params": freeze_report.trainable_params,
        "all_params": freeze_report.all_params,
        "trainable_percent": round(freeze_report.trainable_percent, 4),
        "tied": freeze_report.tied,
        "optimizer_state_bytes": optimizer_state_bytes(optimizer),
        "steps": state.step,
        "epochs_started": state.epoch + 1,
        "resumed_from_step": resumed_from,
        "final_train_loss": last_loss,
        "final_eval_loss": eval_loss,
        "tokens_seen": state.tokens_seen,
        "tokens_per_sec": round(state.tokens_seen / seconds, 2),
        # The first two steps include warm-up (allocations, autotuning); the median skips them.
        "median_step_seconds": statistics.median(step_seconds[2:] or step_seconds or [0.0]),
        "peak_memory_bytes": metrics.peak_memory_bytes(),
        "precision": precision,
        "processes": accelerator.num_processes,
        "seconds": round(seconds, 2),
    }
    accelerator.wait_for_everyone()
    # Sharded weights are gathered by all processes together; only the main one writes.
    full_state = accelerator.get_state_dict(model) if sharded else None
    if accelerator.is_main_process:
        save_model(
            accelerator.unwrap_model(model),
            tokenizer,
            Path(args.output_dir),
            save_dtype,
            args.method,
            report,
            full_state,
        )
        log.info("model saved to %s", args.output_dir)
        print(json.dumps(report))
    accelerator.wait_for_everyone()
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stdout
    )
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        from spectrum_sm.training.args import parse_args

        return train(parse_args(argv))
    except SpectrumError as exc:
        return fail(str(exc))
    except Exception as exc:  # the job's FailureReason, with the traceback in the log
        traceback.print_exc()
        return fail(f"{type(exc).__name__}: {exc}")


def fail(reason: str) -> int:
    print(f"error: {reason}", file=sys.stderr)
    write_failure(reason)
    return 1


if __name__ == "__main__":
    sys.exit(main())
