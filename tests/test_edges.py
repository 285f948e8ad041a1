"""Issue 20's edges: every bad input refused in one line naming the field, nothing leaked, nothing
half-written, nothing silently wrong. Each test fails on the code before the fix it names."""

from __future__ import annotations

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
    ],
)
def test_a_credential_in_any_field_is_refused_naming_the_field_not_the_value(override, field):
    problems = _problems(override)
    assert f"{field} looks like a credential" in problems
    for token in (HF, AKIA, GHP):
        assert token not in problems and token[:12] not in problems


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


def test_the_python_api_gets_the_same_checks():
    from spectrum_sm.aws.config import AnalysisConfig, TrainingConfig

    config = AnalysisConfig(model="m", certify_percents=["abc"], top_percent="50")  # type: ignore
    problems = "; ".join(config.problems(need_role=False))
    assert "certify_percents must be" in problems and "top_percent must be" in problems
    problems = TrainingConfig(model="m", train_data="d", top_percent=0).problems(need_role=False)
    assert any("top_percent must be in (0, 100]" in x for x in problems)
