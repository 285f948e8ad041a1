"""Tiny real checkpoints for tests: Qwen3 models from a config, and planted-signal weights."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from spectrum_sm.toy import make_qwen3


def tiny_qwen3(path: Path, **kwargs) -> Path:
    """A tiny random Qwen3 (4 layers, sharded) saved with ``save_pretrained``."""
    return make_qwen3(path, **kwargs)


def planted_checkpoint(path: Path, ranks: dict[str, int], *, n: int = 96, m: int = 64,
                       strength: float = 3.0, seed: int = 0) -> Path:  # fmt: skip
    """A checkpoint whose weights are noise plus a low-rank signal of known rank.

    Higher rank (with the same per-component strength) means more singular values above the
    Marchenko-Pastur edge, hence a higher Spectrum score: the expected ranking is known.
    """
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, rank in ranks.items():
        noise = torch.randn(n, m, generator=gen) / m**0.5
        signal = torch.zeros(n, m)
        for _ in range(rank):
            u = torch.randn(n, 1, generator=gen)
            v = torch.randn(1, m, generator=gen)
            signal += strength * (u / u.norm()) @ (v / v.norm())
        tensors[f"{name}.weight"] = (noise + signal).to(torch.bfloat16)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps({"model_type": "planted"}))
    return path
