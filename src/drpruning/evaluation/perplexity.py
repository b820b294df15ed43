"""Per-domain next-token loss, perplexity, bits per byte and bits per character.

Works with any Hugging Face causal LM: sequences are fixed-length token blocks ([n, T], no padding), every
one of the T-1 next tokens of a sequence is predicted and counted.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

TEXT_SUFFIXES = (".jsonl", ".json", ".txt")
TOKENIZE_BATCH = 256


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _autocast(model: torch.nn.Module, dtype: torch.dtype | None):
    """Autocast only when a compute dtype other than the weights' is asked for (e.g. bf16 on a GPU)."""
    param_dtype = next(model.parameters()).dtype
    if dtype is None or dtype == param_dtype:
        return contextlib.nullcontext()
    return torch.autocast(device_type=_device(model).type, dtype=dtype)


@torch.no_grad()
def sequence_nats(model: torch.nn.Module, seqs: torch.Tensor, batch_size: int = 8,
                  dtype: torch.dtype | None = None) -> torch.Tensor:
    """Summed next-token cross-entropy (nats) of each sequence in `seqs` [n, T]; returns float64 [n]."""
    if seqs.dim() != 2 or seqs.shape[1] < 2:
        raise ValueError(f"sequences must be a LongTensor [n, T] with T >= 2, got shape {tuple(seqs.shape)}")
    device = _device(model)
    out = torch.zeros(seqs.shape[0], dtype=torch.float64)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, seqs.shape[0], batch_size):
            batch = seqs[start:start + batch_size].to(device)
            with _autocast(model, dtype):
                logits = model(input_ids=batch).logits
            # one row at a time in float32: a [B, T, V] float32 copy of a large vocabulary is costly
            for i in range(batch.shape[0]):
                nll = F.cross_entropy(logits[i, :-1].float(), batch[i, 1:], reduction="sum")
                out[start + i] = nll.double().cpu()
    finally:
        model.train(was_training)
    return out


def domain_losses(model: torch.nn.Module, sequences: dict[str, torch.Tensor], batch_size: int = 8,
                  dtype: torch.dtype | None = None) -> dict[str, dict]:
    """Per domain: token-weighted mean next-token loss (nats), predicted token count, perplexity.

    Also records `sequences` and `sequence_tokens` (n * T, the tokens the text holds) for bits per byte.
    """
    results: dict[str, dict] = {}
    for name, seqs in sequences.items():
        if seqs.numel() == 0:
            raise ValueError(f"domain {name!r} has no evaluation sequences")
        nats = sequence_nats(model, seqs, batch_size, dtype)
        tokens = seqs.shape[0] * (seqs.shape[1] - 1)
        loss = float(nats.sum()) / tokens
        results[name] = {"loss": loss, "tokens": tokens, "ppl": math.exp(loss),
                         "sequences": int(seqs.shape[0]), "sequence_tokens": int(seqs.numel())}
    return results


def bits_per_unit(loss: float, sequence_tokens: int, units: int) -> float:
    """Bits per byte (or character) of a text of `units` bytes held in `sequence_tokens` tokens.

    total_nats = mean loss x tokens of the text (the first token of each sequence has no prediction and is
    counted at the mean loss, so a short T does not bias the value); bpb = total_nats / (ln 2 x bytes).
    """
    if units <= 0:
        raise ValueError(f"byte/character count must be positive, got {units}")
    return loss * sequence_tokens / (math.log(2) * units)


def summarize(losses: dict[str, dict], n_bytes: dict[str, int] | None = None,
              n_chars: dict[str, int] | None = None) -> dict:
    """Add bits per byte / character to each domain; mean (unweighted over domains) and worst domain."""
    if not losses:
        raise ValueError("no domains to summarize")
    domains = {}
    for name, r in losses.items():
        d = dict(r)
        if n_bytes and name in n_bytes:
            d["bytes"] = int(n_bytes[name])
            d["bpb"] = bits_per_unit(r["loss"], r.get("sequence_tokens", r["tokens"]), n_bytes[name])
        if n_chars and name in n_chars:
            d["chars"] = int(n_chars[name])
            d["bpc"] = bits_per_unit(r["loss"], r.get("sequence_tokens", r["tokens"]), n_chars[name])
        domains[name] = d
    mean_loss = sum(d["loss"] for d in domains.values()) / len(domains)
    worst = max(domains, key=lambda n: domains[n]["loss"])
    summary = {"domains": domains, "mean_loss": mean_loss, "mean_ppl": math.exp(mean_loss),
               "worst_loss": domains[worst]["loss"], "worst_domain": worst}
    if all("bpb" in d for d in domains.values()):
        summary["mean_bpb"] = sum(d["bpb"] for d in domains.values()) / len(domains)
    return summary


def read_texts(path: str | Path) -> list[str]:
    """Documents of a file or directory: .jsonl/.json records with a `text` field; .txt: one a line."""
    path = Path(path).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"{path} has no {'/'.join(TEXT_SUFFIXES)} files")
    elif path.is_file():
        if path.suffix not in TEXT_SUFFIXES:
            raise ValueError(f"{path}: unsupported file type {path.suffix!r}; give {'/'.join(TEXT_SUFFIXES)}")
        files = [path]
    else:
        raise FileNotFoundError(f"{path} does not exist; give a .jsonl/.json/.txt file or a directory "
                                "of them")
    texts: list[str] = []
    for f in files:
        if f.suffix == ".txt":
            texts.extend(line for line in f.read_text(encoding="utf-8").splitlines() if line.strip())
            continue
        if f.suffix == ".json":
            rows = json.loads(f.read_text(encoding="utf-8"))
            rows = rows if isinstance(rows, list) else [rows]
        else:
            rows = [json.loads(line) for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
        for i, row in enumerate(rows, 1):
            if not isinstance(row, dict) or "text" not in row:
                raise ValueError(f"{f}: record {i} has no 'text' field (expected {{\"text\": ...}})")
            if row["text"]:
                texts.append(str(row["text"]))
    return texts


def text_sequences(tokenizer, texts: list[str], seq_len: int,
                   max_sequences: int | None = None) -> tuple[torch.Tensor, int, int]:
    """Pack documents, each followed by EOS, into [n, seq_len]; the remainder is dropped.

    Returns the sequences and the UTF-8 bytes and characters of exactly the text they hold (a document cut
    at the end counts up to its last kept token; each EOS separator counts as one byte/character, as the
    newline between documents would).
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    sep = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.bos_token_id
    budget = None if max_sequences is None else max_sequences * seq_len
    docs: list[tuple[str, list[int], list[tuple[int, int]] | None]] = []
    total = 0
    for i in range(0, len(texts), TOKENIZE_BATCH):
        chunk = texts[i:i + TOKENIZE_BATCH]
        fast = getattr(tokenizer, "is_fast", False)
        enc = tokenizer(chunk, add_special_tokens=False, return_offsets_mapping=fast)
        for j, text in enumerate(chunk):
            ids = list(enc["input_ids"][j])
            docs.append((text, ids, enc["offset_mapping"][j] if fast else None))
            total += len(ids) + (sep is not None)
        if budget is not None and total >= budget:
            break  # enough text for max_sequences: do not tokenize the rest
    n = total // seq_len
    if max_sequences is not None:
        n = min(n, max_sequences)
    keep = n * seq_len
    stream: list[int] = []
    n_bytes = n_chars = 0
    for text, ids, offsets in docs:
        room = keep - len(stream)
        if room <= 0:
            break
        if len(ids) <= room:  # the whole document
            stream.extend(ids)
            n_bytes += len(text.encode("utf-8"))
            n_chars += len(text)
            if sep is not None and len(stream) < keep:
                stream.append(sep)
                n_bytes += 1
                n_chars += 1
            continue
        stream.extend(ids[:room])  # a document cut by the end of the last sequence
        if offsets is not None:
            prefix = text[: offsets[room - 1][1]]
        else:
            prefix = tokenizer.decode(ids[:room])
        n_bytes += len(prefix.encode("utf-8"))
        n_chars += len(prefix)
    return torch.tensor(stream, dtype=torch.long).view(n, seq_len), n_bytes, n_chars
