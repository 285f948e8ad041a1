"""Tiny real checkpoints for tests: Qwen3 models from a config, and planted-signal weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from spectrum_sm.toy import make_qwen3


def tiny_qwen3(path: Path, **kwargs) -> Path:
    """A tiny random Qwen3 (4 layers, sharded) saved with ``save_pretrained``."""
    return make_qwen3(path, **kwargs)


def planted_checkpoint(
    path: Path, ranks: dict[str, int], *, size: int = 128, strength: float = 8.0, seed: int = 0
) -> Path:
    """A checkpoint whose square weights are noise plus ``rank`` orthogonal signal components.

    The noise's singular values fill [0, 2]; each component adds one singular value of
    ``strength``. With the top singular value pinned at ``strength``, the score grows with the
    rank (see ``test_snr.test_planted_rank_orders_scores``), so the expected ranking is known.
    """
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, rank in ranks.items():
        noise = torch.randn(size, size, generator=gen) / size**0.5
        u, _ = torch.linalg.qr(torch.randn(size, rank, generator=gen))
        v, _ = torch.linalg.qr(torch.randn(size, rank, generator=gen))
        tensors[f"{name}.weight"] = (noise + strength * u @ v.T).to(torch.bfloat16)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps({"model_type": "planted"}))
    return path


def run_cli(*args: str, env: dict | None = None, cwd: Path | None = None):
    """Run ``spectrum-sm`` in a real subprocess; returns the CompletedProcess."""
    return subprocess.run(
        [sys.executable, "-m", "spectrum_sm.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=cwd,
        timeout=600,
    )
