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
import logging
import re
from collections import Counter
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..core.errors import SpectrumError
from ..core.hub import hub_file, is_local
from ..core.names import EXPERT_BIAS_SUFFIX, FUSING_OPERATIONS, is_multimodal, meta_model, tower_of
from ..core.snr import module_type
from .args import COMPUTE_PRECISIONS

log = logging.getLogger(__name__)
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
    # huggingface.co/Qwen/Qwen3-30B-A3B/blob/main/config.json (architecture fields).
    "Qwen/Qwen3-30B-A3B": {
        "model_type": "qwen3_moe",
        "architectures": ["Qwen3MoeForCausalLM"],
        "vocab_size": 151936,
        "hidden_size": 2048,
        "intermediate_size": 6144,
        "moe_intermediate_size": 768,
        "num_hidden_layers": 48,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "head_dim": 128,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "norm_topk_prob": True,
        "max_position_embeddings": 40960,
        "rope_theta": 1_000_000,
        "rms_norm_eps": 1e-6,
        "attention_bias": False,
        "tie_word_embeddings": False,
    },
    # huggingface.co/openai/gpt-oss-20b/blob/main/config.json: experts stored in MXFP4 (the scan
    # dequantizes them; training loads them dequantized), hence its quantization_config.
    "openai/gpt-oss-20b": {
        "model_type": "gpt_oss",
        "architectures": ["GptOssForCausalLM"],
        "vocab_size": 201088,
        "hidden_size": 2880,
        "intermediate_size": 2880,
        "num_hidden_layers": 24,
        "num_attention_heads": 64,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "num_local_experts": 32,
        "num_experts_per_tok": 4,
        "experts_per_token": 4,
        "attention_bias": True,
        "sliding_window": 128,
        "layer_types": ["sliding_attention", "full_attention"] * 12,
        "max_position_embeddings": 131072,
        "initial_context_length": 4096,
        "rope_theta": 150000,
        "rope_scaling": {
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "factor": 32.0,
            "original_max_position_embeddings": 4096,
            "rope_type": "yarn",
            "truncate": False,
        },
        "rms_norm_eps": 1e-5,
        "swiglu_limit": 7.0,
        "router_aux_loss_coef": 0.9,
        "output_router_logits": False,
        "pad_token_id": 199999,
        "eos_token_id": 200002,
        "tie_word_embeddings": False,
        "quantization_config": {
            "modules_to_not_convert": [
                "model.layers.*.self_attn",
                "model.layers.*.mlp.router",
                "model.embed_tokens",
                "lm_head",
            ],
            "quant_method": "mxfp4",
        },
    },
    # huggingface.co/mistralai/Mixtral-8x7B-v0.1/blob/main/config.json.
    "mistralai/Mixtral-8x7B-v0.1": {
        "model_type": "mixtral",
        "architectures": ["MixtralForCausalLM"],
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
        "max_position_embeddings": 32768,
        "rope_theta": 1e6,
        "rms_norm_eps": 1e-5,
        "router_aux_loss_coef": 0.02,
        "sliding_window": None,
        "bos_token_id": 1,
        "eos_token_id": 2,
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
    """Exact parameter counts of a model at a top percent (see :func:`count_parameters`).

    ``trainable_params`` includes ``expert_trainable_params``: the selected elements of fused
    expert parameters, which train as slices of parameters that otherwise stay frozen.
    """

    total_params: int
    trainable_params: int  # spectrum at the percent, with the embedding entries
    trainable_params_no_embeddings: int
    full_params: int
    lora_params: int
    embedding_params: int
    tied_embeddings: bool
    #: Every element of the fused expert parameters (and their fused biases).
    expert_params: int = 0
    #: The selected ones among them, at the percent.
    expert_trainable_params: int = 0
    #: The largest layer's fused expert elements (what one layer composes while it runs).
    expert_layer_params: int = 0
    #: Tensors the optimizer holds (one ``step`` each): spectrum, full and LoRA.
    trainable_tensors: int = 0
    full_tensors: int = 0
    lora_tensors: int = 0


@dataclass
class _Module:
    """One module the scan scores: its size as a layer-file entry trains it, and its tensors."""

    elements: int
    tensors: int
    fused: str | None = None  # the fused parameter it is a slice of (one per layer and leaf)


def _converters(model) -> list[Any]:
    """transformers' conversions of ``model`` that stack stored per-expert weights into a fused
    parameter (see :data:`~spectrum_sm.core.names.FUSING_OPERATIONS`); others are no experts."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter
    except ImportError:
        return []
    try:
        transforms = get_model_conversion_mapping(model)
    except (AttributeError, TypeError, ValueError) as exc:
        log.debug("no conversion mapping for %s: %s", type(model).__name__, exc)
        return []
    return [
        t
        for t in transforms
        if isinstance(t, WeightConverter)
        and [type(op).__name__ for op in t.operations] in FUSING_OPERATIONS
    ]


def _targets(converter, name: str) -> bool:
    patterns = (re.escape(t.lstrip(".")).replace(r"\*", r"\d+") for t in converter.target_patterns)
    return any(re.search(rf"(?:^|\.){pattern}$", name) for pattern in patterns)


@dataclass
class FusedExperts:
    """What the scan scores in one fused 3-D expert parameter: per expert, ``parts`` as
    ``(stored leaf, elements its entry trains)``; ``bias``: the fused bias trained by rows."""

    parts: list[tuple[str, int]]
    bias: str | None = None


def expert_modules(model) -> dict[str, FusedExperts]:
    """Fused 3-D expert parameter -> the per-expert modules the scan scores in it.

    Where transformers fuses stored per-expert weights while loading (Qwen3-MoE's
    ``experts.E.gate_proj`` and ``up_proj`` into ``experts.gate_up_proj``, Mixtral's ``w1``/``w3``),
    its conversion mapping names the stored leaves, each an equal share of dimension 1. A 3-D
    parameter stored fused (gpt-oss) is scored per expert under its own leaf; its bias
    (``<name>_bias``, ``[experts, ...]``) trains with the expert's row, so the row counts it.
    """
    converters = _converters(model)
    params = dict(model.named_parameters())
    out: dict[str, FusedExperts] = {}
    for name, param in params.items():
        if param.ndim != 3 or param.numel() == 0:
            continue
        experts, rows, cols = param.shape
        converter = next((c for c in converters if _targets(c, name)), None)
        if converter is not None and rows % len(converter.source_patterns) == 0:
            share = rows // len(converter.source_patterns) * cols
            leaves = [
                s.split("*.", 1)[-1].removesuffix(".weight") for s in converter.source_patterns
            ]
            out[name] = FusedExperts([(leaf, share) for leaf in leaves])
            continue
        bias_name = name + EXPERT_BIAS_SUFFIX
        bias = params.get(bias_name)
        if bias is None or bias.ndim < 1 or bias.shape[0] != experts:
            bias_name, bias = None, None
        size = rows * cols + (bias[0].numel() if bias is not None else 0)
        out[name] = FusedExperts([(name.rsplit(".", 1)[-1], size)], bias_name)
    return out


def _layer_of(name: str) -> str:
    """``model.layers.7`` for ``model.layers.7.mlp.experts.down_proj``: the name up to its first
    index (the decoder layer FSDP wraps and checkpointing recomputes)."""
    parts = name.split(".")
    index = next((i for i, p in enumerate(parts) if p.isdigit()), len(parts) - 1)
    return ".".join(parts[: index + 1])


def count_parameters(model, percent: float, lora_rank: int = 16) -> Counts:
    """Exact counts of what trains at ``percent``, as the scan selects and ``freeze_except``
    trains (``tests/test_moe_plan.py`` holds them equal on every family).

    The scan scores each stored 1-D or 2-D weight of the language model as a module and keeps
    ``int(n * percent / 100)`` modules of each type (the name after the first index); a selected
    module trains its weight and bias. Stored per-expert weights are modules of their own, each
    (expert, projection) its own type over the layers, and train as slices of the fused
    parameter. The embedding entries train the input and output embeddings.
    """
    import torch

    named = list(model.named_parameters())  # unique: a tied head appears once
    total = sum(p.numel() for _, p in named)
    multimodal = is_multimodal(model.config.to_dict())
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    embed_ids = {id(m.weight) for m in (inp, out) if m is not None}
    fused = expert_modules(model)
    fused_biases = {f.bias for f in fused.values() if f.bias}
    sizes = {name: p.numel() for name, p in named}
    # A module entry trains every parameter under the module's name.
    under: dict[str, list[int]] = {}
    for name, param in named:
        parts = name.split(".")
        for depth in range(1, len(parts)):
            under.setdefault(".".join(parts[:depth]), []).append(param.numel())
    by_type: dict[str, list[_Module]] = {}
    embedding_types: set[str] = set()
    expert_total, expert_layers = 0, Counter()
    fused_per_type: Counter[str] = Counter()  # fused parameters of each type the scan scores
    for name, param in named:
        if multimodal and tower_of(name) != "language":
            continue  # the scan scores the language model unless told otherwise
        if name in fused:
            experts = fused[name]
            elements = param.numel() + (sizes[experts.bias] if experts.bias else 0)
            expert_total += elements
            expert_layers[_layer_of(name)] += elements
            fused_per_type[module_type(name)] += 1
            module = name.rsplit(".", 1)[0]
            for expert in range(param.shape[0]):
                for leaf, size in experts.parts:
                    kind = module_type(f"{module}.{expert}.{leaf}")
                    by_type.setdefault(kind, []).append(_Module(size, 1, module_type(name)))
            continue
        skip = name in fused_biases or not name.endswith(".weight") or param.numel() == 0
        if skip or param.ndim not in (1, 2):
            continue
        module = name[: -len(".weight")]
        kind = module_type(module)
        by_type.setdefault(kind, []).append(_Module(sum(under[module]), len(under[module])))
        if id(param) in embed_ids:
            embedding_types.add(kind)
    selected = embedding_selected = expert_selected = tensors = 0
    slices_by_fused: Counter[str] = Counter()
    for kind, modules in by_type.items():
        keep = sorted(modules, key=lambda m: m.elements, reverse=True)[
            : int(len(modules) * percent / 100)
        ]
        elements = sum(m.elements for m in keep)
        selected += elements
        if kind in embedding_types:
            embedding_selected += elements  # the embedding entries train these anyway
        elif keep and keep[0].fused:
            expert_selected += elements
            slices_by_fused[keep[0].fused] += len(keep)
        else:
            tensors += sum(m.tensors for m in keep)
    # One trainable tensor per fused parameter holding slices: at most one per layer (and its
    # bias), however many slices it holds; which layers have some depends on the scores.
    for kind, slices in slices_by_fused.items():
        has_bias = any(f.bias for n, f in fused.items() if module_type(n) == kind)
        tensors += min(slices, fused_per_type[kind]) * (2 if has_bias else 1)
    embeddings = sum(p.numel() for _, p in named if id(p) in embed_ids)
    lora = lora_tensors = 0
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not name.endswith("lm_head"):
            lora += lora_rank * (module.in_features + module.out_features)
            lora_tensors += 2
    tied = out is not None and inp is not None and out.weight is inp.weight
    return Counts(
        total_params=total,
        trainable_params=selected - embedding_selected + embeddings,
        trainable_params_no_embeddings=selected,
        full_params=total,
        lora_params=lora,
        embedding_params=embeddings,
        tied_embeddings=tied,
        expert_params=expert_total,
        expert_trainable_params=expert_selected,
        expert_layer_params=max(expert_layers.values(), default=0),
        trainable_tensors=tensors + len(embed_ids),
        full_tensors=len(named),
        lora_tensors=lora_tensors,
    )


#: AdamW's state per trainable element (``exp_avg`` and ``exp_avg_sq``, float32) and per
#: trainable tensor (``step``, a float32 scalar tensor): torch.optim.AdamW's defaults.
ADAM_MOMENT_BYTES, ADAM_STEP_BYTES = 8, 4
#: A trainable element's float32 master copy and float32 gradient.
MASTER_BYTES, GRADIENT_BYTES = 4, 4


def adamw_state_bytes(trainable_elements: int, trainable_tensors: int) -> int:
    """AdamW's optimizer state, in bytes, for this many trainable elements and tensors."""
    return ADAM_MOMENT_BYTES * trainable_elements + ADAM_STEP_BYTES * trainable_tensors


def method_counts(counts: Counts, method: str) -> tuple[int, int]:
    """``(trainable elements, trainable tensors)`` of ``method`` (spectrum at the counted
    percent with the embedding entries; full; lora and qlora at the counted rank)."""
    if method == "spectrum":
        return counts.trainable_params, counts.trainable_tensors
    if method == "full":
        return counts.full_params, counts.full_tensors
    if method in ("lora", "qlora"):
        return counts.lora_params, counts.lora_tensors
    raise SpectrumError(f"unknown method {method!r}")


@dataclass(frozen=True)
class Step:
    """The shape of one training step the estimate counts (``spectrum-sm plan``'s flags, from
    :class:`spectrum_sm.plan.PlanOptions`, which extends it); validated at construction."""

    precision: str = field(
        default="bf16", metadata={"help": "compute precision", "choices": COMPUTE_PRECISIONS}
    )
    seq: int = field(default=2048, metadata={"help": "sequence length"})
    batch: int = field(default=1, metadata={"help": "micro-batch per GPU"})
    checkpointing: bool = field(
        default=True,
        metadata={"help": "count gradient checkpointing", "flag": "gradient-checkpointing"},
    )

    def __post_init__(self) -> None:
        for name in ("seq", "batch", "lora_rank"):
            value = getattr(self, name, 1)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise SpectrumError(f"{name} must be a whole number of at least 1, got {value!r}")
        if self.precision not in COMPUTE_PRECISIONS:
            raise SpectrumError(
                f"precision must be one of {', '.join(COMPUTE_PRECISIONS)}, got {self.precision!r}"
            )

    @classmethod
    def of(cls, args, precision: str) -> Step:
        """The step train.py runs with these :class:`~.args.TrainArgs`, in ``precision`` (its
        ``auto`` resolved for the GPU)."""
        return cls(
            precision,
            args.max_seq_length,
            args.per_device_train_batch_size,
            args.gradient_checkpointing,
        )


@dataclass
class Estimate:
    method: str
    trainable_params: int
    weights_gib: float
    gradients_gib: float
    optimizer_gib: float
    activations_gib: float
    overhead_gib: float
    #: While a layer runs: composed copies of its fused expert parameters and their gradients.
    transient_gib: float = 0.0

    @property
    def total_gib(self) -> float:
        return sum(getattr(self, f.name) for f in fields(self) if f.name.endswith("_gib"))


def estimate_memory(
    cfg,
    total: int,
    trainable: int,
    method: str,
    step: Step = Step(),
    *,
    gpus: int = 1,
    sharded: bool = False,
    overhead_gib: float = CUDA_OVERHEAD_GIB,
    counts: Counts | None = None,
) -> Estimate:
    """Per-GPU memory of one training step (see the module docstring and ``docs/moe.md``).

    With ``counts`` (:func:`count_parameters`), fused expert parameters follow the slice
    mechanism (spectrum) and AdamW's ``step`` tensors are counted; without, every trainable
    parameter is a whole dense one.
    """
    checkpointing = step.checkpointing
    low = 4 if step.precision == "fp32" else 2
    shard = gpus if sharded else 1
    adapters = method in ("lora", "qlora")
    experts = counts.expert_trainable_params if counts is not None and method == "spectrum" else 0
    tensors = method_counts(counts, method)[1] if counts is not None else 0
    # A fused expert parameter with selected slices stays frozen, whole, in the compute dtype;
    # its selected elements are a float32 parameter of their own (master, gradient, moments).
    frozen = total if adapters else total - (trainable - experts)
    # QLoRA stores the frozen base in NF4 with double-quantized scales: ~4.5 bits a weight.
    frozen_bytes = 0.5625 if method == "qlora" else low
    weights = (frozen * frozen_bytes + trainable * MASTER_BYTES) / shard
    gradients = trainable * GRADIENT_BYTES / shard
    # Moments shard with their parameters; every rank keeps each tensor's step scalar.
    optimizer = adamw_state_bytes(trainable, 0) / shard + adamw_state_bytes(0, tensors)
    transient = 0
    if experts:
        layer = counts.expert_layer_params * low
        # A composed copy of each fused parameter and its gradient while a layer runs; without
        # checkpointing every layer's composed copies are saved for backward.
        transient = 2 * layer if checkpointing else counts.expert_params * low + layer
    hidden = cfg.hidden_size
    # The width a token's MLP activations have: the dense MLP's, or for a MoE the ``k`` experts
    # it is routed to (and a shared expert's, where there is one).
    if counts is not None and counts.expert_params:
        k = getattr(cfg, "num_experts_per_tok", None) or getattr(cfg, "experts_per_token", 1) or 1
        width = getattr(cfg, "moe_intermediate_size", None) or cfg.intermediate_size
        intermediate = k * width + (getattr(cfg, "shared_expert_intermediate_size", None) or 0)
    else:
        intermediate = getattr(cfg, "intermediate_size", None) or 4 * hidden
    layers = cfg.num_hidden_layers
    tokens = step.seq * step.batch
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
        transient / GIB,
    )


def estimate_method(cfg, counts: Counts, method: str, step: Step, **settings: Any) -> Estimate:
    """:func:`estimate_memory` of ``method`` for a model counted by :func:`count_parameters`
    (``settings``: its keywords, e.g. ``gpus``, ``sharded``)."""
    trainable = method_counts(counts, method)[0]
    return estimate_memory(
        cfg, counts.total_params, trainable, method, step, counts=counts, **settings
    )


def plan_distribution(
    config: dict[str, Any], *, method: str, percent: float, gpus: int, gpu_gib: float, step: Step
) -> dict[str, Any]:
    """ddp when a full copy of the training state fits one GPU, else fsdp when the sharded one
    does; ``fits`` says whether either does, with the planner's per-GPU numbers."""
    meta, cfg = build_meta(config)
    counts = count_parameters(meta, percent)
    ddp = estimate_method(cfg, counts, method, step, gpus=gpus)
    fsdp = estimate_method(cfg, counts, method, step, gpus=gpus, sharded=gpus > 1)
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
