"""Training data as users have it, end to end: a save_to_disk folder, a CSV and a Parquet folder
train through train.py (and local mode) touching only the selected tensors; under a template
that rewrites earlier turns, data-check shows exactly the answers and train.py trains on them."""

from __future__ import annotations

import json

import pytest
from factories import run_cli
from test_data import CHAT
from test_jobs import EXAMPLES
from test_train import SELECTED, base_args, changed_tensors, run_train
from test_train import setup as setup  # the module fixture

pytestmark = pytest.mark.integration


def _rows(setup) -> list[dict]:
    return [json.loads(line) for line in setup["train"].read_text().splitlines()]


def _as_prompt_completion(rows: list[dict]) -> list[dict]:
    return [
        {"prompt": r["messages"][1]["content"] + "\n", "completion": r["messages"][2]["content"]}
        for r in rows
    ]


@pytest.mark.parametrize("shape", ["save_to_disk", "csv", "parquet_folder"])
def test_train_py_reads_every_source_and_trains_only_the_selected_tensors(
    setup,
    tmp_path,
    shape,
):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = _rows(setup)
    if shape == "save_to_disk":
        source = tmp_path / "disk"
        datasets.Dataset.from_list(rows).save_to_disk(str(source))
    elif shape == "csv":
        source = tmp_path / "train.csv"
        datasets.Dataset.from_list(_as_prompt_completion(rows)).to_csv(str(source), index=False)
    else:
        source = tmp_path / "parquet"
        source.mkdir()
        half = len(rows) // 2
        for part, chunk in enumerate((rows[:half], rows[half:])):
            pq.write_table(pa.Table.from_pylist(chunk), source / f"part-{part}.parquet")
    args = base_args(setup, tmp_path, "--train_data", str(source))
    proc = run_train(args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert changed_tensors(setup["model"], tmp_path / "model") == SELECTED
    report = json.loads((tmp_path / "model" / "training_report.json").read_text())
    assert report["data"]["train"]["rows_read"] == len(rows)
    assert report["data"]["train"]["rows_kept"] == len(rows)


def test_local_mode_trains_from_a_save_to_disk_folder(moto_server, tmp_path):
    import boto3
    import datasets

    from spectrum_sm.toy import make_toy_training_setup

    paths = make_toy_training_setup(tmp_path / "toy", layers=2, rows=16)
    rows = [json.loads(line) for line in paths["train"].read_text().splitlines()]
    disk = tmp_path / "disk"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(disk))
    boto3.client("s3").create_bucket(Bucket="disk-data")
    proc = run_cli(
        "run",
        str(EXAMPLES / "local-tiny.yaml"),
        "--local",
        *("--workdir", str(tmp_path / "jobs")),
        *("--set", "common.output_s3=s3://disk-data/x"),
        *("--set", f"analysis.model={paths['model']}"),
        *("--set", f"training.model={paths['model']}"),
        *("--set", f"training.train_data={disk}"),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    report = json.loads(
        (tmp_path / "jobs" / result["training_job"] / "model" / "training_report.json").read_text()
    )
    assert report["data"]["train"]["rows_kept"] == 16


def test_a_reasoning_template_trains_exactly_what_trl_trains(setup, tmp_path):
    """Multi-turn rows with reasoning under the published Qwen3 template (which drops earlier
    reasoning): data-check shows, as the trained text, exactly the tokens TRL trains (its
    Qwen3 training template: every turn's think block, answer and end-of-turn marker), and
    train.py trains on those rows."""
    import shutil

    from chat_templates import published, tokenizer_for_template, trl_trained_ids

    model = tmp_path / "model-in"
    shutil.copytree(setup["model"], model)
    texts = [m["content"] for m in CHAT] * 20
    vocab = json.loads((model / "config.json").read_text())["vocab_size"]
    tokenizer = tokenizer_for_template(published("qwen3"), texts, vocab_size=vocab - 16)
    assert len(tokenizer) <= vocab  # fits the toy model's embedding
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (model / name).unlink(missing_ok=True)
    tokenizer.save_pretrained(model)
    data = tmp_path / "chat.jsonl"
    rows = [{"messages": CHAT}] * 12 + [{"messages": CHAT[:2]}] * 2
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))

    proc = run_cli("-q", "data-check", str(data), "--model", str(model), "--rows", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert (report["rows_read"], report["rows_kept"]) == (14, 12)
    assert report["dropped"] == {"no_assistant_turn": 2}
    first = report["examples"][0]
    assert first["trained_text"] == tokenizer.decode(trl_trained_ids(tokenizer, rows[0]))
    assert first["trained_parts"] == [
        "<think>\nTwo and three make five.\n</think>\n\n2 plus 3 is 5.<|im_end|>\n",
        "<think>\n\n</think>\n\n4 plus 4 is 8.<|im_end|>\n",
    ]
    assert 0 < first["loss_tokens"] < first["tokens"]
    assert report["loss_mask"] == "TRL's training template (trl 1.16.0 qwen3_training.jinja)"
    shown = run_cli("data-check", str(data), "--model", str(model), "--rows", "1")
    assert "[[<think>\nTwo and three make five.\n</think>\n\n2 plus 3 is 5." in shown.stdout
    assert "loss mask: TRL's training template (trl 1.16.0 qwen3_training.jinja)" in shown.stdout
    assert "14 rows read, 12 kept, dropped: 2 no assistant turn" in shown.stdout

    args = base_args(setup, tmp_path, "--model_name_or_path", str(model), "--train_data", str(data))
    args[args.index("--max_seq_length") + 1] = "128"
    trained = run_train(args)
    assert trained.returncode == 0, trained.stderr[-3000:]
    result = json.loads((tmp_path / "model" / "training_report.json").read_text())
    assert result["data"]["train"] == {
        "rows_read": 14,
        "rows_kept": 12,
        "dropped": {"no_assistant_turn": 2},
        "loss_tokens": report["loss_tokens"],
    }
    assert changed_tensors(model, tmp_path / "model") == SELECTED
    # Trained with TRL's training version; the saved tokenizer keeps the original for inference.
    assert (tmp_path / "model" / "chat_template.jinja").read_text() == published("qwen3")


def test_data_check_names_the_setting_when_nothing_is_left(setup, tmp_path):
    proc = run_cli(
        "data-check", str(setup["train"]), "--model", str(setup["model"]), "--max-seq-length", "16"
    )
    assert proc.returncode == 1
    assert "max_seq_length 16 cuts every row" in proc.stderr and "Traceback" not in proc.stderr
    assert "truncated away" in proc.stdout


def test_data_check_reads_s3_data_as_the_job_s_channel_would_hold_it(setup, s3_bucket):
    """``spectrum_sm.check_data`` (and the CLI) download an s3:// prefix first, then read it
    with the job's loader: the training layer itself never talks to S3."""
    import boto3

    import spectrum_sm
    from spectrum_sm.core.errors import SpectrumError
    from spectrum_sm.training.datacheck import check_data as check_local

    rows = len(_rows(setup))
    boto3.client("s3").upload_file(str(setup["train"]), s3_bucket, "data/train.jsonl")
    uri = f"s3://{s3_bucket}/data/"
    report = spectrum_sm.check_data(uri, str(setup["model"]), rows=1)
    assert report["rows_read"] == rows and report["rows_kept"] == rows
    cli = run_cli("data-check", uri, "--model", str(setup["model"]), "--rows", "1")
    assert cli.returncode == 0, cli.stderr
    with pytest.raises(SpectrumError, match="download it first"):
        check_local(uri, str(setup["model"]))
    with pytest.raises(SpectrumError, match="no such S3 object or prefix"):
        spectrum_sm.check_data(f"s3://{s3_bucket}/nothing/", str(setup["model"]))


def test_the_analyze_command_takes_the_pipeline_s_one_path(moto_server, tmp_path):
    """``spectrum-sm analyze`` plans, stages and executes as ``run`` does: a second analysis
    of the same bytes and settings is reused (it used to submit a new, paid job every time)."""
    import boto3

    from spectrum_sm.toy import make_toy_training_setup

    paths = make_toy_training_setup(tmp_path / "toy", layers=2, rows=4)
    boto3.client("s3").create_bucket(Bucket="analyze-once")

    def analyze():
        proc = run_cli(
            "analyze",
            str(EXAMPLES / "local-tiny.yaml"),
            "--local",
            *("--workdir", str(tmp_path / "jobs")),
            *("--set", "common.output_s3=s3://analyze-once/x"),
            *("--set", f"analysis.model={paths['model']}"),
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads(proc.stdout.strip().splitlines()[-1])

    first = analyze()
    assert first["reused"] is False and first["status"] == "Completed"
    assert (
        first["layer_dir"].startswith("s3://analyze-once/x/") and first["job"] in first["layer_dir"]
    )
    layer_files = boto3.client("s3").list_objects_v2(
        Bucket="analyze-once", Prefix=first["layer_dir"].split("/", 3)[3]
    )
    assert any(o["Key"].endswith("percent.yaml") for o in layer_files.get("Contents", []))
    second = analyze()
    assert second["reused"] is True and second["job"] == first["job"]
