"""Per-domain next-token loss, perplexity, bits per byte and bits per character.

Works with any Hugging Face causal LM: sequences are fixed-length token blocks ([n, T], no padding), every
one of the T-1 next tokens of a sequence is predicted and counted.
"""

from __future__ import annotations

import math

import torch

from drpruning.loss import autocast, token_nll


@torch.no_grad()
def domain_nll(model: torch.nn.Module, sequences: list[torch.Tensor], batch_size: int = 8,
               dtype: torch.dtype | None = None, shard: tuple[int, int] = (0, 1),
               collective: bool = False) -> torch.Tensor:
    """Per domain [k, 5]: summed next-token loss (nats), predicted tokens, sequences, and the sum and sum of
    squares of the sequences' mean losses, for this rank's share; float64 on the model's device (NCCL reduces
    device tensors only, and there is no host sync per batch). Sum over ranks, then `loss_and_error`.

    `shard` = (rank, world): rank r scores sequences r, r + world, ... Under FSDP (`collective`) forwards are
    collective, so every rank runs as many batches as the busiest one; a rank out of sequences runs a
    throw-away one."""
    rank, world = shard
    device = next(model.parameters()).device
    # per domain: summed nats, tokens, sequences, and the sums of per-sequence mean losses and their squares
    stats = torch.zeros(len(sequences), 5, dtype=torch.float64, device=device)
    was_training = model.training
    model.eval()
    try:
        for d, seqs in enumerate(sequences):
            if seqs.dim() != 2 or seqs.shape[1] < 2:
                raise ValueError(f"sequences must be a LongTensor [n, T] with T >= 2, got {tuple(seqs.shape)}")
            mine = seqs[rank::world]
            n = math.ceil(len(seqs) / world) if collective else len(mine)
            for i in range(0, n, batch_size):
                ids = mine[i:i + batch_size].to(device)
                dummy = len(ids) == 0
                if dummy:
                    ids = seqs[:1].to(device)
                with autocast(device, dtype):
                    nll = token_nll(model, ids)
                if not dummy:
                    per_seq = nll.double().mean(dim=1)
                    stats[d] += torch.stack([nll.double().sum(), torch.tensor(float(nll.numel()), device=device),
                                             torch.tensor(float(len(ids)), device=device), per_seq.sum(),
                                             per_seq.pow(2).sum()])
    finally:
        model.train(was_training)
    return stats


def domain_losses(model: torch.nn.Module, sequences: dict[str, torch.Tensor], batch_size: int = 8,
                  dtype: torch.dtype | None = None) -> dict[str, dict]:
    """Per domain: token-weighted mean next-token loss (nats), predicted token count, perplexity.

    Also records `sequences` and `sequence_tokens` (n * T, the tokens the text holds) for bits per byte.
    """
    for name, seqs in sequences.items():
        if seqs.numel() == 0:
            raise ValueError(f"domain {name!r} has no evaluation sequences")
    stats = domain_nll(model, list(sequences.values()), batch_size, dtype)
    losses, errors = loss_and_error(stats)
    results: dict[str, dict] = {}
    for (name, seqs), loss, se, row in zip(sequences.items(), losses, errors, stats.tolist(), strict=True):
        results[name] = {"loss": loss, "stderr": se, "tokens": int(row[1]), "ppl": math.exp(loss),
                         "sequences": int(seqs.shape[0]), "sequence_tokens": int(seqs.numel())}
    return results


def loss_and_error(stats: torch.Tensor) -> tuple[list[float], list[float]]:
    """Per domain: the token-weighted mean loss, and the standard error of the mean over sequences (the
    spread of the sequences' mean losses over sqrt(n); nan for a single sequence)."""
    stats = stats.double().cpu()
    loss = stats[:, 0] / stats[:, 1]
    n, s1, s2 = stats[:, 2], stats[:, 3], stats[:, 4]
    var = (s2 - s1 * s1 / n) / (n - 1)
    return loss.tolist(), torch.where(n > 1, (var.clamp_min(0) / n).sqrt(), torch.nan).tolist()


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
