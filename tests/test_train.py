"""entrypoints/train.py end to end on a tiny Qwen3 with a locally trained tokenizer (CPU)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from spectrum_sm.toy import make_toy_training_setup
from spectrum_sm.training.data import IGNORE_INDEX, DataOptions, encode_row

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "entrypoints" / "train.py"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("train")
    paths = make_toy_training_setup(base, layers=2, rows=48)
    layer_file = base / "layers.yaml"
    layer_file.write_text(
        "unfrozen_parameters:\n- ^lm_head.weight$\n- ^model.embed_tokens.weight$\n"
        "# mlp.down_proj layers\n- model.layers.1.mlp.down_proj\n"
        "# self_attn.q_proj layers\n- model.layers.0.self_attn.q_proj\n"
    )
    paths["layers"] = layer_file
    return paths


def base_args(setup, out: Path, *extra: str) -> list[str]:
    return [
        "--model_name_or_path",
        str(setup["model"]),
        "--spectrum_config",
        str(setup["layers"]),
        "--train_data",
        str(setup["train"]),
        "--output_dir",
        str(out / "model"),
        "--max_steps",
        "8",
        "--learning_rate",
        "3e-3",
        "--per_device_train_batch_size",
        "4",
        "--max_seq_length",
        "64",
        "--logging_steps",
        "1",
        "--seed",
        "7",
        "--precision",
        "fp32",
        "--warmup_ratio",
        "0",
        *extra,
    ]


def run_train(args, env=None, launcher=None, timeout_s=600):
    """Run train.py (or a launcher around it) in its own process group, so a timeout also ends
    the workers a launcher started."""
    cmd = [*(launcher or [sys.executable]), str(TRAIN), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def kill_at_first_checkpoint(cmd: list[str], checkpoint_dir: Path, timeout_s: float = 400) -> None:
    """Start ``cmd`` in its own process group, wait for its first checkpoint folder, then
    SIGKILL the whole group (a launcher and all its workers)."""
    group = subprocess.Popen(
        cmd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        start_new_session=True,
    )
    deadline = time.monotonic() + timeout_s
    ck = checkpoint_dir
    while not (ck.exists() and any(p.name.startswith("checkpoint-") for p in ck.iterdir())):
        assert group.poll() is None, "finished before any checkpoint"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    os.killpg(group.pid, signal.SIGKILL)
    group.wait()


#: The weight tensors the ``setup`` layer file unfreezes.
SELECTED = {
    "lm_head.weight",
    "model.embed_tokens.weight",
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.1.mlp.down_proj.weight",
}


def changed_tensors(base: Path, trained: Path) -> set[str]:
    """Names of the tensors that differ between two model folders (same names required)."""
    before, after = model_tensors(base), model_tensors(trained)
    assert set(before) == set(after)
    return {n for n in before if not torch.equal(before[n], after[n])}


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def model_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def test_assistant_only_loss_masks_the_prompt(setup):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(setup["model"])
    row = {
        "messages": [
            {"role": "system", "content": "You add numbers."},
            {"role": "user", "content": "What is 5 plus 3?"},
            {"role": "assistant", "content": "5 plus 3 is 8."},
        ]
    }
    example = encode_row(row, 0, tokenizer, DataOptions(512))
    learned = [
        t
        for t, label in zip(example["input_ids"], example["labels"], strict=True)
        if label != IGNORE_INDEX
    ]
    assert tokenizer.decode(learned) == "5 plus 3 is 8.<|im_end|>"  # the marker, not the newline
    everything = encode_row(row, 0, tokenizer, DataOptions(512, assistant_only=False))
    assert IGNORE_INDEX not in everything["labels"]
    pc = encode_row({"prompt": "Q: 2+2?", "completion": " 4"}, 1, tokenizer, DataOptions(512))
    pairs = zip(pc["input_ids"], pc["labels"], strict=True)
    assert tokenizer.decode([t for t, label in pairs if label != IGNORE_INDEX]) == " 4<|im_end|>"


def test_spectrum_trains_exactly_the_selected_tensors(setup, tmp_path):
    proc = run_train(base_args(setup, tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "model"
    before, after = model_tensors(setup["model"]), model_tensors(out)
    changed = changed_tensors(setup["model"], out)
    assert changed == SELECTED
    assert all(after[n].dtype == before[n].dtype for n in before)  # saved as loaded (bf16)
    report = json.loads((out / "training_report.json").read_text())
    assert report["steps"] == 8 and report["method"] == "spectrum"
    trainable = sum(before[n].numel() for n in changed)
    assert report["trainable_params"] == trainable
    # AdamW: two fp32 moments per trainable element plus a float32 step counter per tensor.
    assert report["optimizer_state_bytes"] == 2 * 4 * trainable + 4 * len(changed)
    lines = [line for line in proc.stdout.splitlines() if "train_loss=" in line]
    assert len(lines) == 8
    assert "trainable params: " in proc.stdout and "|| trainable%: " in proc.stdout
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out)
    AutoTokenizer.from_pretrained(out)
    assert model.config.num_hidden_layers == 2
    assert (out / "generation_config.json").exists()


def test_bf16_with_gradient_checkpointing_keeps_frozen_weights(setup, tmp_path):
    args = base_args(setup, tmp_path, "--max_steps", "2")
    args[args.index("--precision") + 1] = "bf16"
    proc = run_train([*args, "--gradient_checkpointing", "true"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "learning_rate=3.000000e-03" in proc.stdout  # step 1 logs the rate it used
    assert changed_tensors(setup["model"], tmp_path / "model") == SELECTED
    assert all(t.dtype == torch.bfloat16 for t in model_tensors(tmp_path / "model").values())


def test_loss_falls_on_a_learnable_set(setup, tmp_path):
    proc = run_train(
        base_args(
            setup,
            tmp_path,
            "--tensorboard_dir",
            str(tmp_path / "tb"),
            "--max_steps",
            "30",
            "--validation_data",
            str(setup["train"]),
            "--eval_steps",
            "15",
        )
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [
        float(line.split("train_loss=")[1].split()[0])
        for line in proc.stdout.splitlines()
        if "train_loss=" in line
    ]
    assert losses[-1] < 0.6 * losses[0], losses
    evals = [line for line in proc.stdout.splitlines() if "eval_loss=" in line]
    assert len(evals) == 2  # steps 15 and 30; the final evaluation is step 30's, not a third
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert len(events.Scalars("train/loss")) == 30
    assert [e.step for e in events.Scalars("eval/loss")] == [15, 30]


def test_kill_minus_nine_and_resume_gives_identical_weights(setup, tmp_path):
    reference = tmp_path / "reference"
    args = ["--max_steps", "40", "--save_steps", "5"]
    proc = run_train(base_args(setup, reference, "--checkpoint_dir", str(reference / "ck"), *args))
    assert proc.returncode == 0, proc.stderr[-3000:]

    killed = tmp_path / "killed"
    ck = killed / "ck"
    cmd = base_args(setup, killed, "--checkpoint_dir", str(ck), *args)
    kill_at_first_checkpoint([sys.executable, str(TRAIN), *cmd], ck)
    assert not list((killed / "model").iterdir())  # locked from the start, nothing saved yet
    proc = run_train(cmd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((killed / "model" / "training_report.json").read_text())
    assert report["resumed_from_step"] is not None and 0 < report["resumed_from_step"] < 40
    a, b = model_tensors(reference / "model"), model_tensors(killed / "model")
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert len([p for p in ck.iterdir() if p.name.startswith("checkpoint-")]) == 2  # keep 2


def test_sigterm_saves_a_checkpoint_and_exits(setup, tmp_path):
    ck = tmp_path / "ck"
    cmd = base_args(setup, tmp_path, "--checkpoint_dir", str(ck), "--max_steps", "400")
    child = subprocess.Popen(
        [sys.executable, str(TRAIN), *cmd],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # What a job's request tells train.py (SageMaker and the local runner alike).
        env={**os.environ, "OMP_NUM_THREADS": "1", "SPECTRUM_SM_CHECKPOINT_S3": "s3://b/ck/j/"},
    )
    signal_at(child, "step=3 ")
    rest = child.stdout.read()
    assert child.wait(timeout=120) == 143, rest
    assert "SIGTERM" in rest and "resumable: step" in rest
    assert "continues it with training.resume_from: s3://b/ck/j/" in rest
    saved = [p.name for p in ck.iterdir() if p.name.startswith("checkpoint-")]
    assert len(saved) == 1 and int(saved[0].split("-")[1]) >= 3


def signal_at(proc, *fragments: str, sig=signal.SIGTERM) -> None:
    """Read ``proc``'s output until a line holds every fragment, then send it ``sig``."""
    for line in proc.stdout:
        if all(f in line for f in fragments):
            proc.send_signal(sig)
            return


def job_root(root: Path, args: list[str]) -> Path:
    """A folder laid out like /opt/ml whose hyperparameters.json holds ``args``."""
    (root / "input" / "config").mkdir(parents=True)
    (root / "output").mkdir()
    hyperparameters = dict(zip(args[::2], args[1::2], strict=True))
    (root / "input" / "config" / "hyperparameters.json").write_text(
        json.dumps({k.removeprefix("--"): v for k, v in hyperparameters.items()})
    )
    return root


def test_the_launcher_passes_sigterm_on(setup, tmp_path):
    """A stop reaches the container's first process; launch.py must hand it to train.py."""
    args = base_args(
        setup, tmp_path, "--checkpoint_dir", str(tmp_path / "ck"), "--max_steps", "400"
    )
    root = job_root(tmp_path / "ml", args)
    launcher = subprocess.Popen(
        [sys.executable, str(ROOT / "entrypoints" / "launch.py"), "train"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "SM_OPT_ML": str(root)},
    )
    signal_at(launcher, "step=3 ")
    rest = launcher.stdout.read()
    assert launcher.wait(timeout=120) == 143, rest
    assert "SIGTERM" in rest
    assert any(p.name.startswith("checkpoint-") for p in (tmp_path / "ck").iterdir())


def test_two_processes_with_gloo(setup, tmp_path):
    launcher = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
    ]
    args = base_args(setup, tmp_path, "--max_steps", "4", "--per_device_train_batch_size", "2")
    proc = run_train(args, launcher=launcher, timeout_s=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((tmp_path / "model" / "training_report.json").read_text())
    assert report["processes"] == 2 and report["steps"] == 4
    assert sum("train_loss=" in line for line in proc.stdout.splitlines()) == 4  # main only
    assert changed_tensors(setup["model"], tmp_path / "model") == SELECTED


@pytest.mark.parametrize("world_size, teardown", [("1", True), ("2", False)])
def test_a_worker_of_a_process_group_ends_without_teardown_and_loses_no_output(
    world_size, teardown, tmp_path
):
    """train.py ends through exit_job: a torchrun worker skips interpreter teardown (where a
    gloo thread letting go of a collective aborted finished runs) yet keeps its exit code and
    every buffered line; a single process ends normally (atexit handlers run)."""
    marker = tmp_path / "atexit-ran"
    script = (
        "import atexit, logging, sys\n"
        "from spectrum_sm.core.container import exit_job\n"
        f"atexit.register(lambda: open({str(marker)!r}, 'w').close())\n"
        "logging.basicConfig(stream=sys.stdout, level=logging.INFO, format='%(message)s')\n"
        "logging.info('logged')\n"
        "sys.stdout.write('buffered, no newline')\n"
        "exit_job(3)\n"
    )
    env = {**os.environ, "WORLD_SIZE": world_size}
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60
    )
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == "logged\nbuffered, no newline"
    assert marker.exists() == teardown
    assert "exit_job(main())" in TRAIN.read_text()


def test_lora_and_full_run_through_the_same_loop(setup, tmp_path):
    for method in ("lora", "full"):
        out = tmp_path / method
        proc = run_train(base_args(setup, out, "--method", method, "--max_steps", "2"))
        assert proc.returncode == 0, proc.stderr[-3000:]
        report = json.loads((out / "model" / "training_report.json").read_text())
        assert report["method"] == method
        after = model_tensors(out / "model")
        assert set(after) == set(model_tensors(setup["model"]))  # LoRA merged back


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--spectrum_config", "MISSING"], "does not exist"),
        (["--bogus", "1"], "unrecognized arguments: --bogus"),
        (["--method", "qlora"], "qlora needs"),
        (["--max_steps", "0"], "nothing to train"),
        (["--save_steps", "5"], "saves into checkpoint_dir, which is not set"),
    ],
)
def test_bad_arguments_fail_cleanly(setup, tmp_path, extra, fragment):
    args = base_args(setup, tmp_path)
    if extra[0] == "--spectrum_config":
        args[args.index("--spectrum_config") + 1] = str(tmp_path / extra[1])
    else:
        args += extra
    output = tmp_path / "opt-ml-output"
    output.mkdir()
    proc = run_train(args, env={"SM_OUTPUT_FAILURE": str(output / "failure")})
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert fragment in proc.stderr
    assert fragment in (output / "failure").read_text()
    assert not (tmp_path / "model").exists()


def test_pattern_matching_nothing_and_unknown_rows_fail_cleanly(setup, tmp_path):
    layers = tmp_path / "bad.yaml"
    layers.write_text("unfrozen_parameters:\n- model.layers.9.mlp.down_proj\n")
    args = base_args(setup, tmp_path)
    args[args.index("--spectrum_config") + 1] = str(layers)
    proc = run_train(args)
    assert proc.returncode == 1 and "model.layers.9.mlp.down_proj" in proc.stderr
    assert "match no parameter" in proc.stderr and "Traceback" not in proc.stderr

    data = tmp_path / "odd.jsonl"
    data.write_text('{"text": "fine"}\n{"question": "q", "answer": {"text": "a"}}\n')
    args = base_args(setup, tmp_path)
    args[args.index("--train_data") + 1] = str(data)
    proc = run_train(args)
    assert proc.returncode == 1
    assert "data row 1 has fields [answer, question]" in proc.stderr


def test_container_defaults_come_from_sm_environment(setup, tmp_path):
    spectrum_channel = tmp_path / "spectrum"
    spectrum_channel.mkdir()
    (spectrum_channel / "snr_results_m_unfrozenparameters_30percent.yaml").write_text(
        setup["layers"].read_text()
    )
    train_channel = tmp_path / "train"
    train_channel.mkdir()
    (train_channel / "part-0.jsonl").write_text(setup["train"].read_text())
    env = {
        "SM_CHANNEL_MODEL": str(setup["model"]),
        "SM_CHANNEL_SPECTRUM": str(spectrum_channel),
        "SM_CHANNEL_TRAIN": str(train_channel),
        "SM_MODEL_DIR": str(tmp_path / "sm-model"),
    }
    proc = run_train(["--max_steps", "1", "--max_seq_length", "64", "--precision", "fp32"], env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "sm-model" / "training_report.json").exists()


ACCELERATE_CONFIGS = sorted((ROOT / "entrypoints" / "accelerate").glob("*.yaml"))


@pytest.mark.parametrize("distribution", ["fsdp", "ddp"])
@pytest.mark.parametrize("config", ACCELERATE_CONFIGS, ids=lambda path: path.name)
def test_train_runs_under_each_shipped_accelerate_config(setup, tmp_path, config, distribution):
    """``accelerate launch --config_file <it> entrypoints/train.py``, as each file's first line
    says, on 2 CPU processes (gloo): train.py trains the selected tensors and no others, under
    FSDP2 (each rank's checkpoint holds its row shard of every trained parameter) and under DDP
    (rank 0 holds them whole)."""
    command = f"# accelerate launch --config_file entrypoints/accelerate/{config.name} "
    assert config.read_text().startswith(command + "entrypoints/train.py")
    launcher = [
        *(sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)),
        *("--num_processes", "2", "--main_process_port", str(free_port())),
    ]
    args = base_args(
        setup,
        tmp_path,
        *("--max_steps", "4", "--per_device_train_batch_size", "2"),
        *("--distribution", distribution, "--checkpoint_dir", str(tmp_path / "ck")),
        *("--save_steps", "4"),
    )
    proc = run_train(args, launcher=launcher, timeout_s=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((tmp_path / "model" / "training_report.json").read_text())
    assert report["processes"] == 2 and report["distribution"] == distribution
    assert report["steps"] == 4
    assert changed_tensors(setup["model"], tmp_path / "model") == SELECTED
    rows = {name: tensor.shape[0] for name, tensor in model_tensors(setup["model"]).items()}
    checkpoint = tmp_path / "ck" / "checkpoint-00000004"
    held = [
        {
            name.removeprefix("param/"): tensor.shape[0]
            for name, tensor in load_file(str(checkpoint / f"rank-{rank:05d}.safetensors")).items()
            if name.startswith("param/")
        }
        for rank in (0, 1)
    ]
    if distribution == "fsdp":
        assert set(held[0]) == set(held[1]) == SELECTED
        assert all(held[0][n] + held[1][n] == rows[n] and held[1][n] > 0 for n in SELECTED)
    else:
        assert held == [{n: rows[n] for n in SELECTED}, {}]


def test_hold_out_is_the_same_disjoint_split_for_the_same_seed():
    from spectrum_sm.training.data import hold_out

    rows = [f"row {i}" for i in range(40)]  # rows unlike their positions: a slip shows
    train, held = hold_out(rows, 0.1, seed=42)
    assert len(held) == 4 and len(train) == 36
    assert set(train).isdisjoint(held) and set(train) | set(held) == set(rows)
    assert list(held) == [r for r in rows if r in set(held)]  # in the data's order
    again_train, again_held = hold_out(rows, 0.1, seed=42)
    assert list(again_held) == list(held) and list(again_train) == list(train)
    assert list(hold_out(rows, 0.1, seed=7)[1]) != list(held)
    # evaluate() slices the held-out rows per rank (rows[rank::world]) and takes rows[:1]
    # for a rank with none: slices give the rows themselves, as a list's would.
    rows_held = list(held)
    for world in (1, 2, 3):
        assert [held[r::world] for r in range(world)] == [rows_held[r::world] for r in range(world)]
    assert held[:1] == rows_held[:1] and held[9:] == []
    from spectrum_sm.core.errors import SpectrumError

    with pytest.raises(SpectrumError, match="leaves none to train on"):
        hold_out([1], 0.5, seed=0)


@pytest.mark.integration
def test_validation_share_scores_the_run_on_held_out_training_rows(setup, tmp_path):
    proc = run_train(base_args(setup, tmp_path, "--validation_share", "0.25"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "model" / "training_report.json").read_text())
    assert report["data"]["validation"] == {"held_out_from_train": 12, "share": 0.25}
    assert report["final_eval_loss"] is not None
    extra = ("--validation_share", "0.25", "--validation_data", str(setup["train"]))
    both = run_train(base_args(setup, tmp_path / "b", *extra))
    assert both.returncode != 0 and "leave validation_share at 0" in both.stderr


# -- issue 20: output folders you can trust ---------------------------------------------------


def test_a_second_run_into_the_same_output_dir_is_refused_in_one_line(setup, tmp_path):
    first = subprocess.Popen(
        [sys.executable, str(TRAIN), *base_args(setup, tmp_path, "--max_steps", "400")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        signal_at(first, "step=2 ", sig=signal.SIGSTOP)  # paused, still holding the folder
        second = run_train(base_args(setup, tmp_path, "--max_steps", "2"))
        assert second.returncode == 1
        assert "another training run is writing into" in second.stderr
        assert "--output_dir" in second.stderr and "Traceback" not in second.stderr
    finally:
        first.kill()
        first.wait()
    # The kernel dropped the dead run's lock: the same command now runs.
    again = run_train(base_args(setup, tmp_path, "--max_steps", "2"))
    assert again.returncode == 0, again.stderr[-3000:]


def test_an_older_models_files_go_and_a_dead_save_is_cleaned_up(setup, tmp_path):
    out = tmp_path / "model"
    (out / ".tmp-model").mkdir(parents=True)
    (out / ".tmp-model" / "model.safetensors").write_bytes(b"half")
    for stale in ("model-00001-of-00002.safetensors", "model.safetensors.index.json"):
        (out / stale).write_text("{}")
    (out / "notes.txt").write_text("mine")
    proc = run_train(base_args(setup, tmp_path, "--max_steps", "2"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "left by a run that died while saving" in proc.stdout + proc.stderr
    names = {p.name for p in out.iterdir()}
    assert "model.safetensors" in names and "notes.txt" in names
    assert not names & {".tmp-model", "model-00001-of-00002.safetensors"}
    assert "model.safetensors.index.json" not in names
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)  # one model, not a mix of two


def test_a_finished_run_run_again_refuses_and_never_reports_what_it_did_not_measure(
    setup, tmp_path
):
    ck = tmp_path / "ck"
    args = base_args(setup, tmp_path, "--checkpoint_dir", str(ck), "--max_steps", "4")
    args += ["--save_steps", "2"]
    assert run_train(args).returncode == 0
    report = tmp_path / "model" / "training_report.json"
    first = json.loads(report.read_text())
    again = run_train(args)
    assert again.returncode == 1 and "this run is finished" in again.stderr
    assert "--checkpoint_dir" in again.stderr and "Traceback" not in again.stderr
    assert json.loads(report.read_text()) == first  # untouched
    # A job restarted after its last checkpoint but before its model was saved: saved now,
    # with the loss the run measured and no throughput it did not.
    (tmp_path / "model").rename(tmp_path / "kept")
    proc = run_train(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    resumed = json.loads(report.read_text())
    assert resumed["resumed_from_step"] == 4
    assert resumed["final_train_loss"] == first["final_train_loss"]
    assert resumed["tokens_per_sec"] is None and resumed["median_step_seconds"] is None
    assert "NaN" not in report.read_text()


def test_lora_keeps_the_base_models_dtype(setup, tmp_path):
    proc = run_train(base_args(setup, tmp_path, "--method", "lora", "--max_steps", "1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    base, merged = model_tensors(setup["model"]), model_tensors(tmp_path / "model")
    assert {n: t.dtype for n, t in merged.items()} == {n: t.dtype for n, t in base.items()}
    assert {t.dtype for t in base.values()} == {torch.bfloat16}


SAVE_UNDER_LIMIT = """
import resource, sys
from pathlib import Path
from transformers import AutoModelForCausalLM, AutoTokenizer
from spectrum_sm.core.errors import SpectrumError
from spectrum_sm.training.recipe import save_model
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))  # the weights are larger
try:
    save_model(model, tokenizer, Path(sys.argv[2]), model.dtype, "full", {})
except SpectrumError as exc:
    print("refused:", exc)
"""


def test_a_save_that_hits_a_size_limit_is_one_line_and_leaves_the_old_model(setup, tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "model.safetensors").write_text("the previous model")
    proc = subprocess.run(
        [sys.executable, "-c", SAVE_UNDER_LIMIT, str(setup["model"]), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "refused: saving the model into" in proc.stdout, proc.stderr[-2000:]
    assert "File too large; nothing was replaced" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    assert (out / "model.safetensors").read_text() == "the previous model"
