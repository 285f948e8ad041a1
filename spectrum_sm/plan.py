"""``spectrum-sm plan``: the memory model (:mod:`spectrum_sm.training.memory`) over the instance
table (:mod:`spectrum_sm.core.instances`), ranked by :mod:`spectrum_sm.prices`: which instance
types fit spectrum / full / LoRA training of a model, from its ``config.json`` alone.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from .aws.s3 import model_config
from .core.errors import SpectrumError
from .core.instances import INSTANCES
from .training.args import COMPUTE_PRECISIONS
from .training.memory import (
    CUDA_OVERHEAD_GIB,
    Estimate,
    build_meta,
    count_parameters,
    estimate_method,
)

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


def plan(
    model: str,
    percent: float,
    *,
    precision: str = "bf16",
    seq: int = 2048,
    batch: int = 1,
    checkpointing: bool = True,
    lora_rank: int = 16,
    sharded: bool = True,
) -> dict[str, Any]:
    """Counts, estimates and the instances that fit, cheapest first."""
    from .core.selection import check_percent

    percent = check_percent(percent)
    for name, value in (("seq", seq), ("batch", batch), ("lora_rank", lora_rank)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SpectrumError(f"{name} must be a whole number of at least 1, got {value!r}")
    if precision not in COMPUTE_PRECISIONS:
        raise SpectrumError(
            f"precision must be one of {', '.join(COMPUTE_PRECISIONS)}, got {precision!r}"
        )
    meta, cfg = build_meta(model_config(model))
    counts = count_parameters(meta, percent, lora_rank)
    methods = ("spectrum", "full", "lora")
    settings = dict(precision=precision, seq=seq, batch=batch, checkpointing=checkpointing)
    instances = []
    from .prices import load_prices

    prices = load_prices()
    for name in sorted(CANDIDATES, key=lambda n: prices.hourly("us-east-1", n) or float("inf")):
        gpus, gib = INSTANCES[name].gpus, INSTANCES[name].gpu_gib
        price = prices.hourly("us-east-1", name)
        fits = {}
        sharding = sharded and gpus > 1
        for method in methods:
            est = estimate_method(cfg, counts, method, gpus=gpus, sharded=sharding, **settings)
            fits[method] = {
                "per_gpu_gib": round(est.total_gib, 2),
                "fits": est.total_gib <= 0.9 * gib,
            }
        instances.append(
            {
                "instance_type": name,
                "gpus": gpus,
                "gpu_gib": gib,
                "usd_per_hour": price,
                "methods": fits,
            }
        )
    single = {m: asdict(estimate_method(cfg, counts, m, **settings)) for m in methods}
    return {
        "model": model,
        "top_percent": percent,
        **asdict(counts),
        "memory_one_gpu_gib": {m: round(Estimate(**e).total_gib, 2) for m, e in single.items()},
        "memory_one_gpu_breakdown": single,
        "recommended": {
            m: next((i["instance_type"] for i in instances if i["methods"][m]["fits"]), None)
            for m in methods
        },
        "instances": instances,
        "assumptions": (
            f"{precision} compute, frozen weights in {precision}, trainable weights with float32 "
            f"master copies, float32 gradients, AdamW (8 bytes per trainable parameter, 4 per "
            f"tensor); fused MoE experts frozen whole, their selected slices trainable in "
            f"float32, plus one layer's composed expert weights and gradients (docs/moe.md); "
            f"sequence {seq} x batch {batch}, gradient checkpointing "
            f"{'on' if checkpointing else 'off'}; FSDP/ZeRO-3 sharding over an instance's GPUs "
            f"{'on' if sharded else 'off'}; {CUDA_OVERHEAD_GIB} GiB CUDA overhead; fits means "
            f"at most 90% of GPU memory; prices: us-east-1 on-demand as of {prices.as_of}."
        ),
    }
