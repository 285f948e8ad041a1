"""``spectrum-sm plan``: the memory model (:mod:`spectrum_sm.training.memory`) over the instance
table (:mod:`spectrum_sm.core.instances`), ranked by :mod:`spectrum_sm.prices`: which instance
types fit spectrum / full / LoRA training of a model, from its ``config.json`` alone.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .aws.s3 import model_config
from .core.errors import SpectrumError
from .core.instances import INSTANCES
from .core.selection import check_percent
from .prices import load_prices
from .training.memory import CUDA_OVERHEAD_GIB, Step, build_meta, count_parameters, estimate_method

#: The instance types the planner recommends from (cheapest first by the prices). Not
#: ml.g5.xlarge: its 16 GiB of host memory cannot load an 8B model in bf16 on its way to the GPU;
#: not g4dn: T4 GPUs have no bf16.
CANDIDATES = (
    "ml.g5.2xlarge",
    "ml.g6e.2xlarge",
    "ml.g5.12xlarge",
    "ml.g6e.12xlarge",
    "ml.g5.48xlarge",
    "ml.g6e.48xlarge",
    "ml.p4d.24xlarge",
    "ml.p4de.24xlarge",
    "ml.p5.48xlarge",
    "ml.p5e.48xlarge",
)


@dataclass(frozen=True)
class PlanOptions(Step):
    """What the planner assumes of a training step (:class:`Step`'s shape, LoRA's rank,
    sharding): :func:`plan`'s keywords and, generated from these fields, ``spectrum-sm plan``'s
    flags."""

    lora_rank: int = field(default=16, metadata={"help": "LoRA rank"})
    sharded: bool = field(
        default=True,
        metadata={"help": "shard with FSDP across an instance's GPUs", "flag": "sharding"},
    )


def plan(model: str, percent: float, **options: Any) -> dict[str, Any]:
    """Counts, estimates and the instances that fit, cheapest first. ``options`` are
    :class:`PlanOptions`' fields (precision, seq, batch, checkpointing, lora_rank, sharded)."""
    percent = check_percent(percent)
    if unknown := sorted(set(options) - {f.name for f in fields(PlanOptions)}):
        known = ", ".join(f.name for f in fields(PlanOptions))
        raise SpectrumError(f"plan: unknown option(s) {', '.join(unknown)}; options: {known}")
    step = PlanOptions(**options)
    meta, cfg = build_meta(model_config(model))
    counts = count_parameters(meta, percent, step.lora_rank)
    methods = ("spectrum", "full", "lora")
    instances = []
    prices = load_prices()
    for name in sorted(CANDIDATES, key=lambda n: prices.hourly("us-east-1", n) or float("inf")):
        gpus, gib = INSTANCES[name].gpus, INSTANCES[name].gpu_gib
        sharding = step.sharded and gpus > 1
        need = {
            m: estimate_method(cfg, counts, m, step, gpus=gpus, sharded=sharding).total_gib
            for m in methods
        }
        instances.append(
            {
                "instance_type": name,
                "gpus": gpus,
                "gpu_gib": gib,
                "usd_per_hour": prices.hourly("us-east-1", name),
                "methods": {
                    m: {"per_gpu_gib": round(g, 2), "fits": g <= 0.9 * gib} for m, g in need.items()
                },
            }
        )
    single = {m: estimate_method(cfg, counts, m, step) for m in methods}
    return {
        "model": model,
        "top_percent": percent,
        **asdict(step),
        **asdict(counts),
        "memory_one_gpu_gib": {m: round(e.total_gib, 2) for m, e in single.items()},
        "memory_one_gpu_breakdown": {m: asdict(e) for m, e in single.items()},
        "recommended": {
            m: next((i["instance_type"] for i in instances if i["methods"][m]["fits"]), None)
            for m in methods
        },
        "instances": instances,
        "assumptions": (
            f"{step.precision} compute, frozen weights in {step.precision}, trainable "
            "weights with float32 master copies, float32 gradients, AdamW (8 bytes per "
            "trainable parameter, 4 per tensor); fused MoE experts frozen whole, their "
            "selected slices trainable in float32, plus one layer's composed expert weights "
            f"and gradients (docs/moe.md); sequence {step.seq} x batch {step.batch}, gradient "
            f"checkpointing {'on' if step.checkpointing else 'off'}; FSDP sharding over an "
            f"instance's GPUs {'on' if step.sharded else 'off'}; {CUDA_OVERHEAD_GIB} GiB CUDA "
            "overhead; fits means at most 90% of GPU memory; prices: us-east-1 on-demand as "
            f"of {prices.as_of}."
        ),
    }
