"""Freezing: exactly the named parameters train; axolotl-compatible patterns; clear errors."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from spectrum_sm.core.errors import SpectrumError
from spectrum_sm.core.freeze import compile_entry, freeze_except, read_layer_file


def tiny_qwen3_model(tie: bool = False, layers: int = 4):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        tie_word_embeddings=tie,
    )
    return Qwen3ForCausalLM(config)


class Layered(nn.Module):
    """``model.layers.0..11.proj`` plus ``lm_head``: enough layers to tell 1 from 10."""

    def __init__(self, prefix_module: bool = False) -> None:
        super().__init__()
        inner = nn.Module()
        inner.layers = nn.ModuleList(nn.Linear(3, 3) for _ in range(12))
        if prefix_module:
            outer = nn.Module()
            outer.language_model = inner
            self.model = outer
        else:
            self.model = inner
        self.lm_head = nn.Linear(3, 5, bias=False)


def trainable(model):
    return sorted(n for n, p in model.named_parameters() if p.requires_grad)


def test_module_entries_unfreeze_weight_and_bias_and_respect_layer_boundaries():
    model = Layered()
    report = freeze_except(model, ["model.layers.1", "model.layers.3.", "^lm_head.weight$"])
    assert trainable(model) == [
        "lm_head.weight",
        "model.layers.1.bias",
        "model.layers.1.weight",
        "model.layers.3.bias",
        "model.layers.3.weight",
    ]
    assert report.trainable_params == 15 + 2 * 12
    assert report.all_params == 12 * 12 + 15


@pytest.mark.parametrize(
    ("entry", "name", "matches"),
    [
        ("model.layers.1.", "model.layers.10.weight", False),
        ("model.layers.1.", "model.layers.1.weight", True),
        ("model.layers.1", "model.layers.10.weight", False),
        ("^lm_head.weight$", "lm_head.weight", True),
        ("^lm_head.weight$", "lm_head.weight2", False),
        ("lm_head.weight", "lm_headXweight", False),  # the dot is literal
        ("model.layers.+.mlp", "model.layers.7.mlp.up.weight", True),  # '.+' stays a regex
        ("model.layers.3.mlp.down_proj", "model.layers.3.mlp.down_proj.weight", True),
        ("model.layers.3.mlp.down_proj", "model.layers.3.mlp.down_proj_x.weight", False),
    ],
)
def test_pattern_semantics(entry, name, matches):
    assert bool(compile_entry(entry).match(name)) is matches


def test_qwen3_layer_file_trains_exactly_the_selected_tensors(tmp_path):
    model = tiny_qwen3_model()
    layer_file = tmp_path / "snr_results_x_unfrozenparameters_30percent.yaml"
    layer_file.write_text(
        "unfrozen_parameters:\n- ^lm_head.weight$\n- ^model.embed_tokens.weight$\n"
        "# mlp.down_proj layers\n- model.layers.2.mlp.down_proj\n"
        "# input_layernorm layers\n- model.layers.0.input_layernorm\n"
    )
    report = freeze_except(model, layer_file)
    assert trainable(model) == [
        "lm_head.weight",
        "model.embed_tokens.weight",
        "model.layers.0.input_layernorm.weight",
        "model.layers.2.mlp.down_proj.weight",
    ]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 128, (2, 12))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    changed = sorted(n for n, p in model.named_parameters() if not torch.equal(p, before[n]))
    assert changed == sorted(report.trainable)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_unmatched_entries_are_an_error_naming_them_and_close_names():
    model = tiny_qwen3_model()
    with pytest.raises(SpectrumError) as info:
        freeze_except(
            model,
            [
                "model.layers.1.mlp.down_proj",
                "model.layers.9.mlp.down_prj",
                "^transformer.wte.weight$",
            ],
        )
    message = str(info.value)
    assert "'model.layers.9.mlp.down_prj'" in message
    assert "'^transformer.wte.weight$'" in message
    assert "model.layers.1.mlp.down_proj'" not in message.split("closest")[0]
    assert "closest: model.layers." in message
    assert all(p.requires_grad for p in model.parameters())  # nothing changed on error


def test_name_prefix_for_nested_language_models():
    model = Layered(prefix_module=True)
    with pytest.raises(SpectrumError, match=r"name_prefix='model\.language_model\.'"):
        freeze_except(model, ["model.layers.2"])
    freeze_except(
        model, ["model.layers.2", "^lm_head.weight$"], name_prefix="model.language_model."
    )
    assert trainable(model) == [
        "lm_head.weight",
        "model.language_model.layers.2.bias",
        "model.language_model.layers.2.weight",
    ]


def test_tied_lm_head_is_reported_and_counted_once(caplog):
    model = tiny_qwen3_model(tie=True)
    with caplog.at_level(logging.INFO, logger="spectrum_sm"):
        report = freeze_except(model, ["^lm_head.weight$"])
    assert report.tied == ["lm_head.weight is tied to model.embed_tokens.weight"]
    assert report.trainable == ["model.embed_tokens.weight"]
    assert report.trainable_params == 128 * 32
    assert any("tied" in r.getMessage() for r in caplog.records)
    line = next(r.getMessage() for r in caplog.records if "trainable params" in r.getMessage())
    total = sum(p.numel() for p in model.parameters())
    assert line == (
        f"trainable params: {128 * 32:,} || all params: {total:,} "
        f"|| trainable%: {100 * 128 * 32 / total:.4f}"
    )


def test_read_layer_file_formats(tmp_path):
    (tmp_path / "a.yaml").write_text("unfrozen_parameters:\n- ^lm_head.weight$\n# c\n- model.x\n")
    assert read_layer_file(tmp_path / "a.yaml") == ["^lm_head.weight$", "model.x"]
    (tmp_path / "b.yaml").write_text("- model.a\n- model.b\n")
    assert read_layer_file(tmp_path / "b.yaml") == ["model.a", "model.b"]
    (tmp_path / "c.txt").write_text("model.a\n# skip\n\nmodel.b\n")
    assert read_layer_file(tmp_path / "c.txt") == ["model.a", "model.b"]
    folder = tmp_path / "channel"
    folder.mkdir()
    (folder / "snr_results_m.json").write_text("{}")
    (folder / "snr_results_m_unfrozenparameters_30percent.yaml").write_text("- model.a\n")
    assert read_layer_file(folder) == ["model.a"]
    with pytest.raises(SpectrumError, match="does not exist"):
        read_layer_file(tmp_path / "missing.yaml")
    (tmp_path / "empty.yaml").write_text("unfrozen_parameters: []\n")
    with pytest.raises(SpectrumError, match="names no parameters"):
        read_layer_file(tmp_path / "empty.yaml")
    (tmp_path / "bad.yaml").write_text("unfrozen_parameters: [a\n")
    with pytest.raises(SpectrumError, match="not valid YAML"):
        read_layer_file(tmp_path / "bad.yaml")


def test_reference_selection_on_qwen3_8b_counts_exactly():
    """Qwen3-8B on the meta device (no memory): the reference's 30% selection with both
    embedding entries trains 3,174,124,032 of 8,190,735,360 parameters."""
    import sys
    from pathlib import Path

    from transformers import Qwen3Config, Qwen3ForCausalLM

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from train_gpu import QWEN3_8B, spectrum_entries

    with torch.device("meta"):
        model = Qwen3ForCausalLM(Qwen3Config(**QWEN3_8B))
    report = freeze_except(model, spectrum_entries())
    assert report.all_params == 8_190_735_360
    assert report.trainable_params == 3_174_124_032
