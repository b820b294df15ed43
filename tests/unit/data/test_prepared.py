"""Prepared token files: the same tokens as packing the split in memory, any number of processes, resumable,
rebuilt when torn, never mixed across tokenizers."""

from __future__ import annotations

import gzip
import json
import os
import random

import numpy as np
import pytest
import torch
from tiny_models import tiny_tokenizer

from drpruning.config import ConfigError, DataConfig
from drpruning.data import iter_documents, load_corpus, pack, split_documents
from drpruning.data import prepared as prep
from drpruning.data.split import EVAL_CHARS_PER_TOKEN, HeldOut, order_key


def _docs(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta"]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(5, 120))) + f" #{i}" for i in range(n)]


def _write_jsonl(folder, docs, name="part.jsonl"):
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / name, "w") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    return folder


def _cfg(tmp_path, folder, **kw) -> DataConfig:
    return DataConfig(domains={"d": str(folder)}, seq_len=kw.pop("seq_len", 16), eval_sequences=kw.pop("ev", 3),
                      cache_dir=str(tmp_path / "cache"), **kw)


@pytest.mark.parametrize("wanted,fraction", [(1, 0.5), (300, 0.1), (2000, 0.3), (10**9, 0.2)])
def test_streaming_held_out_choice_equals_the_sorted_split(wanted, fraction):
    docs = _docs(200) + ["dup text"] * 3  # equal texts tie on the key: the lower index goes first
    chooser = HeldOut(wanted)
    for i, d in enumerate(docs):
        chooser.add(order_key("x", d), i, len(d))
    held = [docs[i] for i in sorted(chooser.indices(len(docs), fraction))]
    assert held == split_documents("x", docs, wanted, fraction)[1]
    assert len(chooser.heap) <= max(2, len(held) + 1) or wanted >= 10**9  # bounded by what is held out


def test_prepared_tokens_equal_packing_the_split_in_memory(tmp_path):
    tok, docs = tiny_tokenizer(), _docs(120)
    cfg = _cfg(tmp_path, _write_jsonl(tmp_path / "d", docs))
    corpus = load_corpus(cfg, tok)
    train_docs, eval_docs = split_documents("d", docs, cfg.eval_sequences * cfg.seq_len * EVAL_CHARS_PER_TOKEN,
                                            cfg.eval_fraction)
    want_train = pack(tok, train_docs, cfg.seq_len).sequences
    want_eval = pack(tok, eval_docs, cfg.seq_len, cfg.eval_sequences, count_text=True)
    got = torch.stack([corpus.train[0][i] for i in range(len(corpus.train[0]))])
    assert torch.equal(got, want_train) and torch.equal(corpus.eval[0], want_eval.sequences)
    assert corpus.eval_bytes == [want_eval.n_bytes] and corpus.train_tokens == [want_train.numel()]
    folder = next((tmp_path / "cache").glob("d-*"))
    index = json.loads((folder / "index.json").read_text())
    assert index["dtype"] == "uint16" and index["documents"] == {"train": len(train_docs), "eval": len(eval_docs)}
    assert (folder / "train.bin").stat().st_size == 2 * index["tokens"]["train"]


def test_two_processes_write_the_same_files_as_one(tmp_path):
    tok, folder = tiny_tokenizer(), _write_jsonl(tmp_path / "d", _docs(600))
    one = prep.prepare_domain("d", str(folder), tok, _cfg(tmp_path / "a", folder), num_proc=1)
    two = prep.prepare_domain("d", str(folder), tok, _cfg(tmp_path / "b", folder), num_proc=2)
    for name in ("train.bin", "eval.bin", "index.json"):
        assert (one / name).read_bytes() == (two / name).read_bytes()


def test_compressed_and_saved_dataset_sources_read_the_same_documents(tmp_path):
    import datasets
    import pyarrow as pa

    docs = _docs(30)
    lines = "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()
    (tmp_path / "gz").mkdir()
    with gzip.open(tmp_path / "gz" / "a.jsonl.gz", "wb") as f:
        f.write(lines)
    (tmp_path / "zst").mkdir()
    with pa.CompressedOutputStream(str(tmp_path / "zst" / "a.jsonl.zst"), "zstd") as f:
        f.write(lines)
    datasets.Dataset.from_dict({"text": docs}).save_to_disk(str(tmp_path / "saved"))
    for source in ("gz", "zst", "saved"):
        assert list(iter_documents(tmp_path / source)) == docs, source


def test_a_killed_build_resumes_to_the_same_files(tmp_path, monkeypatch):
    tok, folder = tiny_tokenizer(), _write_jsonl(tmp_path / "d", _docs(2000))
    reference = prep.prepare_domain("d", str(folder), tok, _cfg(tmp_path / "ref", folder), num_proc=1)
    monkeypatch.setattr(prep, "PROGRESS_TOKENS", 500)  # a progress record every batch or two
    real, calls = prep.encode_batches, {"n": 0}

    def dies_after_three(*args, **kwargs):
        for item in real(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] > 3:
                raise KeyboardInterrupt  # as a kill would, between two progress records
            yield item

    cfg = _cfg(tmp_path / "run", folder)
    monkeypatch.setattr(prep, "encode_batches", dies_after_three)
    with pytest.raises(KeyboardInterrupt):
        prep.prepare_domain("d", str(folder), tok, cfg, num_proc=1)
    partial = next((tmp_path / "run" / "cache").glob("*.partial"))
    progress = json.loads((partial / "progress.json").read_text())
    assert 0 < progress["docs_done"] < 2000 and not list((tmp_path / "run" / "cache").glob("*.lock"))
    with open(partial / "train.bin", "ab") as f:
        f.write(b"\x07" * 100)  # tokens written after the last record, as a kill leaves them
    monkeypatch.setattr(prep, "encode_batches", real)
    done = prep.prepare_domain("d", str(folder), tok, cfg, num_proc=1)
    for name in ("train.bin", "eval.bin", "index.json"):
        assert (done / name).read_bytes() == (reference / name).read_bytes()
    assert not partial.exists()


def test_a_torn_file_is_detected_and_rebuilt(tmp_path, caplog):
    tok, folder = tiny_tokenizer(), _write_jsonl(tmp_path / "d", _docs(100))
    cfg = _cfg(tmp_path, folder)
    built = prep.prepare_domain("d", str(folder), tok, cfg)
    good = (built / "train.bin").read_bytes()
    with open(built / "train.bin", "r+b") as f:
        f.truncate(len(good) - 10)
    assert "holds" in prep.problem(built)
    with caplog.at_level("WARNING"):
        again = prep.prepare_domain("d", str(folder), tok, cfg)
    assert again == built and (built / "train.bin").read_bytes() == good
    assert any("rebuilding" in r.message for r in caplog.records)


def test_changed_files_get_a_new_folder_and_another_tokenizer_is_refused(tmp_path):
    tok, folder = tiny_tokenizer(), _write_jsonl(tmp_path / "d", _docs(50))
    cfg = _cfg(tmp_path, folder)
    first = prep.prepare_domain("d", str(folder), tok, cfg)
    _write_jsonl(folder, _docs(60, seed=1))
    os.utime(folder / "part.jsonl", ns=(1, 1))  # a different size and time: the key changes
    second = prep.prepare_domain("d", str(folder), tok, cfg)
    assert second != first and (first / "index.json").is_file()
    other = tiny_tokenizer()
    other.add_tokens(["zzz"])
    with pytest.raises(ConfigError, match="another tokenizer"):
        load_corpus(DataConfig(domains={"d": str(first)}, seq_len=16, eval_sequences=3), other)
    with pytest.raises(ConfigError, match="data.seq_len=16"):
        load_corpus(DataConfig(domains={"d": str(first)}, seq_len=32, eval_sequences=3), tok)
    # the same tokenizer reads a prepared folder given as a source directly
    direct = load_corpus(DataConfig(domains={"d": str(first)}, seq_len=16, eval_sequences=3), tok)
    assert len(direct.train[0]) == json.loads((first / "index.json").read_text())["tokens"]["train"] // 16


def test_a_copy_with_new_times_reuses_the_tokens_and_an_edit_of_the_same_size_does_not(tmp_path):
    tok, folder = tiny_tokenizer(), _write_jsonl(tmp_path / "d", _docs(3000))
    cfg = _cfg(tmp_path, folder)
    path = folder / "part.jsonl"
    assert path.stat().st_size > 2 * prep.SAMPLE_BYTES  # the middle of the file is outside the key
    first = prep.prepare_domain("d", str(folder), tok, cfg)
    os.utime(path, ns=(1, 1))  # as a copy or a remount leaves it: same bytes, another modification time
    assert prep.prepare_domain("d", str(folder), tok, cfg) == first
    data = bytearray(path.read_bytes())
    data[-10] = ord("Z") if data[-10] != ord("Z") else ord("Y")  # in the last document's text: same size
    path.write_bytes(bytes(data))
    assert prep.prepare_domain("d", str(folder), tok, cfg) != first


def test_a_stale_lock_of_a_dead_builder_is_taken_over(tmp_path):
    import socket
    import subprocess

    tok, folder = tiny_tokenizer(), _write_jsonl(tmp_path / "d", _docs(50))
    cfg = _cfg(tmp_path, folder)
    target = prep.domain_folder("d", str(folder), tok, cfg)
    dead = subprocess.Popen(["true"])
    dead.wait()
    target.parent.mkdir(parents=True)
    lock = target.with_name(target.name + ".lock")
    lock.write_text(f"{socket.gethostname()} {dead.pid}\n")
    assert prep.prepare_domain("d", str(folder), tok, cfg) == target and not lock.exists()


def test_windows_read_only_what_they_index(tmp_path):
    tokens = np.arange(1000, dtype=np.uint16)
    tokens.tofile(tmp_path / "t.bin")
    w = prep.TokenWindows(tmp_path / "t.bin", "uint16", 1000, 64)
    assert len(w) == 15 and w.numel() == 960
    assert torch.equal(w[2], torch.arange(128, 192)) and torch.equal(w[-1], torch.arange(896, 960))
    with pytest.raises(IndexError):
        w[15]


def test_a_torn_prepared_folder_given_as_a_source_is_refused(tmp_path):
    tok, folder = tiny_tokenizer(), _write_jsonl(tmp_path / "d", _docs(50))
    built = prep.prepare_domain("d", str(folder), tok, _cfg(tmp_path, folder))
    with open(built / "eval.bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(ConfigError, match="unusable .*eval.bin holds"):
        load_corpus(DataConfig(domains={"d": str(built)}, seq_len=16, eval_sequences=3), tok)


def test_prepare_command_builds_once_and_training_reuses_it(tmp_path, capsys):
    from tiny_models import save_tiny

    from drpruning.cli import main

    model = save_tiny(tmp_path / "model")
    folder = _write_jsonl(tmp_path / "d", _docs(80))
    args = ["prepare", f"model.source={model}", f"data.domains={{d: {folder}}}", "data.seq_len=16",
            f"data.cache_dir={tmp_path / 'cache'}"]
    assert main(args) == 0
    name, path = capsys.readouterr().out.strip().split("\t")
    index = json.loads((tmp_path / "cache" / path.rsplit("/", 1)[-1] / "index.json").read_text())
    assert name == "d" and index["tokens"]["train"] > 0
    mtime = os.stat(f"{path}/train.bin").st_mtime_ns
    cfg = DataConfig(domains={"d": str(folder)}, seq_len=16, cache_dir=str(tmp_path / "cache"))
    corpus = load_corpus(cfg, tiny_tokenizer())
    assert corpus.train_tokens[0] == index["tokens"]["train"] // 16 * 16
    assert os.stat(f"{path}/train.bin").st_mtime_ns == mtime  # reused, not rebuilt


def test_concurrent_builders_build_once_and_share_the_folder(tmp_path, caplog):
    """Two builders (two ranks, or two nodes on a shared file system) ask for the same folder at once: one
    builds it, the other waits for it. Threads here: the lock is a file, the same between processes."""
    from concurrent.futures import ThreadPoolExecutor

    tok, folder = tiny_tokenizer(), _write_jsonl(tmp_path / "d", _docs(3000))
    cfg = _cfg(tmp_path, folder)
    with caplog.at_level("INFO"), ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: prep.prepare_domain("d", str(folder), tok, cfg, num_proc=1), range(2)))
    assert results[0] == results[1] and prep.problem(results[0]) is None
    assert sum("prepared:" in r.message for r in caplog.records) == 1  # built by exactly one of them
