"""Fused MoE experts trained by slice (core.slices): the optimizer holds state for the selected
elements only (bytes measured on the optimizer), the fused weights never change, the trained
values equal those of training the whole fused parameter with its other elements masked, and a
merged model is a plain transformers model again."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from families import MOE, make_family, make_scanned_family

import spectrum_sm
from spectrum_sm.core.names import model_class_for
from spectrum_sm.core.slices import SUFFIX, installed_slices, selection_index
from spectrum_sm.training.memory import adamw_state_bytes, build_meta, count_parameters, load_config
from spectrum_sm.training.recipe import optimizer_state_bytes

pytestmark = pytest.mark.integration


def trained_values(model, name: str):
    """The current value of a fused parameter with its trained slices in (a new tensor)."""
    params = dict(model.named_parameters())
    item = installed_slices(model).get(name)
    fused = params[name].detach()
    if item is None:
        return fused.clone()
    return item.compose(fused, params[item.slice_name].detach())


@pytest.fixture(scope="module", params=sorted(MOE))
def family(request, tmp_path_factory):
    paths, _ = make_scanned_family(request.param, tmp_path_factory.mktemp(request.param))
    return request.param, paths, paths["layers"]


def load(paths, dtype):
    config = json.loads((paths["model"] / "config.json").read_text())
    return model_class_for(config).from_pretrained(paths["model"], dtype=dtype)


def train_steps(model, params, steps: int = 3, autocast: bool = False):
    optimizer = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.0)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ids = torch.randint(0, model.config.vocab_size, (4, 24), generator=generator)
        # The recipe's autocast: bf16 frozen weights meet float32 masters in bf16 compute.
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return optimizer


def fused_names(model) -> list[str]:
    return [n for n, p in model.named_parameters() if p.ndim == 3 and ".experts." in n]


def test_optimizer_holds_state_only_for_the_selected_slices(family):
    name, paths, layers = family
    model = load(paths, torch.bfloat16)
    stored = {n: p.detach().clone() for n, p in model.named_parameters()}
    report = spectrum_sm.freeze_except(model, layers)
    slices = installed_slices(model)
    assert slices, f"{name}: the 30% layer file selects no expert slice"
    trainable = [p for p in model.parameters() if p.requires_grad]
    with torch.no_grad():
        for param in trainable:  # float32 masters, as the recipe keeps them
            param.data = param.data.float()
    # The fused weights are frozen and stay in their stored dtype.
    for fused in slices:
        param = dict(model.named_parameters())[fused]
        assert not param.requires_grad and param.dtype == torch.bfloat16
    assert sum(p.numel() for p in trainable) == report.trainable_params
    optimizer = train_steps(model, trainable, steps=1, autocast=True)
    # Measured on the optimizer: two float32 moments per trained element and a float32 step
    # per trained tensor, nothing for the unselected expert elements.
    assert optimizer_state_bytes(optimizer) == 8 * report.trainable_params + 4 * len(trainable)
    # The planner, from config.json alone, counts the same elements; its bytes are what the
    # optimizer allocated (its tensor count, one step scalar each, is a bound: which layers
    # hold a selected expert depends on the scores).
    counts = count_parameters(build_meta(load_config(str(paths["model"])))[0], 30)
    assert counts.trainable_params == report.trainable_params
    assert optimizer_state_bytes(optimizer) == adamw_state_bytes(
        counts.trainable_params, len(trainable)
    )
    assert len(trainable) <= counts.trainable_tensors
    whole = sum(dict(model.named_parameters())[n].numel() for n in slices)
    selected = sum(s.size for s in slices.values())
    assert 0 < selected < whole
    params = dict(model.named_parameters())
    for fused, item in slices.items():  # a slice tensor holds the selected elements, no more
        trailing = params[fused].shape[len(item.index) :]
        assert params[item.slice_name].shape == (item.size, *trailing)
    # The fused weights themselves never changed; their trained values differ only where
    # the layer file selected.
    params, moved = dict(model.named_parameters()), 0
    for fused, item in slices.items():
        assert torch.equal(params[fused], stored[fused])
        now = trained_values(model, fused)
        mask = torch.zeros(now.shape[: len(item.index)], dtype=torch.bool)
        mask[item.index] = True
        assert torch.equal(now[~mask], stored[fused][~mask])
        moved += int((now[mask] != stored[fused][mask]).sum())
    assert moved  # (an expert the router sent no token to gets no gradient this step)


def test_slices_train_as_the_masked_whole_parameter_does(family):
    """The reference mechanism: the whole fused parameter trainable, its gradient zeroed outside
    the selected regions (no weight decay: AdamW then never moves a zero-gradient element)."""
    name, paths, layers = family
    model = load(paths, torch.float32)
    reference = copy.deepcopy(model)
    report = spectrum_sm.freeze_except(model, layers)
    train_steps(model, [p for p in model.parameters() if p.requires_grad])

    for param in reference.parameters():
        param.requires_grad_(False)
    wanted = set(report.trainable) | set(report.partial)
    params = dict(reference.named_parameters())
    for param_name in wanted:
        if param_name.endswith(SUFFIX):
            continue
        param = params[param_name]
        param.requires_grad_(True)
        if param_name in report.partial:
            keep = torch.zeros(param.shape, dtype=torch.bool)
            keep[selection_index(param.shape, report.partial[param_name])] = True
            param.register_hook(lambda grad, keep=keep: grad * keep)
    train_steps(reference, [p for p in reference.parameters() if p.requires_grad])

    for param_name in report.partial:
        ours, theirs = trained_values(model, param_name), params[param_name].detach()
        assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6), (name, param_name)
    ours = dict(model.named_parameters())
    for param_name in report.trainable:
        if not param_name.endswith(SUFFIX):
            assert torch.allclose(ours[param_name], params[param_name], rtol=1e-5, atol=1e-6)


def test_a_merged_model_saves_as_a_plain_model(family, tmp_path):
    _, paths, layers = family
    model = load(paths, torch.bfloat16)
    spectrum_sm.freeze_except(model, layers)
    names = set(installed_slices(model))
    expected = {n: trained_values(model, n) for n in names}
    spectrum_sm.merge_slices(model)  # the public name, for users' own training loops
    assert not installed_slices(model)
    assert not any(n.endswith(SUFFIX) for n, _ in model.named_parameters())
    model.save_pretrained(tmp_path / "merged")
    again = load({"model": tmp_path / "merged"}, torch.bfloat16)
    params = dict(again.named_parameters())
    assert all(torch.equal(params[n], expected[n]) for n in names)
    # Freezing the same model twice starts from the plain model again (no slices of slices).
    spectrum_sm.freeze_except(model, layers)
    spectrum_sm.freeze_except(model, layers)
    assert set(installed_slices(model)) == names
    assert sum(n.endswith(SUFFIX) for n, _ in model.named_parameters()) == len(names)


def test_no_composed_copy_outlives_its_layer_under_gradient_checkpointing(family):
    """Checkpointing stops a recomputed forward early (an exception inside it): the composed
    fused weight must still be dropped, or every layer keeps one more copy of its experts
    between steps (measured on a 208M Qwen3-MoE: 0.7 GiB held, benchmarks/train_moe.py)."""
    _, paths, layers = family
    model = load(paths, torch.float32)
    spectrum_sm.freeze_except(model, layers)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    train_steps(model, [p for p in model.parameters() if p.requires_grad], steps=1)
    slices = installed_slices(model)
    held = [n for n, s in slices.items() if s.leaf in model.get_submodule(s.module).__dict__]
    assert slices and not held


def test_the_prepared_gpu_check_runs_as_written_at_toy_widths():
    """benchmarks/train_moe_gpu.py (for a lent GPU) runs here on CPU at toy widths: its layer
    entries match the model, Spectrum's optimizer holds less than full's, the planner answers."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "train_moe_gpu.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--device", "cpu", "--tiny", "--steps", "2", "--seq", "32"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["method"]: r for r in map(json.loads, proc.stdout.splitlines())}
    spectrum, full = rows["spectrum"], rows["full"]
    assert 0 < spectrum["trainable_params"] < full["trainable_params"]
    assert spectrum["optimizer_state_bytes"] < 0.5 * full["optimizer_state_bytes"]
    assert spectrum["planned_gib"] > 0 and full["planned_gib"] > 0


def test_save_pretrained_without_merging_keeps_the_training(family, tmp_path):
    """A user's own loop (or HF Trainer) saves without merge_slices: state_dict() folds the
    trained values into the fused weights, and loading a plain state dict refreshes them."""
    _, paths, layers = family
    model = load(paths, torch.float32)
    spectrum_sm.freeze_except(model, layers)
    train_steps(model, [p for p in model.parameters() if p.requires_grad], steps=1)
    names = set(installed_slices(model))
    expected = {n: trained_values(model, n) for n in names}
    assert not any(k.endswith(SUFFIX) for k in model.state_dict())
    model.save_pretrained(tmp_path / "saved")
    again = load({"model": tmp_path / "saved"}, torch.float32)
    params = dict(again.named_parameters())
    assert all(torch.equal(params[n], expected[n]) for n in names)
    fresh = load(paths, torch.float32)
    spectrum_sm.freeze_except(fresh, layers)
    fresh.load_state_dict(again.state_dict())  # strict: the slice keys are not asked for
    assert all(torch.equal(trained_values(fresh, n), expected[n]) for n in names)


def test_a_sliced_tied_embedding_trains_through_both_of_its_uses(tmp_path):
    """axolotl's example entry on a tied model: the lm_head's use of the embedding must reach
    the slice's gradient too (the masked whole parameter is the reference)."""
    paths = make_family("qwen3-tied", tmp_path)
    layer_file = tmp_path / "rows.yaml"
    layer_file.write_text("unfrozen_parameters:\n- ^model.embed_tokens.weight$[0:32]\n")
    model = load(paths, torch.float32)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    reference = copy.deepcopy(model)
    spectrum_sm.freeze_except(model, layer_file)
    ids = torch.randint(
        0, model.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1)
    )
    model(input_ids=ids, labels=ids).loss.backward()
    (item,) = installed_slices(model).values()
    ours = dict(model.named_parameters())[item.slice_name].grad
    for param in reference.parameters():
        param.requires_grad_(False)
    weight = reference.model.embed_tokens.weight
    weight.requires_grad_(True)
    reference(input_ids=ids, labels=ids).loss.backward()
    assert torch.allclose(ours, weight.grad[:32], rtol=1e-5, atol=1e-7)
