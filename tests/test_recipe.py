"""The training recipe under real conditions: FSDP2 on two processes, interruptions, foreign and
damaged checkpoints, and every hyperparameter that used to train silently wrong."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train import (
    SELECTED,
    TRAIN,
    base_args,
    changed_tensors,
    free_port,
    job_root,
    kill_at_first_checkpoint,
    model_tensors,
    run_train,
    signal_at,
)
from test_train import setup as setup

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]


def torchrun(processes: int = 2) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(processes),
        "--master_port",
        str(free_port()),
    ]


def folder_hash(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def report(out: Path) -> dict:
    return json.loads((out / "model" / "training_report.json").read_text())


def test_fsdp_on_two_processes_matches_one_process_with_the_same_global_batch(setup, tmp_path):
    fsdp = tmp_path / "fsdp"
    args = base_args(setup, fsdp, "--per_device_train_batch_size", "2", "--max_steps", "6")
    proc = run_train([*args, "--distribution", "fsdp"], launcher=torchrun(), timeout_s=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "distribution fsdp over 2 process(es)" in proc.stdout
    assert report(fsdp)["distribution"] == "fsdp" and report(fsdp)["processes"] == 2
    assert changed_tensors(setup["model"], fsdp / "model") == SELECTED

    single = tmp_path / "single"
    proc = run_train(
        base_args(setup, single, "--per_device_train_batch_size", "4", "--max_steps", "6")
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = model_tensors(fsdp / "model"), model_tensors(single / "model")
    for name in SELECTED:
        # Same examples, same token-mean loss: equal up to float32 summation order, which can
        # move the saved bf16 value by at most one ulp (2^-7 relative).
        assert torch.allclose(a[name].float(), b[name].float(), rtol=2**-7, atol=1e-6), name
    assert report(fsdp)["final_train_loss"] == pytest.approx(
        report(single)["final_train_loss"], rel=1e-4
    )


def test_fsdp_kill_minus_nine_and_rerun_gives_identical_weights(setup, tmp_path):
    extra = ["--per_device_train_batch_size", "2", "--max_steps", "60", "--save_steps", "4"]
    reference = tmp_path / "reference"
    proc = run_train(
        [
            *base_args(setup, reference, "--checkpoint_dir", str(reference / "ck"), *extra),
            "--distribution",
            "fsdp",
        ],
        launcher=torchrun(),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]

    killed = tmp_path / "killed"
    ck = killed / "ck"
    cmd = [
        *torchrun(),
        str(TRAIN),
        *base_args(setup, killed, "--checkpoint_dir", str(ck), *extra),
        "--distribution",
        "fsdp",
    ]
    kill_at_first_checkpoint(cmd, ck)  # the whole process group: torchrun and both workers
    assert not list((killed / "model").iterdir())  # locked from the start, nothing saved yet
    saved = next(p for p in ck.iterdir() if p.name.startswith("checkpoint-"))
    # Each rank wrote its own shard; nothing in a checkpoint needs unpickling.
    assert sorted(p.suffix for p in saved.iterdir()) == [".json"] * 3 + [".safetensors"] * 2
    proc = run_train(cmd[len(torchrun()) + 1 :], launcher=torchrun())
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert 0 < report(killed)["resumed_from_step"] < 60
    a, b = model_tensors(reference / "model"), model_tensors(killed / "model")
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_a_foreign_checkpoint_is_refused_and_resume_from_continues_it(setup, tmp_path):
    ck = tmp_path / "ck"
    first = run_train(
        base_args(
            setup,
            tmp_path / "a",
            "--checkpoint_dir",
            str(ck),
            "--max_steps",
            "4",
            "--save_steps",
            "2",
        )
    )
    assert first.returncode == 0, first.stderr[-3000:]
    other = base_args(setup, tmp_path / "b", "--checkpoint_dir", str(ck), "--max_steps", "4")
    other[other.index("--learning_rate") + 1] = "1e-3"
    proc = run_train(other)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert (
        "belongs to another run" in proc.stderr
        and "learning_rate: 0.003 there, 0.001 here" in proc.stderr
    )
    assert not (tmp_path / "b" / "model").exists()
    # Continuing that run on purpose: its weights and state, this run's own checkpoints.
    own = tmp_path / "own-ck"
    args = base_args(
        setup,
        tmp_path / "c",
        "--checkpoint_dir",
        str(own),
        "--max_steps",
        "6",
        "--save_steps",
        "2",
        "--resume_from",
        str(ck),
    )
    args[args.index("--learning_rate") + 1] = "1e-3"
    proc = run_train(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert report(tmp_path / "c")["resumed_from_step"] == 4
    assert any(p.name.startswith("checkpoint-") for p in own.iterdir())


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(setup, tmp_path):
    args = ["--max_steps", "12", "--save_steps", "4", "--save_total_limit", "3"]
    reference = tmp_path / "reference"  # the same run, uninterrupted (no checkpoints needed)
    assert run_train(base_args(setup, reference, "--max_steps", "12")).returncode == 0
    ck = tmp_path / "ck"
    partial = base_args(setup, tmp_path / "partial", "--checkpoint_dir", str(ck), *args)
    partial[partial.index("--max_steps") + 1] = "12"
    child = subprocess.Popen(
        [sys.executable, str(TRAIN), *partial],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    signal_at(child, "saved checkpoint", "00000008", sig=signal.SIGKILL)
    child.wait()
    newest = ck / "checkpoint-00000008"
    shard = newest / "rank-00000.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])  # a spot kill during the save
    proc = run_train(partial)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "checkpoint-00000008 is damaged" in proc.stdout + proc.stderr
    assert report(tmp_path / "partial")["resumed_from_step"] == 4
    a, b = model_tensors(reference / "model"), model_tensors(tmp_path / "partial" / "model")
    assert all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.parametrize(
    ("flag", "value", "fragment"),
    [
        ("--learning_rate", "inf", "learning_rate must be a finite number"),
        ("--learning_rate", "nan", "learning_rate must be a finite number"),
        ("--max_grad_norm", "-1", "max_grad_norm must be positive"),
        ("--weight_decay", "2", "weight_decay must be in [0, 1)"),
        ("--num_train_epochs", "inf", "num_train_epochs must be a finite number"),
        ("--max_seq_length", "1", "max_seq_length must be at least 16"),
        ("--warmup_ratio", "1.5", "warmup_ratio must be in [0, 1)"),
        ("--distribution", "tp", "distribution must be one of"),
        ("--output_dir", "MODEL", "is the base model's folder"),
    ],
)
def test_bad_hyperparameters_fail_before_anything_changes(setup, tmp_path, flag, value, fragment):
    before = folder_hash(setup["model"])
    args = base_args(setup, tmp_path)
    if value == "MODEL":
        value = str(setup["model"])
    if flag in args:
        args[args.index(flag) + 1] = value
    else:
        args += [flag, value]
    failure = tmp_path / "failure"
    proc = run_train(args, env={"SM_OUTPUT_FAILURE": str(failure)})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert fragment in proc.stderr and fragment in failure.read_text()
    assert folder_hash(setup["model"]) == before


def test_a_tokenizer_larger_than_the_vocabulary_is_named(setup, tmp_path):
    model = shutil.copytree(setup["model"], tmp_path / "small-vocab")
    config = json.loads((model / "config.json").read_text())
    config["vocab_size"] = 100
    (model / "config.json").write_text(json.dumps(config))
    args = base_args(setup, tmp_path)
    args[args.index("--model_name_or_path") + 1] = str(model)
    proc = run_train(args)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "tokens but the model's embedding has 100 rows" in proc.stderr


def test_a_diverging_run_stops_without_saving(setup, tmp_path):
    from safetensors.torch import load_file, save_file

    model = shutil.copytree(setup["model"], tmp_path / "nan-model")
    weights = load_file(str(model / "model.safetensors"))
    weights["model.layers.0.self_attn.q_proj.weight"][0, 0] = float("inf")
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    args = base_args(setup, tmp_path)
    args[args.index("--model_name_or_path") + 1] = str(model)
    failure = tmp_path / "failure"
    proc = run_train(args, env={"SM_OUTPUT_FAILURE": str(failure)})
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "the training diverged at step 1" in failure.read_text()
    assert not (tmp_path / "model").exists()


def test_sigterm_without_a_checkpoint_folder_says_it_cannot_be_resumed(setup, tmp_path):
    failure = tmp_path / "failure"
    child = subprocess.Popen(
        [sys.executable, str(TRAIN), *base_args(setup, tmp_path, "--max_steps", "400")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "SM_OUTPUT_FAILURE": str(failure)},
    )
    signal_at(child, "step=2 ")
    rest = child.stdout.read()
    assert child.wait(timeout=120) == 143, rest
    assert "not resumable: no checkpoint folder was set" in rest
    assert failure.read_text().startswith("stopped by SIGTERM at step")
    assert "not resumable" in failure.read_text()


def test_sigterm_reaches_every_worker_under_torchrun(setup, tmp_path):
    """A stop reaches launch.py only; both ranks must save their shard before exiting."""
    ck = tmp_path / "ck"
    args = base_args(
        setup,
        tmp_path,
        "--checkpoint_dir",
        str(ck),
        "--max_steps",
        "400",
        "--per_device_train_batch_size",
        "2",
        "--distribution",
        "fsdp",
    )
    root = job_root(tmp_path / "ml", args)
    launcher = subprocess.Popen(
        [sys.executable, str(ROOT / "entrypoints" / "launch.py"), "train"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "SM_OPT_ML": str(root),
            "SPECTRUM_SM_NPROC_PER_HOST": "2",
            "SPECTRUM_SM_MASTER_PORT": str(free_port()),
        },
        start_new_session=True,
    )
    try:
        signal_at(launcher, "step=3 ")
        rest = launcher.stdout.read()
        assert launcher.wait(timeout=180) == 143, rest
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    saved = [p for p in ck.iterdir() if p.name.startswith("checkpoint-")]
    assert len(saved) == 1
    assert {p.name for p in saved[0].glob("rank-*.json")} == {"rank-00000.json", "rank-00001.json"}
    assert (root / "output" / "failure").read_text().startswith("stopped by SIGTERM")


def test_hand_runs_never_default_to_opt_ml(monkeypatch):
    from spectrum_sm.core.container import default_checkpoint_dir

    monkeypatch.delenv("SM_CURRENT_HOST", raising=False)
    monkeypatch.delenv("TRAINING_JOB_NAME", raising=False)
    assert default_checkpoint_dir() is None
    monkeypatch.setenv("SM_CURRENT_HOST", "algo-1")
    assert default_checkpoint_dir() == os.environ.get("SM_CHECKPOINT_DIR", "/opt/ml/checkpoints")
