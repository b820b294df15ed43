"""Domains: documents -> tokens -> packed fixed-length sequences, with a held-out split by document.

A domain is a name and a source: a directory of .jsonl/.json/.txt/.parquet files with a `text` field, the
embedded default corpus (`embedded`), or a Hugging Face dataset (`hf:NAME[:SPLIT]`, online only).
Tokenised sequences are cached on disk, keyed by the tokenizer, the files and the packing settings.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from drpruning.config import ConfigError, DataConfig
from drpruning.data.documents import check_source, read_documents
from drpruning.data.documents import files as list_files
from drpruning.data.packing import pack
from drpruning.paths import cache_root, follow_umask

log = logging.getLogger(__name__)

PIECE_CHARS = 32_000  # long documents are cut into pieces at line breaks so that even a one-book domain
# can be split into disjoint training and evaluation text
CACHE_VERSION = 5  # bump when what a cache holds changes (4: bytes counted by the packer; 5: split by document)
EVAL_CHARS_PER_TOKEN = 6  # held-out text stops once it can fill the sequences (generous for English)


@dataclass
class Corpus:
    names: list[str]
    train: list[torch.Tensor]  # per domain: LongTensor [n_seq, seq_len]
    eval: list[torch.Tensor]
    eval_bytes: list[int]  # UTF-8 bytes of the held-out text (for bits per byte)
    train_tokens: list[int]  # training tokens per domain (for temperature proportions)

    def eval_dict(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.eval))


def check_sources(domains: dict[str, str]) -> dict[str, str]:
    """Resolve `embedded` and check each source before any tokenisation starts."""
    resolved: dict[str, str] = {}
    for name, source in (domains or {"embedded": "embedded"}).items():
        source = str(source)
        if source == "embedded":
            from drpruning.data.embedded import materialize_embedded_corpus

            for sub, sub_dir in materialize_embedded_corpus().items():
                resolved[sub] = str(sub_dir)
            continue
        check_source(source, f"data.domains.{name}")
        resolved[name] = source if source.startswith("hf:") else str(Path(source).expanduser())
    return resolved


def split_pieces(doc: str, size: int = PIECE_CHARS) -> list[str]:
    """Cut a long document at line breaks into pieces of about `size` characters."""
    if len(doc) <= size:
        return [doc]
    pieces, start = [], 0
    while start < len(doc):
        end = min(len(doc), start + size)
        if end < len(doc):
            cut = doc.rfind("\n", start + size // 2, end)
            end = cut + 1 if cut > 0 else end
        pieces.append(doc[start:end])
        start = end
    return pieces


def _order_key(name: str, text: str) -> str:
    return hashlib.sha256(f"{name}\0{text}".encode()).hexdigest()


def split_documents(name: str, docs: list[str], eval_tokens_wanted_chars: int,
                    eval_fraction: float) -> tuple[list[str], list[str]]:
    """Deterministic split by document, chosen by a hash of the text, so that no document has text on both
    sides. A domain of one document (a book) is split by piece of about PIECE_CHARS characters instead."""
    pieces = docs
    if len(docs) < 2:
        pieces = [p for d in docs for p in split_pieces(d)]
        log.info("domain %s holds one document: its held-out text is %d-character pieces of it", name, PIECE_CHARS)
    if len(pieces) < 2:
        raise ConfigError(f"domain {name!r} has too little text ({sum(map(len, docs))} characters) to hold out "
                          "evaluation documents; add documents or remove the domain")
    order = sorted(range(len(pieces)), key=lambda i: _order_key(name, pieces[i]))
    max_eval = max(1, int(eval_fraction * len(pieces)))
    held, chars = set(), 0
    for i in order:
        if len(held) >= max_eval or chars >= eval_tokens_wanted_chars:
            break
        held.add(i)
        chars += len(pieces[i])
    train = [p for i, p in enumerate(pieces) if i not in held]
    held_out = [p for i, p in enumerate(pieces) if i in held]
    return train, held_out


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _cache_key(source: str, tok_fp: str, cfg: DataConfig) -> str:
    if source.startswith("hf:"):
        files = [source]
    else:
        files = [f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in list_files(source)]
    blob = json.dumps([files, tok_fp, cfg.seq_len, cfg.eval_sequences, cfg.eval_fraction, cfg.max_documents,
                       PIECE_CHARS, CACHE_VERSION])
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _cache_dir(cfg: DataConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    return cache_root() / "tokens"


def _save_atomic(tensors: dict[str, torch.Tensor], meta: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    save_file(tensors, tmp, metadata={k: json.dumps(v) for k, v in meta.items()})
    follow_umask(tmp)
    os.replace(tmp, path)


def load_domain(name: str, source: str, tokenizer, cfg: DataConfig) -> tuple[torch.Tensor, torch.Tensor, int]:
    key = _cache_key(source, tokenizer_fingerprint(tokenizer), cfg)
    cache = _cache_dir(cfg) / f"{name}-{key}.safetensors"
    if cache.exists():
        from safetensors import safe_open

        with safe_open(str(cache), "pt") as f:
            meta = {k: json.loads(v) for k, v in f.metadata().items()}
        t = load_file(str(cache))
        return t["train"], t["eval"], meta["eval_bytes"]
    docs = read_documents(source, cfg.max_documents)
    if not docs:
        raise ConfigError(f"domain {name!r} ({source}) has no non-empty documents")
    wanted_chars = cfg.eval_sequences * cfg.seq_len * EVAL_CHARS_PER_TOKEN
    train_docs, eval_docs = split_documents(name, docs, wanted_chars, cfg.eval_fraction)
    held_out = pack(tokenizer, eval_docs, cfg.seq_len, cfg.eval_sequences, count_text=True)
    eval_seqs, eval_bytes = held_out.sequences, held_out.n_bytes
    train_seqs = pack(tokenizer, train_docs, cfg.seq_len).sequences
    if len(eval_seqs) == 0 or len(train_seqs) == 0:
        raise ConfigError(f"domain {name!r} has too little text for one training and one evaluation sequence "
                          f"of data.seq_len={cfg.seq_len} tokens; add text or lower data.seq_len")
    _save_atomic({"train": train_seqs, "eval": eval_seqs}, {"eval_bytes": eval_bytes, "source": source}, cache)
    return train_seqs, eval_seqs, eval_bytes


def load_corpus(cfg: DataConfig, tokenizer, sources: dict[str, str] | None = None) -> Corpus:
    sources = sources or check_sources(cfg.domains)
    names, train, evals, nbytes = [], [], [], []
    for name, source in sources.items():
        tr, ev, nb = load_domain(name, source, tokenizer, cfg)
        names.append(name)
        train.append(tr)
        evals.append(ev)
        nbytes.append(nb)
        log.info("domain %s: %d training and %d evaluation sequences of %d tokens", name, len(tr), len(ev),
                 cfg.seq_len)
    return Corpus(names, train, evals, nbytes, [t.numel() for t in train])
