"""The container-side entrypoints on the training image's packages, not on ours.

``scripts/image-env.sh`` (run by ``scripts/test.sh``) builds ``.venv-image`` from
``images/huggingface-pytorch-training-gpu.txt``: transformers 5.3.0, accelerate 1.12.0, peft
0.18.1, datasets 4.5.0, huggingface_hub 1.10.0, trl 0.28.0, numpy < 2. Local mode then plays the
container with that interpreter (``SPECTRUM_SM_LOCAL_PYTHON``), so the analysis, Spectrum
training and LoRA run as they would in the image, and an API our development packages have but
the image lacks fails here.
"""

from __future__ import annotations

import json
import os
import re
import subprocess

import boto3
import pytest
import torch
from factories import run_cli
from safetensors.torch import load_file
from test_jobs import EXAMPLES, ROOT

pytestmark = pytest.mark.integration
PINS = ROOT / "images" / "huggingface-pytorch-training-gpu.txt"
IMAGE_PYTHON = ROOT / ".venv-image" / "bin" / "python"


@pytest.fixture(scope="module")
def image_python() -> str:
    if IMAGE_PYTHON.exists():
        return str(IMAGE_PYTHON)
    if os.environ.get("SPECTRUM_SM_REQUIRE_IMAGE_ENV"):
        pytest.fail("no .venv-image: scripts/image-env.sh did not run")
    pytest.skip("no .venv-image (bash scripts/image-env.sh builds it)")


def _pins() -> dict[str, str]:
    pins = {}
    for line in PINS.read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_\-]+)\s*(==|<)\s*([\w.]+)$", line.strip())
        if match:
            pins[match.group(1)] = match.group(2) + match.group(3)
    return pins


def test_the_environment_has_the_images_packages(image_python):
    pins = _pins()
    assert set(pins) == {
        "transformers",
        "accelerate",
        "peft",
        "datasets",
        "huggingface_hub",
        "trl",
        "numpy",
    }
    code = (
        "import importlib.metadata as m, json;"
        f"print(json.dumps({{n: m.version(n) for n in {sorted(pins)!r}}}))"
    )
    found = json.loads(subprocess.check_output([image_python, "-c", code], text=True))
    for name, pin in pins.items():
        if pin.startswith("=="):
            assert found[name] == pin[2:], name
        else:
            assert int(found[name].split(".")[0]) < int(pin[1:]), name


def test_analysis_spectrum_and_lora_run_on_the_images_packages(image_python, moto_server, tmp_path):
    from spectrum_sm.toy import make_toy_training_setup

    paths = make_toy_training_setup(tmp_path / "toy", layers=2, rows=16)
    bucket = "image-env-test"
    boto3.client("s3").create_bucket(Bucket=bucket)
    common = [
        "--local",
        "--workdir",
        str(tmp_path / "jobs"),
        *("--set", f"common.output_s3=s3://{bucket}/tiny"),
        *("--set", f"analysis.model={paths['model']}"),
        *("--set", f"training.model={paths['model']}"),
        *("--set", f"training.train_data={paths['train']}"),
    ]
    env = {"SPECTRUM_SM_LOCAL_PYTHON": image_python}
    proc = run_cli("run", str(EXAMPLES / "local-tiny.yaml"), *common, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    job = tmp_path / "jobs" / result["training_job"]
    report = json.loads((job / "model" / "training_report.json").read_text())
    layers = (tmp_path / "jobs" / result["analysis_job"] / "model").glob("*percent.yaml")
    assert len(list(layers)) == 1
    before = load_file(str(paths["model"] / "model.safetensors"))
    after = load_file(str(job / "model" / "model.safetensors"))
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and len(changed) < len(before)
    assert 0 < report["trainable_params"] < report["all_params"]
    assert f"launch: {image_python} " in proc.stderr  # the jobs ran on the image's packages

    lora = run_cli(
        "train",
        str(EXAMPLES / "local-tiny.yaml"),
        *common,
        *("--set", "training.method=lora"),
        env=env,
    )
    assert lora.returncode == 0, lora.stderr[-4000:]
    name = json.loads(lora.stdout.strip().splitlines()[-1])["job"]
    merged = tmp_path / "jobs" / name / "model"  # the adapter is merged into the weights
    lora_report = json.loads((merged / "training_report.json").read_text())
    assert lora_report["method"] == "lora"
    assert 0 < lora_report["trainable_params"] < report["trainable_params"]
    after = load_file(str(merged / "model.safetensors"))
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all(n.endswith("proj.weight") for n in changed)  # linear layers only


def test_compare_on_the_images_packages_falls_back_to_log_lines(
    image_python, moto_server, tmp_path
):
    """The image environment has no tensorboard (whether the real image has it is not known
    here): the runs write no event files, and compare takes their curves from the metric lines
    of their logs, timed by their steps."""
    from spectrum_sm.toy import make_toy_training_setup

    paths = make_toy_training_setup(tmp_path / "toy", layers=2, rows=16)
    bucket = "image-env-compare"
    boto3.client("s3").create_bucket(Bucket=bucket)
    proc = run_cli(
        "-q",
        "compare",
        str(EXAMPLES / "compare-tiny.yaml"),
        "--local",
        "--methods",
        "spectrum:50,full",
        "--json",
        "--workdir",
        str(tmp_path / "jobs"),
        "--output-dir",
        str(tmp_path / "out"),
        *("--set", f"common.output_s3=s3://{bucket}/cmp"),
        *("--set", f"analysis.model={paths['model']}"),
        *("--set", f"training.model={paths['model']}"),
        *("--set", f"training.train_data={paths['train']}"),
        *("--set", f"training.validation_data={paths['validation']}"),
        env={"SPECTRUM_SM_LOCAL_PYTHON": image_python},
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [r["status"] for r in summary["runs"]] == ["completed", "completed"]
    details = json.loads((tmp_path / "out" / "comparison.json").read_text())
    for label, curves in details["curves"].items():
        assert details["curve_sources"][label] == "log lines (time by step)"
        assert [p[1] for p in curves["eval"]] == [2, 4, 6, 8]
        assert [p[1] for p in curves["train"]] == list(range(1, 9))


def test_chat_masks_on_the_images_packages_are_what_data_check_shows_here(image_python, tmp_path):
    """Tool-call rows under the published Qwen3 template, read and masked on the image's
    packages with the code channel a training job gets (spectrum_sm and this machine's TRL
    modules): the trained text of every row is the one data-check shows here. On its own TRL
    (0.28.0) the image would refuse; its datasets (4.5.0) would unify the rows' tool-call
    arguments into one struct and render every other row's keys as nulls."""
    from chat_templates import published, tokenizer_for_template
    from conversations import CONVERSATIONS, texts

    from spectrum_sm.aws.pipeline import write_code
    from spectrum_sm.training.datacheck import check_data

    tokenizer = tokenizer_for_template(published("qwen3"), texts())
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    kinds = [
        "tool_call_dict_arguments",
        "tool_call_json_string_arguments",
        "several_calls_in_one_turn",
        "reasoning_then_tool_call_only_turn",
        "agent_trace",
        "reasoning_content_multi_turn",
    ]
    data = tmp_path / "agents.jsonl"
    data.write_text("".join(json.dumps(CONVERSATIONS[k]) + "\n" for k in kinds))
    here = check_data(str(data), str(tmp_path / "tokenizer"), rows=len(kinds))
    code = tmp_path / "code"
    write_code(code, with_trl=True)
    assert (code / "trl" / "chat_templates" / "qwen3_training.jinja").is_file()

    def image_check(pythonpath: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [image_python, "-m", "spectrum_sm.cli", "data-check", str(data), "--json",
             "--model", str(tmp_path / "tokenizer"), "--rows", str(len(kinds))],
            capture_output=True, text=True, cwd=tmp_path, timeout=600,
            env={**os.environ, "PYTHONPATH": pythonpath,
                 "HF_DATASETS_CACHE": str(tmp_path / "cache")},
        )  # fmt: skip

    proc = image_check(str(code))
    assert proc.returncode == 0, proc.stderr[-3000:]
    there = json.loads(proc.stdout)
    assert (
        there["loss_mask"]
        == here["loss_mask"]
        == ("TRL's training template (trl 1.16.0 qwen3_training.jinja)")
    )
    for kind, ours, theirs in zip(kinds, here["examples"], there["examples"], strict=True):
        assert theirs["trained_text"] == ours["trained_text"], kind
        assert "null" not in theirs["trained_text"], kind
    alone = image_check(str(ROOT))  # without the code channel's TRL: the image's own
    assert alone.returncode == 1
    assert "needs trl>=1.16.0" in alone.stderr and "trl 0.28.0 is installed" in alone.stderr
