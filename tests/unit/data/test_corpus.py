import json

import pytest
import torch
from tiny_models import tiny_tokenizer

from drpruning.config import ConfigError, DataConfig
from drpruning.data import check_sources, load_corpus, split_documents


def write_domain(folder, docs):
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "part.jsonl", "w") as f:
        for d in docs:
            f.write(json.dumps({"text": d, "meta": {}}) + "\n")
    return folder


def windows(w):
    return torch.stack([w[i] for i in range(len(w))])


def docs(prefix, n, length=300):
    return [f"{prefix} document {i}: " + (f"{prefix}{i} " * length)[:length] for i in range(n)]


def test_split_is_by_document_and_deterministic():
    d = docs("x", 40)
    train, held = split_documents("x", d, eval_tokens_wanted_chars=1000, eval_fraction=0.5)
    assert set(train).isdisjoint(held) and sorted(train + held) == sorted(d)
    # the choice depends on the texts, not on the order the files list them in
    assert set(split_documents("x", list(reversed(d)), 1000, 0.5)[1]) == set(held)
    assert 1 <= len(held) <= 20


def test_no_leakage_of_evaluation_documents(tmp_path):
    tok = tiny_tokenizer()
    # each document is a unique run of one letter, so a sequence reveals which document it came from
    letters = "abcdefghijklmnopqrst"
    d = [ch * 200 for ch in letters]
    write_domain(tmp_path / "dom", d)
    cfg = DataConfig(domains={"dom": str(tmp_path / "dom")}, seq_len=16, eval_sequences=4,
                     eval_fraction=0.2, cache_dir=str(tmp_path / "cache"))
    corpus = load_corpus(cfg, tok)
    def letters_in(t):
        return {c for c in tok.decode(t.flatten().tolist(), skip_special_tokens=True)}
    train_letters, eval_letters = letters_in(windows(corpus.train[0])), letters_in(corpus.eval[0])
    assert eval_letters and train_letters and not (train_letters & eval_letters)
    assert corpus.eval[0].shape == (4, 16)
    # every token of this tokenizer is one ASCII character, and a separator counts as one byte
    assert corpus.eval_bytes[0] == corpus.eval[0].numel()


def test_long_documents_are_held_out_whole():
    """Two long documents: one is held out entirely, none is cut into pieces on both sides."""
    a = "\n".join(f"alpha line {i}" for i in range(5000))  # ~70k characters: more than 2 pieces each
    b = "\n".join(f"beta line {i}" for i in range(5000))
    train, held = split_documents("x", [a, b], eval_tokens_wanted_chars=1000, eval_fraction=0.1)
    assert len(held) == 1 and len(train) == 1 and {held[0], train[0]} == {a, b}


def test_long_single_document_is_split_into_disjoint_pieces(tmp_path):
    tok = tiny_tokenizer()
    book = "\n".join(f"line {i:05d} of the only book" for i in range(4000))
    write_domain(tmp_path / "book", [book])
    cfg = DataConfig(domains={"book": str(tmp_path / "book")}, seq_len=32, eval_sequences=2,
                     cache_dir=str(tmp_path / "cache"))
    corpus = load_corpus(cfg, tok)
    train_text = tok.decode(windows(corpus.train[0]).flatten().tolist())
    eval_text = tok.decode(corpus.eval[0].flatten().tolist())
    eval_lines = [x for x in eval_text.split("\n")[1:-1] if x.startswith("line")]
    assert eval_lines and not any(x in train_text for x in eval_lines)


def test_cache_is_reused(tmp_path):
    tok = tiny_tokenizer()
    write_domain(tmp_path / "a", docs("a", 30))
    cfg = DataConfig(domains={"a": str(tmp_path / "a")}, seq_len=16, eval_sequences=2,
                     cache_dir=str(tmp_path / "cache"))
    first = load_corpus(cfg, tok)
    assert len(list((tmp_path / "cache").glob("a-*/index.json"))) == 1
    second = load_corpus(cfg, tok)
    assert torch.equal(windows(first.train[0]), windows(second.train[0])) and first.eval_bytes == second.eval_bytes


def test_missing_and_empty_directories(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        check_sources({"x": str(tmp_path / "nope")})
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="has no .jsonl"):
        check_sources({"x": str(tmp_path / "empty")})


def test_record_without_text_field(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.jsonl").write_text(json.dumps({"content": "hi"}) + "\n")
    cfg = DataConfig(domains={"bad": str(folder)}, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match="no 'text' field"):
        load_corpus(cfg, tiny_tokenizer())


def test_txt_and_parquet_sources(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "t").mkdir()
    for i in range(6):
        (tmp_path / "t" / f"{i}.txt").write_text(f"text file {i} " * 40)
    (tmp_path / "p").mkdir()
    pq.write_table(pa.table({"text": [f"parquet row {i} " * 40 for i in range(6)]}), tmp_path / "p" / "x.parquet")
    cfg = DataConfig(domains={"t": str(tmp_path / "t"), "p": str(tmp_path / "p")}, seq_len=16,
                     eval_sequences=2, eval_fraction=0.3, cache_dir=str(tmp_path / "cache"))
    corpus = load_corpus(cfg, tiny_tokenizer())
    assert corpus.names == ["t", "p"] and all(len(t) > 0 for t in corpus.train)
