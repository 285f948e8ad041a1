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


CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def make_tokenizer(path: str | Path, texts: list[str], vocab_size: int = 512) -> Path:
    """Train a small byte-level BPE tokenizer on ``texts`` and save it with a ChatML template.

    Byte-level, so any text encodes; ``vocab_size`` must not exceed the toy model's vocabulary.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHAT_TEMPLATE,
    )
    fast.save_pretrained(Path(path))
    return Path(path)


def toy_chat_rows(count: int = 64, seed: int = 0) -> list[dict]:
    """A learnable chat set: questions about small sums, answered with the result."""
    import random

    rng = random.Random(seed)
    return [
        {
            "messages": [
                {"role": "system", "content": "You add numbers."},
                {"role": "user", "content": f"What is {a} plus {b}?"},
                {"role": "assistant", "content": f"{a} plus {b} is {a + b}."},
            ]
        }
        for a, b in ((rng.randint(1, 9), rng.randint(1, 9)) for _ in range(count))
    ]


def make_toy_training_setup(
    directory: str | Path,
    *,
    layers: int = 2,
    rows: int = 64,
    seed: int = 0,
    validation_rows: int = 16,
) -> dict[str, Path]:
    """A tiny Qwen3 with its own tokenizer, a chat training file and a held-out validation file
    (other sums' rows, from another seed), all in ``directory``."""
    import json

    directory = Path(directory)
    data = toy_chat_rows(rows, seed)
    texts = [m["content"] for r in data for m in r["messages"]]
    model_dir = directory / "model"
    make_tokenizer(model_dir, texts * 4, vocab_size=320)
    make_qwen3(model_dir, layers=layers, intermediate=128, vocab=320, seed=seed, shard_size=None)
    paths = {"model": model_dir}
    for kind, chats in (("train", data), ("validation", toy_chat_rows(validation_rows, seed + 1))):
        paths[kind] = directory / f"{kind}.jsonl"
        paths[kind].write_text("".join(json.dumps(r) + "\n" for r in chats))
    return paths
