"""Loading training rows from jsonl, json, parquet and folders, and rejecting odd rows."""

from __future__ import annotations

import json

import pytest

from spectrum_sm.core.errors import SpectrumError
from spectrum_sm.training.data import load_rows, row_kind

ROWS = [{"text": "a"}, {"prompt": "p", "completion": "c"}, {"messages": []}]


def test_jsonl_json_parquet_and_folders(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (tmp_path / "b.json").write_text(json.dumps(ROWS))
    (tmp_path / "c.json").write_text(json.dumps({"train": ROWS}))
    pq.write_table(pa.Table.from_pylist([{"text": "x"}, {"text": "y"}]), tmp_path / "d.parquet")
    assert load_rows(tmp_path / "a.jsonl") == ROWS
    assert load_rows(tmp_path / "b.json") == ROWS
    assert load_rows(tmp_path / "c.json") == ROWS
    assert load_rows(tmp_path / "d.parquet") == [{"text": "x"}, {"text": "y"}]
    assert len(load_rows(tmp_path)) == 3 * 3 + 2
    assert [row_kind(r, i) for i, r in enumerate(ROWS)] == ["text", "prompt_completion", "messages"]


def test_bad_data_is_named(tmp_path):
    with pytest.raises(SpectrumError, match="does not exist"):
        load_rows(tmp_path / "missing.jsonl")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SpectrumError, match=r"no \.jsonl, \.json or \.parquet"):
        load_rows(tmp_path / "empty")
    (tmp_path / "broken.jsonl").write_text('{"text": "a"}\n{oops\n')
    with pytest.raises(SpectrumError, match=r"broken.jsonl:2: not valid JSON"):
        load_rows(tmp_path / "broken.jsonl")
    with pytest.raises(SpectrumError, match=r"data row 4 has fields \[answer, question\]"):
        row_kind({"question": "q", "answer": "a"}, 4)
    with pytest.raises(SpectrumError, match="a list, not an object"):
        row_kind(["text"], 0)
