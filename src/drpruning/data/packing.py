"""The one packer: documents -> tokens -> fixed-length sequences, for training and evaluation alike.

Documents are concatenated, each followed by a separator token (EOS, else BOS), and cut into [n, seq_len]
blocks; the remainder is dropped. With `count_text`, the UTF-8 bytes and characters of exactly the text the
blocks hold are counted as well, for bits per byte: a document cut by the end of the last block counts up to
its last kept token, and a separator counts as one byte and one character, as a newline between documents
would.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

TOKENIZE_BATCH = 256  # documents per tokenizer call


@dataclass
class Packed:
    sequences: torch.Tensor  # LongTensor [n, seq_len]
    n_bytes: int = 0  # of the text held (only with count_text)
    n_chars: int = 0


def separator(tokenizer) -> int | None:
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id


def pack(tokenizer, texts: list[str], seq_len: int, max_sequences: int | None = None,
         count_text: bool = False) -> Packed:
    """Pack `texts` into at most `max_sequences` blocks of `seq_len` tokens (tokenising no more than needed)."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    sep = separator(tokenizer)
    budget = None if max_sequences is None else max_sequences * seq_len
    fast = count_text and getattr(tokenizer, "is_fast", False)
    stream: list[int] = []
    docs: list[tuple[int, str, list[int], list | None]] = []  # (start in stream, text, ids, offsets)
    for i in range(0, len(texts), TOKENIZE_BATCH):
        chunk = texts[i:i + TOKENIZE_BATCH]
        enc = tokenizer(chunk, add_special_tokens=False, return_offsets_mapping=fast)
        for j, ids in enumerate(enc["input_ids"]):
            if count_text:
                docs.append((len(stream), chunk[j], list(ids), enc["offset_mapping"][j] if fast else None))
            stream.extend(ids)
            if sep is not None:
                stream.append(sep)
        if budget is not None and len(stream) >= budget:
            break  # enough text for max_sequences: do not tokenise the rest
    n = len(stream) // seq_len
    if max_sequences is not None:
        n = min(n, max_sequences)
    keep = n * seq_len
    packed = Packed(torch.tensor(stream[:keep], dtype=torch.long).view(n, seq_len))
    for start, text, ids, offsets in docs:
        room = keep - start
        if room <= 0:
            break
        if len(ids) <= room:  # the whole document, and its separator when that is kept too
            packed.n_bytes += len(text.encode("utf-8"))
            packed.n_chars += len(text)
            if sep is not None and len(ids) < room:
                packed.n_bytes += 1
                packed.n_chars += 1
            continue
        prefix = text[: offsets[room - 1][1]] if offsets is not None else tokenizer.decode(ids[:room])
        packed.n_bytes += len(prefix.encode("utf-8"))
        packed.n_chars += len(prefix)
    return packed
