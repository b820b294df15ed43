"""Prepared data: each domain's tokens in memory-mapped files with a JSON index, built once and shared.

A prepared domain is a folder `<cache>/<domain>-<key>/` holding
- `train.bin`: the training documents' tokens, each document followed by the separator, in document order
  (uint16 when the vocabulary fits, else uint32); training reads fixed-length windows of it on demand;
- `eval.bin`: the held-out sequences, already cut to [eval_sequences, seq_len];
- `index.json`: format, source files, tokenizer fingerprint, dtype, documents and tokens per split, and the
  held-out text's bytes and characters (for bits per byte).
The key hashes the source files (path, size, the first and last 64 KiB), the tokenizer and the split
settings, so changed files or another tokenizer get a new folder: prepared tokens are never mixed, and a copy
of the same files with new modification times reuses them. A folder is built under
`<folder>.partial/` and renamed when complete; a killed build resumes from its last progress record. One
process builds (it holds `<folder>.lock`); the others (ranks, nodes, a second `prepare`) wait for it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from drpruning.config import ConfigError, DataConfig
from drpruning.data.documents import files as list_files
from drpruning.data.documents import iter_documents
from drpruning.data.packing import TOKENIZE_BATCH, pack, separator
from drpruning.data.split import EVAL_CHARS_PER_TOKEN, PIECE_CHARS, HeldOut, order_key, split_pieces, too_little_text
from drpruning.data.tokenizing import encode_batches, token_dtype
from drpruning.paths import cache_root, follow_umask

log = logging.getLogger(__name__)

FORMAT = 1  # of a prepared folder; bump when what it holds changes
INDEX = "index.json"
PROGRESS_TOKENS = 1 << 24  # tokens between progress records of a build (what a kill can lose)
STALE_LOCK_S = 600  # a lock not refreshed for this long belongs to a dead builder
WAIT_LOG_S = 60
POOL_MIN_BYTES = 32 << 20  # below this much source text, worker start-up (seconds each) costs more than it saves


@dataclass
class PreparedDomain:
    train: TokenWindows
    eval: torch.Tensor  # [eval_sequences, seq_len]
    index: dict


class TokenWindows:
    """Fixed-length windows of a token file, read on demand: window i is tokens [i * L, (i + 1) * L). Only
    the windows read are paged in, so memory does not grow with the file."""

    def __init__(self, path: str | Path, dtype: str, n_tokens: int, seq_len: int):
        self.path, self.dtype, self.n_tokens, self.seq_len = str(path), np.dtype(dtype), n_tokens, seq_len
        self._data: np.memmap | None = None

    def __len__(self) -> int:
        return self.n_tokens // self.seq_len

    def __getitem__(self, i: int) -> torch.Tensor:
        n = len(self)
        i = i + n if i < 0 else i
        if not 0 <= i < n:
            raise IndexError(f"window {i} of {n}")
        if self._data is None:
            self._data = np.memmap(self.path, dtype=self.dtype, mode="r", shape=(self.n_tokens,))
        return torch.from_numpy(self._data[i * self.seq_len:(i + 1) * self.seq_len].astype(np.int64))

    def numel(self) -> int:
        return len(self) * self.seq_len


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


SAMPLE_BYTES = 1 << 16  # of each file's head and tail in the key


def file_signature(path: Path) -> str:
    """Path, size and a digest of the file's first and last 64 KiB: a copy (new modification time, same bytes)
    keeps its prepared tokens, an edit or an append gets new ones, and a start never reads whole files."""
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        digest.update(f.read(SAMPLE_BYTES))
        if size > SAMPLE_BYTES:
            f.seek(max(SAMPLE_BYTES, size - SAMPLE_BYTES))
            digest.update(f.read(SAMPLE_BYTES))
    return f"{path}:{size}:{digest.hexdigest()[:16]}"


def source_files(source: str) -> list[str]:
    if source.startswith("hf:"):
        return [source]
    return [file_signature(p) for p in list_files(source)]


def domain_folder(name: str, source: str, tokenizer, cfg: DataConfig) -> Path:
    blob = json.dumps([source_files(source), tokenizer_fingerprint(tokenizer), cfg.seq_len, cfg.eval_sequences,
                       cfg.eval_fraction, cfg.max_documents, PIECE_CHARS, FORMAT])
    root = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else cache_root() / "tokens"
    return root / f"{name}-{hashlib.sha256(blob.encode()).hexdigest()[:24]}"


def is_prepared(source: str) -> bool:
    """A source that is itself a prepared folder (e.g. one written by `drpruning prepare`)."""
    return not source.startswith("hf:") and (Path(source).expanduser() / INDEX).is_file()


def _write_json(path: Path, data: dict) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def problem(folder: Path) -> str | None:
    """Why a prepared folder cannot be used (None: it can): missing, another format, or a torn file."""
    try:
        index = json.loads((folder / INDEX).read_text())
    except (OSError, json.JSONDecodeError):
        return "missing" if not folder.exists() else "no readable index.json"
    if index.get("format") != FORMAT:
        return f"format {index.get('format')}, this version reads {FORMAT}"
    itemsize = np.dtype(index["dtype"]).itemsize
    for split in ("train", "eval"):
        path, want = folder / f"{split}.bin", index["tokens"][split] * itemsize
        size = path.stat().st_size if path.is_file() else -1
        if size != want:
            return f"{path.name} holds {size} bytes, its index says {want}"
    return None


def open_domain(folder: Path, tokenizer, seq_len: int) -> PreparedDomain:
    if (why := problem(folder)) is not None:
        raise ConfigError(f"prepared data {folder} is unusable ({why}): run `drpruning prepare` again")
    index = json.loads((folder / INDEX).read_text())
    if index["tokenizer"] != tokenizer_fingerprint(tokenizer):
        raise ConfigError(f"prepared data {folder} was tokenised by another tokenizer than this model's: "
                          "prepare the source text again for this model (never mix tokenisations)")
    if index["seq_len"] != seq_len:
        raise ConfigError(f"prepared data {folder} has held-out sequences of {index['seq_len']} tokens: set "
                          f"data.seq_len={index['seq_len']} or prepare the source text again")
    ev = np.fromfile(folder / "eval.bin", dtype=index["dtype"]).astype(np.int64)
    train = TokenWindows(folder / "train.bin", index["dtype"], index["tokens"]["train"], seq_len)
    return PreparedDomain(train, torch.from_numpy(ev).view(-1, seq_len), index)


# ---------------------------------------------------------------- building

def _documents(source: str, cfg: DataConfig, pieces: bool) -> Iterator[str]:
    docs = iter_documents(source, cfg.max_documents)
    return (p for d in docs for p in split_pieces(d)) if pieces else docs


def choose_held_out(name: str, source: str, cfg: DataConfig, heartbeat=lambda: None) -> dict:
    """Pass 1: the held-out document indices (those of `split.split_documents`), in one streaming pass."""
    wanted = cfg.eval_sequences * cfg.seq_len * EVAL_CHARS_PER_TOKEN
    chooser, n, chars, first = HeldOut(wanted), 0, 0, None
    for i, doc in enumerate(iter_documents(source, cfg.max_documents)):
        chooser.add(order_key(name, doc), i, len(doc))
        n, chars, first = n + 1, chars + len(doc), doc if i == 0 else first
        if i % 10_000 == 0:
            heartbeat()
    if n == 0:
        raise ConfigError(f"domain {name!r} ({source}) has no non-empty documents")
    pieces = n < 2
    if pieces:
        log.info("domain %s holds one document: its held-out text is %d-character pieces of it", name, PIECE_CHARS)
        parts = split_pieces(first)
        if len(parts) < 2:
            raise too_little_text(name, chars)
        chooser, n = HeldOut(wanted), len(parts)
        for i, part in enumerate(parts):
            chooser.add(order_key(name, part), i, len(part))
    return {"n_docs": n, "pieces": pieces, "held": sorted(chooser.indices(n, cfg.eval_fraction)),
            "docs_done": 0, "train_docs": 0, "train_tokens": 0}


def _build(folder: Path, name: str, source: str, tokenizer, cfg: DataConfig, num_proc: int, lock: Path) -> None:
    part = folder.with_name(folder.name + ".partial")
    part.mkdir(parents=True, exist_ok=True)

    def heartbeat() -> None:  # tells waiting processes the builder is alive
        os.utime(lock)

    progress_path = part / "progress.json"
    progress = json.loads(progress_path.read_text()) if progress_path.is_file() else None
    if progress is None:
        progress = choose_held_out(name, source, cfg, heartbeat)
        _write_json(progress_path, progress)
    else:
        log.info("domain %s: resuming its preparation after %d documents", name, progress["docs_done"])
    held, done, dtype = set(progress["held"]), progress["docs_done"], token_dtype(len(tokenizer))
    eval_docs: list[str] = []
    bar = tqdm(total=progress["n_docs"], initial=done, desc=f"prepare {name}", unit="doc", dynamic_ncols=True)

    def batches() -> Iterator[tuple[tuple[int, int], list[str]]]:
        batch: list[str] = []
        for i, doc in enumerate(_documents(source, cfg, progress["pieces"])):
            if i in held:
                eval_docs.append(doc)
            elif i >= done:
                batch.append(doc)
                if len(batch) == TOKENIZE_BATCH:
                    yield (i + 1, len(batch)), batch
                    batch = []
        if batch:
            yield (progress["n_docs"], len(batch)), batch

    train_path = part / "train.bin"
    with open(train_path, "r+b" if train_path.exists() else "wb") as f:
        f.truncate(progress["train_tokens"] * dtype.itemsize)  # tokens written after the last record go
        f.seek(0, os.SEEK_END)
        saved = progress["train_tokens"]
        for (end, n_docs), tokens in encode_batches(tokenizer, batches(), separator(tokenizer), dtype, num_proc):
            f.write(tokens.tobytes())
            progress["train_tokens"] += len(tokens)
            progress["train_docs"] += n_docs
            progress["docs_done"] = end
            bar.update(end - bar.n)
            if progress["train_tokens"] - saved >= PROGRESS_TOKENS:
                f.flush()
                os.fsync(f.fileno())
                _write_json(progress_path, progress)
                heartbeat()
                saved = progress["train_tokens"]
        f.flush()
        os.fsync(f.fileno())
    bar.close()
    held_out = pack(tokenizer, eval_docs, cfg.seq_len, cfg.eval_sequences, count_text=True)
    if len(held_out.sequences) == 0 or progress["train_tokens"] < cfg.seq_len:
        raise ConfigError(f"domain {name!r} has too little text for one training and one evaluation sequence "
                          f"of data.seq_len={cfg.seq_len} tokens; add text or lower data.seq_len")
    held_out.sequences.numpy().astype(dtype).tofile(part / "eval.bin")
    index = {"format": FORMAT, "domain": name, "source": source, "files": source_files(source),
             "tokenizer": tokenizer_fingerprint(tokenizer), "vocab_size": len(tokenizer), "dtype": dtype.name,
             "seq_len": cfg.seq_len, "pieces": progress["pieces"],
             "documents": {"train": progress["train_docs"], "eval": len(eval_docs)},
             "tokens": {"train": progress["train_tokens"], "eval": held_out.sequences.numel()},
             "eval_bytes": held_out.n_bytes, "eval_chars": held_out.n_chars}
    _write_json(part / INDEX, index)
    progress_path.unlink()
    follow_umask(part)
    os.replace(part, folder)
    log.info("domain %s prepared: %d training tokens (%d documents) in %s", name, progress["train_tokens"],
             progress["train_docs"], folder)


# ---------------------------------------------------------------- one builder, the others wait

def _take_lock(lock: Path) -> bool:
    lock.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(f"{socket.gethostname()} {os.getpid()}\n")
    return True


def _lock_is_stale(lock: Path) -> bool:
    try:
        host, pid = lock.read_text().split()
        age = time.time() - lock.stat().st_mtime
    except (OSError, ValueError):
        return False  # just released, or being written
    if host == socket.gethostname():
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass
    return age > STALE_LOCK_S


def default_num_proc(source: str) -> int:
    """All cores for a large (or remote) source, one process for a small one."""
    if not source.startswith("hf:") and sum(p.stat().st_size for p in list_files(source)) < POOL_MIN_BYTES:
        return 1
    return len(os.sched_getaffinity(0))


def prepare_domain(name: str, source: str, tokenizer, cfg: DataConfig, num_proc: int | None = None) -> Path:
    """The domain's prepared folder: reused when complete, else built here or awaited from its builder."""
    folder = domain_folder(name, source, tokenizer, cfg)
    lock, waited = folder.with_name(folder.name + ".lock"), time.monotonic()
    num_proc = num_proc or cfg.num_proc or default_num_proc(source)
    while True:
        if problem(folder) is None:
            return folder
        if _take_lock(lock):
            try:
                why = problem(folder)
                if why is None:
                    return folder
                if why != "missing":
                    log.warning("prepared data %s is unusable (%s): rebuilding it", folder, why)
                    shutil.rmtree(folder)
                _build(folder, name, source, tokenizer, cfg, num_proc, lock)
                return folder
            finally:
                lock.unlink(missing_ok=True)
        if _lock_is_stale(lock):
            log.warning("removing the stale lock %s (%s)", lock, lock.read_text().strip())
            lock.unlink(missing_ok=True)
            continue
        if time.monotonic() - waited > WAIT_LOG_S:
            log.info("waiting for the builder of domain %s (lock %s)", name, lock)
            waited = time.monotonic()
        time.sleep(1.0)
