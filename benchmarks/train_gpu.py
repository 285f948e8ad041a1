"""GPU benchmark (a few minutes on one H100/H200): Qwen3-8B, full vs Spectrum-30% vs LoRA.

    python benchmarks/train_gpu.py [--steps 6] [--seq 2048]   # under 8 minutes on one H200

``spectrum-fsdp`` is the FSDP2 smoke test: Spectrum-30% sharded by the recipe's own
``shard_model`` in a one-process NCCL group (the path train.py --distribution fsdp takes).

Builds a randomly initialised Qwen3-8B from its config directly on the GPU in bf16 (no download),
then for each method: freezes as train.py does (trainable weights get float32 master copies,
frozen ones stay bf16), runs a few AdamW steps on random tokens with gradient checkpointing, and
reports peak GPU memory and tokens/s. A method that does not fit is reported as OOM. The Spectrum
selection has the reference's shape at 30% (10 of 36 layers per type plus both embeddings); which
layers does not change memory or speed.
"""

from __future__ import annotations

import argparse
import gc
import json
import time

from spectrum_sm.training.memory import KNOWN_CONFIGS

QWEN3_8B = {
    k: v
    for k, v in KNOWN_CONFIGS["Qwen/Qwen3-8B"].items()
    if k not in ("model_type", "architectures")
}
TYPES = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "self_attn.q_norm",
    "self_attn.k_norm",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
    "input_layernorm",
    "post_attention_layernorm",
]


def spectrum_entries(layers: int = 36, percent: int = 30) -> list[str]:
    keep = int(layers * percent / 100)
    entries = ["^lm_head.weight$", "^model.embed_tokens.weight$"]
    return entries + [f"model.layers.{i}.{t}" for t in TYPES for i in range(keep)]


def run(method: str, args) -> dict:
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from spectrum_sm.core.freeze import freeze_except

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    with torch.device("cuda"):
        model = Qwen3ForCausalLM(Qwen3Config(**QWEN3_8B)).to(torch.bfloat16)
    if method in ("spectrum", "spectrum-fsdp"):
        report = freeze_except(model, spectrum_entries())
        trainable_params = report.trainable_params
    elif method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
        trainable_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    else:
        trainable_params = sum(p.numel() for p in model.parameters())
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    if method == "spectrum-fsdp":
        import torch.distributed as dist

        from spectrum_sm.training.recipe import Dist, shard_model

        if not dist.is_initialized():
            dist.init_process_group(
                "nccl", rank=0, world_size=1, init_method="tcp://127.0.0.1:29561"
            )
        model = shard_model(model, Dist(0, 1, 0, torch.device("cuda")), "bf16")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    tokens = torch.randint(0, QWEN3_8B["vocab_size"], (args.batch, args.seq), device="cuda")
    times = []
    try:
        for _ in range(args.steps):
            torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=tokens, labels=tokens).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        steady = sorted(times[2:] or times)[len(times[2:] or times) // 2]
        result = {
            "method": method,
            "trainable_params": trainable_params,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
            "tokens_per_sec": args.batch * args.seq / steady,
            "step_s": steady,
        }
    except torch.cuda.OutOfMemoryError:
        result = {
            "method": method,
            "trainable_params": trainable_params,
            "oom": True,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        }
    del model, optimizer
    gc.collect()
    torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--methods", default="spectrum,lora,full,spectrum-fsdp")
    args = parser.parse_args()
    results = [run(m, args) for m in args.methods.split(",")]
    for r in results:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
