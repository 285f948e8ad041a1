"""What a credential looks like: the one place that decides it.

Configs, requests and job logs are seen by anyone who can describe a job, so a credential in
any field but the ones meant for secret references is refused before anything is sent. Messages
name the field, never the value.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from typing import Any

#: Values that are credentials whatever field holds them: Hugging Face, AWS access key ids,
#: GitHub (classic and fine-grained), OpenAI-style and Slack tokens.
SECRET_VALUE = re.compile(
    r"(hf_[A-Za-z0-9]{30,}|\b(AKIA|ASIA)[A-Z0-9]{16}\b|gh[pousr]_[A-Za-z0-9]{30,}"
    r"|github_pat_[A-Za-z0-9_]{40,}|sk-[A-Za-z0-9_\-]{20,}|xox[abpsr]-[A-Za-z0-9\-]{10,}"
    # a password in a URL's user part: scheme://user:password@host
    r"|[A-Za-z][A-Za-z0-9+.\-]*://[^/\s:@]+:[^/\s@]+@)"
)
#: Where a bare AWS secret key could sit inside a message (checked with :func:`is_secret`).
_AWS_KEY_CANDIDATE = re.compile(r"(?<![A-Za-z0-9/+])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])")
HIDDEN = "<a credential, not shown>"
#: An AWS secret access key has no prefix: 40 base64 characters (30 random bytes). Taken as
#: one only when it is the whole value and looks random, so that git SHAs (lowercase hex), S3
#: keys and Hub paths (many "/" between words) are not: mixed case and digits, at most three
#: "/", and the character entropy of random base64 (~4.7 bits; paths of this length ~4.3).
AWS_SECRET_KEY = re.compile(r"(?=.*[a-z])(?=.*[A-Z])(?=.*[0-9])[A-Za-z0-9/+]{40}")
AWS_SECRET_KEY_ENTROPY = 4.5


def is_secret(text: str) -> bool:
    """Whether ``text`` holds a credential (a token anywhere in it, or an AWS secret key as the
    whole value)."""
    if SECRET_VALUE.search(text):
        return True
    text = text.strip()
    if not AWS_SECRET_KEY.fullmatch(text) or text.count("/") > 3:
        return False
    counts = collections.Counter(text)
    entropy = -sum(n / len(text) * math.log2(n / len(text)) for n in counts.values())
    return entropy >= AWS_SECRET_KEY_ENTROPY


def redact(text: str) -> str:
    """``text`` with every credential-shaped part replaced: the last guard for messages that
    quote what a user typed (a token pasted into the wrong flag)."""
    text = SECRET_VALUE.sub(HIDDEN, text)
    return _AWS_KEY_CANDIDATE.sub(lambda m: HIDDEN if is_secret(m.group()) else m.group(), text)


#: Names under which a value is a credential (HF_TOKEN, WANDB_API_KEY, DB_PASSWORD, ...), as whole
#: name parts: TOKENIZERS_PARALLELISM or max_tokens are not.
SECRET_NAME = re.compile(
    r"(?:^|[_\-.])(TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIALS?|API_?KEY|ACCESS_KEY|PRIVATE_KEY)"
    r"(?:$|[_\-.])",
    re.IGNORECASE,
)
#: Fields whose values are references to secrets (Secrets Manager ARNs), never secrets.
REFERENCE_FIELDS = ("secret_environment",)
#: Fields whose keys become environment variables or tags: a credential-like name is refused.
NAMED_FIELDS = ("environment", "tags", "hyperparameters", "Environment", "HyperParameters")


def _walk(value: Any, where: str, keys_named: bool, found: list[str]) -> None:
    if isinstance(value, str):
        if is_secret(value):
            found.append(where)
    elif isinstance(value, dict):
        for key, item in value.items():
            inner = f"{where}.{key}"
            if is_secret(str(key)) or (keys_named and SECRET_NAME.search(str(key))):
                found.append(inner if not is_secret(str(key)) else f"{where} (a key)")
                continue
            _walk(item, inner, False, found)
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _walk(item, f"{where}[{index}]", False, found)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            if f.name in REFERENCE_FIELDS:
                continue  # their values are checked to be ARNs, their keys are env names
            _walk(getattr(value, f.name), f.name, f.name in NAMED_FIELDS, found)


def secret_fields(value: Any, where: str = "") -> list[str]:
    """The places in ``value`` (a config dataclass, a request dict, a list, a string) that hold
    something credential-shaped; ``secret_environment`` values (secret ARNs) are not."""
    found: list[str] = []
    if isinstance(value, dict) and not where:
        for key, item in value.items():
            if key not in REFERENCE_FIELDS:
                _walk(item, str(key), key in NAMED_FIELDS, found)
    else:
        _walk(value, where, False, found)
    return found


def secret_message(place: str) -> str:
    return (
        f"{place} looks like a credential (the value is not shown); never put one in a config "
        "or an argument: SageMaker shows environment, hyperparameters, names and every setting "
        "to anyone who can describe the job. Store it in AWS Secrets Manager and name it in "
        "secret_environment (e.g. HF_TOKEN: arn:aws:secretsmanager:...), which the job reads "
        "with its role"
    )
