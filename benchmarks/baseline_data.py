"""The previous training-data loader, kept as the baseline of benchmarks/data_prep.py.

Every rank reads all rows into Python lists and tokenizes them all; assistant turns are found
by rendering prefixes. Not used by the library.

Training data: load rows, tokenize them with loss masks, pack, and batch.

Three row shapes are understood:

* ``{"messages": [{"role": ..., "content": str}, ...]}``: rendered with the tokenizer's chat
  template; by default only assistant tokens carry loss.
* ``{"prompt": str, "completion": str}``: loss on the completion (and the end-of-sequence token).
* ``{"text": str}``: loss on everything.

Anything else is an error that names the row and the fields it has.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spectrum_sm.core.errors import SpectrumError

log = logging.getLogger(__name__)
IGNORE_INDEX = -100
DATA_SUFFIXES = (".jsonl", ".json", ".parquet")


def data_files(path: str | Path) -> list[Path]:
    """A data file, or every jsonl/json/parquet file in a folder (sorted)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in DATA_SUFFIXES)
        if files:
            return files
        raise SpectrumError(f"{path}: no .jsonl, .json or .parquet files in this folder")
    raise SpectrumError(f"data path {str(path)!r} does not exist")


def load_rows(path: str | Path) -> list[dict[str, Any]]:
    """All rows of a data file or folder, as dicts."""
    rows: list[dict[str, Any]] = []
    for file in data_files(path):
        rows += _read_file(file)
    if not rows:
        raise SpectrumError(f"{path}: the data holds no rows")
    return rows


def _read_file(file: Path) -> list[dict[str, Any]]:
    try:
        if file.suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(file).to_pylist()
        text = file.read_text(encoding="utf-8")
        if file.suffix == ".jsonl":
            rows = []
            for number, line in enumerate(text.splitlines(), 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise SpectrumError(f"{file}:{number}: not valid JSON ({exc})") from exc
            return rows
        data = json.loads(text)
    except SpectrumError:
        raise
    except ImportError as exc:
        raise SpectrumError(f"{file}: reading parquet needs pyarrow ({exc})") from exc
    except Exception as exc:
        raise SpectrumError(f"{file}: cannot read ({type(exc).__name__}: {exc})") from exc
    if isinstance(data, dict):
        # {"data": [...]} or {"train": [...]} style files: take the single list inside.
        lists = [v for v in data.values() if isinstance(v, list)]
        data = lists[0] if len(lists) == 1 else [data]
    if not isinstance(data, list):
        raise SpectrumError(f"{file}: expected a list of rows")
    return data


def row_kind(row: Any, index: int) -> str:
    """``messages``, ``prompt_completion`` or ``text``; an error naming the row otherwise."""
    if isinstance(row, dict):
        if "messages" in row:
            return "messages"
        if "prompt" in row and "completion" in row:
            return "prompt_completion"
        if "text" in row:
            return "text"
        fields = ", ".join(sorted(map(str, row))) or "none"
    else:
        fields = f"a {type(row).__name__}, not an object"
    raise SpectrumError(
        f"data row {index} has fields [{fields}]; expected 'messages', 'prompt' and "
        f"'completion', or 'text'"
    )


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


def _check_text(value: Any, what: str, index: int) -> str:
    if not isinstance(value, str):
        raise SpectrumError(
            f"data row {index}: {what} is a {type(value).__name__}, expected text "
            f"(a dict here usually means an answer object was passed instead of its text)"
        )
    return value


def tokenize_row(
    row: dict[str, Any], index: int, tokenizer: Any, max_length: int, assistant_only: bool = True
) -> Example:
    """Token ids and labels (``-100`` where no loss is taken), truncated to ``max_length``."""
    kind = row_kind(row, index)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if kind == "text":
        ids = (
            tokenizer(_check_text(row["text"], "'text'", index), add_special_tokens=False)[
                "input_ids"
            ]
            + eos
        )
        labels = list(ids)
    elif kind == "prompt_completion":
        prompt = tokenizer(_check_text(row["prompt"], "'prompt'", index), add_special_tokens=False)[
            "input_ids"
        ]
        completion = (
            tokenizer(
                _check_text(row["completion"], "'completion'", index), add_special_tokens=False
            )["input_ids"]
            + eos
        )
        ids = prompt + completion
        labels = [IGNORE_INDEX] * len(prompt) + completion
    else:
        ids, labels = _tokenize_messages(row["messages"], index, tokenizer, assistant_only)
    ids, labels = ids[:max_length], labels[:max_length]
    return Example(ids, labels)


def _tokenize_messages(messages: Any, index: int, tokenizer: Any, assistant_only: bool):
    if not isinstance(messages, list) or not messages:
        raise SpectrumError(f"data row {index}: 'messages' must be a non-empty list")
    for number, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise SpectrumError(f"data row {index}: message {number} needs 'role' and 'content'")
        _check_text(message["content"], f"message {number} content", index)
    if not getattr(tokenizer, "chat_template", None):
        raise SpectrumError("the tokenizer has no chat template; 'messages' rows need one")
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    # Assistant spans by rendering prefixes: works with any template that renders a
    # conversation as the concatenation of its turns (no {% generation %} markers needed).
    spans = []
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = (
            tokenizer.apply_chat_template(
                messages[:turn], tokenize=False, add_generation_prompt=True
            )
            if turn
            else ""
        )
        upto = tokenizer.apply_chat_template(messages[: turn + 1], tokenize=False)
        if not full.startswith(upto) or not upto.startswith(before):
            raise SpectrumError(
                f"data row {index}: the chat template does not render turns as prefixes; "
                f"cannot find the assistant tokens (pass --assistant_only_loss false)"
            )
        spans.append((len(before), len(upto)))
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = encoded["input_ids"]
    if not assistant_only:
        return ids, list(ids)
    labels = [
        token if any(start <= a and b <= end for start, end in spans) and b > a else IGNORE_INDEX
        for token, (a, b) in zip(ids, encoded["offset_mapping"], strict=True)
    ]
    return ids, labels


def build_examples(
    rows: Sequence[dict[str, Any]],
    tokenizer: Any,
    max_length: int,
    *,
    assistant_only: bool = True,
    packing: bool = False,
) -> list[Example]:
    """Tokenize every row; with ``packing``, concatenate and cut into ``max_length`` blocks."""
    examples = [
        tokenize_row(r, i, tokenizer, max_length, assistant_only) for i, r in enumerate(rows)
    ]
    examples = [e for e in examples if any(label != IGNORE_INDEX for label in e.labels)]
    if not examples:
        raise SpectrumError("no row has any token to learn from (all masked or empty)")
    if not packing:
        return examples
    ids = [t for e in examples for t in e.input_ids]
    labels = [t for e in examples for t in e.labels]
    blocks = [
        Example(ids[i : i + max_length], labels[i : i + max_length])
        for i in range(0, len(ids) - max_length + 1, max_length)
    ]
    return blocks or [Example(ids, labels)]
