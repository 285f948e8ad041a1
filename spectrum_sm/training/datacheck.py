"""What the loss sees: the training data loaded exactly as the job loads it, row by row.

Backs ``spectrum-sm data-check``: the same loader, row mapping, chat template, loss masks and
truncation as train.py, with the counts of rows read, kept and dropped (by reason).
"""

from __future__ import annotations

import itertools
from typing import Any

from ..core.errors import SpectrumError, first_sentence
from ..core.hub import is_local, require_hub
from .args import data_settings
from .data import (
    IGNORE_INDEX,
    data_options,
    encode_row,
    load_split,
    mask_source,
    nothing_left,
    prepare_split,
)


def _tokenizer(model: str):
    from transformers import AutoTokenizer

    if not is_local(model, "model"):
        try:  # a cached Hub tokenizer needs no network
            return AutoTokenizer.from_pretrained(model, local_files_only=True)
        except Exception:
            require_hub(f"the tokenizer of {model!r}")
    try:
        return AutoTokenizer.from_pretrained(model)
    except Exception as exc:
        raise SpectrumError(
            f"cannot load the tokenizer of {model!r}: {first_sentence(exc, 300)}"
        ) from exc


def _pieces(tokenizer: Any, ids: list[int], labels: list[int]) -> list[tuple[str, bool]]:
    """The row's text in runs that do or do not carry loss (decoded run by run, so multi-byte
    characters split across tokens stay whole)."""
    runs = itertools.groupby(zip(ids, labels, strict=True), key=lambda p: p[1] != IGNORE_INDEX)
    return [(tokenizer.decode([token for token, _ in run]), flag) for flag, run in runs]


def render_row(pieces: list[tuple[str, bool]], *, color: bool) -> str:
    """The text with its loss-carrying parts highlighted (green) or bracketed ``[[...]]``."""
    opened, closed = ("\x1b[1;32m", "\x1b[0m") if color else ("[[", "]]")
    return "".join(f"{opened}{text}{closed}" if flag else text for text, flag in pieces)


def check_data(
    data: str, model: str, *, rows: int = 3, split: str = "train", **settings: Any
) -> dict[str, Any]:
    """Counts for the whole split and, for its first ``rows`` rows, the text that carries loss.
    ``settings`` are train.py's data arguments by their names (:data:`~.args.DATA_SETTINGS`:
    ``max_seq_length``, ``columns``, ``prompt_template``, ``completion_template``,
    ``system_prompt``, ``assistant_only_loss``, ``dataset_config``, ``chat_template_path``, a
    .jinja file that replaces the tokenizer's template); unset ones keep train.py's defaults.
    ``loss_mask`` in the answer says how chat rows' masks were made (see :mod:`.chat`)."""
    if rows < 0:
        raise SpectrumError(f"rows must be >= 0, got {rows}")
    args = data_settings(settings)
    tokenizer = _tokenizer(model)
    options = data_options(args)
    if data.startswith("s3://"):
        # Reading S3 is the jobs layer's: spectrum_sm.check_data downloads it first.
        raise SpectrumError(f"{data}: download it first (spectrum_sm.check_data does)")
    dataset = load_split(data, split=split, name=args.dataset_config or None)
    _, counts = prepare_split(dataset, tokenizer, options, split=split, require_rows=False)
    examples, rendered = [], []
    for index in range(min(rows, len(dataset))):
        encoded = encode_row(dataset[index], index, tokenizer, options)
        ids, labels = encoded["input_ids"], encoded["labels"]
        pieces = _pieces(tokenizer, ids, labels)
        loss_ids = [t for t, label in zip(ids, labels, strict=True) if label != IGNORE_INDEX]
        examples.append(
            {
                "row": index,
                "trained_text": tokenizer.decode(loss_ids),
                "trained_parts": [text for text, flag in pieces if flag],
                "tokens": len(ids),
                "loss_tokens": encoded["loss_tokens"],
                "drop_reason": encoded["drop_reason"],
            }
        )
        rendered.append(pieces)
    report = {
        "loss_mask": mask_source(tokenizer, options, dataset.column_names) or None,
        **vars(counts),  # rows_read, rows_kept, dropped, loss_tokens
        "examples": examples,
        "rendered": rendered,
    }
    if counts.rows_kept == 0:
        report["error"] = nothing_left(split, counts, options)
    return report
