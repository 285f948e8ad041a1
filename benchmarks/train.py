"""Benchmark: step time, peak memory and optimizer state of spectrum (30%) vs full vs LoRA.

    python benchmarks/train.py              # ~130M-parameter Qwen3 on this CPU, one process each

Each method runs entrypoints/train.py in its own process on the same generated model and data;
the Spectrum layer file comes from our scan of that model. Run it alone (timings are noisy
beside other work). The figures are printed as ratios against full fine-tuning.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def prepare(work: Path, args: argparse.Namespace) -> dict[str, Path]:
    from spectrum_sm.api import scan
    from spectrum_sm.toy import make_qwen3, make_tokenizer, toy_chat_rows

    model = work / "model"
    if not (model / "config.json").exists():
        rows = toy_chat_rows(256)
        make_tokenizer(model, [m["content"] for r in rows for m in r["messages"]] * 4, 512)
        make_qwen3(
            model,
            layers=args.layers,
            hidden=args.hidden,
            intermediate=3 * args.hidden,
            vocab=32000,
            heads=args.hidden // 64,
            kv_heads=4,
            head_dim=64,
            shard_size="500MB",
            dtype="bfloat16",
        )
        (work / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = scan(model, 30, output_dir=work / "snr", show_progress=False)
    return {"model": model, "train": work / "train.jsonl", "layers": result.files["layers"]}


def run(method: str, paths: dict[str, Path], work: Path, args: argparse.Namespace) -> dict:
    out = work / f"out-{method}"
    cmd = [
        sys.executable,
        str(ROOT / "entrypoints" / "train.py"),
        "--model_name_or_path",
        str(paths["model"]),
        "--train_data",
        str(paths["train"]),
        "--spectrum_config",
        str(paths["layers"]),
        "--output_dir",
        str(out),
        "--method",
        method,
        "--max_steps",
        str(args.steps),
        "--packing",
        "true",
        "--max_seq_length",
        str(args.seq),
        "--per_device_train_batch_size",
        str(args.batch),
        "--precision",
        args.precision,
        "--learning_rate",
        "1e-5",
        "--logging_steps",
        "5",
        "--gradient_checkpointing",
        str(args.gradient_checkpointing).lower(),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
    if proc.returncode != 0:
        sys.exit(f"{method} failed:\n{proc.stderr[-3000:]}")
    return json.loads((out / "training_report.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=str(ROOT / "bench-out" / "train"))
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    paths = prepare(work, args)
    reports = {m: run(m, paths, work, args) for m in ("full", "spectrum", "lora")}
    full = reports["full"]
    gib = 1024**3
    print(
        f"model: {full['all_params'] / 1e6:.1f}M parameters, {args.steps} steps of "
        f"{args.batch}x{args.seq} tokens, {args.precision}"
    )
    print(
        f"{'method':10}{'trainable':>14}{'optimizer MiB':>15}{'step s':>9}{'peak GiB':>10}"
        f"{'step/full':>11}{'peak/full':>11}"
    )
    for method, r in reports.items():
        print(
            f"{method:10}{r['trainable_params']:>14,}{r['optimizer_state_bytes'] / 2**20:>15.1f}"
            f"{r['median_step_seconds']:>9.3f}{r['peak_memory_bytes'] / gib:>10.2f}"
            f"{r['median_step_seconds'] / full['median_step_seconds']:>11.2f}"
            f"{r['peak_memory_bytes'] / full['peak_memory_bytes']:>11.2f}"
        )
    print(
        "optimizer state bytes (exact): "
        + ", ".join(f"{m} {r['optimizer_state_bytes']:,}" for m, r in reports.items())
    )


if __name__ == "__main__":
    main()
