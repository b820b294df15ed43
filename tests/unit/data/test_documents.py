"""The one document reader, shared by training domains and `drpruning eval --data`."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from drpruning.data import DataError, read_documents
from drpruning.data.documents import check_source


def test_every_format_in_one_folder(tmp_path):
    rows = json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two"}) + "\n"
    (tmp_path / "a.jsonl").write_text(rows)
    (tmp_path / "b.txt").write_text("line 1\n\nline 2\n")
    (tmp_path / "c.json").write_text(json.dumps([{"text": "three"}, {"text": ""}]))
    pq.write_table(pa.table({"text": ["four", None, "five"]}), tmp_path / "d.parquet")
    # a .txt file is one document, line breaks included (as training always read it)
    assert read_documents(tmp_path) == ["one", "two", "line 1\n\nline 2\n", "three", "four", "five"]
    assert read_documents(tmp_path / "b.txt") == ["line 1\n\nline 2\n"]
    assert read_documents(tmp_path, max_documents=3) == ["one", "two", "line 1\n\nline 2\n"]


def test_bad_records_name_the_file_and_line(tmp_path):
    (tmp_path / "bad.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DataError, match="no 'text' field"):
        read_documents(tmp_path / "bad.jsonl")
    (tmp_path / "broken.jsonl").write_text('{"text": "a"}\n{"text": \n')
    with pytest.raises(DataError, match="broken.jsonl:2 is not valid JSON"):
        read_documents(tmp_path / "broken.jsonl")
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "p.parquet")
    with pytest.raises(DataError, match="no 'text' column"):
        read_documents(tmp_path / "p.parquet")


def test_check_source(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        check_source(tmp_path / "missing", "--data x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="has no .jsonl"):
        check_source(tmp_path / "empty", "data.domains.x")
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(DataError, match="unsupported type '.md'"):
        check_source(tmp_path / "notes.md", "--data x")
    check_source("hf:some/dataset", "data.domains.x")  # checked when read (online only)
