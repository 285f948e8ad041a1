"""The memory model of training: parameter counts and per-GPU memory for spectrum / full / LoRA,
from a model's ``config.json`` alone (the model is built on the meta device: no weights, no memory).

The estimate follows how :mod:`spectrum_sm.training.recipe` trains: frozen weights stay in the
compute dtype, trainable ones get float32 master copies, float32 gradients and two float32 AdamW
moments; FSDP / ZeRO-3 divide weights, gradients and optimizer state by the GPU count.
Activations use a per-layer rule of thumb (below); it was checked against the CPU training
benchmark. The job's request builder and the recipe's ``distribution: auto`` both ask
:func:`plan_distribution`; ``spectrum-sm plan`` (:mod:`spectrum_sm.plan`) adds instances and prices.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import SpectrumError
from ..core.hub import hub_file, is_local
from ..core.names import meta_model
from ..core.snr import module_type

GIB = 1024**3
#: Bytes of saved activations per token per layer, in units of the compute dtype's size:
#: without checkpointing ~ 18 * hidden + 4 * intermediate (attention and MLP inputs, outputs
#: and intermediates with SDPA attention); with checkpointing only the layer input is kept
#: (plus one layer's worth recomputed at a time).
ACT_HIDDEN, ACT_INTERMEDIATE = 18, 4
CUDA_OVERHEAD_GIB = 1.0
#: config.json of models the examples use, so a dry run plans without reaching the Hub.
KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "Qwen/Qwen3-8B": {
        "model_type": "qwen3",
        "architectures": ["Qwen3ForCausalLM"],
        "vocab_size": 151936,
        "hidden_size": 4096,
        "intermediate_size": 12288,
        "num_hidden_layers": 36,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "max_position_embeddings": 40960,
        "rope_theta": 1_000_000,
        "tie_word_embeddings": False,
    },
}


def load_config(model: str) -> dict[str, Any]:
    """``config.json`` of a local folder (or the file itself) or a Hub id (a few known models'
    configs ship with the planner, for offline dry runs). ``s3://`` prefixes:
    :func:`spectrum_sm.aws.s3.model_config`."""
    if model.startswith("s3://"):
        raise SpectrumError(f"{model}: read an S3 config with spectrum_sm.aws.s3.model_config")
    path = Path(model)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        if is_local(model, "model"):
            raise SpectrumError(f"no config.json at {model!r}")
        if model in KNOWN_CONFIGS:
            # A published model's architecture does not change: no Hub round trip (and no
            # retries when there is no route to it) for the models the examples use.
            return dict(KNOWN_CONFIGS[model])
        path = hub_file(model, "config.json")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SpectrumError(f"{path}: unreadable config.json ({exc})") from exc


def build_meta(config: dict[str, Any]):
    """The model on the meta device and its transformers config."""
    model = meta_model(config, "plan")
    return model, model.config


@dataclass
class Counts:
    total_params: int
    trainable_params: int  # spectrum at the percent, with the embedding entries
    trainable_params_no_embeddings: int
    full_params: int
    lora_params: int
    embedding_params: int
    tied_embeddings: bool


def count_parameters(model, percent: float, lora_rank: int = 16) -> Counts:
    """Exact counts: Spectrum keeps ``int(n * percent / 100)`` modules of each type."""
    import torch

    unique = {id(p): (n, p) for n, p in model.named_parameters()}
    total = sum(p.numel() for _, p in unique.values())
    by_type: dict[str, list[int]] = {}
    embed_ids = set()
    for name, param in unique.values():
        if not name.endswith(".weight"):
            continue
        module = name[: -len(".weight")]
        if module.endswith("embed_tokens") or module == "lm_head":
            embed_ids.add(id(param))
            continue
        by_type.setdefault(module_type(module), []).append(param.numel())
    selected = 0
    for sizes in by_type.values():
        keep = int(len(sizes) * percent / 100)
        selected += sum(sorted(sizes, reverse=True)[:keep])  # equal within a type in practice
    embeddings = sum(unique[i][1].numel() for i in embed_ids)
    lora = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head"):
            lora += lora_rank * (module.in_features + module.out_features)
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    tied = out is not None and inp is not None and out.weight is inp.weight
    return Counts(total, selected + embeddings, selected, total, lora, embeddings, tied)


@dataclass
class Estimate:
    method: str
    trainable_params: int
    weights_gib: float
    gradients_gib: float
    optimizer_gib: float
    activations_gib: float
    overhead_gib: float

    @property
    def total_gib(self) -> float:
        return (
            self.weights_gib
            + self.gradients_gib
            + self.optimizer_gib
            + self.activations_gib
            + self.overhead_gib
        )


def estimate_memory(
    cfg,
    total: int,
    trainable: int,
    method: str,
    *,
    precision: str = "bf16",
    seq: int = 2048,
    batch: int = 1,
    checkpointing: bool = True,
    gpus: int = 1,
    sharded: bool = False,
    overhead_gib: float = CUDA_OVERHEAD_GIB,
) -> Estimate:
    """Per-GPU memory of one training step (see the module docstring for the model)."""
    low = 4 if precision == "fp32" else 2
    shard = gpus if sharded else 1
    adapters = method in ("lora", "qlora")
    frozen = total - trainable if not adapters else total
    # QLoRA stores the frozen base in NF4 with double-quantized scales: ~4.5 bits a weight.
    frozen_bytes = 0.5625 if method == "qlora" else low
    weights = (frozen * frozen_bytes + trainable * 4) / shard
    gradients = trainable * 4 / shard
    optimizer = trainable * 8 / shard
    hidden = cfg.hidden_size
    intermediate = getattr(cfg, "intermediate_size", 4 * hidden)
    layers = cfg.num_hidden_layers
    tokens = seq * batch
    per_layer = (ACT_HIDDEN * hidden + ACT_INTERMEDIATE * intermediate) * tokens * low
    if checkpointing:
        activations = layers * tokens * hidden * low + per_layer
    else:
        activations = layers * per_layer
    activations += 3 * tokens * cfg.vocab_size * 4  # float32 logits, their softmax and gradient
    if adapters:
        # Measured on the CPU benchmark: LoRA keeps about one more copy of every adapted
        # layer's input (its A matrix needs it for the gradient).
        inputs = 6 * hidden + intermediate  # q, k, v, o, gate, up read hidden; down reads inter.
        activations += (1 if checkpointing else layers) * inputs * tokens * low
    return Estimate(
        method,
        trainable,
        weights / GIB,
        gradients / GIB,
        optimizer / GIB,
        activations / GIB,
        overhead_gib,
    )


def plan_distribution(
    config: dict[str, Any],
    *,
    method: str,
    percent: float,
    gpus: int,
    gpu_gib: float,
    precision: str = "bf16",
    seq: int = 2048,
    batch: int = 1,
    checkpointing: bool = True,
) -> dict[str, Any]:
    """ddp when a full copy of the training state fits one GPU, else fsdp when the sharded one
    does; ``fits`` says whether either does, with the planner's per-GPU numbers."""
    meta, cfg = build_meta(config)
    counts = count_parameters(meta, percent)
    trainable = {
        "spectrum": counts.trainable_params,
        "full": counts.full_params,
        "lora": counts.lora_params,
        "qlora": counts.lora_params,
    }[method]
    common = dict(precision=precision, seq=seq, batch=batch, checkpointing=checkpointing)
    ddp = estimate_memory(cfg, counts.total_params, trainable, method, gpus=gpus, **common)
    fsdp = estimate_memory(
        cfg, counts.total_params, trainable, method, gpus=gpus, sharded=gpus > 1, **common
    )
    limit = 0.9 * gpu_gib
    numbers = {"ddp_gib": round(ddp.total_gib, 1), "fsdp_gib": round(fsdp.total_gib, 1)}
    if ddp.total_gib <= limit or method in ("lora", "qlora"):
        choice, fits = "ddp", ddp.total_gib <= limit
    else:
        choice, fits = "fsdp", fsdp.total_gib <= limit
    reason = (
        f"per GPU: ddp {numbers['ddp_gib']} GiB, fsdp over {gpus} GPUs {numbers['fsdp_gib']} GiB, "
        f"limit {limit:.1f} GiB (90% of {gpu_gib} GiB)"
    )
    return {"distribution": choice, "fits": fits, "reason": reason, **numbers}
