"""The one exception type that carries a user-facing message."""

from __future__ import annotations


class SpectrumError(Exception):
    """An error the user can fix (bad path, bad percent, corrupt shard...).

    The CLI prints ``str(error)`` on one line and exits non-zero, without a traceback. Messages
    quote what the user gave; a credential among it is never shown (:func:`secrets.redact`).
    """

    def __str__(self) -> str:
        from .secrets import redact

        return redact(super().__str__())


def first_sentence(exc: BaseException, limit: int = 200) -> str:
    """The first sentence of a third party's message, without terminal colour codes: enough to
    say what failed on one line."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*m|\[[0-9;]*m", "", str(exc)).strip() or type(exc).__name__
    text = text.splitlines()[0]
    sentence = re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0]
    return sentence if len(sentence) <= limit else sentence[: limit - 3] + "..."


def unknown_model(
    where: str, config: dict, exc: BaseException, *, can_trust: bool
) -> SpectrumError:
    """transformers refused a model's config: name its type and, for a model that brings its own
    code (``auto_map``), how to run it."""
    model_type = config.get("model_type", "?")
    if custom := config.get("auto_map"):
        code = ", ".join(sorted({str(v) for v in dict(custom).values()}))[:120]
        hint = (
            f"it needs its own code ({code}): pass --trust_remote_code true if you trust it"
            if can_trust
            else f"it needs its own code ({code}), which this command does not run"
        )
    else:
        hint = "this transformers does not know it: upgrade transformers or check model_type"
    return SpectrumError(f"{where}: model_type {model_type!r}: {hint} ({first_sentence(exc)})")


def did_you_mean(word: str, choices) -> str:
    """`` (did you mean 'x'?)`` for the nearest of ``choices``, or "" when none is near."""
    import difflib

    match = difflib.get_close_matches(word, sorted(choices), n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""
