"""Data: one document reader (`documents`), one packer (`packing`), the held-out split (`split`), prepared
memory-mapped token files (`prepared`, built with `tokenizing`), domains (`corpus`), the embedded default
corpus (`embedded`), the mixture sampler (`sampler`), initial proportions.

Names are imported on first use, so that a tokenising worker process (`tokenizing`) starts without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "Corpus": "corpus", "check_sources": "corpus", "load_corpus": "corpus", "prepare_corpus": "corpus",
    "SUFFIXES": "documents", "DataError": "documents", "iter_documents": "documents",
    "read_documents": "documents", "Packed": "packing", "pack": "packing", "TokenWindows": "prepared",
    "tokenizer_fingerprint": "prepared", "initial_proportions": "proportions",
    "temperature_proportions": "proportions", "MixtureSampler": "sampler", "split_documents": "split",
}
__all__ = list(_HOMES)


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'drpruning.data' has no attribute {name!r}")
    return getattr(importlib.import_module(f"drpruning.data.{_HOMES[name]}"), name)
