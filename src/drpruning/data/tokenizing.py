"""Tokenising a stream of documents in worker processes, in order, with a bounded number of batches in flight.

Kept free of torch so that a spawned worker starts fast. Each worker tokenises single-threaded (the Rust
tokenizer's own thread pool is switched off) so that `num_proc` processes use `num_proc` cores; in a single
process the tokenizer does the same, so 1 and N processes are compared like for like.
"""

from __future__ import annotations

import contextlib
import os
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import numpy as np

IN_FLIGHT_PER_PROC = 4  # batches queued per worker: enough to keep it busy, little memory
_TOKENIZER = None


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32: half the disk and page cache of int32 for most models."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def encode(tokenizer, texts: list[str], sep: int | None, dtype: np.dtype) -> np.ndarray:
    """The documents' tokens, each document followed by `sep`, as one flat array. `tokenizer` is a
    transformers tokenizer or its Rust backend (what a fast tokenizer's __call__ runs: the same ids)."""
    if hasattr(tokenizer, "encode_batch"):
        ids = [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
    else:
        ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    parts = [np.asarray(x + [sep] if sep is not None else x, dtype=dtype) for x in ids]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


@contextlib.contextmanager
def _single_threaded():
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old


def _init_worker(tokenizer) -> None:
    global _TOKENIZER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _TOKENIZER = tokenizer


def _encode_in_worker(texts: list[str], sep: int | None, dtype: str) -> np.ndarray:
    return encode(_TOKENIZER, texts, sep, np.dtype(dtype))


def encode_batches(tokenizer, batches: Iterable[tuple[int, list[str]]], sep: int | None, dtype: np.dtype,
                   num_proc: int) -> Iterator[tuple[int, np.ndarray]]:
    """(tag, tokens) for each (tag, texts) of `batches`, in the input order. `num_proc` > 1 tokenises in that
    many spawned processes (fork is unsafe once torch and the tokenizer's threads exist)."""
    # a fast tokenizer's Rust backend alone: a worker then needs neither transformers nor torch, and no
    # BatchEncoding is built per batch (in one process too, so that 1 and N processes compare like for like)
    light = getattr(tokenizer, "backend_tokenizer", None) or tokenizer
    if num_proc <= 1:
        with _single_threaded():
            for tag, texts in batches:
                yield tag, encode(light, texts, sep, dtype)
        return
    with ProcessPoolExecutor(num_proc, mp_context=get_context("spawn"), initializer=_init_worker,
                             initargs=(light,)) as pool:
        pending: deque = deque()
        for tag, texts in batches:
            pending.append((tag, pool.submit(_encode_in_worker, texts, sep, dtype.str)))
            if len(pending) >= IN_FLIGHT_PER_PROC * num_proc:
                tag0, future = pending.popleft()
                yield tag0, future.result()
        while pending:
            tag0, future = pending.popleft()
            yield tag0, future.result()
