"""Domains: documents -> prepared token files -> fixed-length windows, with a held-out split by document.

A domain is a name and a source: a directory of .jsonl/.jsonl.gz/.jsonl.zst/.json/.txt/.parquet files with
a `text` field, a `datasets` folder saved with `save_to_disk`, a folder written by `drpruning prepare`, the
embedded default corpus (`embedded`), or a Hugging Face dataset (`hf:NAME[:SPLIT]`, online only). Each is
prepared once into memory-mapped token files (`data.prepared`), keyed by the tokenizer, the files and the
split settings; training reads windows of them, so memory does not grow with the corpus.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from drpruning.config import DataConfig
from drpruning.data.documents import check_source
from drpruning.data.prepared import PreparedDomain, TokenWindows, is_prepared, open_domain, prepare_domain
from drpruning.data.prepared import tokenizer_fingerprint as tokenizer_fingerprint
from drpruning.data.split import split_documents as split_documents

log = logging.getLogger(__name__)


@dataclass
class Corpus:
    names: list[str]
    train: list[TokenWindows]  # per domain: window i is a LongTensor [seq_len]
    eval: list[torch.Tensor]  # per domain: LongTensor [n_seq, seq_len]
    eval_bytes: list[int]  # UTF-8 bytes of the held-out text (for bits per byte)
    train_tokens: list[int]  # training tokens per domain in whole windows (for temperature proportions)

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
        if not is_prepared(source):
            check_source(source, f"data.domains.{name}")
        resolved[name] = source if source.startswith("hf:") else str(Path(source).expanduser())
    return resolved


def prepared_folder(name: str, source: str, tokenizer, cfg: DataConfig) -> Path:
    """A domain's prepared folder: the source itself when it is one, else the source prepared (once)."""
    return Path(source).expanduser() if is_prepared(source) else prepare_domain(name, source, tokenizer, cfg)


def load_domain(name: str, source: str, tokenizer, cfg: DataConfig) -> PreparedDomain:
    return open_domain(prepared_folder(name, source, tokenizer, cfg), tokenizer, cfg.seq_len)


def prepare_corpus(cfg: DataConfig, tokenizer, sources: dict[str, str] | None = None) -> dict[str, Path]:
    """`drpruning prepare`: every domain's prepared folder, built where missing."""
    sources = sources or check_sources(cfg.domains)
    return {name: prepared_folder(name, source, tokenizer, cfg) for name, source in sources.items()}


def load_corpus(cfg: DataConfig, tokenizer, sources: dict[str, str] | None = None) -> Corpus:
    sources = sources or check_sources(cfg.domains)
    names, train, evals, nbytes = [], [], [], []
    for name, source in sources.items():
        domain = load_domain(name, source, tokenizer, cfg)
        names.append(name)
        train.append(domain.train)
        evals.append(domain.eval)
        nbytes.append(domain.index["eval_bytes"])
        log.info("domain %s: %d training windows and %d evaluation sequences of %d tokens", name,
                 len(domain.train), len(domain.eval), cfg.seq_len)
    return Corpus(names, train, evals, nbytes, [t.numel() for t in train])
