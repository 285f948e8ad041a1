"""Tiny real checkpoints of the model families the scan must handle, built from configs.

Each is saved with ``save_pretrained`` (so in the checkpoint naming transformers writes, fused
experts split back into per-expert tensors), with a small tokenizer and chat data beside it, so
the same folder is scanned, scored by the reference loop and trained by ``train.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from spectrum_sm.toy import make_tokenizer, toy_chat_rows

VOCAB = 320
TEXT = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def _configs():
    import transformers as T

    return {
        "qwen3-dense": lambda: T.Qwen3Config(**TEXT, head_dim=16),
        "qwen3-tied": lambda: T.Qwen3Config(**TEXT, head_dim=16, tie_word_embeddings=True),
        "llama-zero-norm": lambda: T.LlamaConfig(**TEXT),
        "gpt-neox": lambda: T.GPTNeoXConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
        ),
        "qwen3-moe": lambda: T.Qwen3MoeConfig(
            **TEXT, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32
        ),
        "mixtral": lambda: T.MixtralConfig(**TEXT, num_local_experts=4, num_experts_per_tok=2),
        # Experts stored fused and 3-D (gate and up interleaved), with biases; widths divide by
        # 32, MXFP4's block, so tests can quantize it (tests/test_mxfp4.py).
        "gpt-oss": lambda: T.GptOssConfig(
            **{**TEXT, "intermediate_size": 64},
            head_dim=16,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=16,
        ),
        "qwen2.5-vl": lambda: T.Qwen2_5_VLConfig(
            text_config=dict(**TEXT, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]}),
            vision_config=dict(
                depth=2,
                hidden_size=32,
                intermediate_size=64,
                num_heads=2,
                out_hidden_size=64,
                fullatt_block_indexes=[1],
            ),
            bos_token_id=0,
            eos_token_id=2,
        ),
        "qwen3-vl": lambda: T.Qwen3VLConfig(
            text_config=dict(
                **TEXT,
                head_dim=16,
                rope_scaling={
                    "rope_type": "default",
                    "mrope_section": [2, 3, 3],
                    "mrope_interleaved": True,
                },
            ),
            vision_config=dict(
                depth=2,
                hidden_size=32,
                intermediate_size=64,
                num_heads=2,
                out_hidden_size=64,
                deepstack_visual_indexes=[1],
            ),
        ),
        "llama3.2-vision": lambda: T.MllamaConfig(
            text_config=dict(
                **{**TEXT, "vocab_size": VOCAB + 8},  # Mllama adds image tokens after the vocab
                cross_attention_layers=[1],
                pad_token_id=0,
                bos_token_id=0,
                eos_token_id=2,
            ),
            vision_config=dict(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_global_layers=1,
                attention_heads=2,
                image_size=28,
                patch_size=14,
                vision_output_dim=64,
                intermediate_layers_indices=[0],
            ),
        ),
        "gemma3-vl": lambda: T.Gemma3Config(
            text_config=dict(**TEXT, head_dim=16),
            vision_config=dict(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                image_size=28,
                patch_size=14,
            ),
            mm_tokens_per_image=4,
            boi_token_index=1,
            eoi_token_index=2,
            image_token_index=3,
        ),
    }


FAMILIES = list(_configs())
MULTIMODAL = {"qwen2.5-vl", "qwen3-vl", "llama3.2-vision", "gemma3-vl"}
MOE = {"qwen3-moe", "mixtral", "gpt-oss"}
#: Families whose checkpoints store experts fused (one 3-D tensor per layer and projection).
FUSED_EXPERTS = {"gpt-oss"}


def make_family(name: str, path: Path, seed: int = 0) -> dict[str, Path]:
    """``{"model", "train"}`` for family ``name`` under ``path``."""
    from spectrum_sm.core.names import model_class_for

    torch.manual_seed(seed)
    config = _configs()[name]()
    model = model_class_for(config).from_config(config).to(torch.bfloat16)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1:
                param.uniform_(0.5, 1.5)  # fresh norms are all 1.0: every 1-D weight would tie
            else:
                param.normal_(0.0, 0.05)
        if name == "llama-zero-norm":
            # Gemma-style zero-initialised norm: the reference scores it +inf.
            model.model.layers[2].post_attention_layernorm.weight.zero_()
    model_dir = path / "model"
    model.save_pretrained(model_dir)
    rows = toy_chat_rows(48, seed)
    texts = [m["content"] for r in rows for m in r["messages"]]
    make_tokenizer(model_dir, texts * 4, vocab_size=VOCAB)
    data = path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"model": model_dir, "train": data}


def make_scanned_family(name: str, path: Path, percent: float = 30):
    """:func:`make_family` and the real scan of it at ``percent``: ``(paths, result)``, with
    ``paths["layers"]`` the scan's layer file (the ``setup`` shape of test_train's helpers)."""
    import spectrum_sm

    paths = make_family(name, path)
    result = spectrum_sm.scan(
        paths["model"], percent, output_dir=path / "scan", show_progress=False
    )
    return {**paths, "layers": result.files["layers"]}, result
