"""Optimisers and learning-rate schedules, by name: `weights` (AdamW over the model) and, when pruning,
`masks` (AdamW over the masks, descending, and the Lagrange multipliers, ascending), or, with
`pruning.lagrangian_optimizer: sgd`, `masks` for the masks alone and `multipliers` (plain gradient ascent).

Separate optimisers keep the weights' state shardable (FSDP) apart from the small, replicated pruning state.
"""

from __future__ import annotations

import math

import torch

from drpruning.config import PruningConfig, TrainConfig, warmup_steps


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warmup, then cosine decay to `min_ratio` of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress_ = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress_)))


def build_optimizers(model: torch.nn.Module, pruner: torch.nn.Module | None,
                     t: TrainConfig) -> dict[str, torch.optim.Optimizer]:
    betas = tuple(t.betas)
    weights = [q for q in model.parameters() if q.requires_grad]
    # fused: one kernel per parameter for the whole update; the default on a CPU loops over a dozen elementwise
    # ops per tensor (SmolLM2-135M: 0.17 s against 0.7-1.4 s a step, bench/bench_train_step.py --optimizer)
    fused = all(q.device.type in ("cpu", "cuda") and q.is_floating_point() for q in weights)
    out = {"weights": torch.optim.AdamW(weights, lr=t.lr, betas=betas, eps=t.eps, weight_decay=t.weight_decay,
                                        fused=fused or None)}
    if pruner is not None:
        masks, multipliers = pruner.optimizer_groups()
        if pruner.cfg.lagrangian_optimizer == "sgd":
            out["masks"] = torch.optim.AdamW([masks], betas=betas, eps=t.eps, weight_decay=0.0)
            out["multipliers"] = torch.optim.SGD([multipliers])  # the group carries lr and maximize
        else:
            out["masks"] = torch.optim.AdamW([masks, multipliers], betas=betas, eps=t.eps, weight_decay=0.0)
    return out


def build_schedulers(optimizers: dict[str, torch.optim.Optimizer], t: TrainConfig,
                     p: PruningConfig | None = None) -> dict[str, torch.optim.lr_scheduler.LRScheduler]:
    """The weights: warmup + cosine. The masks: constant after a linear warmup (`pruning.mask_schedule:
    constant`, so they can still converge after the Lagrangian warmup), or the weights' schedule (`follow`,
    the paper's)."""
    warmup = round(t.warmup_fraction * t.steps)
    out = {}
    for name, o in optimizers.items():
        if name in ("masks", "multipliers") and p is not None and p.mask_schedule == "constant":
            w = p.mask_warmup_steps if p.mask_warmup_steps is not None else round(0.25 * warmup_steps(p, t.steps))
            out[name] = torch.optim.lr_scheduler.LambdaLR(o, lambda s, w=w: min(1.0, (s + 1) / w) if w > 0 else 1.0)
        else:
            out[name] = torch.optim.lr_scheduler.LambdaLR(
                o, lambda s: lr_factor(s, t.steps, warmup, t.min_lr_ratio))
    return out
