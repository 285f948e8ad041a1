"""Issue 20's edges: every bad input refused in one line naming the field, nothing leaked, nothing
half-written, nothing silently wrong. Each test fails on the code before the fix it names."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from factories import run_cli

from spectrum_sm.aws.config import load_pipeline, validate
from spectrum_sm.core.errors import SpectrumError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
FLAGSHIP = EXAMPLES / "qwen3-8b.yaml"
HF = "hf_" + "q" * 34
AKIA = "AKIA" + "Z" * 16
GHP = "ghp_" + "r" * 36
AWS_KEY = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"  # AWS's documented example secret key


def _problems(*overrides: str) -> str:
    config = load_pipeline(FLAGSHIP, list(overrides))
    messages = []
    for job in (config.analysis, config.training):
        try:
            validate(job, need_role=True)
        except SpectrumError as exc:
            messages.append(str(exc))
    return "\n".join(messages)


# -- secrets ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "override, field",
    [
        (f"analysis.revision={HF}", "revision"),
        (f"common.base_job_name={AKIA}", "base_job_name"),
        (f"training.model={HF}", "model"),
        (f"training.chat_template={GHP}", "chat_template"),
        (f"analysis.include=[q_proj, {HF}]", "include[1]"),
        (f"training.hyperparameters.run_name={GHP}", "hyperparameters.run_name"),
        (f"training.tags.owner={AKIA}", "tags.owner"),
        (f"common.image_uri=x/{HF}:1", "image_uri"),
        (f"training.tags.owner={AWS_KEY}", "tags.owner"),
        (f"training.hyperparameters.seed={AWS_KEY}", "hyperparameters.seed"),
    ],
)
def test_a_credential_in_any_field_is_refused_naming_the_field_not_the_value(override, field):
    problems = _problems(override)
    assert f"{field} looks like a credential" in problems
    for token in (HF, AKIA, GHP, AWS_KEY):
        assert token not in problems and token[:12] not in problems


@pytest.mark.parametrize(
    "value",
    [
        "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b",  # a git commit (revision)
        "meta/Llama3/8B/Instruct/v1/checkpoints01",  # a 40-character path
        "Qwen/Qwen3/30B/A3B/Instruct/2507/model01",
        "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaA1",  # 41 characters, no randomness
        "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAa1",
    ],
)
def test_ordinary_forty_character_values_are_not_taken_for_aws_secret_keys(value):
    from spectrum_sm.core.secrets import is_secret

    assert not is_secret(value)
    assert is_secret(AWS_KEY) and is_secret(f" {AWS_KEY}\n")


def test_an_aws_secret_key_as_a_hyperparameter_is_refused_without_echoing_it():
    """Before: argparse's "invalid int value: 'wJalr...'" printed the key."""
    proc = run_cli(
        "run", str(FLAGSHIP), "--dry-run", "--set", f"training.hyperparameters.seed={AWS_KEY}"
    )
    assert proc.returncode == 1
    assert "hyperparameters.seed looks like a credential" in proc.stderr
    assert AWS_KEY[:8] not in proc.stderr + proc.stdout and "Traceback" not in proc.stderr


def test_secret_references_and_ordinary_values_pass():
    arn = "arn:aws:secretsmanager:us-east-1:123456789012:secret:hf-token-AbCdEf"
    assert _problems(f"training.secret_environment.HF_TOKEN={arn}") == ""
    assert _problems("training.environment.TOKENIZERS_PARALLELISM=false") == ""


def test_the_dry_run_refuses_what_the_real_run_would_send_in_plain_text():
    """Before: a token in analysis.revision printed as *** by the dry run, sent as is."""
    proc = run_cli("run", str(FLAGSHIP), "--dry-run", "--set", f"analysis.revision={HF}")
    assert proc.returncode == 1
    assert "revision looks like a credential" in proc.stderr
    assert "Traceback" not in proc.stderr and HF[:10] not in proc.stderr + proc.stdout
    assert len(proc.stderr.strip().splitlines()) == 1


def test_the_request_guard_refuses_a_credential_but_not_a_secret_reference():
    from spectrum_sm.aws.requests import SECRET_PREFIX, validate_request

    arn = "arn:aws:secretsmanager:us-east-1:123456789012:secret:hf-token-AbCdEf"
    request = {"Environment": {SECRET_PREFIX + "HF_TOKEN": arn}, "HyperParameters": {"x": HF}}
    with pytest.raises(SpectrumError, match=r"request HyperParameters\.x looks like a credential"):
        validate_request(request)


# -- IAM -------------------------------------------------------------------------------------

ARN = "arn:aws:secretsmanager:us-east-1:123456789012:secret:"


@pytest.mark.parametrize("secret", [ARN + "*", ARN + "hf-*", ARN + "hf-token-??????"])
def test_a_wildcard_secret_arn_is_refused(secret):
    assert "no wildcards" in _problems(f"training.secret_environment.HF_TOKEN={secret}")


def test_iam_policy_gives_a_partial_secret_arn_the_suffix_and_keeps_a_full_one():
    from spectrum_sm.aws.iam import policies

    config = load_pipeline(
        FLAGSHIP,
        [
            f"training.secret_environment.HF_TOKEN={ARN}hf-token",
            f"analysis.secret_environment.WANDB_API_KEY={ARN}wandb-AbCdEf",
        ],
    )
    role = {s["Sid"]: s for s in policies(config)["job_role"]["Statement"]}
    assert role["Secrets"]["Resource"] == [ARN + "hf-token-??????", ARN + "wandb-AbCdEf"]


@pytest.mark.parametrize("key", ["alias/my-key", "arn:aws:kms:us-east-1:123456789012:alias/my-key"])
def test_iam_policy_refuses_a_kms_alias(key):
    proc = run_cli("iam-policy", str(FLAGSHIP), "--set", f"common.output_kms_key={key}")
    assert proc.returncode == 1 and "is a KMS alias" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


def test_iam_policy_checks_the_config_as_run_does():
    from spectrum_sm.aws.iam import policies

    config = load_pipeline(FLAGSHIP, ["training.instance_type=ml.p9.huge"])
    with pytest.raises(SpectrumError, match=r"instance_type 'ml\.p9\.huge' is not a SageMaker"):
        policies(config)


# -- numbers and names where they enter --------------------------------------------------------


def test_yaml_numbers_in_exponent_form_are_numbers_in_files_and_overrides(tmp_path):
    text = FLAGSHIP.read_text().replace("top_percent: 30", "top_percent: 2.5e1")
    path = tmp_path / "c.yaml"
    path.write_text(text)
    assert load_pipeline(path).analysis.top_percent == 25.0
    config = load_pipeline(
        FLAGSHIP, ["analysis.top_percent=3e1", "analysis.certify_percents=[1e1]"]
    )
    assert config.analysis.top_percent == 30.0 and config.analysis.certify_percents == [10.0]
    assert _problems("analysis.top_percent=3e1") == ""


def test_a_repeated_key_in_a_config_file_is_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(FLAGSHIP.read_text() + "\nreuse_analysis: true\nreuse_analysis: false\n")
    with pytest.raises(SpectrumError, match="key 'reuse_analysis' appears twice"):
        load_pipeline(path)


def test_the_command_line_wins_over_the_files_sections():
    config = load_pipeline(FLAGSHIP, ["common.volume_size_gb=500", "common.tags.project=other"])
    assert config.analysis.volume_size_gb == config.training.volume_size_gb == 500
    config = load_pipeline(FLAGSHIP, ["common.volume_size_gb=500", "training.volume_size_gb=600"])
    assert (config.analysis.volume_size_gb, config.training.volume_size_gb) == (500, 600)


def test_a_jobs_mapping_adds_to_the_common_one():
    config = load_pipeline(FLAGSHIP, ["training.tags.team=nlp"])
    assert config.training.tags == {"project": "spectrum-sm", "team": "nlp"}
    assert config.analysis.tags == {"project": "spectrum-sm"}


@pytest.mark.parametrize("value", ["[abc]", "abc", "[true]", "[0]", "[101]"])
def test_certify_percents_of_the_wrong_kind_are_one_line(value):
    with pytest.raises(SpectrumError, match="certify_percents must be"):
        config = load_pipeline(FLAGSHIP, [f"analysis.certify_percents={value}"])
        validate(config.analysis, need_role=True)


def test_a_wrong_type_names_where_the_value_came_from(tmp_path):
    """Before: a bad ``--set`` value was blamed on the YAML file, which holds no such value."""
    with pytest.raises(SpectrumError, match=r"^--set analysis\.certify_percents: certify_perc"):
        load_pipeline(FLAGSHIP, ["analysis.certify_percents=[abc]"])
    with pytest.raises(SpectrumError, match=r"^--set common\.top_percent: top_percent must be"):
        load_pipeline(FLAGSHIP, ["common.top_percent=abc"])
    written = tmp_path / "bad.yaml"
    written.write_text(FLAGSHIP.read_text().replace("top_percent: 30", "top_percent: abc"))
    with pytest.raises(SpectrumError, match=r"bad\.yaml: analysis: top_percent must be"):
        load_pipeline(written)


def test_the_python_api_gets_the_same_checks():
    from spectrum_sm.aws.config import AnalysisConfig, TrainingConfig

    config = AnalysisConfig(model="m", certify_percents=["abc"], top_percent="50")  # type: ignore
    problems = "; ".join(config.problems(need_role=False))
    assert "certify_percents must be" in problems and "top_percent must be" in problems
    problems = TrainingConfig(model="m", train_data="d", top_percent=0).problems(need_role=False)
    assert any("top_percent must be in (0, 100]" in x for x in problems)


def _tiny_results(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "snr_results_tiny.json"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "text, fragment",
    [
        (
            '{"a.0.q": {"snr": 1.0, "type": "q"}, "a.0.q": {"snr": 9.0, "type": "q"}}',
            "'a.0.q' appears twice",
        ),
        ('{"a.0.q": {"snr": -2.0, "type": "q"}}', "is negative"),
        ('{"a.0.q": {"snr": -Infinity, "type": "q"}}', "is negative"),
        ('{"q": {"a.0.q": 1.0, "a.1.q": 2.0}, "q": {"a.0.q": 3.0}}', "'q' appears twice"),
    ],
)
def test_select_refuses_a_results_file_it_cannot_trust(tmp_path, text, fragment):
    path = _tiny_results(tmp_path, text)
    proc = run_cli("select", str(path), "--top-percent", "50")
    assert proc.returncode == 1 and fragment in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # nothing written


def test_scores_the_reference_writes_are_read(tmp_path):
    from spectrum_sm.core.selection import load_results

    path = _tiny_results(
        tmp_path, '{"a.0.q": {"snr": Infinity, "type": "q"}, "a.1.q": {"snr": NaN, "type": "q"}}'
    )
    assert len(load_results(path)) == 2


def test_a_selection_at_zero_percent_is_refused_not_the_scans_percent(tmp_path):
    from factories import planted_checkpoint

    from spectrum_sm import api

    ranks = {f"model.layers.{i}.self_attn.q_proj": i + 1 for i in range(4)}
    result = api.scan(str(planted_checkpoint(tmp_path / "m", ranks, size=32)), top_percent=50)
    assert sum(map(len, result.selection().values())) == 2
    with pytest.raises(SpectrumError, match=r"in \(0, 100\], got 0"):
        result.selection(0)


def test_a_scan_that_replaces_results_removes_the_layer_files_selected_from_them(tmp_path):
    """Before: two models saved as ``model`` scanned into one folder left the first one's 30%
    layer file beside the second one's results, to be trained on as if it were the second's.
    A rescan of the same weights keeps them (its scores may differ in the last bits under load,
    its layers do not)."""
    from factories import tiny_qwen3

    out = tmp_path / "out"
    first = tiny_qwen3(tmp_path / "a" / "model", layers=4)
    second = tiny_qwen3(tmp_path / "b" / "model", layers=4, seed=1)
    assert (
        run_cli("scan", str(first), "--top-percent", "30", "--output-dir", str(out)).returncode == 0
    )
    assert (
        run_cli("select", str(out / "snr_results_model.json"), "--top-percent", "25").returncode
        == 0
    )
    again = run_cli("scan", str(first), "--output-dir", str(out))  # the same layers: all kept
    assert again.returncode == 0 and "removing" not in again.stderr
    percents = sorted(p.name.split("_")[-1] for p in out.glob("*unfrozenparameters*"))
    assert percents == ["25percent.yaml", "30percent.yaml", "50percent.yaml"]
    other = run_cli("scan", str(second), "--output-dir", str(out))
    assert other.returncode == 0, other.stderr
    assert "removing snr_results_model_unfrozenparameters_25percent.yaml" in other.stderr
    assert sorted(p.name for p in out.glob("*unfrozenparameters*")) == [
        "snr_results_model_unfrozenparameters_50percent.yaml"
    ]


def test_a_rescan_keeps_a_layer_file_its_scores_still_select(tmp_path):
    """Results that differ only in the last bits (threaded float sums under load) replace the
    results file but select the same layers: the layer files at other percents stay."""
    import math

    from factories import tiny_qwen3

    from spectrum_sm import api

    out = tmp_path / "out"
    model = tiny_qwen3(tmp_path / "model", layers=4)
    first = api.scan(str(model), top_percent=30, output_dir=out, show_progress=False)
    api.select(first.files["results"], 25)
    kept = out / "snr_results_model_unfrozenparameters_25percent.yaml"
    before = first.files["results"].read_text()
    assert kept.is_file()
    again = api.scan(str(model), top_percent=30, show_progress=False)
    for score in again.scores.values():  # the last bits of every score, as a busy machine can
        score.snr = math.nextafter(score.snr, math.inf)
    again.write(out)
    assert first.files["results"].read_text() != before  # the results were replaced
    assert kept.read_text() == again.layer_file_text(25)


@pytest.mark.parametrize("flag", ["--batch=-4", "--seq=0", "--lora-rank=0", "--batch=2.5"])
def test_plan_refuses_sizes_below_one(tmp_path, flag):
    proc = run_cli("plan", str(tmp_path), flag)
    assert proc.returncode == 2, proc.stderr
    assert "must be at least 1" in proc.stderr or "not a whole number" in proc.stderr
    assert "GiB" not in proc.stdout


def test_the_python_planner_refuses_them_too(tmp_path):
    from spectrum_sm.plan import plan

    with pytest.raises(SpectrumError, match="batch must be a whole number of at least 1"):
        plan(str(tmp_path), 30, batch=-4)


def test_every_command_defaults_to_the_same_percent():
    import dataclasses

    from spectrum_sm import api
    from spectrum_sm.aws.config import AnalysisConfig, TrainingConfig
    from spectrum_sm.cli import build_parser
    from spectrum_sm.core.options import ScanOptions
    from spectrum_sm.core.selection import DEFAULT_TOP_PERCENT

    parser = build_parser()
    defaults = {
        command: parser.parse_args([command, "x"]).top_percent for command in ("report", "plan")
    }
    # The scan's command line leaves it unset: ScanOptions' default is the one that applies.
    assert parser.parse_args(["scan", "x"]).top_percent is None
    defaults["scan"] = ScanOptions().top_percent
    defaults["demo"] = parser.parse_args(["demo"]).top_percent
    defaults["api.scan"] = (
        __import__("inspect").signature(api.scan).parameters["top_percent"].default
    )
    for cls in (AnalysisConfig, TrainingConfig):
        defaults[cls.__name__] = {f.name: f for f in dataclasses.fields(cls)}["top_percent"].default
    assert set(defaults.values()) == {DEFAULT_TOP_PERCENT}, defaults


def test_a_run_refuses_a_training_percent_the_analysis_would_override():
    """Before: ``run --set training.top_percent=40`` trained the analysis's 30% and said nothing."""
    proc = run_cli("run", str(FLAGSHIP), "--dry-run", "--set", "training.top_percent=40")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "training.top_percent is 40 but analysis.top_percent is 30" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    both = run_cli("run", str(FLAGSHIP), "--dry-run", "--set", "common.top_percent=40")
    assert both.returncode == 0, both.stderr
    sent = json.loads(both.stdout)["analysis"]["HyperParameters"]
    assert float(sent["top_percent"]) == 40
    same = run_cli("run", str(FLAGSHIP), "--dry-run", "--set", "training.top_percent=30")
    assert same.returncode == 0, same.stderr
    compared = run_cli(
        "compare", str(FLAGSHIP), "--methods", "spectrum,full", "--dry-run",
        "--set", "training.top_percent=40",
    )  # fmt: skip
    assert compared.returncode == 1 and "training.top_percent is 40" in compared.stderr


# -- tracebacks on user errors ---------------------------------------------------------------


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    from spectrum_sm.toy import make_toy_training_setup

    return make_toy_training_setup(tmp_path_factory.mktemp("toy"), layers=2, rows=8)


BAD_DATA = {
    "latin.jsonl": (b'{"prompt": "caf\xe9", "completion": "ok"}\n', "not UTF-8 text (byte 0xe9"),
    "notes.txt": (b"hello\n", "unknown data format '.txt'"),
    "empty.jsonl": (b"", "the file is empty"),
    "empty.json": (b"[]", "the data holds no rows"),
}


@pytest.mark.parametrize("name", sorted(BAD_DATA))
def test_bad_data_files_are_one_line_naming_the_file(toy, tmp_path, name):
    body, fragment = BAD_DATA[name]
    (tmp_path / name).write_bytes(body)
    proc = run_cli("data-check", str(tmp_path / name), "--model", str(toy["model"]))
    assert proc.returncode == 1 and fragment in proc.stderr, proc.stderr[-2000:]
    assert name in proc.stderr and "Traceback" not in proc.stderr


def test_a_pickle_that_needs_code_is_refused_in_one_line(tmp_path):
    import subprocess
    import sys

    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "qwen3"}')
    code = (
        "import collections, torch, sys\n"
        "class Box(collections.OrderedDict): pass\n"
        "torch.save(Box(w=torch.zeros(4, 4)), sys.argv[1])\n"
    )
    subprocess.run([sys.executable, "-c", code, str(model / "pytorch_model.bin")], check=True)
    proc = run_cli("scan", str(model), "--output-dir", str(tmp_path / "out"))
    assert proc.returncode == 1, proc.stderr
    assert "cannot be loaded safely" in proc.stderr and "\x1b" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_a_custom_code_model_is_one_line_in_plan_and_train(toy, tmp_path):
    import shutil

    model = tmp_path / "custom"
    shutil.copytree(toy["model"], model)
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="mything", auto_map={"AutoModelForCausalLM": "modeling_x.MyModel"})
    (model / "config.json").write_text(json.dumps(config))
    proc = run_cli("plan", str(model))
    assert proc.returncode == 1 and "needs its own code (modeling_x.MyModel)" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    import subprocess
    import sys

    train = Path(__file__).resolve().parents[1] / "entrypoints" / "train.py"
    proc = subprocess.run(
        [sys.executable, str(train), "--model_name_or_path", str(model), "--train_data",
         str(toy["train"]), "--output_dir", str(tmp_path / "out"), "--method", "full"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 1
    assert "pass --trust_remote_code true if you trust it" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()


def test_the_demo_refuses_a_file_as_workdir_and_a_dead_endpoint(tmp_path):
    (tmp_path / "file").write_text("x")
    proc = run_cli("demo", "--workdir", str(tmp_path / "file"))
    assert proc.returncode == 1 and "exists and is not a directory" in proc.stderr
    assert "Traceback" not in proc.stderr
    proc = run_cli(
        "demo", "--workdir", str(tmp_path / "w"), env={"AWS_ENDPOINT_URL": "http://127.0.0.1:1"}
    )
    assert proc.returncode == 1 and "does not answer" in proc.stderr
    assert "Traceback" not in proc.stderr


# -- local mode = SageMaker mode ---------------------------------------------------------------


def test_resume_from_travels_as_a_channel_not_a_container_path(tmp_path, monkeypatch):
    from spectrum_sm.aws.requests import CHECKPOINT_S3_ENV
    from spectrum_sm.training.args import parse_args

    config = load_pipeline(FLAGSHIP, ["training.resume_from=s3://my-spectrum-bucket/ck/old/"])
    from spectrum_sm.aws.requests import build_training_request

    request = build_training_request(
        config.training, spectrum_uri="s3://my-spectrum-bucket/layers/"
    )
    assert "/opt/ml" not in json.dumps(request["HyperParameters"])
    channels = {c["ChannelName"] for c in request["InputDataConfig"]}
    assert "resume" in channels
    assert request["Environment"][CHECKPOINT_S3_ENV] == request["CheckpointConfig"]["S3Uri"]
    # Wherever the job's root is, train.py finds the channel through SM_CHANNEL_RESUME.
    monkeypatch.setenv("SM_CHANNEL_RESUME", str(tmp_path / "input" / "data" / "resume"))
    args = parse_args(["--model_name_or_path", "m", "--train_data", "d", "--method", "full"])
    assert args.resume_from == str(tmp_path / "input" / "data" / "resume")


def test_the_local_example_starts_from_the_demos_base_model_not_its_output(tmp_path):
    from spectrum_sm.toy import make_toy_training_setup

    config = load_pipeline(EXAMPLES / "local-tiny.yaml")
    built = make_toy_training_setup(tmp_path / "work" / "demo" / "inputs", layers=1, rows=4)
    base = str(built["model"].relative_to(tmp_path))
    data = str(built["train"].relative_to(tmp_path))
    assert config.analysis.model == config.training.model == base  # demo.py: workdir/inputs
    assert config.training.train_data == data


@pytest.mark.parametrize(
    ("rows", "sets", "fragment"),
    [
        ([{"messages": [{"role": "user", "content": "2+2?"}]}], [], "no assistant answer"),
        (
            [{"prompt": "one two three " * 40, "completion": "four"}],
            ["training.hyperparameters.max_seq_length=16"],
            "raise max_seq_length",
        ),
        ("caf\xe9", [], "not UTF-8 text"),
    ],
    ids=["no-answer", "cut-away", "latin-1"],
)
def test_the_dry_run_reads_local_training_data_as_the_job_will(toy, tmp_path, rows, sets, fragment):
    """Data with nothing to learn from (or unreadable) is refused by ``run --dry-run`` with the
    job's own data settings, as data-check would, before anything is uploaded."""
    data = toy["train"]
    if isinstance(rows, list):
        data = tmp_path / "train.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif isinstance(rows, str):
        data = tmp_path / "train.jsonl"
        data.write_bytes(json.dumps({"prompt": "x", "completion": "y"}).encode()[:-2] + b'\xe9"}\n')
    overrides = [
        f"analysis.model={toy['model']}",
        f"training.model={toy['model']}",
        f"training.train_data={data}",
        *sets,
    ]
    args = [a for o in overrides for a in ("--set", o)]
    proc = run_cli("run", str(EXAMPLES / "local-tiny.yaml"), "--local", "--dry-run", *args)
    assert proc.returncode == 1 and fragment in proc.stderr, proc.stderr[-2000:]
    error = proc.stderr.strip().splitlines()[-1]  # after the data layer's INFO counts
    assert "Traceback" not in proc.stderr and error.startswith("error: ") and fragment in error
    assert "train_data" in error or data.name in error
    ok = run_cli("run", str(EXAMPLES / "local-tiny.yaml"), "--local", "--dry-run", *args[:4],
                 "--set", f"training.train_data={toy['train']}")  # fmt: skip
    assert ok.returncode == 0, ok.stderr[-2000:]


# -- a second new user's probe ------------------------------------------------------------------


def _dry_run(*overrides: str):
    args = ["run", str(FLAGSHIP), "--dry-run"]
    for override in overrides:
        args += ["--set", override]
    return run_cli(*args)


def _sent(*overrides: str) -> dict:
    proc = _dry_run(*overrides)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)["training"]


@pytest.mark.parametrize(
    "override", [f"training.spot={HF}", f"trainig.spot={HF}", f"training.spott={HF}"]
)
def test_a_token_in_a_type_or_typo_error_is_not_echoed(override):
    """Before: ``spot must be bool, got 'hf_...'`` and typo messages repeated the token."""
    proc = _dry_run(override)
    assert proc.returncode == 1 and "not shown" in proc.stderr
    assert HF[:8] not in proc.stderr + proc.stdout


def test_argparse_errors_do_not_echo_a_token(tmp_path):
    import subprocess
    import sys

    train = Path(__file__).resolve().parents[1] / "entrypoints" / "train.py"
    for argv in (["--max_steps", HF], ["--hf_token", HF]):
        proc = subprocess.run(
            [sys.executable, str(train), *argv], capture_output=True, text=True, cwd=tmp_path
        )
        assert proc.returncode == 1 and HF[:8] not in proc.stderr + proc.stdout, proc.stderr
    proc = run_cli("plan", "--batch", HF, "x")
    assert proc.returncode == 2 and HF[:8] not in proc.stderr


def test_a_password_in_a_url_is_a_credential():
    url = "postgresql://admin:Sup3rS3cretPassw0rd@db.example.com/x"
    proc = _dry_run(f"common.environment.DB_URL={url}")
    assert proc.returncode == 1 and "environment.DB_URL looks like a credential" in proc.stderr
    assert "Sup3r" not in proc.stderr + proc.stdout
    assert _problems("training.environment.SITE=https://example.com/x@y") == ""


def test_yaml_numbers_and_booleans_are_read_as_yaml_1_2(tmp_path):
    """Before: 0400 was octal (256 GB), 010 was 8, ``on`` was True, 1.10 became 1.1."""
    sent = _sent(
        "training.volume_size_gb=0400",
        "training.hyperparameters.max_steps=010",
        "common.environment.FLAG=on",
        "common.tags.version=1.10",
    )
    assert sent["ResourceConfig"]["VolumeSizeInGB"] == 400
    assert sent["HyperParameters"]["max_steps"] == "10"
    assert sent["Environment"]["FLAG"] == "on"
    assert {"Key": "version", "Value": "1.10"} in sent["Tags"]
    written = tmp_path / "tags.yaml"
    written.write_text(FLAGSHIP.read_text().replace("project: spectrum-sm", "version: 1.10"))
    with pytest.raises(SpectrumError, match=r"tags\.version must be text, got the YAML value 1\.1"):
        load_pipeline(written)


def test_an_empty_mapping_entry_is_not_set_not_the_text_none():
    sent = _sent("common.environment.EMPTY=", "training.hyperparameters.system_prompt=")
    assert "EMPTY" not in sent["Environment"]
    assert "system_prompt" not in sent["HyperParameters"]


def test_variables_spectrum_sm_sets_are_refused_not_silently_replaced():
    proc = _dry_run("common.environment.SPECTRUM_SM_NPROC_PER_HOST=1")
    assert proc.returncode == 1 and "SPECTRUM_SM_* variables are set by spectrum-sm" in proc.stderr


def test_python_configs_are_type_checked():
    """Before: ``spot="false"`` sent EnableManagedSpotTraining: true; "2" was a TypeError."""
    from spectrum_sm.aws.config import TrainingConfig

    config = TrainingConfig(
        model="Qwen/Qwen3-8B",
        train_data="s3://b/d",
        spot="false",  # type: ignore[arg-type]
        instance_count="2",  # type: ignore[arg-type]
        environment={"B": True},  # type: ignore[dict-item]
    )
    problems = "; ".join(config.problems(need_role=False))
    assert "spot must be bool, got 'false'" in problems
    assert "instance_count must be int, got '2'" in problems
    assert "environment must map text to text" in problems


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--method", "lora", "--lora_alpha", "0"], "lora_alpha must be positive"),
        (["--seed", "-1"], "seed must be in [0, 2**32)"),
        (["--seed", "99999999999"], "seed must be in [0, 2**32)"),
        (["--checkpoint_dir", "{out}"], "overlap"),
        (["--checkpoint_dir", "{out}/ck"], "overlap"),
        (["--tensorboard_dir", "{file}"], "tensorboard_dir '{file}' is a file"),
    ],
)
def test_train_arguments_that_would_train_nothing_or_mix_folders(tmp_path, flags, fragment):
    from spectrum_sm.training.args import parse_args

    (tmp_path / "data.jsonl").write_text("{}\n")
    names = {"out": str(tmp_path / "out"), "file": str(tmp_path / "data.jsonl")}
    argv = ["--model_name_or_path", "m", "--train_data", "d", "--method", "full"]
    argv += ["--output_dir", names["out"], *(f.format(**names) for f in flags)]
    with pytest.raises(SpectrumError, match=re.escape(fragment.format(**names))):
        parse_args(argv)


def test_a_seed_out_of_range_fails_the_dry_run_not_the_job():
    proc = _dry_run("training.hyperparameters.seed=-1")
    assert proc.returncode == 1 and "seed must be in [0, 2**32)" in proc.stderr


@pytest.mark.parametrize(
    "text, fragment",
    [
        ('{"chat_template": "{{ messages }}"}', "is JSON, not a Jinja template"),
        ("{% for m in messages %}{{ m.content }", "does not compile at line 1"),
        ("Hello {{ bos_token }}", "never reads `messages`"),
    ],
)
def test_what_cannot_be_a_chat_template_is_refused_naming_the_file(toy, tmp_path, text, fragment):
    template = tmp_path / "template.jinja"
    template.write_text(text)
    proc = run_cli("data-check", str(toy["train"]), "--model", str(toy["model"]),
                   "--chat-template-path", str(template))  # fmt: skip
    assert proc.returncode == 1 and fragment in proc.stderr and "template.jinja" in proc.stderr
    assert "data row" not in proc.stderr and "Traceback" not in proc.stderr


def test_report_never_overwrites_another_file_with_its_figure(tmp_path):
    results = tmp_path / "snr_results_m.json"
    results.write_text('{"a.0.q": {"snr": 1.0, "type": "q"}, "a.1.q": {"snr": 2.0, "type": "q"}}')
    model = tmp_path / "model.safetensors"
    model.write_bytes(b"weights")
    proc = run_cli("report", str(results), "--output", str(model))
    assert proc.returncode == 1 and "name it *.png" in proc.stderr
    assert model.read_bytes() == b"weights"
    proc = run_cli("report", str(results), "--output", str(tmp_path / "fig.png" / ".." / "x"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    (tmp_path / "figs.png").mkdir()
    proc = run_cli("report", str(results), "--output", str(tmp_path / "figs.png"))
    assert proc.returncode == 1 and "is a folder" in proc.stderr


def test_the_python_scan_refuses_wrong_types_and_takes_one_glob(tmp_path):
    from factories import tiny_qwen3

    import spectrum_sm

    with pytest.raises(SpectrumError, match="model must be a path"):
        spectrum_sm.scan(None)  # type: ignore[arg-type]
    model = tiny_qwen3(tmp_path / "m", layers=1)
    with pytest.raises(SpectrumError, match="top_percent must be float, got True"):
        spectrum_sm.scan(model, top_percent=True)
    result = spectrum_sm.scan(model, include="self_attn.*", show_progress=False)
    assert result.selection() and all(t.startswith("self_attn.") for t in result.selection())


def test_folders_and_results_files_given_for_the_wrong_thing_say_so(tmp_path):
    from spectrum_sm.core.freeze import read_layer_file

    assert "is a folder" in run_cli("select", str(tmp_path), "--top-percent", "50").stderr
    assert "is a folder" in run_cli("run", str(tmp_path), "--dry-run").stderr
    results = tmp_path / "snr_results_m.json"
    results.write_text('{"a.0.q": {"snr": 1.0, "type": "q"}}')
    with pytest.raises(SpectrumError, match=r"is a results file .* spectrum-sm select"):
        read_layer_file(results)


def test_the_demo_refuses_a_negative_step_count(tmp_path):
    proc = run_cli("demo", "--workdir", str(tmp_path / "d"), "--steps", "-3")
    assert proc.returncode == 2 and not (tmp_path / "d").exists()


@pytest.mark.parametrize(
    "flags, fragment",
    [
        (["--precision", "fp16"], "precision fp16 needs a CUDA GPU"),
        (["--method", "lora", "--lora_target_modules", "nonexistent_mod"], "match no module"),
        (["--method", "lora", "--lora_target_modules", ","], "lora_target_modules is empty"),
    ],
)
def test_train_py_refuses_what_would_end_in_a_traceback(toy, tmp_path, flags, fragment):
    import subprocess
    import sys

    train = Path(__file__).resolve().parents[1] / "entrypoints" / "train.py"
    argv = ["--model_name_or_path", str(toy["model"]), "--train_data", str(toy["train"])]
    argv += ["--method", "full", "--output_dir", str(tmp_path / "out"), "--max_steps", "1"]
    proc = subprocess.run(
        [sys.executable, str(train), *argv, *flags], capture_output=True, text=True, cwd=tmp_path
    )
    assert proc.returncode == 1 and fragment in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()  # a refused run leaves no folder


def test_a_columns_mapping_that_the_job_cannot_parse_fails_the_dry_run():
    """Before: with S3 data it passed the dry run and failed in the job."""
    proc = _dry_run("training.hyperparameters.columns={prompt: question}")
    assert proc.returncode == 1 and "is not NEW=EXISTING" in proc.stderr


@pytest.mark.parametrize(
    "tag, fragment",
    [("bad*key=v", "letters, digits, spaces"), ("aws:owner=me", "reserved for AWS")],
)
def test_tags_sagemaker_would_refuse_fail_the_dry_run(tag, fragment):
    proc = _dry_run(f"common.tags.{tag}")
    assert proc.returncode == 1 and fragment in proc.stderr
    assert _problems("common.tags.équipe=nlp 1") == ""  # letters of any script, spaces


def test_a_training_job_without_a_layer_file_names_the_setting(tmp_path):
    proc = run_cli("train", str(FLAGSHIP), "--dry-run")
    assert proc.returncode == 1 and "training.spectrum_config" in proc.stderr


def test_scan_refuses_a_revision_for_a_folder_and_a_name_no_one_can_type(tmp_path):
    from factories import tiny_qwen3

    model = tiny_qwen3(tmp_path / "m", layers=1)
    proc = run_cli("scan", str(model), "--revision", "v2.0", "--output-dir", str(tmp_path / "o"))
    assert proc.returncode == 1 and "applies to Hub models" in proc.stderr
    proc = run_cli("scan", str(model), "--name", "x\ty", "--output-dir", str(tmp_path / "o"))
    assert proc.returncode == 1 and "cannot name files" in proc.stderr
    assert not list(tmp_path.glob("o/*"))  # nothing written


def test_data_check_agrees_with_train_py_and_says_a_bad_file_once(toy, tmp_path):
    proc = run_cli("data-check", str(toy["train"]), "--model", str(toy["model"]),
                   "--max-seq-length", "8")  # fmt: skip
    assert proc.returncode == 2 and "at least 16" in proc.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{bad json\n')
    proc = run_cli("data-check", str(bad), "--model", str(toy["model"]))
    assert proc.returncode == 1 and "bad.jsonl:2: not valid JSON" in proc.stderr
    assert "Failed to load JSON" not in proc.stderr and "ERROR" not in proc.stderr


def test_an_analysis_revision_for_a_model_that_is_not_on_the_hub_is_refused():
    problems = _problems("analysis.model=s3://bucket/models/m/", "analysis.revision=main")
    assert "revision 'main' applies to Hub models" in problems
    assert "revision" not in _problems("analysis.revision=main")  # Qwen/Qwen3-8B is


def test_the_memory_refusal_suggests_only_what_would_change_the_answer():
    one_gpu = _dry_run("training.instance_type=ml.g5.2xlarge")
    assert one_gpu.returncode == 1 and "needs ~" in one_gpu.stderr
    assert "use distribution fsdp" not in one_gpu.stderr  # one GPU: nothing to shard over
    assert "gradient_checkpointing" not in one_gpu.stderr.split("; use ")[-1]  # already on
    four = _dry_run(
        "training.instance_type=ml.g5.12xlarge",
        "training.distribution=ddp",
        "training.method=full",
    )
    assert four.returncode == 1 and "use distribution fsdp" in four.stderr


@pytest.mark.parametrize(
    "setting", ["training.method=qlora", "training.hyperparameters.precision=fp16"]
)
def test_what_needs_cuda_is_refused_on_a_cpu_instance_at_dry_run(setting):
    image = "common.image_uri=123456789012.dkr.ecr.us-east-1.amazonaws.com/x:1"
    proc = _dry_run("training.instance_type=ml.c5.xlarge", image, setting)
    assert proc.returncode == 1 and "needs a CUDA GPU; ml.c5.xlarge has none" in proc.stderr
