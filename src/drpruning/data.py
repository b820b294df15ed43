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

log = logging.getLogger(__name__)

SUFFIXES = (".jsonl", ".json", ".txt", ".parquet")
PIECE_CHARS = 32_000  # long documents are cut into pieces at line breaks so that even a one-book domain
# can be split into disjoint training and evaluation text
TOKENIZE_BATCH = 256


@dataclass
class Corpus:
    names: list[str]
    train: list[torch.Tensor]  # per domain: LongTensor [n_seq, seq_len]
    eval: list[torch.Tensor]
    eval_bytes: list[int]  # UTF-8 bytes of the held-out text (for bits per byte)
    train_tokens: list[int]  # training tokens per domain (for temperature proportions)

    def eval_dict(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.eval))


def _files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)


def check_sources(domains: dict[str, str]) -> dict[str, str]:
    """Resolve `embedded` and check each directory before any tokenisation starts."""
    resolved: dict[str, str] = {}
    for name, source in (domains or {"embedded": "embedded"}).items():
        source = str(source)
        if source == "embedded":
            from drpruning.corpus import materialize_embedded_corpus

            for sub, sub_dir in materialize_embedded_corpus().items():
                resolved[sub] = str(sub_dir)
            continue
        if source.startswith("hf:"):
            resolved[name] = source
            continue
        path = Path(source).expanduser()
        if not path.is_dir():
            raise ConfigError(f"data.domains.{name}: directory {path} does not exist; give a directory of "
                              f".jsonl/.json/.txt/.parquet files with a 'text' field")
        if not _files(path):
            raise ConfigError(f"data.domains.{name}: directory {path} has no {'/'.join(SUFFIXES)} files; "
                              "add documents or remove the domain")
        resolved[name] = str(path)
    return resolved


def _read_file(path: Path) -> list[str]:
    if path.suffix == ".txt":
        return [path.read_text(encoding="utf-8", errors="replace")]
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if "text" not in table.column_names:
            raise ConfigError(f"{path} has no 'text' column (columns: {table.column_names}); "
                              "rename the text column to 'text'")
        return [t for t in table.column("text").to_pylist() if t]
    if path.suffix == ".json":
        rows = json.loads(path.read_text(encoding="utf-8"))
        rows = rows if isinstance(rows, list) else [rows]
    else:
        rows = []
        with path.open(encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ConfigError(f"{path}:{i} is not valid JSON ({e.msg}); fix or remove the line") from None
    docs = []
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict) or "text" not in row:
            raise ConfigError(f"{path}: record {i} has no 'text' field; every record needs one "
                              "(e.g. {\"text\": \"...\"})")
        if row["text"]:
            docs.append(str(row["text"]))
    return docs


def read_documents(source: str, max_documents: int | None = None) -> list[str]:
    if source.startswith("hf:"):
        try:
            import datasets
        except ImportError:
            raise ConfigError(f"{source}: Hugging Face datasets need `pip install datasets` (and a network); "
                              "or download the data and give a local directory") from None
        name, _, split = source[3:].partition(":")
        ds = datasets.load_dataset(name, split=split or "train")
        docs = [str(t) for t in ds["text"] if t]
    else:
        docs = []
        for path in _files(Path(source)):
            docs.extend(_read_file(path))
            if max_documents and len(docs) >= max_documents:
                break
    return docs[:max_documents] if max_documents else docs


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
    """Deterministic split by document: held-out pieces are chosen by a hash of their text."""
    pieces = [p for d in docs for p in split_pieces(d)]
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


def tokenize_and_pack(tokenizer, texts: list[str], seq_len: int) -> torch.Tensor:
    """Concatenate documents, each followed by EOS, and cut into [n, seq_len] (the remainder is dropped)."""
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
    stream: list[int] = []
    for i in range(0, len(texts), TOKENIZE_BATCH):
        for ids in tokenizer(texts[i:i + TOKENIZE_BATCH], add_special_tokens=False)["input_ids"]:
            stream.extend(ids)
            if sep is not None:
                stream.append(sep)
    n = len(stream) // seq_len
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _cache_key(source: str, tok_fp: str, cfg: DataConfig) -> str:
    if source.startswith("hf:"):
        files = [source]
    else:
        files = [f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in _files(Path(source))]
    blob = json.dumps([files, tok_fp, cfg.seq_len, cfg.eval_sequences, cfg.eval_fraction, cfg.max_documents,
                       PIECE_CHARS, 3])
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _cache_dir(cfg: DataConfig) -> Path:
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    from drpruning.models import cache_root

    return cache_root() / "tokens"


def _save_atomic(tensors: dict[str, torch.Tensor], meta: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    save_file(tensors, tmp, metadata={k: json.dumps(v) for k, v in meta.items()})
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
    # ~4 characters per token is generous for English; held-out text stops once it can fill the sequences
    train_docs, eval_docs = split_documents(name, docs, cfg.eval_sequences * cfg.seq_len * 6, cfg.eval_fraction)
    eval_seqs = tokenize_and_pack(tokenizer, eval_docs, cfg.seq_len)[: cfg.eval_sequences]
    train_seqs = tokenize_and_pack(tokenizer, train_docs, cfg.seq_len)
    if len(eval_seqs) == 0 or len(train_seqs) == 0:
        raise ConfigError(f"domain {name!r} has too little text for one training and one evaluation sequence "
                          f"of data.seq_len={cfg.seq_len} tokens; add text or lower data.seq_len")
    # bytes of exactly the evaluated tokens, for bits per byte; a document separator counts as one byte
    ids = eval_seqs.flatten().tolist()
    special = set(tokenizer.all_special_ids)
    eval_bytes = len(tokenizer.decode(ids, skip_special_tokens=True).encode("utf-8")) + sum(i in special for i in ids)
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
