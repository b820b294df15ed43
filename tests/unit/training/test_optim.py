"""The learning-rate schedules of the weights and of the masks, against the formulas written out."""

from __future__ import annotations

import math

import pytest
import torch

from drpruning.config import PruningConfig, TrainConfig
from drpruning.training.optim import build_schedulers


def lrs(scheduler: torch.optim.lr_scheduler.LRScheduler, steps: int) -> list[list[float]]:
    out = []
    for _ in range(steps):
        out.append([g["lr"] for g in scheduler.optimizer.param_groups])
        scheduler.optimizer.step()
        scheduler.step()
    return out


def optimizers() -> dict[str, torch.optim.Optimizer]:
    w, m, lam = (torch.nn.Parameter(torch.zeros(1)) for _ in range(3))
    return {"weights": torch.optim.AdamW([w], lr=1e-3),
            "masks": torch.optim.AdamW([{"params": [m], "lr": 0.1}, {"params": [lam], "lr": 0.2, "maximize": True}])}


def cosine(step: int, total: int, warmup: int, floor: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    x = (step - warmup) / (total - warmup)
    return floor + (1 - floor) * (1 + math.cos(math.pi * x)) / 2


@pytest.mark.parametrize("mask_warmup", [None, 7])
def test_masks_are_constant_after_their_own_warmup(mask_warmup):
    """`constant`: both mask groups rise linearly over the mask warmup (default: a quarter of the Lagrangian
    warmup, which is 20% of the run) and then stay at their peak; the weights follow warmup + cosine."""
    t = TrainConfig(steps=100, warmup_fraction=0.1, min_lr_ratio=0.1)
    p = PruningConfig(enabled=True, method="l0", mask_schedule="constant", mask_warmup_steps=mask_warmup)
    sched = build_schedulers(optimizers(), t, p)
    w = mask_warmup if mask_warmup is not None else 5  # 0.25 x round(0.2 x 100)
    for step, (m, lam) in enumerate(lrs(sched["masks"], 100)):
        factor = min(1.0, (step + 1) / w)
        assert (m, lam) == pytest.approx((0.1 * factor, 0.2 * factor)), step
    for step, (lr,) in enumerate(lrs(sched["weights"], 100)):
        assert lr == pytest.approx(1e-3 * cosine(step, 100, 10, 0.1)), step


def test_masks_follow_the_weights_schedule_when_asked():
    t = TrainConfig(steps=60, warmup_fraction=0.25, min_lr_ratio=0.0)
    sched = build_schedulers(optimizers(), t, PruningConfig(enabled=True, method="l0", mask_schedule="follow"))
    for step, (m, lam) in enumerate(lrs(sched["masks"], 60)):
        assert (m, lam) == pytest.approx((0.1 * cosine(step, 60, 15, 0.0), 0.2 * cosine(step, 60, 15, 0.0))), step
