"""The held-out split, by document: which documents of a domain are evaluation text (docs/method.md §5).

Documents are ordered by a hash of their text (so the choice does not depend on file order) and held out from
the smallest hash on until they can fill the evaluation sequences, at most `eval_fraction` of the documents.
A domain of one document (a book) is split by pieces of about PIECE_CHARS characters instead. `HeldOut`
finds the same documents in one streaming pass, keeping only the few candidates it needs.
"""

from __future__ import annotations

import hashlib
import heapq
import logging

from drpruning.config import ConfigError

log = logging.getLogger(__name__)

PIECE_CHARS = 32_000  # long documents are cut into pieces at line breaks so that even a one-book domain
# can be split into disjoint training and evaluation text
EVAL_CHARS_PER_TOKEN = 6  # held-out text stops once it can fill the sequences (generous for English)


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


def order_key(name: str, text: str) -> int:
    """The document's place in the held-out order: a hash of its text, so file order does not matter."""
    return int.from_bytes(hashlib.sha256(f"{name}\0{text}".encode()).digest(), "big")


def split_documents(name: str, docs: list[str], eval_tokens_wanted_chars: int,
                    eval_fraction: float) -> tuple[list[str], list[str]]:
    """Deterministic split by document, chosen by a hash of the text, so that no document has text on both
    sides. A domain of one document (a book) is split by piece of about PIECE_CHARS characters instead."""
    pieces = docs
    if len(docs) < 2:
        pieces = [p for d in docs for p in split_pieces(d)]
        log.info("domain %s holds one document: its held-out text is %d-character pieces of it", name, PIECE_CHARS)
    if len(pieces) < 2:
        raise too_little_text(name, sum(map(len, docs)))
    order = sorted(range(len(pieces)), key=lambda i: order_key(name, pieces[i]))
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



class HeldOut:
    """The documents `split_documents` holds out, found in one pass: add (key, index, characters) per
    document in any order, then `indices(n_documents, eval_fraction)`. Only candidates whose preceding
    characters in key order are below `wanted_chars` are kept (a max-heap), so memory is bounded by the
    held-out text, not the corpus."""

    def __init__(self, wanted_chars: int):
        self.wanted = wanted_chars
        self.heap: list[tuple[int, int, int]] = []  # (-key, -index, characters): the largest key on top
        self.chars = 0

    def add(self, key: int, index: int, n_chars: int) -> None:
        heapq.heappush(self.heap, (-key, -index, n_chars))
        self.chars += n_chars
        # the largest candidate is needed only while the text before it is still short of `wanted`
        while len(self.heap) > 1 and self.chars - self.heap[0][2] >= self.wanted:
            self.chars -= heapq.heappop(self.heap)[2]

    def indices(self, n_documents: int, eval_fraction: float) -> set[int]:
        max_eval = max(1, int(eval_fraction * n_documents))
        held, chars = set(), 0
        for _, index, n_chars in sorted((-k, -i, c) for k, i, c in self.heap):
            if len(held) >= max_eval or chars >= self.wanted:
                break
            held.add(index)
            chars += n_chars
        return held


def too_little_text(name: str, n_chars: int) -> ConfigError:
    return ConfigError(f"domain {name!r} has too little text ({n_chars} characters) to hold out "
                       "evaluation documents; add documents or remove the domain")
