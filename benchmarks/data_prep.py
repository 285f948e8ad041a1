"""Benchmark: preparing a 200k-row chat dataset for training with 2 processes, before and after
the `datasets` data layer.

    python benchmarks/data_prep.py               # 200k rows (and 50k, to show memory is flat)
    python benchmarks/data_prep.py --rows 20000  # quicker

Both run under torchrun with 2 processes on the same multi-turn chat jsonl and tokenizer:
* before (``benchmarks/baseline_data.py``, the previous loader): every rank reads all rows into
  Python lists and tokenizes all of them, rendering prefixes to find the assistant turns;
* after (``spectrum_sm.training.data``): rank 0 tokenizes once into a cached Arrow file, rank 1
  waits and memory-maps it (as the recipe does per host).
Per rank: wall time of data preparation, peak RSS and its growth over the RSS after imports.
Run it alone: the machine has 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def worker(mode: str, data: str, tokenizer_dir: str, max_length: int, out: str) -> None:
    import torch.distributed as td
    from transformers import AutoTokenizer

    sys.path[:0] = [str(ROOT), str(HERE)]
    import baseline_data as old

    from spectrum_sm.training import data as new

    td.init_process_group("gloo")
    rank = td.get_rank()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    td.barrier()
    base = _status("VmRSS")
    start = time.perf_counter()
    if mode == "before":
        examples = old.build_examples(old.load_rows(data), tokenizer, max_length)
        count = len(examples)
    else:

        def work():
            return new.prepare_split(
                new.load_split(data),
                tokenizer,
                new.DataOptions(max_length),
                num_proc=new.default_num_proc(),  # as the recipe does
            )

        if rank == 0:
            examples, _ = work()
            td.barrier()
        else:
            td.barrier()
            examples, _ = work()
        count = len(examples)
        assert examples[count - 1].input_ids  # readable to the end
    seconds = time.perf_counter() - start
    result = {"rank": rank, "seconds": seconds, "peak": _status("VmHWM"), "base": base}
    result["examples"] = count
    Path(f"{out}.{rank}").write_text(json.dumps(result))
    td.barrier()
    td.destroy_process_group()


def make_data(path: Path, rows: int) -> None:
    import random

    rng = random.Random(0)
    with path.open("w") as handle:
        for _ in range(rows):
            a, b, c = rng.randint(1, 99), rng.randint(1, 99), rng.randint(1, 99)
            messages = [
                {"role": "system", "content": "You add numbers and explain briefly."},
                {"role": "user", "content": f"What is {a} plus {b}?"},
                {"role": "assistant", "content": f"{a} plus {b} is {a + b}, by adding."},
                {"role": "user", "content": f"And if I add {c} more?"},
                {"role": "assistant", "content": f"Then it is {a + b + c}."},
            ]
            handle.write(json.dumps({"messages": messages}) + "\n")


def run(mode: str, data: Path, tokenizer: Path, scratch: Path, max_length: int) -> list[dict]:
    out = scratch / f"{mode}-{data.stem}"
    env = {
        **os.environ,
        "HF_DATASETS_CACHE": str(scratch / f"cache-{mode}-{data.stem}"),  # a cold cache
        "OMP_NUM_THREADS": "1",
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port=29611",
        __file__,
        "--worker",
        mode,
        str(data),
        str(tokenizer),
        str(max_length),
        str(out),
    ]
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, capture_output=True, text=True)
    return [json.loads(Path(f"{out}.{rank}").read_text()) for rank in (0, 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--max-seq-length", type=int, default=256)
    parser.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        mode, data, tokenizer, max_length, out = args.worker
        worker(mode, data, tokenizer, int(max_length), out)
        return
    sys.path.insert(0, str(ROOT))
    from spectrum_sm.toy import make_tokenizer

    scratch = Path(tempfile.mkdtemp(prefix="spectrum-data-bench-"))
    tokenizer = make_tokenizer(
        scratch / "tokenizer", ["What is 12 plus 34? 12 plus 34 is 46, by adding."] * 50, 320
    )
    sizes = sorted({args.rows // 4, args.rows})
    rows = []
    for size in sizes:
        data = scratch / f"chat-{size}.jsonl"
        make_data(data, size)
        for mode in ("before", "after"):
            for r in run(mode, data, tokenizer, scratch, args.max_seq_length):
                rows.append({"rows": size, "mode": mode, **r})
                print(
                    f"{size:>7} rows  {mode:6}  rank {r['rank']}: {r['seconds']:7.1f} s  "
                    f"peak RSS {r['peak'] / 2**20:7.0f} MiB  growth "
                    f"{(r['peak'] - r['base']) / 2**20:7.0f} MiB  ({r['examples']} examples)",
                    flush=True,
                )
    big = [r for r in rows if r["rows"] == sizes[-1]]

    def pick(mode, rank):
        return next(r for r in big if r["mode"] == mode and r["rank"] == rank)

    wall = {m: max(pick(m, k)["seconds"] for k in (0, 1)) for m in ("before", "after")}
    print(f"\n{sizes[-1]} rows, 2 processes (ratios after / before, one run):")
    print(f"  wall time of data preparation: {wall['after'] / wall['before']:.2f}")
    for rank in (0, 1):
        growth = {m: pick(m, rank)["peak"] - pick(m, rank)["base"] for m in ("before", "after")}
        print(f"  rank {rank} RSS growth: {growth['after'] / max(growth['before'], 1):.2f}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
