"""Fused MoE experts trained by slice across processes: train.py on tiny Qwen3-MoE, Mixtral and
gpt-oss models under FSDP2 and DDP (2 processes, gloo) changes exactly the scan's selection,
agrees with one process on the same global batch, holds a shard of the slice optimizer state per
rank, and resumes bit-identically after kill -9 of the whole process group."""

from __future__ import annotations

import json

import pytest
import torch
from families import FUSED_EXPERTS, MOE, make_scanned_family
from test_families import changed_expert_slices, expected_changes, expected_expert_slices
from test_recipe import torchrun
from test_train import TRAIN, base_args, kill_at_first_checkpoint, model_tensors, run_train

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module", params=sorted(MOE))
def moe(request, tmp_path_factory):
    paths, result = make_scanned_family(request.param, tmp_path_factory.mktemp(request.param))
    return request.param, paths, result


def report(out) -> dict:
    return json.loads((out / "model" / "training_report.json").read_text())


def test_two_processes_fsdp_and_ddp_match_one_process_and_change_only_the_slices(moe, tmp_path):
    name, paths, result = moe
    runs = {}
    for distribution, processes, batch in (("fsdp", 2, "2"), ("ddp", 2, "2"), ("ddp", 1, "4")):
        out = tmp_path / f"{distribution}-{processes}"
        args = base_args(paths, out, "--max_steps", "6", "--per_device_train_batch_size")
        proc = run_train(
            [*args, batch, "--distribution", distribution],
            launcher=torchrun(processes) if processes > 1 else None,
        )
        assert proc.returncode == 0, (name, distribution, proc.stderr[-4000:])
        runs[distribution, processes] = out
    before = model_tensors(paths["model"])
    expected = expected_changes(result, set(before))
    single = model_tensors(runs["ddp", 1] / "model")
    for key, out in runs.items():
        after = model_tensors(out / "model")
        assert set(after) == set(before)  # a plain model: no slice tensors saved
        changed = {n for n in before if not torch.equal(before[n], after[n])}
        assert changed <= expected, (name, key, changed - expected)
        assert any(".experts." in n for n in changed), (name, key)
        if name in FUSED_EXPERTS:  # stored fused: the rows of unselected experts stay too
            assert changed_expert_slices(before, after) <= expected_expert_slices(result), key
        # Trained tensors agree with one process up to float32 summation order. AdamW turns a
        # round-off in a near-zero gradient into a whole step, and a router's logits pick the
        # experts, so the bound is relative to the update: measured at most 0.2% of it (a rank
        # that trained other slices or half the batch would be off by the whole update).
        for tensor in before:
            update = (single[tensor].float() - before[tensor].float()).norm()
            gap = (after[tensor].float() - single[tensor].float()).norm()
            assert gap <= 1e-2 * update, (name, key, tensor, float(gap / update.clamp_min(1e-30)))
    assert report(runs["fsdp", 2])["final_train_loss"] == pytest.approx(
        report(runs["ddp", 1])["final_train_loss"], rel=1e-4
    )
    # Measured on each run's optimizer: DDP holds the whole slice state on every process, FSDP2
    # about half of it per rank (its own rows of every slice tensor).
    full = report(runs["ddp", 1])["optimizer_state_bytes"]
    assert report(runs["ddp", 2])["optimizer_state_bytes"] == full
    assert report(runs["fsdp", 2])["optimizer_state_bytes"] < 0.6 * full


def test_fsdp_kill_minus_nine_and_rerun_gives_identical_weights(moe, tmp_path):
    name, paths, _ = moe
    extra = ["--per_device_train_batch_size", "2", "--max_steps", "24", "--save_steps", "4"]
    extra += ["--distribution", "fsdp"]
    reference = tmp_path / "reference"
    proc = run_train(
        base_args(paths, reference, "--checkpoint_dir", str(reference / "ck"), *extra),
        launcher=torchrun(),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]

    killed = tmp_path / "killed"
    ck = killed / "ck"
    args = base_args(paths, killed, "--checkpoint_dir", str(ck), *extra)
    kill_at_first_checkpoint([*torchrun(), str(TRAIN), *args], ck)  # torchrun and both workers
    proc = run_train(args, launcher=torchrun())
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert 0 < report(killed)["resumed_from_step"] < 24, name
    a, b = model_tensors(reference / "model"), model_tensors(killed / "model")
    assert set(a) == set(b) and all(torch.equal(a[n], b[n]) for n in a), name
