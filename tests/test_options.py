"""Each option is declared once: the scan's in ScanOptions, the trainer's roles on TrainArgs.
Every reader (Python API, CLI, analysis config, request, analyze.py, reuse key) follows the one
declaration, so a field added there reaches all of them."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from factories import run_cli
from staging import load_entrypoint

from spectrum_sm.api import scan_options_from
from spectrum_sm.aws.config import AnalysisConfig
from spectrum_sm.cli import build_parser
from spectrum_sm.core.errors import SpectrumError
from spectrum_sm.core.options import ScanOptions, scan_fields
from spectrum_sm.training.args import TrainArgs, with_role

ROOT = Path(__file__).resolve().parents[1]
SCAN = [f.name for f in scan_fields()]


def test_every_scan_option_reaches_every_reader():
    config_fields = {f.name for f in dataclasses.fields(AnalysisConfig)}
    assert set(SCAN) <= config_fields
    scan_help = build_parser()._subparsers._group_actions[0].choices["scan"].format_help()
    for name in SCAN:
        flag = "--no-embeddings" if name == "embeddings" else f"--{name.replace('_', '-')}"
        assert flag in scan_help, flag
    # A job's hyperparameters are parsed by analyze.py's generated parser, one field each.
    values = {
        "top_percent": "30",
        "include": "self_attn.*,mlp.*",
        "exclude": "*norm*",
        "embeddings": "false",
        "exact": "true",
        "precision": "float64",
        "certify_percents": "10,50",
        "towers": "language,vision",
        "device": "cpu",
        "chunk_mb": "8",
    }
    assert sorted(values) == sorted(SCAN)
    argv = ["--model_name_or_path", "m"] + [x for k, v in values.items() for x in (f"--{k}", v)]
    parsed = load_entrypoint("analyze").parse_args(argv).scan
    assert parsed == ScanOptions(
        top_percent=30.0,
        include=["self_attn.*", "mlp.*"],
        exclude=["*norm*"],
        embeddings=False,
        exact=True,
        precision="float64",
        certify_percents=[10.0, 50.0],
        towers=["language", "vision"],
        device="cpu",
        chunk_mb=8,
    )


def test_the_analysis_request_carries_every_set_scan_option(monkeypatch):
    from spectrum_sm.aws.requests import build_analysis_request

    config = AnalysisConfig(
        model="s3://bucket/model/",
        output_s3="s3://bucket/out",
        role="arn:aws:iam::123456789012:role/r",
        include=["self_attn.*"],
        towers=["all"],
        chunk_mb=16,
        device="cpu",
    )
    hps = build_analysis_request(config, name="a-analysis-1")["HyperParameters"]
    monkeypatch.setenv("SM_CHANNEL_MODEL", "/opt/ml/input/data/model")  # an S3 model: a channel
    argv = [x for k, v in hps.items() for x in (f"--{k}", v)]
    parsed = load_entrypoint("analyze").parse_args(argv).scan
    assert parsed == ScanOptions(include=["self_attn.*"], towers=["all"], chunk_mb=16, device="cpu")
    assert json.loads(json.dumps(hps))  # text only, as SageMaker takes it


def test_the_reuse_key_follows_result_options_only():
    from spectrum_sm.aws.pipeline import analysis_key

    base = AnalysisConfig(model="m", output_s3="s3://b/o")
    fingerprint = {"kind": "hub", "id": "m", "sha": "0" * 40}
    key = analysis_key(base, fingerprint)
    assert analysis_key(dataclasses.replace(base, device="cpu", chunk_mb=8), fingerprint) == key
    for change in ({"exact": True}, {"towers": ["all"]}, {"include": ["mlp.*"]}):
        assert analysis_key(dataclasses.replace(base, **change), fingerprint) != key, change


def test_scan_options_refuse_what_the_scan_cannot_do():
    for bad, fragment in (
        ({"top_percent": 0}, "top_percent must be in"),
        ({"towers": ["speech"]}, "towers must be some of language"),
        ({"precision": "float16"}, "precision must be one of certified"),
        ({"exact": "false"}, "exact must be bool"),
        ({"chunk_mb": 0}, "chunk_mb must be at least 1"),
    ):
        with pytest.raises(SpectrumError, match=fragment):
            ScanOptions(**bad)
    with pytest.raises(SpectrumError, match="scan has no option 'tower' \\(did you mean 'towers'"):
        scan_options_from(50, {"tower": "all"})
    assert scan_options_from(50, {"towers": "all", "include": "mlp.*"}).towers == ["all"]


def test_train_args_roles_keep_the_fingerprint_of_earlier_checkpoints():
    # Checkpoints written before the roles moved onto TrainArgs carry exactly these keys: a
    # change here makes every earlier checkpoint unresumable, so it must be deliberate.
    assert set(with_role("fingerprint")) == {
        "method", "learning_rate", "weight_decay", "warmup_ratio", "max_grad_norm",
        "per_device_train_batch_size", "gradient_accumulation_steps", "max_seq_length",
        "max_steps", "num_train_epochs", "precision", "packing", "assistant_only_loss",
        "train_split", "dataset_config", "columns", "prompt_template", "completion_template",
        "system_prompt", "seed", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules",
    }  # fmt: skip
    assert set(with_role("job")) == {
        "model_name_or_path", "spectrum_config", "train_data", "validation_data", "output_dir",
        "checkpoint_dir", "tensorboard_dir", "chat_template_path",
    }  # fmt: skip
    known = {f.name for f in dataclasses.fields(TrainArgs)}
    roles = {r for f in dataclasses.fields(TrainArgs) for r in f.metadata.get("roles", ())}
    assert roles == {"fingerprint", "budget", "job", "data"}
    assert set(with_role("budget")) <= known
    # data-check's flags and the client's data check: what the encoder reads (data_options).
    assert set(with_role("data")) == {
        "max_seq_length", "dataset_config", "columns", "prompt_template", "completion_template",
        "system_prompt", "assistant_only_loss", "chat_template_path",
    }  # fmt: skip


def test_data_check_takes_train_pys_data_arguments_by_their_names():
    """One declaration: data-check's flags, check_data's keywords and the client's check of a
    job's data are TrainArgs' data fields; a name train.py does not have is refused."""
    from spectrum_sm.training.args import DATA_SETTINGS
    from spectrum_sm.training.datacheck import check_data

    parsed = build_parser().parse_args(["data-check", "rows.jsonl", "--model", "m"])
    assert set(DATA_SETTINGS) <= set(vars(parsed))
    flags = ["--max-seq-length", "64", "--no-assistant-only-loss", "--columns", "prompt=q"]
    parsed = build_parser().parse_args(["data-check", "rows.jsonl", "--model", "m", *flags])
    assert (parsed.max_seq_length, parsed.assistant_only_loss, parsed.columns) == (
        64,
        False,
        "prompt=q",
    )
    with pytest.raises(SpectrumError, match=r"'max_length' is not a data setting.*max_seq_length"):
        check_data("rows.jsonl", "m", max_length=64)
    with pytest.raises(SpectrumError, match="max_seq_length"):  # train.py's own range check
        check_data("rows.jsonl", "m", max_seq_length=4)
    proc = run_cli("data-check", "rows.jsonl", "--model", "m", "--rows", "-1")
    assert proc.returncode == 1 and "rows must be >= 0, got -1" in proc.stderr, proc.stderr


def test_plan_takes_the_planners_options_by_one_declaration():
    """spectrum-sm plan's flags are PlanOptions' fields (names, defaults left to the dataclass);
    plan() refuses a keyword that is not one, naming the options."""
    from spectrum_sm.plan import PlanOptions, plan

    names = {f.name for f in dataclasses.fields(PlanOptions)}
    flags = ["--no-gradient-checkpointing", "--no-sharding", "--seq", "512", "--lora-rank", "8"]
    parsed = build_parser().parse_args(["plan", "m", *flags])
    assert names <= set(vars(parsed))
    assert (parsed.checkpointing, parsed.sharded, parsed.seq, parsed.lora_rank) == (
        False,
        False,
        512,
        8,
    )
    assert build_parser().parse_args(["plan", "m"]).seq is None  # the default is PlanOptions'
    with pytest.raises(SpectrumError, match=r"unknown option.*sequence.*options: precision"):
        plan("m", 30, sequence=512)
    with pytest.raises(SpectrumError, match="batch must be a whole number"):
        PlanOptions(batch=0)
