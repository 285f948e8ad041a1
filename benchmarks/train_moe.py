"""Benchmark: Spectrum on a mixture-of-experts model, fused expert slices vs full fine-tuning.

    python benchmarks/train_moe.py          # ~210M-parameter Qwen3-MoE (64 experts) on this CPU

Runs entrypoints/train.py (one process each) for Spectrum-30% (the scan's layer file: slices of
the fused expert parameters) and full fine-tuning, with and without gradient checkpointing, and
prints the optimizer state measured on the optimizer, the peak resident memory, and the
planner's estimate for the same run (training.memory, one device, no CUDA overhead), as ratios
against full fine-tuning. Before fused slices had their own parameters, Spectrum's optimizer
held the whole fused parameter of every expert with a selected slice: full fine-tuning's bytes
for the experts. Run it alone: the step times are noisy beside other work.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from train import ROOT, run

GIB = 1024**3


def prepare(work: Path, args: argparse.Namespace) -> dict[str, Path]:
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from spectrum_sm.api import scan
    from spectrum_sm.toy import make_tokenizer, toy_chat_rows

    model = work / "model"
    if not (model / "config.json").exists():
        torch.manual_seed(0)
        config = Qwen3MoeConfig(
            vocab_size=args.vocab,
            hidden_size=args.hidden,
            intermediate_size=3 * args.hidden,
            moe_intermediate_size=args.hidden // 2,
            num_experts=args.experts,
            num_experts_per_tok=4,
            num_hidden_layers=args.layers,
            num_attention_heads=args.hidden // 64,
            num_key_value_heads=2,
            head_dim=64,
            tie_word_embeddings=False,
        )
        Qwen3MoeForCausalLM(config).to(torch.bfloat16).save_pretrained(model)
        rows = toy_chat_rows(256)
        make_tokenizer(model, [m["content"] for r in rows for m in r["messages"]] * 4, 512)
        (work / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = scan(model, 30, output_dir=work / "snr", show_progress=False)
    return {"model": model, "train": work / "train.jsonl", "layers": result.files["layers"]}


def planned(paths: dict[str, Path], method: str, args, checkpointing: bool) -> float:
    from spectrum_sm.training.memory import (
        Step,
        build_meta,
        count_parameters,
        estimate_memory,
        load_config,
    )

    meta, cfg = build_meta(load_config(str(paths["model"])))
    counts = count_parameters(meta, 30)
    trainable = counts.trainable_params if method == "spectrum" else counts.full_params
    estimate = estimate_memory(
        cfg,
        counts.total_params,
        trainable,
        method,
        Step(args.precision, args.seq, args.batch, checkpointing),
        overhead_gib=0.0,
        counts=counts,
    )
    return estimate.total_gib


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=str(ROOT / "bench-out" / "train-moe"))
    parser.add_argument("--layers", type=int, default=8)
    # A small vocabulary (the toy tokenizer has 512 tokens) keeps the experts most of the
    # model, as in real MoE models (Qwen3-30B-A3B: 95%).
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--precision", default="fp32")
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    paths = prepare(work, args)
    rows = {}
    for checkpointing in (False, True):
        args.gradient_checkpointing = checkpointing
        for method in ("full", "spectrum"):
            report = run(method, paths, work / f"ckpt-{checkpointing}", args)
            rows[method, checkpointing] = (report, planned(paths, method, args, checkpointing))
    full = rows["full", False][0]
    print(
        f"model: {full['all_params'] / 1e6:.1f}M parameters ({args.experts} experts, "
        f"{args.layers} layers), {args.steps} steps of {args.batch}x{args.seq} tokens, "
        f"{args.precision}"
    )
    print(
        f"{'method':10}{'ckpt':>6}{'trainable':>14}{'optimizer MiB':>15}{'opt/full':>10}"
        f"{'peak GiB':>10}{'planned GiB':>13}{'peak/full':>11}{'step s':>9}"
    )
    for (method, checkpointing), (report, plan_gib) in rows.items():
        base = rows["full", checkpointing][0]
        print(
            f"{method:10}{'on' if checkpointing else 'off':>6}{report['trainable_params']:>14,}"
            f"{report['optimizer_state_bytes'] / 2**20:>15.1f}"
            f"{report['optimizer_state_bytes'] / base['optimizer_state_bytes']:>10.3f}"
            f"{report['peak_memory_bytes'] / GIB:>10.2f}{plan_gib:>13.2f}"
            f"{report['peak_memory_bytes'] / base['peak_memory_bytes']:>11.2f}"
            f"{report['median_step_seconds']:>9.3f}"
        )


if __name__ == "__main__":
    sys.exit(main())
