"""Which tokens of a rendered conversation are the assistant's: loss masks for any chat template.

Two ways, tried in order:

1. The template's own markers: a template with ``{% generation %}`` blocks tells transformers
   which characters are the assistant's (``return_assistant_tokens_mask``).
2. Otherwise the conversation is rendered once, as the model will see it, and each assistant
   message is located in that text in order: its reasoning (when the template renders it there),
   its answer, and the template's end-of-turn marker right after. Nothing assumes that a
   conversation renders as the concatenation of its turns, so templates that rewrite earlier
   turns (Qwen3 drops the reasoning of all but the last assistant turn and adds an empty think
   block to it), fold the system prompt into a user turn (Gemma, Mistral) or trim contents
   (Llama 3) all work.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from ..core.errors import SpectrumError

SENTINEL = "SPECTRUMSMSENTINEL"


def has_generation_markers(template: str | None) -> bool:
    return bool(template) and "{% generation %}" in template.replace("{%-", "{%").replace(
        "-%}", "%}"
    )


def end_of_turn(tokenizer: Any) -> str:
    """What the template writes right after an assistant answer (``<|im_end|>``,
    ``<|eot_id|>``, ``<end_of_turn>``, ...), learned from two probe conversations."""
    return _end_of_turn(tokenizer.chat_template, tokenizer)


@lru_cache(maxsize=32)
def _end_of_turn(template: str, tokenizer: Any) -> str:
    short = [{"role": "user", "content": "x"}, {"role": "assistant", "content": SENTINEL}]
    long = [*short, {"role": "user", "content": "y"}]
    try:
        a = tokenizer.apply_chat_template(short, tokenize=False)
        b = tokenizer.apply_chat_template(long, tokenize=False)
    except Exception:  # a template that refuses the probe: no end-of-turn text is trained
        return ""
    a, b = a[a.rfind(SENTINEL) + len(SENTINEL) :], b[b.rfind(SENTINEL) + len(SENTINEL) :]
    common = 0
    while common < min(len(a), len(b)) and a[common] == b[common]:
        common += 1
    # The marker, not the whitespace after it: "<|im_end|>\n" trains "<|im_end|>".
    return a[:common].rstrip()


def generation_prompt(tokenizer: Any) -> str:
    """What the template writes to open an assistant turn (``<|im_start|>assistant\n``)."""
    return _generation_prompt(tokenizer.chat_template, tokenizer)


@lru_cache(maxsize=32)
def _generation_prompt(template: str, tokenizer: Any) -> str:
    probe = [{"role": "user", "content": SENTINEL}]
    try:
        bare = tokenizer.apply_chat_template(probe, tokenize=False)
        opened = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
    except Exception:
        return ""
    return opened[len(bare) :] if opened.startswith(bare) else ""


def _answer(message: dict[str, Any]) -> tuple[str, str]:
    """(reasoning, answer) as a template shows them: inline ``<think>...</think>`` split off."""
    content = message.get("content") or ""
    reasoning = message.get("reasoning_content") or message.get("reasoning") or ""
    if not reasoning and "</think>" in content:
        head, _, content = content.rpartition("</think>")
        reasoning = head.split("<think>")[-1]
    return reasoning.strip(), content.strip()


def assistant_spans(
    text: str, messages: list[dict[str, Any]], eot: str, opening: str = ""
) -> list[tuple[int, int]]:
    """Character spans of ``text`` (the rendered conversation) that are assistant output.

    Raises :class:`SpectrumError` when an assistant answer cannot be found in order (a
    template that changes the answers themselves)."""
    spans: list[tuple[int, int]] = []
    cursor = 0
    for number, message in enumerate(messages):
        role = message.get("role")
        if role != "assistant":
            content = message.get("content")
            if role in ("user", "tool") and isinstance(content, str) and content.strip():
                found = text.find(content.strip(), cursor)
                if found >= 0:  # a user turn moves the cursor past itself
                    cursor = found + len(content.strip())
            continue
        reasoning, answer = _answer(message)
        if not answer and not message.get("tool_calls"):
            continue  # an empty turn carries no loss
        start = end = -1
        if answer:
            start = text.find(answer, cursor)
            if start < 0:
                raise SpectrumError(
                    f"message {number}: the assistant answer is not in the rendered "
                    "conversation (the chat template changes it)"
                )
            end = start + len(answer)
        if reasoning:
            thought = text.find(reasoning, cursor, start if start >= 0 else len(text))
            if thought >= 0:  # rendered at this turn (Qwen3: only the last turn's)
                opening = text.rfind("<think>", cursor, thought)
                # The opening tag is the model's to write too (no generation prompt holds it).
                if opening >= 0 and not text[opening + len("<think>") : thought].strip():
                    thought = opening
                start = thought
                end = max(end, thought + len(reasoning))
        if start < 0:  # tool calls only: from the turn's opening to its end
            opened = text.find(opening, cursor) if opening else -1
            start = end = opened + len(opening) if opened >= 0 else cursor
        if eot:
            marker = text.find(eot, end)
            # The marker closing this turn, not one several turns later.
            nxt = _next_user(text, messages, number, end)
            if marker >= 0 and (nxt < 0 or marker < nxt):
                end = marker + len(eot)
        spans.append((start, end))
        cursor = end
    return spans


def _next_user(text: str, messages: list[dict[str, Any]], number: int, start: int) -> int:
    for message in messages[number + 1 :]:
        content = message.get("content")
        if message.get("role") == "user" and isinstance(content, str) and content.strip():
            return text.find(content.strip(), start)
    return -1


def render_with_mask(
    tokenizer: Any, messages: list[dict[str, Any]], tools: list | None = None
) -> tuple[list[int], list[bool], str]:
    """Token ids of the rendered conversation, which of them are assistant output, and the text."""
    kwargs = {"tools": tools} if tools else {}
    if has_generation_markers(tokenizer.chat_template):
        out = tokenizer.apply_chat_template(
            messages,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=True,
            **kwargs,
        )
        ids = list(out["input_ids"])
        return ids, [bool(m) for m in out["assistant_masks"]], tokenizer.decode(ids)
    text = tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    spans = assistant_spans(text, messages, end_of_turn(tokenizer), generation_prompt(tokenizer))
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [
        b > a and any(a < end and b > start for start, end in spans)
        for a, b in encoded["offset_mapping"]
    ]
    return list(encoded["input_ids"]), mask, text
