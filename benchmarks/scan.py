"""Benchmark: our streaming scan vs the reference-style loop, each in a fresh process.

    python benchmarks/scan.py                      # ~0.3B sharded Qwen3, whole processes
    python benchmarks/scan.py --qwen3-8b-layer     # Qwen3-8B shapes, extrapolated to 36 layers

Run it alone: MKL's SVD slows 10-50x beside another busy process. It prints wall time and peak
RSS of the runs and the ratios, how many weights the certified scan rechecked in float64, and
checks that the certified scan, the float64 scan and the reference selected the same layers.
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


def run_with_rss(cmd: list[str]) -> tuple[float, float, str]:
    """Run ``[python, -m/-c, ...]`` under _peak.py: wall seconds, peak RSS (GiB), stdout."""
    with tempfile.NamedTemporaryFile("r", suffix=".peak") as peak:
        wrapped = [cmd[0], str(ROOT / "benchmarks" / "_peak.py"), *cmd[1:]]
        start = time.perf_counter()
        proc = subprocess.run(
            wrapped, capture_output=True, text=True, env={**os.environ, "PEAK_RSS_FILE": peak.name}
        )
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            sys.exit(f"command failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
        return wall, int(peak.read()) * 1024 / GIB, proc.stdout


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


def _ours(model: Path, out: Path, percent: float, *extra: str) -> tuple[float, float, dict]:
    cmd = [
        sys.executable,
        "-m",
        "spectrum_sm.cli",
        "-q",
        "scan",
        str(model),
        "--top-percent",
        str(percent),
        "--output-dir",
        str(out),
        "--json",
        *extra,
    ]
    wall, rss, summary = run_with_rss(cmd)
    return wall, rss, json.loads(summary.strip().splitlines()[-1])


def whole_model(args: argparse.Namespace) -> None:
    work = Path(args.workdir)
    model = build_model(work / f"qwen3-{args.size}", args.size)
    index = json.loads((model / "model.safetensors.index.json").read_text())
    params = index["metadata"]["total_size"] / 2  # bytes of bf16
    print(f"model: {model} ({params / 1e9:.3f}B parameters)")
    ref_sel = work / "reference_selection.json"
    ref_cmd = [
        sys.executable,
        "-c",
        REFERENCE_RUN.format(
            tests=str(ROOT / "tests"), model=str(model), percent=args.percent, out=str(ref_sel)
        ),
    ]
    ours_wall, ours_rss, summary = _ours(model, work / "ours", args.percent)
    f64_wall, f64_rss, f64_summary = _ours(
        model, work / "ours-float64", args.percent, "--precision", "float64"
    )
    ref_wall, ref_rss, _ = run_with_rss(ref_cmd)
    from spectrum_sm.core.selection import load_results, select_layers

    def selection(result_summary):
        chosen = select_layers(load_results(result_summary["files"]["results"]), args.percent)
        return {k: sorted(v) for k, v in chosen.items() if v}

    ours, f64 = selection(summary), selection(f64_summary)
    ref = {k: sorted(v) for k, v in json.loads(ref_sel.read_text()).items() if v}
    print(f"{'':28}{'wall s':>10}{'peak RSS GiB':>14}")
    print(f"{'spectrum-sm scan':28}{ours_wall:10.1f}{ours_rss:14.2f}")
    print(f"{'spectrum-sm scan, float64':28}{f64_wall:10.1f}{f64_rss:14.2f}")
    print(f"{'reference-style loop':28}{ref_wall:10.1f}{ref_rss:14.2f}")
    print(
        f"speed-up: {ref_wall / ours_wall:.2f}x (float64 scan: {ref_wall / f64_wall:.2f}x)   "
        f"memory ratio (ours/ref): {ours_rss / ref_rss:.2f}"
    )
    print(
        f"rechecked in float64: {summary['recomputed_in_float64']} of "
        f"{summary['weights_scanned']} weights"
    )
    same = ours == f64 == ref
    print(f"same selection at {args.percent}% (certified, float64, reference): {same}")
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

    layers = 4  # enough for both BLAS workers to stay busy, as in a 36-layer run
    work = Path(args.workdir) / "qwen3-8b-layers"
    work.mkdir(parents=True, exist_ok=True)
    if not (work / "model.safetensors").exists():
        print(f"writing {layers} Qwen3-8B layers plus both embeddings (bf16, ~4.1 GB) ...")
        gen = torch.Generator().manual_seed(0)
        tensors = {
            f"model.layers.{i}.{name}.weight": (torch.randn(*shape, generator=gen) * 0.02).to(
                torch.bfloat16
            )
            for i in range(layers)
            for name, shape in QWEN3_8B_LAYER.items()
        }
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            tensors[name] = (torch.randn(*EMBEDDING, generator=gen) * 0.02).to(torch.bfloat16)
        save_file(tensors, str(work / "model.safetensors"), metadata={"format": "pt"})
        del tensors

    def ours(include: str) -> tuple[float, float, float]:
        out = work / f"out-{args.precision}-{include.replace('*', '').replace(',', '-')}"
        cmd = [
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
            "--device",
            args.device,
            "--precision",
            args.precision,
            "--include",
            include,
        ]
        wall, rss, _ = run_with_rss(cmd)
        manifest = json.loads((out / "scan_manifest_qwen3-8b-layers.json").read_text())
        rechecked.extend(manifest["recomputed_in_float64"])
        return wall, manifest["seconds"], rss

    rechecked: list[str] = []

    wall_l, scan_l, rss_l = ours("self_attn.*_proj,mlp.*")
    _, scan_e, rss_e = ours("lm_head,model.embed_tokens")
    overhead = wall_l - scan_l
    ours_total = 36 / layers * scan_l + scan_e + overhead
    print(
        f"ours ({args.device}, {args.precision}): {layers} layers {scan_l:.1f} s "
        f"({scan_l / layers:.1f} s/layer), embeddings {scan_e:.1f} s, process overhead "
        f"{overhead:.1f} s, peak RSS {max(rss_l, rss_e):.2f} GiB, "
        f"{len(rechecked)} of {layers * 7 + 2} weights rechecked in float64"
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=str(ROOT / "bench-out"))
    parser.add_argument("--size", default="0.3b", choices=["0.3b", "tiny"])
    parser.add_argument("--percent", type=float, default=30)
    parser.add_argument("--qwen3-8b-layer", action="store_true")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="certified", choices=["certified", "float64"])
    parser.add_argument("--skip-reference", action="store_true")
    args = parser.parse_args()
    if args.qwen3_8b_layer:
        qwen3_8b_layer(args)
    else:
        whole_model(args)


if __name__ == "__main__":
    main()
