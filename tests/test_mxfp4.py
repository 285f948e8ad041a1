"""gpt-oss in MXFP4, end to end: our dequantization against transformers' own, the scan of an
MXFP4 checkpoint against the scan of the same values stored in bf16, and training's load of it
(dequantized, trainable, the slices the layer file names)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from families import make_family
from safetensors.torch import load_file, save_file

import spectrum_sm
from spectrum_sm.core import mxfp4

pytestmark = pytest.mark.integration

EXPERT_PARAMS = ("gate_up_proj", "down_proj")
#: What the published gpt-oss checkpoints keep unquantized (their config.json says so).
NOT_CONVERTED = [
    "model.layers.*.self_attn",
    "model.layers.*.mlp.router",
    "model.embed_tokens",
    "lm_head",
]


def dequantize_experts(blocks, scales):
    """Ours, for a whole fused parameter ``[experts, 32 * groups, rows]`` (float32)."""
    return mxfp4.dequantize_rows(blocks, scales).transpose(1, 2).contiguous()


def reference_dequantize(blocks, scales, dtype=torch.float32):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    return convert_moe_packed_tensors(blocks, scales, dtype=dtype)


def quantize(param: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A fused expert parameter ``[experts, k, rows]`` as MXFP4 ``blocks`` and ``scales`` in
    transformers' layout: per stored row, groups of 32 values share the power of two that
    brings their largest magnitude to at most 6, each value rounded to the nearest FP4 one.
    Written from the format's definition with transformers' FP4 table, not from our code."""
    from transformers.integrations.mxfp4 import FP4_VALUES

    rows = param.float().transpose(1, 2)  # [experts, rows, k]: the stored order
    experts, count, k = rows.shape
    groups = rows.reshape(experts, count, k // 32, 32)
    amax = groups.abs().amax(-1).clamp_min(2.0**-100)
    exponent = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)
    scaled = groups / torch.exp2(exponent)[..., None]
    codes = (scaled[..., None] - torch.tensor(FP4_VALUES)).abs().argmin(-1).to(torch.uint8)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)  # low nibble first
    return blocks.contiguous(), (exponent + 127).to(torch.uint8)


def as_mxfp4(bf16_dir, target):
    """The bf16 checkpoint with its expert weights in MXFP4, as the published gpt-oss is."""
    target.mkdir(parents=True)
    for item in bf16_dir.iterdir():
        if item.suffix != ".safetensors":
            shutil.copy(item, target / item.name)
    tensors = load_file(bf16_dir / "model.safetensors")
    packed = {}
    for name, tensor in tensors.items():
        if name.rsplit(".", 1)[-1] in EXPERT_PARAMS:
            packed[name + "_blocks"], packed[name + "_scales"] = quantize(tensor)
        else:
            packed[name] = tensor
    save_file(packed, str(target / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((bf16_dir / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": NOT_CONVERTED,
    }
    (target / "config.json").write_text(json.dumps(config))
    return target


def as_dequantized(mxfp4_dir, target):
    """The MXFP4 checkpoint dequantized by transformers into bf16, as a plain checkpoint."""
    target.mkdir(parents=True)
    for item in mxfp4_dir.iterdir():
        if item.suffix != ".safetensors":
            shutil.copy(item, target / item.name)
    tensors = load_file(mxfp4_dir / "model.safetensors")
    plain = {}
    for name, tensor in tensors.items():
        if name.endswith("_blocks"):
            base = name.removesuffix("_blocks")
            plain[base] = reference_dequantize(tensor, tensors[base + "_scales"], torch.bfloat16)
        elif not name.endswith("_scales"):
            plain[name] = tensor
    save_file(plain, str(target / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((mxfp4_dir / "config.json").read_text())
    del config["quantization_config"]
    (target / "config.json").write_text(json.dumps(config))
    return target


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt-oss")
    paths = make_family("gpt-oss", root / "bf16")
    packed = as_mxfp4(paths["model"], root / "mxfp4")
    return {
        "bf16": paths["model"],
        "mxfp4": packed,
        "dequantized": as_dequantized(packed, root / "deq"),
    }


def test_dequantization_equals_transformers_reference():
    gen = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 40, 4, 16), generator=gen, dtype=torch.uint8)
    # Every finite E8M0 scale (255 is NaN in the format), so the bias and range are checked.
    scales = torch.randint(0, 255, (3, 40, 4), generator=gen, dtype=torch.uint8)
    ours = dequantize_experts(blocks, scales)
    assert ours.shape == (3, 128, 40) and ours.dtype == torch.float32
    assert torch.equal(ours, reference_dequantize(blocks, scales))
    assert torch.equal(ours.bfloat16(), reference_dequantize(blocks, scales, torch.bfloat16))
    # One expert at a time, a few rows per step (how the scan reads it) gives the same values.
    for expert in range(3):
        one = mxfp4.expert_matrix(blocks[expert], scales[expert], rows_per_step=7)
        assert one.is_contiguous() and torch.equal(one, ours[expert])


def test_nibble_order_lookup_table_and_scale_bias():
    blocks = torch.zeros(1, 1, 1, 16, dtype=torch.uint8)
    blocks[..., 0] = 0x21  # low nibble 1 (+0.5) is value 0, high nibble 2 (+1.0) value 1
    blocks[..., 1] = 0xF9  # 9 is -0.5, 15 is -6.0
    scales = torch.full((1, 1, 1), 128, dtype=torch.uint8)  # 2 ** (128 - 127)
    values = dequantize_experts(blocks, scales)[0, :4, 0]
    assert values.tolist() == [1.0, 2.0, -1.0, -12.0]


def test_mxfp4_scan_scores_equal_the_scan_of_the_dequantized_checkpoint(checkpoints, tmp_path):
    packed = spectrum_sm.scan(
        checkpoints["mxfp4"], 50, output_dir=tmp_path / "a", show_progress=False
    )
    plain = spectrum_sm.scan(
        checkpoints["dequantized"], 50, output_dir=tmp_path / "b", show_progress=False
    )
    assert list(packed.scores) == list(plain.scores)
    experts = [m for m in packed.scores if ".experts." in m]
    assert len(experts) == 4 * 4 * 2  # layers x experts x (gate_up_proj, down_proj)
    for module, score in plain.scores.items():
        mine = packed.scores[module]
        assert (mine.snr, mine.shape, mine.entry, mine.type) == (
            score.snr,
            score.shape,
            score.entry,
            score.type,
        ), module
        assert mine.dtype == ("MXFP4" if module in experts else score.dtype)
    assert packed.layer_file_text() == plain.layer_file_text()
    assert packed.scores["model.layers.0.mlp.experts.3.gate_up_proj"].shape == (64, 128)
    assert packed.scores["model.layers.0.mlp.experts.3.down_proj"].shape == (64, 64)
    # Quantizing changed the values, and the scores followed: the dequantized values were
    # scored, not the bf16 originals nor the raw codes.
    original = spectrum_sm.scan(checkpoints["bf16"], 50, show_progress=False)
    assert any(original.scores[m].snr != packed.scores[m].snr for m in experts)
    manifest = json.loads(packed.files["manifest"].read_text())
    record = manifest["tensors"]["model.layers.1.mlp.experts.2.down_proj"]
    assert record["dtype"] == "MXFP4"
    assert record["stored"] == "model.layers.1.mlp.experts.down_proj_blocks"
    assert record["entry"] == "^model.layers.1.mlp.experts.down_proj(_bias)?$[2]"
    # select at another percent reads the entries back from the manifest.
    again = spectrum_sm.select(packed.files["results"], 25, output_dir=tmp_path / "c")
    assert again.read_text() == packed.layer_file_text(25)


def test_without_transformers_the_entries_are_the_same(checkpoints, monkeypatch):
    """The analysis's CPU image has no transformers: stored names are kept, and gpt-oss stores
    its experts under the loaded names, so the layer file is the same."""
    from spectrum_sm.core import names

    with_transformers = spectrum_sm.scan(checkpoints["mxfp4"], 50, show_progress=False)

    def no_transformers(*args):
        raise ImportError("transformers")

    monkeypatch.setattr(names, "_with_transformers", no_transformers)
    stored_names = spectrum_sm.scan(checkpoints["mxfp4"], 50, show_progress=False)
    assert stored_names.names_source == "checkpoint names"
    assert stored_names.layer_file_text() == with_transformers.layer_file_text()


def test_mxfp4_exact_and_float64_modes_match_the_dequantized_checkpoint(checkpoints):
    for options in ({"exact": True}, {"precision": "float64"}):
        packed = spectrum_sm.scan(checkpoints["mxfp4"], 50, show_progress=False, **options)
        plain = spectrum_sm.scan(checkpoints["dequantized"], 50, show_progress=False, **options)
        assert {m: s.snr for m, s in packed.scores.items()} == {
            m: s.snr for m, s in plain.scores.items()
        }


def test_mxfp4_blocks_without_scales_are_refused_by_name(checkpoints, tmp_path):
    broken = shutil.copytree(checkpoints["mxfp4"], tmp_path / "broken")
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.2.mlp.experts.down_proj_scales"]
    save_file(tensors, str(broken / "model.safetensors"))
    with pytest.raises(spectrum_sm.SpectrumError) as info:
        spectrum_sm.scan(broken, 50, show_progress=False)
    message = str(info.value)
    assert "model.layers.2.mlp.experts.down_proj_blocks: it has no _scales tensor" in message
    assert message.startswith("MXFP4 tensors not in the layout this scan dequantizes")


def test_mxfp4_experts_are_read_one_at_a_time(tmp_path, monkeypatch):
    """Peak traced memory (the reader's buffers: tracemalloc sees bytearrays, not torch's own
    allocations) while a layer of 8 MXFP4 experts is scanned: one expert's blocks and scales,
    never the fused tensor's 8 (1 MiB)."""
    import tracemalloc

    from spectrum_sm.core import scanner

    monkeypatch.setattr(scanner, "_worker_count", lambda device: 1)
    gen = torch.Generator().manual_seed(0)
    experts, rows, groups = 8, 512, 16
    name = "model.layers.0.mlp.experts.down_proj"
    blocks = torch.randint(0, 256, (experts, rows, groups, 16), generator=gen, dtype=torch.uint8)
    scales = torch.randint(120, 130, (experts, rows, groups), generator=gen, dtype=torch.uint8)
    model = tmp_path / "m"
    model.mkdir()
    save_file(
        {f"{name}_blocks": blocks, f"{name}_scales": scales}, str(model / "model.safetensors")
    )
    config = {"model_type": "planted", "quantization_config": {"quant_method": "mxfp4"}}
    (model / "config.json").write_text(json.dumps(config))
    one_expert = rows * groups * 17  # 128 KiB of blocks, 8 KiB of scales
    spectrum_sm.scan(model, 50, hash_files=False, show_progress=False)  # lazy imports
    tracemalloc.start()
    try:
        result = spectrum_sm.scan(model, 50, hash_files=False, show_progress=False)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(result.scores) == experts
    assert one_expert <= peak <= one_expert + 256 * 1024  # slack: headers, results, logging


@pytest.mark.parametrize("method", ["gptq", "awq", "bitsandbytes"])
def test_other_packed_formats_stay_refused(checkpoints, tmp_path, method):
    model = shutil.copytree(checkpoints["bf16"], tmp_path / method)
    config = json.loads((model / "config.json").read_text())
    config["quantization_config"] = {"quant_method": method, "bits": 4}
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(spectrum_sm.SpectrumError, match=f"quantized with {method}: .*unquantized"):
        spectrum_sm.scan(model, 50, show_progress=False)


def test_training_loads_mxfp4_dequantized_and_trains_the_selected_slices(checkpoints, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    from spectrum_sm.core.freeze import freeze_except
    from spectrum_sm.training.loading import dequantized_load_kwargs

    config = json.loads((checkpoints["mxfp4"] / "config.json").read_text())
    kwargs = dequantized_load_kwargs(config)
    assert kwargs["quantization_config"].dequantize is True
    # recipe.load_model holds transformers' config object, not the dict.
    loaded_config = AutoConfig.from_pretrained(checkpoints["mxfp4"])
    assert dequantized_load_kwargs(loaded_config)["quantization_config"].dequantize is True
    model = AutoModelForCausalLM.from_pretrained(
        checkpoints["mxfp4"], dtype=torch.bfloat16, **kwargs
    )
    # A plain model now: saved after training, it is an ordinary bf16 checkpoint.
    assert not getattr(model, "is_quantized", False)
    assert getattr(model.config, "quantization_config", None) is None
    stored = load_file(checkpoints["mxfp4"] / "model.safetensors")
    params = dict(model.named_parameters())
    for layer in range(4):
        for leaf in EXPERT_PARAMS:
            name = f"model.layers.{layer}.mlp.experts.{leaf}"
            expected = reference_dequantize(
                stored[name + "_blocks"], stored[name + "_scales"], torch.bfloat16
            )
            assert params[name].dtype == torch.bfloat16
            assert torch.equal(params[name].detach(), expected), name
    # The layer file of the MXFP4 scan trains exactly the experts' rows it names, and their
    # bias rows.
    result = spectrum_sm.scan(checkpoints["mxfp4"], 50, output_dir=tmp_path, show_progress=False)
    report = freeze_except(model, result.files["layers"])
    chosen = [m for modules in result.selection().values() for m in modules]
    expected_parts: dict[str, set[int]] = {}
    for module in chosen:
        if ".experts." in module:
            layer, expert, leaf = (
                module.split(".")[2],
                int(module.split(".")[-2]),
                module.split(".")[-1],
            )
            for name in (leaf, leaf + "_bias"):
                expected_parts.setdefault(f"model.layers.{layer}.mlp.experts.{name}", set()).add(
                    expert
                )
    assert {
        name: {region[0].start for region in regions} for name, regions in report.partial.items()
    } == expected_parts
    assert all(
        region[0].stop == region[0].start + 1 and len(region) == 1
        for regions in report.partial.values()
        for region in regions
    )


def test_train_py_trains_an_mxfp4_checkpoint_from_its_own_scan(checkpoints, tmp_path):
    """train.py on the MXFP4 checkpoint with the layer file of its scan: the output is a plain
    bf16 checkpoint (the dequantized one's tensors), and only the selected experts' rows, of
    weights and biases, changed. (On this CPU, without Triton, transformers dequantizes on its
    own; :func:`dequantized_load_kwargs` makes it so where its kernels are installed too.)"""
    from test_families import changed_expert_slices
    from test_train import run_train

    result = spectrum_sm.scan(checkpoints["mxfp4"], 50, output_dir=tmp_path, show_progress=False)
    out = tmp_path / "trained"
    proc = run_train(
        [
            "--model_name_or_path",
            str(checkpoints["mxfp4"]),
            "--spectrum_config",
            str(result.files["layers"]),
            "--train_data",
            str(checkpoints["bf16"].parent / "train.jsonl"),
            "--output_dir",
            str(out),
            "--max_steps",
            "3",
            "--learning_rate",
            "3e-3",
            "--per_device_train_batch_size",
            "4",
            "--max_seq_length",
            "64",
            "--warmup_ratio",
            "0",
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    before = load_file(checkpoints["dequantized"] / "model.safetensors")
    after = load_file(out / "model.safetensors")
    assert set(after) == set(before)
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    selected = set()
    for modules in result.selection().values():
        for module in modules:
            score = result.scores[module]
            if ".experts." in module:
                base, expert = score.stored.removesuffix("_blocks"), int(module.split(".")[-2])
                selected |= {(base, expert), (base + "_bias", expert)}
    changed = changed_expert_slices(before, after)
    assert changed and changed <= selected
    assert any(name.endswith("_bias") for name, _ in changed)


def test_other_checkpoints_load_as_before():
    from spectrum_sm.training.loading import dequantized_load_kwargs

    assert dequantized_load_kwargs({"model_type": "qwen3"}) == {}
    assert dequantized_load_kwargs({"quantization_config": {"quant_method": "fp8"}}) == {}


def test_qlora_on_an_mxfp4_checkpoint_is_refused_with_a_message(checkpoints, tmp_path):
    """QLoRA would quantize the dequantized experts again (transformers raises a ValueError of
    two quantization configs): train.py says so in one line, before any CUDA check."""
    from test_train import run_train

    proc = run_train(
        [
            "--model_name_or_path",
            str(checkpoints["mxfp4"]),
            "--method",
            "qlora",
            "--train_data",
            str(checkpoints["bf16"].parent / "train.jsonl"),
            "--output_dir",
            str(tmp_path / "out"),
            "--max_steps",
            "1",
        ]
    )
    assert proc.returncode != 0
    assert "method qlora cannot load an MXFP4 checkpoint" in proc.stderr
    assert "Traceback" not in proc.stderr
