"""GPU check for the scan: Qwen3-8B shapes on CUDA, float64 against certified float32.

    python benchmarks/scan_gpu.py            # ~4 GB of weights written to --workdir, < 8 min

Writes 4 random Qwen3-8B layers and both embeddings (bf16), scans them on the GPU with
``--precision float64`` and with the certified default, and prints each time, the weights the
certified scan rechecked in float64, and whether both selected the same modules at 10, 30 and
50%. Exits 1 if they differ. Needs CUDA.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    import torch

    import spectrum_sm
    from benchmarks.scan import EMBEDDING, QWEN3_8B_LAYER

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=str(ROOT / "bench-out" / "gpu"))
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs CUDA")
    model = Path(args.workdir) / "qwen3-8b-layers"
    model.mkdir(parents=True, exist_ok=True)
    if not (model / "model.safetensors").exists():
        from safetensors.torch import save_file

        gen = torch.Generator().manual_seed(0)
        tensors = {
            f"model.layers.{i}.{name}.weight": (torch.randn(*shape, generator=gen) * 0.02).to(
                torch.bfloat16
            )
            for i in range(args.layers)
            for name, shape in QWEN3_8B_LAYER.items()
        }
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            tensors[name] = (torch.randn(*EMBEDDING, generator=gen) * 0.02).to(torch.bfloat16)
        save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})
        del tensors
    print(f"GPU: {torch.cuda.get_device_name()}")
    results = {}
    for precision in ("float64", "certified"):
        torch.cuda.synchronize()
        started = time.perf_counter()
        results[precision] = spectrum_sm.scan(
            model,
            30,
            precision=precision,
            certify_percents=[10, 50],
            device="cuda",
            hash_files=False,
            show_progress=False,
        )
        seconds = time.perf_counter() - started
        per_layer = seconds / args.layers
        print(
            f"{precision:10} {seconds:7.1f} s for {args.layers} layers + embeddings "
            f"(~{per_layer:.1f} s per layer), rechecked in float64: "
            f"{len(results[precision].recomputed)} of {len(results[precision].scores)}"
        )
    same = all(
        results["float64"].selection(p) == results["certified"].selection(p) for p in (10, 30, 50)
    )
    print(f"same selections at 10/30/50%: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
