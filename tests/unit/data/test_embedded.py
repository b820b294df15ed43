"""The embedded default corpus: three real-text domains, deterministic, written once."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from drpruning.data.embedded import DOMAINS, MIN_DOC_CHARS, domain_documents, materialize_embedded_corpus


def _read(folder: Path) -> list[str]:
    with open(folder / "documents.jsonl", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> dict[str, Path]:
    return materialize_embedded_corpus(tmp_path_factory.mktemp("c") / "corpus", max_docs_per_domain=30)


def test_three_non_empty_domains(small):
    assert set(small) == {"python-source", "docs", "licenses"} == set(DOMAINS)
    for folder in small.values():
        docs = _read(folder)
        assert len(docs) == 30
        assert all(isinstance(t, str) and len(t) >= MIN_DOC_CHARS for t in docs)
        assert len(set(docs)) == len(docs)  # deduplicated


def test_documents_are_real_text_of_their_domain(small):
    for text in _read(small["python-source"]):
        ast.parse(text)  # every document is a whole, valid Python module
    docs = " ".join(_read(small["docs"])).lower()
    assert docs.count(" the ") > 200 and "statement" in docs
    for text in _read(small["licenses"]):
        assert any(w in text.lower() for w in ("license", "licence", "copyright", "permission"))
    for folder in small.values():
        text = "".join(_read(folder))
        assert sum(c.isprintable() or c in "\n\t" for c in text) / len(text) > 0.99


def test_deterministic(small, tmp_path):
    again = materialize_embedded_corpus(tmp_path / "again", max_docs_per_domain=30)
    for name in DOMAINS:
        a, b = again[name] / "documents.jsonl", small[name] / "documents.jsonl"
        assert a.read_bytes() == b.read_bytes()


def test_written_once_and_reused(small):
    files = [small[name] / "documents.jsonl" for name in DOMAINS]
    before = [f.stat().st_mtime_ns for f in files]
    assert materialize_embedded_corpus(small["docs"].parent, max_docs_per_domain=30) == small
    assert [f.stat().st_mtime_ns for f in files] == before
    manifest = json.loads((small["docs"].parent / "manifest.json").read_text())
    assert manifest["domains"]["docs"]["documents"] == 30


def test_refuses_a_foreign_non_empty_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        materialize_embedded_corpus(tmp_path)


@pytest.mark.slow  # materialises every full domain (~15 s): in the slow tier, which CI runs too
@pytest.mark.parametrize("name", DOMAINS)
def test_each_domain_is_big_enough_for_a_demo(name):
    # a few hundred 256-token sequences per domain need roughly 300 KB of text
    assert sum(len(t.encode()) for t in domain_documents(name)) > 300_000
