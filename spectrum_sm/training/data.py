"""Training data through the `datasets` library: load, map to a row shape, tokenize once, count.

Sources: a file or folder of jsonl / json / parquet / csv / arrow files (hidden files such as
``.ipynb_checkpoints/`` ignored, a UTF-8 BOM accepted), a ``Dataset.save_to_disk`` folder (a
``DatasetDict`` gives its split), or a Hub dataset id with config and split (read inside the
job; a private one needs ``secret_environment: {HF_TOKEN: ...}``).

Row shapes:

* ``{"messages": [{"role", "content", "reasoning_content"?, "tool_calls"?}, ...], "tools"?,
  "chat_template_kwargs"?}``: rendered with the tokenizer's chat template (or the one given);
  by default only what the assistant writes carries loss, exactly as TRL's
  ``assistant_only_loss`` masks it (:mod:`.chat`);
* ``{"prompt": str, "completion": str}``: loss on the completion and the end-of-sequence token;
* ``{"text": str}``: loss on everything.

Datasets of other shapes are mapped by configuration: ``columns`` renames (``prompt=question``),
``prompt_template`` / ``completion_template`` are Python format strings over a row's fields
(``"{context}\\n\\n{question}"``, ``"{answers[text][0]}"``), rendered as a chat when the tokenizer
has a template (with ``system_prompt`` first).

Every row is tokenized once, by the main process first (``num_proc`` workers), into a cached
Arrow file that every rank memory-maps: memory per rank does not grow with the dataset. Rows
that carry no loss are dropped and counted by reason (``no_assistant_turn``,
``truncated_away``, ``empty``); malformed rows are errors naming the row.
"""

from __future__ import annotations

import codecs
import contextlib
import hashlib
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..core.errors import SpectrumError
from ..core.hub import is_hub_id, require_hub
from ..core.names import quiet_logger

log = logging.getLogger(__name__)
IGNORE_INDEX = -100
#: File suffix -> the `datasets` builder that reads it.
BUILDERS = {
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".arrow": "arrow",
}
DATA_SUFFIXES = tuple(BUILDERS)
DISK_MARKERS = ("dataset_dict.json", "state.json", "dataset_info.json")
DROP_REASONS = ("empty", "no_assistant_turn", "truncated_away")
#: Bumped when tokenization changes, so old cached Arrow files are not reused.
FORMAT_VERSION = 2


# --- reading ---------------------------------------------------------------------------------


def data_files(path: str | Path) -> list[Path]:
    """A data file, or every data file in a folder (sorted; hidden files and folders skipped)."""
    path = Path(path)
    if path.is_file():
        if path.suffix not in BUILDERS:
            raise SpectrumError(
                f"{path}: unknown data format {path.suffix or '(no extension)'!r}; name the "
                f"file by its format: {', '.join(DATA_SUFFIXES)}"
            )
        return [path]
    if path.is_dir():
        files = sorted(
            p
            for p in path.rglob("*")
            if p.is_file()
            and p.suffix in BUILDERS
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if files:
            return files
        raise SpectrumError(
            f"{path}: no {', '.join(DATA_SUFFIXES)} files and no save_to_disk dataset here"
        )
    raise SpectrumError(f"data path {str(path)!r} does not exist")


def _datasets():
    try:
        import datasets
    except ImportError as exc:
        raise SpectrumError(f"reading training data needs the datasets library ({exc})") from exc
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    return datasets


def _cache_root() -> Path:
    root = os.environ.get("HF_DATASETS_CACHE") or (
        Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "datasets"
    )
    return Path(root) / "spectrum-sm"


def _derived_copy(file: Path, kind: str, name: str, write: Callable[[Path], None]) -> Path:
    """A copy of ``file`` made by ``write(partial_path)``, cached under ``kind`` by the file's
    path, size and modification time, and renamed into place only once whole."""
    stat = file.stat()
    key = hashlib.sha256(f"{file.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    copy = _cache_root() / kind / key.hexdigest()[:16] / name
    if not copy.is_file():
        copy.parent.mkdir(parents=True, exist_ok=True)
        partial = copy.with_suffix(copy.suffix + ".part")
        write(partial)
        partial.replace(copy)
    return copy


def _without_bom(file: Path) -> Path:
    """The file itself, or (for a text file starting with a UTF-8 BOM) a copy without it.
    Refuses an empty file or text that is not UTF-8 (a latin-1 export, say), naming the file
    and where: the readers would fail later with a traceback, or not at all."""
    if file.stat().st_size == 0:
        raise SpectrumError(f"{file}: the file is empty (no rows)")
    if file.suffix not in (".json", ".jsonl", ".csv"):
        return file
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with file.open("rb") as handle:
        while True:
            block = handle.read(1 << 20)
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as exc:
                at = offset + exc.start
                raise SpectrumError(
                    f"{file}: not UTF-8 text (byte 0x{(block or b'?')[exc.start]:02x} at offset "
                    f"{at}); save it as UTF-8, e.g. iconv -f latin1 -t utf-8 {file.name}"
                ) from None
            if not block:
                break
            offset += len(block)
        handle.seek(0)
        if handle.read(3) != b"\xef\xbb\xbf":
            return file

    def write(partial: Path) -> None:
        with file.open("rb") as handle, partial.open("wb") as out:
            handle.seek(3)
            while block := handle.read(1 << 20):
                out.write(block)

    return _derived_copy(file, "bom", file.name, write)


#: Row fields whose nested objects differ from row to row (tool-call arguments, tool schemas).
FREE_FORM = ("messages", "tools", "chat_template_kwargs")


def _free_form_as_text(file: Path, field_name: str | None) -> Path:
    """A copy of a JSON(L) file with the :data:`FREE_FORM` fields as JSON strings (decoded
    again per row), for `datasets` releases without the ``Json`` feature type (4.5, the
    training image's). Those unify the objects of all rows into one Arrow struct, so a row's
    tool-call arguments ``{"city": "Paris"}`` would come back as ``{"city": "Paris", "a":
    None, ...}`` and be rendered with every other row's keys as nulls. Raises ValueError on
    text that is not JSON."""

    def write(partial: Path) -> None:
        if file.suffix == ".json":
            data = json.loads(file.read_text(encoding="utf-8-sig"))
            rows = data[field_name] if field_name else data
            rows = rows if isinstance(rows, list) else [rows]
        else:
            with file.open(encoding="utf-8-sig") as handle:
                rows = [json.loads(line) for line in handle if line.strip()]
        with partial.open("w", encoding="utf-8") as out:
            for row in rows:
                if isinstance(row, dict):
                    row = {
                        k: json.dumps(v) if k in FREE_FORM and not isinstance(v, str) else v
                        for k, v in row.items()
                    }
                out.write(json.dumps(row) + "\n")

    return _derived_copy(file, "free-form", file.stem + ".jsonl", write)


def _json_field(file: Path) -> str | None:
    """``{"train": [...]}``-style files: the one list inside, by name."""
    if file.suffix != ".json":
        return None
    with file.open("rb") as handle:
        head = handle.read(1 << 16).lstrip(b"\xef\xbb\xbf").lstrip()
    if not head.startswith(b"{"):
        return None
    try:
        data = json.loads(file.read_text(encoding="utf-8-sig"))
    except ValueError:
        return None
    lists = [k for k, v in data.items() if isinstance(v, list)] if isinstance(data, dict) else []
    return lists[0] if len(lists) == 1 else None


def _first_bad_json_line(files: list[Path]) -> str:
    for file in (f for f in files if f.suffix == ".jsonl"):
        with file.open(encoding="utf-8-sig") as handle:
            for number, line in enumerate(handle, 1):
                if line.strip():
                    try:
                        json.loads(line)
                    except ValueError as exc:
                        return f"{file}:{number}: not valid JSON ({exc})"
    return ""


def load_split(source: str | Path, *, split: str = "train", name: str | None = None):
    """A `datasets.Dataset` from a file, a folder, a ``save_to_disk`` folder or a Hub id."""
    datasets = _datasets()
    path = Path(source).expanduser()
    if path.is_dir() and any((path / m).is_file() for m in DISK_MARKERS):
        try:
            loaded = datasets.load_from_disk(str(path))
        except Exception as exc:
            raise SpectrumError(f"{path}: cannot load this save_to_disk folder ({exc})") from exc
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise SpectrumError(
                    f"{path}: no split {split!r} in this dataset (it has {', '.join(loaded)})"
                )
            loaded = loaded[split]
        return _nonempty(loaded, path)
    if path.exists():
        files = data_files(path)
        kinds = {BUILDERS[f.suffix] for f in files}
        if len(kinds) > 1:
            raise SpectrumError(f"{path}: mixes {', '.join(sorted(kinds))} files; use one format")
        builder = kinds.pop()
        readable = [_without_bom(f) for f in files]
        field_name = _json_field(readable[0])  # None but for a .json file
        options = {"field": field_name} if field_name else {}
        if builder == "json" and not hasattr(datasets, "Json"):
            options = {}  # the copies hold the rows themselves
            try:
                readable = [_free_form_as_text(f, field_name) for f in readable]
            except ValueError as exc:
                raise SpectrumError(
                    _first_bad_json_line(readable) or f"{path}: not valid JSON ({exc})"
                ) from None
        try:
            # datasets logs a reader's failure at ERROR before raising it ("Failed to load
            # JSON"); the raised error becomes our one line, so its lines would say it twice.
            with quiet_logger("datasets", logging.CRITICAL):
                loaded = datasets.load_dataset(
                    builder,
                    data_files=[str(f) for f in readable],
                    split="train",
                    cache_dir=str(_cache_root() / "sources"),
                    **options,
                )
        except Exception as exc:
            first = (str(exc).splitlines() or [""])[0][:300]
            reason = _first_bad_json_line(readable) or (
                f"{path}: the data holds no rows"
                if "corresponds to no data" in first
                else f"{path}: cannot read ({type(exc).__name__}: {first})"
            )
            raise SpectrumError(reason) from exc
        return _nonempty(loaded, path)
    # A Hub dataset id by the Hub's rule, not a data file name that does not exist.
    if is_hub_id(str(source)) and path.suffix not in BUILDERS:
        require_hub(f"dataset {source!r}")
        try:
            loaded = datasets.load_dataset(str(source), name, split=split)
        except Exception as exc:
            raise SpectrumError(
                f"cannot load dataset {source!r} (config {name!r}, split {split!r}) from the "
                f"Hub: {type(exc).__name__}: {str(exc).splitlines()[0][:300]} (no network, a "
                "private dataset without HF_TOKEN, or no such split)"
            ) from exc
        return _nonempty(loaded, source)
    raise SpectrumError(f"data path {str(source)!r} does not exist")


def _nonempty(dataset, where):
    if len(dataset) == 0:
        raise SpectrumError(f"{where}: the data holds no rows")
    return dataset


# --- row shapes --------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataOptions:
    """How rows become training examples (train.py's data arguments)."""

    max_length: int = 2048
    assistant_only: bool = True
    columns: dict[str, str] = field(default_factory=dict)  # new name -> existing field
    prompt_template: str = ""
    completion_template: str = ""
    system_prompt: str = ""
    #: The text of a chat template that replaces the tokenizer's (``--chat_template_path``).
    chat_template: str = ""


def data_options(settings: Any) -> DataOptions:
    """The encoder's options from train.py's data arguments (:data:`~.args.DATA_SETTINGS` of a
    TrainArgs, or any object with those names); the chat template is read from its path."""
    from .chat import read_chat_template

    path = settings.chat_template_path
    return DataOptions(
        settings.max_seq_length,
        settings.assistant_only_loss,
        parse_columns(settings.columns),
        settings.prompt_template,
        settings.completion_template,
        settings.system_prompt,
        read_chat_template(path) if path else "",
    )


def parse_columns(text: str) -> dict[str, str]:
    """``"prompt=question,completion=answer"`` -> ``{"prompt": "question", ...}``."""
    mapping = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        new, sep, old = part.partition("=")
        if not sep or not new.strip() or not old.strip():
            raise SpectrumError(f"columns: {part!r} is not NEW=EXISTING (e.g. prompt=question)")
        mapping[new.strip()] = old.strip()
    return mapping


def _present(row: dict[str, Any]) -> dict[str, Any]:
    """A row without the fields Arrow added as None (absent in this row, present in others),
    its ``messages`` and ``chat_template_kwargs`` decoded when they are JSON text."""
    clean = {}
    for key, value in row.items():
        if value is None:
            continue
        if key in ("messages", "chat_template_kwargs") and isinstance(value, str):
            with contextlib.suppress(ValueError):  # else left as text: the row's checks name it
                value = json.loads(value)
        if key == "messages" and isinstance(value, list):
            value = [
                {k: v for k, v in m.items() if v is not None} if isinstance(m, dict) else m
                for m in value
            ]
        clean[key] = value
    return clean


def _format(template: str, row: dict[str, Any], what: str, index: int) -> str:
    try:
        return template.format(**row)
    except (KeyError, IndexError, AttributeError, ValueError) as exc:
        raise SpectrumError(
            f"data row {index}: {what} {template!r} does not fit the row ({type(exc).__name__}: "
            f"{exc}); the row has [{', '.join(sorted(row))}]"
        ) from None


def shape_row(row: dict[str, Any], index: int, options: DataOptions, chat: bool) -> dict[str, Any]:
    """The row in one of the three shapes, after the configured mapping."""
    row = _present(row)
    for new, old in options.columns.items():
        if old not in row:
            raise SpectrumError(
                f"data row {index}: columns maps {new} from {old!r}, which the row lacks "
                f"(it has [{', '.join(sorted(row))}])"
            )
        row[new] = row.pop(old)
    if options.prompt_template or options.completion_template:
        if not (options.prompt_template and options.completion_template):
            raise SpectrumError("prompt_template and completion_template go together")
        prompt = _format(options.prompt_template, row, "prompt_template", index)
        completion = _format(options.completion_template, row, "completion_template", index)
        if not chat:
            return {"prompt": prompt, "completion": completion}
        turns = [("system", options.system_prompt)] * bool(options.system_prompt)
        turns += [("user", prompt), ("assistant", completion)]
        return {"messages": [{"role": role, "content": text} for role, text in turns]}
    return row


def row_kind(row: Any, index: int) -> str:
    """``messages``, ``prompt_completion`` or ``text``; an error naming the row otherwise."""
    if isinstance(row, dict):
        row = _present(row)
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
        f"'completion', or 'text' (or map them: columns, prompt_template, completion_template)"
    )


def _check_text(value: Any, what: str, index: int) -> str:
    if not isinstance(value, str):
        raise SpectrumError(
            f"data row {index}: {what} is a {type(value).__name__}, expected text "
            f"(a dict here usually means an answer object was passed instead of its text)"
        )
    return value


# --- tokenizing ------------------------------------------------------------------------------


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]


def encode_row(
    row: dict[str, Any], index: int, tokenizer: Any, options: DataOptions
) -> dict[str, Any]:
    """``input_ids``, ``labels`` (``-100``: no loss), ``loss_tokens`` and ``drop_reason`` ("" when
    the row is kept). Malformed rows raise, naming the row."""
    chat = bool(options.chat_template or getattr(tokenizer, "chat_template", None))
    row = shape_row(row, index, options, chat=chat)
    kind = row_kind(row, index)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if kind == "messages":
        ids, labels = _encode_messages(row, index, tokenizer, options)
    else:  # a text row is all completion, no prompt
        prompt_ids, answer = [], "text" if kind == "text" else "completion"
        if kind == "prompt_completion":
            prompt = _check_text(row["prompt"], "'prompt'", index)
            prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        completion = _check_text(row[answer], repr(answer), index)
        completion_ids = (
            tokenizer(completion, add_special_tokens=False)["input_ids"] + eos if completion else []
        )
        ids = prompt_ids + completion_ids
        labels = [IGNORE_INDEX] * len(prompt_ids) + completion_ids
    learnable = sum(label != IGNORE_INDEX for label in labels)
    ids, labels = ids[: options.max_length], labels[: options.max_length]
    kept = sum(label != IGNORE_INDEX for label in labels)
    if not ids:
        reason = "empty"
    elif learnable == 0:
        reason = "no_assistant_turn" if kind == "messages" else "empty"
    elif kept == 0:
        reason = "truncated_away"
    else:
        reason = ""
    return {"input_ids": ids, "labels": labels, "loss_tokens": kept, "drop_reason": reason}


def _encode_messages(row: dict[str, Any], index: int, tokenizer: Any, options: DataOptions):
    from .chat import render_with_mask

    messages = row["messages"]
    if not isinstance(messages, list):
        raise SpectrumError(f"data row {index}: 'messages' must be a list")
    if not messages:
        return [], []
    for number, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message:
            raise SpectrumError(f"data row {index}: message {number} needs 'role' and 'content'")
        if "content" not in message and not message.get("tool_calls"):
            raise SpectrumError(f"data row {index}: message {number} needs 'role' and 'content'")
        if "content" in message:
            _check_text(message["content"], f"message {number} content", index)
    template_kwargs = row.get("chat_template_kwargs") or {}
    if not isinstance(template_kwargs, dict):
        raise SpectrumError(f"data row {index}: 'chat_template_kwargs' must be an object")
    tools = row.get("tools")
    if isinstance(tools, str):  # TRL's convention: a JSON list in a string column
        try:
            tools = json.loads(tools)
        except ValueError as exc:
            raise SpectrumError(f"data row {index}: 'tools' is not valid JSON ({exc})") from None
    render = {"template": options.chat_template or None, "template_kwargs": template_kwargs}
    try:
        ids, mask = render_with_mask(
            tokenizer, messages, tools, assistant_only=options.assistant_only, **render
        )
    except SpectrumError as exc:
        raise SpectrumError(f"data row {index}: {exc}") from None
    return ids, [t if m else IGNORE_INDEX for t, m in zip(ids, mask, strict=True)]


# --- preparing a split -------------------------------------------------------------------


@dataclass
class Counts:
    """What happened to a split's rows."""

    rows_read: int
    rows_kept: int
    dropped: dict[str, int]
    loss_tokens: int

    def line(self, split: str = "") -> str:
        """The counts in one line, after ``split:`` when one is named."""
        dropped = ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in self.dropped.items())
        return (
            (f"{split}: " if split else "")
            + f"{self.rows_read} rows read, {self.rows_kept} kept"
            + (f", dropped: {dropped}" if dropped else "")
            + f"; {self.loss_tokens} tokens carry loss"
        )


class TokenizedData(Sequence):
    """Examples backed by a memory-mapped Arrow table (or a list, for small in-memory sets)."""

    def __init__(self, table) -> None:
        self.table = table

    def __len__(self) -> int:
        return len(self.table)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(len(self))[index]]
        row = self.table[int(index)]
        return Example(list(row["input_ids"]), list(row["labels"]))


class Subset(Sequence):
    """Some examples of another sequence, by position: a held-out split without a copy."""

    def __init__(self, data: Sequence, indices: list[int]) -> None:
        self.data, self.indices = data, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self.data[i] for i in self.indices[index]]
        return self.data[self.indices[index]]


def hold_out(examples: Sequence, share: float, seed: int) -> tuple[Subset, Subset]:
    """``(train, validation)``: ``share`` of the examples, drawn with ``seed``, held out. The
    same data and seed give the same split, so runs that differ only in method (``spectrum-sm
    compare``) are scored on the same rows."""
    import random

    count = len(examples)
    held = max(1, round(count * share))
    if held >= count:
        raise SpectrumError(
            f"validation_share {share} of {count} training rows leaves none to train on"
        )
    order = list(range(count))
    random.Random(seed).shuffle(order)
    return Subset(examples, sorted(order[held:])), Subset(examples, sorted(order[:held]))


def _tokenizer_key(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab())
    extra = json.dumps(
        [tokenizer.chat_template, tokenizer.eos_token_id, type(tokenizer).__name__],
        default=str,
    )
    return hashlib.sha256((body + extra).encode()).hexdigest()


def mask_source(tokenizer: Any, options: DataOptions, columns: Sequence[str]) -> str:
    """How the loss masks of chat rows are made (:func:`.chat.mask_way`), or "" when the rows
    are not chats or every token is trained: part of the cache key, and what the log says."""
    template = options.chat_template or getattr(tokenizer, "chat_template", None)
    chats = "messages" in columns or bool(options.prompt_template)
    if not (template and chats and options.assistant_only):
        return ""
    from .chat import mask_way

    return mask_way(tokenizer, options.chat_template or None).describe()


def _encode_batch(batch, indices, tokenizer, options):
    rows = [
        encode_row({k: batch[k][offset] for k in batch}, index, tokenizer, options)
        for offset, index in enumerate(indices)
    ]
    return {
        k: [row[k] for row in rows] for k in ("input_ids", "labels", "loss_tokens", "drop_reason")
    }


def prepare_split(
    dataset,
    tokenizer: Any,
    options: DataOptions,
    *,
    split: str = "train",
    packing: bool = False,
    num_proc: int = 1,
    require_rows: bool = True,
) -> tuple[TokenizedData, Counts]:
    """Tokenize ``dataset`` once into a cached Arrow file (the other processes of a host, run
    after its main one, read that file), drop rows without loss and count them.

    Raises :class:`SpectrumError` naming the cause and the setting when no row is left."""
    key = hashlib.sha256(
        json.dumps(
            [
                dataset._fingerprint,
                _tokenizer_key(tokenizer),
                json.dumps(asdict(options), sort_keys=True),
                mask_source(tokenizer, options, dataset.column_names),
                FORMAT_VERSION,
                packing,
            ]
        ).encode()
    ).hexdigest()[:32]
    cache = _cache_root() / "tokenized"
    cache.mkdir(parents=True, exist_ok=True)
    encoded = dataset.map(
        _encode_batch,
        fn_kwargs={"tokenizer": tokenizer, "options": options},
        batched=True,
        with_indices=True,
        remove_columns=dataset.column_names,
        num_proc=num_proc if num_proc > 1 and len(dataset) >= 1000 else None,
        cache_file_name=str(cache / f"{key}.arrow"),
        new_fingerprint=key,
        desc=f"tokenizing {split}",
    )
    reasons = Counter(encoded["drop_reason"])
    dropped = {r: reasons[r] for r in DROP_REASONS if reasons.get(r)}
    kept_rows = len(encoded) - sum(dropped.values())
    counts = Counts(len(encoded), kept_rows, dropped, int(sum(encoded["loss_tokens"])))
    log.info("%s", counts.line(split))
    if kept_rows == 0:
        if not require_rows:
            return TokenizedData([]), counts
        raise SpectrumError(nothing_left(split, counts, options))
    kept = encoded.filter(
        lambda reasons: [r == "" for r in reasons],
        input_columns=["drop_reason"],
        batched=True,
        cache_file_name=str(cache / f"{key}-kept.arrow"),
        new_fingerprint=key + "-kept",
    ).select_columns(["input_ids", "labels"])
    if packing:
        kept = kept.map(
            _pack,
            fn_kwargs={"size": options.max_length},
            batched=True,
            batch_size=10_000,
            cache_file_name=str(cache / f"{key}-packed.arrow"),
            new_fingerprint=key + "-packed",
        )
    return TokenizedData(kept), counts


def default_num_proc() -> int:
    """Tokenizing workers: every core of the host (its other ranks wait meanwhile), at most 8."""
    return max(1, min(8, os.cpu_count() or 1))


def _pack(batch, size: int):
    flat = {k: [t for row in batch[k] for t in row] for k in ("input_ids", "labels")}
    total = len(flat["input_ids"])
    starts = range(0, total - size + 1, size) if total >= size else [0]
    return {k: [v[i : i + size] for i in starts] for k, v in flat.items()}


def nothing_left(split: str, counts: Counts, options: DataOptions) -> str:
    head = f"no {split} row has any token to learn from ({counts.line(split)})"
    main = max(counts.dropped, key=counts.dropped.get)
    if main == "truncated_away":
        return (
            f"{head}: max_seq_length {options.max_length} cuts every row before its first "
            "trained token; raise max_seq_length (train.py --max_seq_length, data-check "
            "--max-seq-length)"
        )
    if main == "no_assistant_turn":
        return (
            f"{head}: the conversations have no assistant answer; add one per row, or train on "
            "every token with --assistant_only_loss false"
        )
    return f"{head}: the rows are empty"


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, Any]:
    """Right-padded tensors: ``input_ids``, ``attention_mask``, ``labels`` (-100 on padding)."""
    import torch

    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        ids[row, : len(e.input_ids)] = torch.tensor(e.input_ids)
        labels[row, : len(e.labels)] = torch.tensor(e.labels)
        mask[row, : len(e.input_ids)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
