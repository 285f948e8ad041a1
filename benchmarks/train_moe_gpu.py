"""GPU check (under 8 minutes on one H200): Qwen3-30B-A3B at reduced depth, Spectrum vs full.

    python benchmarks/train_moe_gpu.py [--layers 4] [--steps 6] [--seq 2048]

Builds a randomly initialised Qwen3-30B-A3B from its config with ``--layers`` decoder layers
(real widths: hidden 2048, 128 experts of 768, 8 active, vocabulary 151936) directly on the GPU in
bf16 (no download). For each method it freezes as train.py does (``freeze_except``: fused expert
slices become float32 parameters of their own; other trainable weights get float32 masters,
frozen ones stay bf16), runs AdamW steps on random tokens with gradient checkpointing under bf16
autocast, and prints peak GPU memory, tokens/s, optimizer-state bytes measured on the optimizer
and the planner's estimate for the same model, one JSON line per method. The Spectrum selection
has the scan's shape: for every (expert, projection) type and every dense type, 30% of the layers
(at least one), chosen round-robin; which layers does not change memory or speed.
``--device cpu --tiny`` runs the same code at toy widths (the test suite's smoke run).
"""

from __future__ import annotations

import argparse
import gc
import json
import time

from spectrum_sm.training.memory import KNOWN_CONFIGS

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
TINY = {"hidden_size": 64, "moe_intermediate_size": 32, "num_experts": 8, "num_experts_per_tok": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 512,
        "intermediate_size": 128}  # fmt: skip


def model_config(layers: int, tiny: bool) -> dict:
    config = dict(KNOWN_CONFIGS["Qwen/Qwen3-30B-A3B"], num_hidden_layers=layers)
    config.update(TINY if tiny else {})
    return {k: v for k, v in config.items() if k not in ("model_type", "architectures")}


def spectrum_entries(config: dict, percent: float = 30) -> list[str]:
    """Layer-file entries of the scan's shape: per type, ``percent`` of the layers."""
    layers, experts = config["num_hidden_layers"], config["num_experts"]
    inter = config["moe_intermediate_size"]
    keep = max(1, int(layers * percent / 100))
    entries = ["^lm_head.weight$", "^model.embed_tokens.weight$"]
    for offset, name in enumerate(ATTENTION):
        entries += [f"model.layers.{(offset + i) % layers}.self_attn.{name}" for i in range(keep)]
    # gate and up are the two halves of gate_up_proj's rows; down is a whole expert.
    slices = [("gate_up_proj", f", 0:{inter}"), ("gate_up_proj", f", {inter}:{2 * inter}")]
    slices.append(("down_proj", ""))
    for expert in range(experts):
        for offset, (param, rows) in enumerate(slices):
            for i in range(keep):
                layer = (expert + offset + i) % layers
                entries.append(f"^model.layers.{layer}.mlp.experts.{param}$[{expert}{rows}]")
    return entries


def planned_gib(config: dict, method: str, args) -> float:
    from spectrum_sm.training.memory import Step, build_meta, count_parameters, estimate_memory

    meta, cfg = build_meta({**config, "model_type": "qwen3_moe"})
    counts = count_parameters(meta, 30)
    trainable = counts.trainable_params if method == "spectrum" else counts.full_params
    return estimate_memory(
        cfg,
        counts.total_params,
        trainable,
        method,
        Step(seq=args.seq, batch=args.batch),
        counts=counts,
    ).total_gib


def run(method: str, args) -> dict:
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from spectrum_sm.core.freeze import freeze_except
    from spectrum_sm.training.recipe import optimizer_state_bytes

    cuda = args.device == "cuda"
    config = model_config(args.layers, args.tiny)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    with torch.device(args.device):
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**config)).to(torch.bfloat16)
    if method == "spectrum":
        trainable_params = freeze_except(model, spectrum_entries(config)).trainable_params
    else:
        trainable_params = sum(p.numel() for p in model.parameters())
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    tokens = torch.randint(0, config["vocab_size"], (args.batch, args.seq), device=args.device)
    result = {"method": method, "layers": args.layers, "trainable_params": trainable_params}
    result["planned_gib"] = round(planned_gib(config, method, args), 2)
    times = []
    try:
        for _ in range(args.steps):
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.autocast(args.device, dtype=torch.bfloat16):
                loss = model(input_ids=tokens, labels=tokens).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        steady = sorted(times[2:] or times)[len(times[2:] or times) // 2]
        result.update(
            tokens_per_sec=round(args.batch * args.seq / steady, 1),
            step_s=round(steady, 3),
            optimizer_state_bytes=optimizer_state_bytes(optimizer),
            loss=float(loss.detach()),
        )
    except torch.cuda.OutOfMemoryError:
        result["oom"] = True
    if cuda:
        result["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    del model, optimizer
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--methods", default="spectrum,full")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--tiny", action="store_true", help="toy widths (a CPU smoke run)")
    args = parser.parse_args()
    for method in args.methods.split(","):
        print(json.dumps(run(method, args)), flush=True)


if __name__ == "__main__":
    main()
