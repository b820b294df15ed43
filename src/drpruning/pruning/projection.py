"""The projected size constraint (`pruning.constraint: projected`, docs/method.md §2.11).

The paper prices the gap between each structure's expected size and its target with Lagrange multipliers that
ascend on the gap. Measured on SmolLM2 (experiments/l0_budget), the multipliers oscillate: the loss pulls cut
units back, the multipliers answer late, and over 350 steps the expected layer sparsity swung 0.04 -> 0.42
around a target of 0.20. Projection has no multipliers: after every optimiser step (and before every forward)
each row's log-alphas are shifted by one common amount `tau`, so that the row's expected kept count is its
target exactly; the masks then learn which units stay, never how many. ProbMask (Zhou et al., 2021) projects
its scores onto a global sparsity constraint the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from drpruning.pruning.pruner import Pruner

BISECTION_STEPS = 48  # the shift's interval, at most 18.4 wide, halves to 7e-14: below float32's resolution
COUNT_TOLERANCE = 1e-3  # kept units: a row this close to its target is left as it is (float32 sums)


@torch.no_grad()
def shift_to_count(
    log_alpha: torch.Tensor, keep: Callable[[torch.Tensor], torch.Tensor], kept: float, protected: torch.Tensor,
    bounds: tuple[float, float],
) -> torch.Tensor:
    """Per row (last dim), the shift `tau` of smallest magnitude with
    sum(keep(clamp(log_alpha - tau, *bounds))) over unprotected units + protected units = `kept`.

    `keep` maps log-alphas to each unit's expected keep (P(z > 0), or a deterministic gate's value); it is
    non-decreasing, so the count falls as `tau` grows and bisection finds the boundary of the set of shifts that
    meet the target: rows already at it keep `tau = 0`."""
    rows = log_alpha.reshape(-1, log_alpha.shape[-1]).float()
    prot = protected.expand_as(log_alpha).reshape(rows.shape)
    target = kept - prot.sum(-1).to(rows.dtype)

    def count(tau: torch.Tensor) -> torch.Tensor:
        shifted = (rows - tau.unsqueeze(-1)).clamp(*bounds)
        return torch.where(prot, 0.0, keep(shifted)).sum(-1)

    zero = torch.zeros(rows.shape[0], dtype=rows.dtype, device=rows.device)
    now = count(zero)
    over, under = now > target + COUNT_TOLERANCE, now < target - COUNT_TOLERANCE
    width = bounds[1] - bounds[0]  # the rows lie within the bounds: any shift beyond this saturates every unit
    lo = torch.where(under, -width, 0.0).to(rows.dtype)  # over: the smallest tau >= 0 with count <= target
    hi = torch.where(over, width, 0.0).to(rows.dtype)  # under: the largest tau <= 0 with count >= target
    for _ in range(BISECTION_STEPS):
        mid = (lo + hi) / 2
        c = count(mid)
        meets = torch.where(over, c <= target, c >= target)
        hi = torch.where(over & meets, mid, torch.where(under & ~meets, mid, hi))
        lo = torch.where(over & ~meets, mid, torch.where(under & meets, mid, lo))
    tau = torch.where(over, hi, torch.where(under, lo, zero))
    return tau.reshape(log_alpha.shape[:-1])


@torch.no_grad()
def project_(pruner: Pruner, step: int) -> None:
    """Shift every structure's log-alphas (in place, clamped to their range) so that each row's expected kept
    count is the target of `step` (the Lagrangian ramp's, when there is one). While hardening it does nothing:
    the exact masks stay as they are."""
    if pruner.hardening:
        return
    bounds = pruner.log_alpha_range()
    for s, a in pruner.log_alpha.items():
        size, _ = pruner.unit_count(s)
        kept = size * (1.0 - pruner.target_sparsity(s, step))
        tau = shift_to_count(a, pruner.keep, kept, pruner.protected(s), bounds)
        a.sub_(tau.unsqueeze(-1).to(a.dtype)).clamp_(*bounds)
