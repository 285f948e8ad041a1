"""Benchmark: our streaming scan vs the reference-style loop, each in a fresh process.

    python benchmarks/scan.py                      # ~0.3B sharded Qwen3, whole processes
    python benchmarks/scan.py --qwen3-8b-layer     # Qwen3-8B shapes, extrapolated to 36 layers

Run it alone: MKL's SVD slows 10-50x beside another busy process. It prints wall time and peak
RSS of both runs and the ratios, and checks that both selected the same layers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GIB = 1024**3

REFERENCE_RUN = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, {tests!r})
    from reference_spectrum import reference_scan, reference_select
    results = reference_scan({model!r})
    json.dump(reference_select(results, {percent}), open({out!r}, "w"))
    """
)


def run_with_rss(cmd: list[str], env: dict | None = None) -> tuple[float, float, str]:
    """Like run_measured, but reads the child's own peak RSS with os.wait4."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env={**os.environ, **(env or {})})
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            sys.exit(f"command failed: {' '.join(cmd)}\n{err.read()[-3000:]}")
        return wall, usage.ru_maxrss * 1024 / GIB, out.read()


def build_model(path: Path, size: str) -> Path:
    if (path / "config.json").exists():
        return path
    from spectrum_sm.toy import make_qwen3

    shapes = {
        # ~0.30B parameters: 20 layers of hidden 1024 plus a 32k vocabulary.
        "0.3b": dict(
            layers=20,
            hidden=1024,
            intermediate=3072,
            vocab=32000,
            heads=8,
            kv_heads=2,
            head_dim=128,
            shard_size="200MB",
        ),
        "tiny": dict(layers=4, hidden=128, intermediate=384, vocab=2048, shard_size="1MB"),
    }[size]
    print(f"building a {size} Qwen3 checkpoint in {path} ...", flush=True)
    make_qwen3(path, **shapes)
    return path


def whole_model(args: argparse.Namespace) -> None:
    work = Path(args.workdir)
    model = build_model(work / f"qwen3-{args.size}", args.size)
    index = json.loads((model / "model.safetensors.index.json").read_text())
    params = index["metadata"]["total_size"] / 2  # bytes of bf16
    print(f"model: {model} ({params / 1e9:.3f}B parameters)")
    out = work / "ours"
    ours_cmd = [
        sys.executable,
        "-m",
        "spectrum_sm.cli",
        "-q",
        "scan",
        str(model),
        "--top-percent",
        str(args.percent),
        "--output-dir",
        str(out),
        "--json",
    ]
    ref_sel = work / "reference_selection.json"
    ref_cmd = [
        sys.executable,
        "-c",
        REFERENCE_RUN.format(
            tests=str(ROOT / "tests"), model=str(model), percent=args.percent, out=str(ref_sel)
        ),
    ]
    ours_wall, ours_rss, summary = run_with_rss(ours_cmd)
    ref_wall, ref_rss, _ = run_with_rss(ref_cmd)
    layer_file = json.loads(summary.strip().splitlines()[-1])["files"]["results"]
    from spectrum_sm.core.selection import load_results, select_layers

    ours = select_layers(load_results(layer_file), args.percent)
    ref = json.loads(ref_sel.read_text())
    same = {k: sorted(v) for k, v in ours.items() if v} == {
        k: sorted(v) for k, v in ref.items() if v
    }
    print(f"{'':24}{'wall s':>10}{'peak RSS GiB':>14}")
    print(f"{'spectrum-sm scan':24}{ours_wall:10.1f}{ours_rss:14.2f}")
    print(f"{'reference-style loop':24}{ref_wall:10.1f}{ref_rss:14.2f}")
    print(
        f"speed-up: {ref_wall / ours_wall:.2f}x   memory ratio (ours/ref): {ours_rss / ref_rss:.2f}"
    )
    print(f"same selection at {args.percent}%: {same}")
    if not same:
        sys.exit(1)


QWEN3_8B_LAYER = {
    "self_attn.q_proj": (4096, 4096),
    "self_attn.k_proj": (1024, 4096),
    "self_attn.v_proj": (1024, 4096),
    "self_attn.o_proj": (4096, 4096),
    "mlp.gate_proj": (12288, 4096),
    "mlp.up_proj": (12288, 4096),
    "mlp.down_proj": (4096, 12288),
}
EMBEDDING = (151936, 4096)

REFERENCE_TIMING = textwrap.dedent(
    """
    import json, sys, time, torch
    torch.manual_seed(0)
    shapes = json.loads(sys.argv[1])
    times = {}
    for name, (n, m) in shapes.items():
        w = (torch.randn(n, m) * 0.02).to(torch.bfloat16).float()  # the reference loads fp32
        start = time.perf_counter()
        torch.linalg.svdvals(w)  # as the reference calls it, wide matrices included
        times[name] = time.perf_counter() - start
        del w
    print(json.dumps(times))
    """
)


def qwen3_8b_layer(args: argparse.Namespace) -> None:
    import torch
    from safetensors.torch import save_file

    work = Path(args.workdir) / "qwen3-8b-layer"
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "model.safetensors").exists():
        print("writing one Qwen3-8B layer plus both embeddings (bf16, ~3.4 GB) ...", flush=True)
        gen = torch.Generator().manual_seed(0)
        tensors = {
            f"model.layers.0.{name}.weight": (torch.randn(*shape, generator=gen) * 0.02).to(
                torch.bfloat16
            )
            for name, shape in QWEN3_8B_LAYER.items()
        }
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            tensors[name] = (torch.randn(*EMBEDDING, generator=gen) * 0.02).to(torch.bfloat16)
        save_file(tensors, str(work / "model.safetensors"), metadata={"format": "pt"})
        del tensors
    out = work / "out"
    ours_cmd = [
        sys.executable,
        "-m",
        "spectrum_sm.cli",
        "-q",
        "scan",
        str(work),
        "--top-percent",
        "30",
        "--output-dir",
        str(out),
        "--no-hash",
        "--json",
        "--device",
        args.device,
    ]
    wall, rss, _ = run_with_rss(ours_cmd)
    manifest = json.loads((out / "scan_manifest_qwen3-8b-layer.json").read_text())
    seconds = {
        m.split(".", 3)[-1] if m.startswith("model.layers.") else m: t["seconds"]
        for m, t in manifest["tensors"].items()
    }
    layer = sum(seconds[name] for name in QWEN3_8B_LAYER)
    embeds = seconds["model.embed_tokens"] + seconds["lm_head"]
    overhead = wall - sum(seconds.values())
    ours_total = 36 * layer + embeds + overhead
    print(
        f"ours ({manifest['device']}): one layer {layer:.1f} s, embeddings {embeds:.1f} s, "
        f"process overhead {overhead:.1f} s, peak RSS {rss:.2f} GiB"
    )
    print(f"ours, whole Qwen3-8B (36 layers + embeddings): {ours_total / 60:.1f} min")
    if args.skip_reference:
        return
    shapes = {**QWEN3_8B_LAYER, "model.embed_tokens": EMBEDDING}
    _, _, ref_out = run_with_rss([sys.executable, "-c", REFERENCE_TIMING, json.dumps(shapes)])
    ref = json.loads(ref_out)
    ref_layer = sum(ref[name] for name in QWEN3_8B_LAYER)
    ref_total = 36 * ref_layer + 2 * ref["model.embed_tokens"]
    print(
        f"reference svdvals (float32): one layer {ref_layer:.1f} s, "
        f"each embedding {ref['model.embed_tokens']:.1f} s"
    )
    print(
        f"reference, whole Qwen3-8B: {ref_total / 60:.1f} min of SVD alone; loading the model "
        f"in float32 needs {8.19e9 * 4 / GIB:.1f} GiB"
    )
    print(f"speed-up: {ref_total / ours_total:.2f}x")
    for name in QWEN3_8B_LAYER:
        print(f"  {name:18} ours {seconds[name]:6.2f} s   reference {ref[name]:6.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=str(ROOT / "bench-out"))
    parser.add_argument("--size", default="0.3b", choices=["0.3b", "tiny"])
    parser.add_argument("--percent", type=float, default=30)
    parser.add_argument("--qwen3-8b-layer", action="store_true")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--skip-reference", action="store_true")
    args = parser.parse_args()
    if args.qwen3_8b_layer:
        qwen3_8b_layer(args)
    else:
        whole_model(args)


if __name__ == "__main__":
    main()
