"""Hard-concrete (L0) gates: sampling, P(z > 0), the deterministic values used at evaluation and export
(docs/method.md §2.2-2.3). Pure functions of `log_alpha`, no state."""

from __future__ import annotations

import math

import torch

LIMIT_L, LIMIT_R, TEMPERATURE, EPS = -0.1, 1.1, 2.0 / 3.0, 1e-6
LOG_ALPHA_MIN, LOG_ALPHA_MAX = math.log(0.01), math.log(100.0)
SOFT_SCALE = 0.8  # deterministic value sigmoid(0.8 log_alpha / T), as in the authors' code
GATE_FLOOR = 1e-6  # the smallest value a deterministic gate that the exact masks keep takes: a kept unit stays kept
SHARPEN_END = 0.2  # deterministic gates end at a fifth of TEMPERATURE (DDP: its scale 2.4 / mu, mu 0.5 -> 0.1)
# a deterministic gate is exactly 1 for log_alpha >= ln(r / -l) T and exactly 0 below -ln(r / -l) T; the bounded
# range (pruning.log_alpha_bound: temperature) stops a quarter past those points
BOUND_SCALE = 1.25 * math.log(LIMIT_R / -LIMIT_L)


def prob_nonzero(log_alpha: torch.Tensor) -> torch.Tensor:
    """P(z > 0) of the stretched hard-concrete variable."""
    return torch.sigmoid(log_alpha - TEMPERATURE * math.log(-LIMIT_L / LIMIT_R))


def sample_hard_concrete(log_alpha: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One reparameterised sample z in [0, 1] with the shape of log_alpha (differentiable in log_alpha)."""
    u = torch.rand(log_alpha.shape, generator=generator, device=log_alpha.device, dtype=log_alpha.dtype)
    u = u * (1 - 2 * EPS) + EPS
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha) / TEMPERATURE)
    return (s * (LIMIT_R - LIMIT_L) + LIMIT_L).clamp(0.0, 1.0)


def sharpened_temperature(progress: float) -> float:
    """The deterministic gates' temperature: TEMPERATURE at progress 0, falling with sqrt(progress) to
    SHARPEN_END x TEMPERATURE at 1 (DDP's schedule: most of the sharpening early)."""
    p = min(max(float(progress), 0.0), 1.0)
    return TEMPERATURE * (1.0 - (1.0 - SHARPEN_END) * math.sqrt(p))


def deterministic_gate(log_alpha: torch.Tensor, temperature: torch.Tensor | float) -> torch.Tensor:
    """The noise-free stretched gate clamp(sigmoid(log_alpha / t) (r - l) + l, 0, 1). The clamp passes the
    gradient straight through (as DDP's), else a gate at 0 or 1 could never move again."""
    s = torch.sigmoid(log_alpha / temperature) * (LIMIT_R - LIMIT_L) + LIMIT_L
    return s + (s.clamp(0.0, 1.0) - s).detach()


def log_alpha_range(temperature: float | None = None) -> tuple[float, float]:
    """The range log_alpha is clamped to: [ln 0.01, ln 100], or with a deterministic gate's `temperature`
    +-BOUND_SCALE x temperature within it. In the full range a gate can sit far inside its flat top (at T / 5
    the edge is 0.32, ln 100 is 4.61), where its straight-through gradient all but vanishes (1e-14 at ln 100,
    below Adam's eps) and the multipliers cannot move it; bounded, every gate stays within a quarter of its
    edge (docs/method.md §2.10)."""
    if temperature is None:
        return LOG_ALPHA_MIN, LOG_ALPHA_MAX
    b = BOUND_SCALE * float(temperature)
    return max(LOG_ALPHA_MIN, -b), min(LOG_ALPHA_MAX, b)


def soft_values(log_alpha: torch.Tensor) -> torch.Tensor:
    return torch.sigmoid(log_alpha * SOFT_SCALE / TEMPERATURE)


def topk_mask(soft: torch.Tensor, k: torch.Tensor | int, key: torch.Tensor | None = None) -> torch.Tensor:
    """`soft` with the k smallest entries of each row (last dim) set to 0; survivors keep their value. Equal
    soft values are ordered by `key` (smaller goes first), else by index."""
    k = torch.as_tensor(k, device=soft.device).expand(soft.shape[:-1])
    return torch.where(cut_ranks(soft, key) >= k.unsqueeze(-1), soft, torch.zeros_like(soft))


def cut_ranks(soft: torch.Tensor, key: torch.Tensor | None = None) -> torch.Tensor:
    """Each unit's rank in its row by (soft value, key), 0 = the first to be cut."""
    if key is None:
        return soft.argsort(dim=-1, stable=True).argsort(dim=-1, stable=True)
    by_key = key.argsort(dim=-1, stable=True)  # then a stable sort on soft keeps the key order among ties
    order = by_key.gather(-1, soft.gather(-1, by_key).argsort(dim=-1, stable=True))
    return order.argsort(dim=-1)
