"""Small, real models built on this machine (no Hub): for the quickstart, tests and benchmarks."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def make_qwen3(
    path: str | Path,
    *,
    layers: int = 4,
    hidden: int = 64,
    intermediate: int = 160,
    vocab: int = 256,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int = 16,
    tie: bool = False,
    shard_size: str | None = "200KB",
    seed: int = 0,
    dtype: str = "bfloat16",
    **config_overrides: Any,
) -> Path:
    """Save a randomly initialised Qwen3 causal LM with ``save_pretrained`` and return its folder.

    Norm weights are drawn from U(0.5, 1.5) instead of the constant 1.0 of a fresh model, so
    1-D weights do not all tie. ``shard_size`` (e.g. ``"200KB"``) gives a sharded checkpoint with
    ``model.safetensors.index.json``; ``None`` gives one ``model.safetensors``.
    """
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        max_position_embeddings=512,
        tie_word_embeddings=tie,
        **config_overrides,
    )
    model = Qwen3ForCausalLM(config).to(getattr(torch, dtype))
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1:
                param.uniform_(0.5, 1.5)
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(Path(path), **kwargs)
    return Path(path)
