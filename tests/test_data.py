"""Training data through `datasets`: every source users have, row shapes and mappings, loss masks
for any chat template, and counts of what was dropped and why."""

from __future__ import annotations

import json

import pytest
from chat_templates import TEMPLATES, tokenizer_for, trained_runs

from spectrum_sm.core.errors import SpectrumError
from spectrum_sm.training.data import (
    IGNORE_INDEX,
    DataOptions,
    encode_row,
    load_split,
    parse_columns,
    prepare_split,
    row_kind,
)

ROWS = [{"text": "a"}, {"text": "b c"}, {"text": "d"}]


def load_rows(path):
    """A source's rows as train.py reads them (:func:`load_split`), each without the fields
    Arrow filled with None because other rows have them."""
    return [{k: v for k, v in row.items() if v is not None} for row in load_split(path)]


CHAT = [
    {"role": "system", "content": "You add numbers."},
    {"role": "user", "content": "What is 2 plus 3?"},
    {
        "role": "assistant",
        "content": "2 plus 3 is 5.",
        "reasoning_content": "Two and three make five.",
    },
    {"role": "user", "content": "And 4 plus 4?"},
    {"role": "assistant", "content": "4 plus 4 is 8."},
]


def test_every_file_format_and_folder(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (tmp_path / "b.json").write_text(json.dumps(ROWS))
    (tmp_path / "c.json").write_text(json.dumps({"train": ROWS}))
    (tmp_path / "d.csv").write_bytes(b"\xef\xbb\xbfprompt,completion\nq1,a1\nq2,a2\n")  # a BOM
    (tmp_path / "e.jsonl").write_bytes(b"\xef\xbb\xbf" + json.dumps(ROWS[0]).encode() + b"\n")
    parquet = tmp_path / "parts"
    parquet.mkdir()
    pq.write_table(pa.Table.from_pylist(ROWS[:2]), parquet / "part-0.parquet")
    pq.write_table(pa.Table.from_pylist(ROWS[2:]), parquet / "part-1.parquet")
    hidden = parquet / ".ipynb_checkpoints"  # a notebook's autosave: never training data
    hidden.mkdir()
    pq.write_table(pa.Table.from_pylist(ROWS), hidden / "part-0-checkpoint.parquet")
    for name in ("a.jsonl", "b.json", "c.json"):
        assert load_rows(tmp_path / name) == ROWS, name
    assert load_rows(tmp_path / "d.csv") == [
        {"prompt": "q1", "completion": "a1"},
        {"prompt": "q2", "completion": "a2"},
    ]
    assert load_rows(tmp_path / "e.jsonl") == ROWS[:1]
    assert load_rows(parquet) == ROWS
    assert [row_kind(r, 0) for r in ({"text": "a"}, {"prompt": "p", "completion": "c"})] == [
        "text",
        "prompt_completion",
    ]


def test_save_to_disk_folders_and_arrow_files(tmp_path):
    import datasets

    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "one"))
    splits = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(ROWS[:1])}
    )
    splits.save_to_disk(str(tmp_path / "dict"))
    assert load_rows(tmp_path / "one") == ROWS
    assert len(load_split(tmp_path / "dict", split="test")) == 1
    with pytest.raises(SpectrumError, match=r"no split 'validation' .*it has train, test"):
        load_split(tmp_path / "dict", split="validation")
    arrow = next((tmp_path / "one").glob("*.arrow"))
    assert len(load_split(arrow)) == 3


def test_bad_data_is_named(tmp_path):
    with pytest.raises(SpectrumError, match="does not exist"):
        load_rows(tmp_path / "missing.jsonl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SpectrumError, match=r"no \.jsonl, \.json, \.parquet, \.csv, \.arrow"):
        load_rows(tmp_path / "empty")
    (tmp_path / "broken.jsonl").write_text('{"text": "a"}\n{oops\n')
    with pytest.raises(SpectrumError, match=r"broken.jsonl:2: not valid JSON"):
        load_rows(tmp_path / "broken.jsonl")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.jsonl").write_text('{"text": "a"}\n')
    (mixed / "b.csv").write_text("text\nb\n")
    with pytest.raises(SpectrumError, match="mixes csv, json files"):
        load_rows(mixed)
    with pytest.raises(SpectrumError, match=r"data row 4 has fields \[answer, question\]"):
        row_kind({"question": "q", "answer": "a"}, 4)
    with pytest.raises(SpectrumError, match="a list, not an object"):
        row_kind(["text"], 0)


def _trained(tokenizer, encoded) -> list[str]:
    """The decoded runs of tokens that carry loss."""
    flags = [label != IGNORE_INDEX for label in encoded["labels"]]
    return trained_runs(tokenizer, encoded["input_ids"], flags)


@pytest.mark.parametrize("name", ["gemma", "llama3", "chatml", "chatml_marked"])
def test_multi_turn_masks_are_exactly_the_answers_for_every_template(name):
    """Templates TRL does not know: Gemma folds the system prompt into the first user turn,
    Llama 3 trims; ChatML with generation markers is masked by them. In every case the loss
    falls on the answers and the end-of-turn marker, nothing else."""
    tokenizer = tokenizer_for(name, [m["content"] for m in CHAT] * 20)
    _, eot = TEMPLATES[name]
    encoded = encode_row({"messages": CHAT}, 0, tokenizer, DataOptions(512))
    runs = [run.strip() for run in _trained(tokenizer, encoded)]
    assert runs == [f"2 plus 3 is 5.{eot}", f"4 plus 4 is 8.{eot}"]
    assert encoded["drop_reason"] == ""


@pytest.mark.parametrize("name", ["qwen3", "mistral"])
def test_a_row_the_template_does_not_render_as_prefixes_is_refused_naming_it(name):
    """Qwen3-like (earlier reasoning dropped once a later user turn follows) and Mistral-like
    (the system prompt moves to the last user turn) templates TRL does not know: no exact mask
    exists for this row, so it is refused with its number and the two ways out."""
    tokenizer = tokenizer_for(name, [m["content"] for m in CHAT] * 20)
    with pytest.raises(SpectrumError) as refused:
        encode_row({"messages": CHAT}, 7, tokenizer, DataOptions(512))
    message = str(refused.value)
    assert message.startswith("data row 7: message ")
    assert "not prefix-preserving" in message and "\n" not in message
    assert "--chat_template_path" in message and "--assistant_only_loss false" in message
    # Every token trained: no mask needed, so the row is taken.
    every = encode_row({"messages": CHAT}, 7, tokenizer, DataOptions(512, assistant_only=False))
    assert every["labels"] == every["input_ids"]


def test_rows_without_loss_are_counted_by_reason(tmp_path):
    import datasets

    tokenizer = tokenizer_for("chatml", [m["content"] for m in CHAT] * 20)
    long_question = "What is " + "2 plus " * 40 + "3?"
    rows = (
        [{"messages": CHAT[:3]}] * 4
        + [{"messages": CHAT[:2]}] * 3  # no assistant turn
        + [{"messages": [{"role": "user", "content": long_question}, CHAT[2]]}] * 5  # cut
        + [{"messages": []}] * 2
    )
    data = datasets.Dataset.from_list(rows)
    kept, counts = prepare_split(data, tokenizer, DataOptions(64))
    assert (counts.rows_read, counts.rows_kept) == (14, 4)
    assert counts.dropped == {"empty": 2, "no_assistant_turn": 3, "truncated_away": 5}
    assert len(kept) == 4 and counts.loss_tokens > 0
    assert "14 rows read, 4 kept, dropped: 2 empty, 3 no assistant turn, 5 truncated away" in (
        counts.line("train")
    )
    cut = datasets.Dataset.from_list(rows[7:12])
    with pytest.raises(SpectrumError, match=r"max_seq_length 64 cuts every row.*--max_seq_length"):
        prepare_split(cut, tokenizer, DataOptions(64))


def test_other_shapes_are_mapped_by_configuration():
    """SQuAD's question/context/answers through template strings; a rename for the rest."""
    tokenizer = tokenizer_for("chatml", ["Context Question answer Paris France"] * 20)
    squad = {
        "id": "1",
        "context": "Paris is in France.",
        "question": "Where is Paris?",
        "answers": {"text": ["France"], "answer_start": [12]},
    }
    options = DataOptions(
        256,
        prompt_template="{context}\n\n{question}",
        completion_template="{answers[text][0]}",
        system_prompt="Answer from the context.",
    )
    encoded = encode_row(squad, 0, tokenizer, options)
    assert [r.strip() for r in _trained(tokenizer, encoded)] == ["France<|im_end|>"]
    text = tokenizer.decode(encoded["input_ids"])
    assert "Answer from the context." in text and "Paris is in France.\n\nWhere is Paris?" in text
    renamed = DataOptions(64, columns=parse_columns("prompt=question, completion=answer"))
    row = encode_row({"question": "q", "answer": "a"}, 0, tokenizer, renamed)
    assert row["drop_reason"] == ""
    with pytest.raises(SpectrumError, match=r"completion_template .* does not fit the row"):
        encode_row({"x": 1}, 3, tokenizer, DataOptions(64, "", {}, "{x}", "{missing}"))
    with pytest.raises(SpectrumError, match="is not NEW=EXISTING"):
        parse_columns("prompt")


def test_tool_calls_and_results_go_through_the_template():
    """A tool-call turn trains the call and its end-of-turn marker; the tool's result does not
    carry loss; the final answer does."""
    tokenizer = tokenizer_for("chatml_tools", ["add 2 3 What is 2 plus 3? It is 5."] * 20)
    call = {"type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}
    row = {
        "messages": [
            {"role": "user", "content": "What is 2 plus 3?"},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "content": "5"},
            {"role": "assistant", "content": "It is 5."},
        ]
    }
    encoded = encode_row(row, 0, tokenizer, DataOptions(256))
    assert _trained(tokenizer, encoded) == [
        '<tool_call>add({"a": 2, "b": 3})</tool_call><|im_end|>',
        "It is 5.<|im_end|>",
    ]


def test_a_hub_dataset_id_goes_to_load_dataset_with_its_config_and_split(
    monkeypatch, tmp_path, hub_answers
):
    """No network here: the Hub call is replaced, so this checks what we ask for (id, config,
    split) and what we make of the answer, not the Hub itself."""
    import datasets

    calls = []

    def fake(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        return datasets.Dataset.from_list(ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake)
    monkeypatch.chdir(tmp_path)  # no local folder of that name
    assert len(load_split("rajpurkar/squad", split="validation", name="plain_text")) == 3
    assert calls == [("rajpurkar/squad", "plain_text", "validation")]

    def offline(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(SpectrumError, match=r"cannot load dataset 'org/name' .*from the Hub"):
        load_split("org/name")


def test_packing_cuts_the_kept_rows_into_full_blocks():
    """Through prepare_split, as train.py packs (--packing): the kept rows' tokens and labels,
    end to end, cut into blocks of max_length; the partial block at the end is left out."""
    import datasets

    tokenizer = tokenizer_for("chatml", ["one two three four five"] * 20)
    rows = [{"text": "one two three four five"}] * 36 + [{"text": ""}]  # the last is dropped
    data = datasets.Dataset.from_list(rows)
    plain, _ = prepare_split(data, tokenizer, DataOptions(16))
    packed, counts = prepare_split(data, tokenizer, DataOptions(16), packing=True)
    assert counts.rows_kept == 36 == len(plain) and counts.dropped == {"empty": 1}
    ids = [t for e in plain for t in e.input_ids]
    labels = [t for e in plain for t in e.labels]
    assert len(packed) == len(ids) // 16 > 1
    assert all(len(e.input_ids) == 16 == len(e.labels) for e in packed)
    assert [t for e in packed for t in e.input_ids] == ids[: 16 * len(packed)]
    assert [t for e in packed for t in e.labels] == labels[: 16 * len(packed)]
