"""The update rules, as pure functions of losses and proportions (docs/method.md §5): chi-square DRO
weights with the excess loss, Sheared-LLaMA's exponentiated-gradient update, the moving reference ratio."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.optimize import brentq

TIE_TOLERANCE = 1e-9  # excesses closer than this (relative) are equal: rounding must not choose the weights
RATIO_EMA = 0.1  # weight of q in the moving reference ratio (docs/method.md §5.5); not the training-loss `ema`


def vector(name: str, values: Sequence[float], k: int | None = None) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"{name} must be a flat list of numbers, got shape {x.shape}")
    if k is not None and len(x) != k:
        raise ValueError(f"{name} has {len(x)} values but there are {k} domains: give one per domain")
    return x


def distribution(name: str, values: Sequence[float], k: int | None = None) -> np.ndarray:
    p = vector(name, values, k)
    if not (np.all(np.isfinite(p)) and np.all(p >= 0) and p.sum() > 0):
        raise ValueError(f"{name} must be non-negative numbers with a positive sum, got {list(values)}")
    return p / p.sum()


def check_losses(name: str, values: Sequence[float], k: int | None = None) -> np.ndarray:
    x = vector(name, values, k)
    if not (np.all(np.isfinite(x)) and np.all(x >= 0)):
        raise ValueError(f"{name} must be finite and non-negative, got {list(values)}")
    return x


def check_dro_options(rho: float, min_prob: float) -> None:
    if not (isinstance(rho, (int, float)) and rho > 0):
        raise ValueError(f"rho must be > 0, got {rho!r}")
    if not (isinstance(min_prob, (int, float)) and 0 <= min_prob < 1):
        raise ValueError(f"min_prob must be in [0, 1), got {min_prob!r}")


def chi_square(q: Sequence[float], p: Sequence[float]) -> float:
    """0.5 * sum_i p_i (q_i / p_i - 1)^2, over the domains with p_i > 0."""
    q, p = np.asarray(q, dtype=np.float64), np.asarray(p, dtype=np.float64)
    m = p > 0
    return float(0.5 * np.sum(p[m] * (q[m] / p[m] - 1.0) ** 2))


def excess(losses: Sequence[float], reference_losses: Sequence[float]) -> tuple[list[float], float]:
    """(loss - c * ref, c): c = 1, or the first of 0.9, 0.8, ..., 0 that makes some excess positive.

    References above every loss (a model that beats them everywhere) would give DRO nothing to weigh;
    shrinking them keeps the ordering of the domains by how far they are from their references."""
    x = check_losses("losses", losses)
    ref = check_losses("reference_losses", reference_losses, len(x))
    for tenths in range(10, -1, -1):
        c = tenths / 10
        e = x - c * ref
        if e.max() > 0:
            return e.tolist(), c
    return (x - 0.0 * ref).tolist(), 0.0


def _floored_weights(e: np.ndarray, p: np.ndarray, eta: float, min_prob: float) -> np.ndarray:
    """q(eta) = r p / sum(r p) with r_i = max((e_i - eta)^+ / sum_j p_j (e_j - eta)^+, min_prob)."""
    top = e.max()
    shifted = np.maximum(e - eta, 0.0)
    total = float(np.dot(p, shifted))
    if eta >= top or total <= 0:
        # the limit eta -> max e: all the mass on the largest excesses (exact on (second largest, max e))
        hit = (e == top).astype(np.float64)
        ratio = hit / float(np.dot(p, hit))
    else:
        ratio = shifted / total
    r = np.maximum(ratio, min_prob) * p
    return r / r.sum()


def dro_weights(losses: Sequence[float], reference_losses: Sequence[float], reference_ratio: Sequence[float],
                rho: float = 0.1, min_prob: float = 0.2, clamp_to_min: bool = True) -> list[float]:
    """Chi-square DRO proportions: the q in the ball 0.5 * sum p (q/p - 1)^2 = rho around the reference
    ratio p that leans toward the domains with the largest excess loss (docs/method.md §5.3)."""
    check_dro_options(rho, min_prob)
    x = check_losses("losses", losses)
    ref = check_losses("reference_losses", reference_losses)
    p = vector("reference_ratio", reference_ratio)
    if len(ref) != len(x) or len(p) != len(x):
        raise ValueError(f"got {len(x)} losses, {len(ref)} reference losses and {len(p)} reference "
                         "proportions: give one of each per domain")
    p = distribution("reference_ratio", p)
    e = np.asarray(excess(x, ref)[0])
    active = p > 0
    spread = e[active].max() - e[active].min()
    if e[active].max() <= 0 or spread <= TIE_TOLERANCE * max(1.0, float(np.abs(e[active]).max())):
        q = p.copy()  # no loss anywhere, or equal excess everywhere (up to rounding): nothing to lean toward
    else:
        # a domain outside the reference ratio (p_i = 0) gets no mass; keep it below the others' excess
        e = np.where(active, e, e[active].min() - 1.0)

        def gap(eta: float) -> float:
            return chi_square(_floored_weights(e, p, eta, min_prob), p) - rho

        top = float(e[active].max())
        if gap(top) <= 0:
            q = _floored_weights(e, p, top, min_prob)  # the ball's edge is out of reach
        else:
            # for eta -> -inf, q -> p (divergence 0): widen until the bracket's low end is inside the ball
            span = max(top - float(e[active].min()), abs(top) * 1e-12, 1e-300)
            low = top - span
            while gap(low) >= 0:
                span *= 2.0
                low = top - span
            eta = brentq(gap, low, top, xtol=np.finfo(np.float64).eps * max(span, abs(top)),
                         rtol=4 * np.finfo(np.float64).eps, maxiter=1000)
            q = _floored_weights(e, p, eta, min_prob)
    if clamp_to_min:
        # the paper's final clamp (it can leave the ball): no domain below the smallest reference share
        q = np.maximum(q, p.min())
        q = q / q.sum()
    return q.tolist()


def sheared_weights(weights: Sequence[float], losses: Sequence[float], reference_losses: Sequence[float],
                    eta: float = 1.0, smoothing: float = 1e-4) -> list[float]:
    """Sheared-LLaMA: w = softmax(log w + eta * max(loss - ref, 0)), then (1 - c) w + c / k."""
    w = distribution("weights", weights)
    x = check_losses("losses", losses, len(w))
    ref = check_losses("reference_losses", reference_losses, len(w))
    with np.errstate(divide="ignore"):
        z = np.log(w) + eta * np.maximum(x - ref, 0.0)
    z = np.exp(z - z.max())
    w = z / z.sum()
    return ((1 - smoothing) * w + smoothing / len(w)).tolist()


def update_reference_ratio(ratio: Sequence[float], weights: Sequence[float], initial_ratio: Sequence[float],
                           ema: float = RATIO_EMA) -> list[float]:
    """p = norm((1 - ema) p + ema q), clipped to [p0 / 2, 2 p0] and then to [min p0, max p0], renormalised."""
    p = distribution("ratio", ratio)
    q = distribution("weights", weights, len(p))
    p0 = distribution("initial_ratio", initial_ratio, len(p))
    p = (1 - ema) * p + ema * q
    p = p / p.sum()
    p = np.clip(p, p0 / 2, 2 * p0)
    p = p / p.sum()
    p = np.clip(p, p0.min(), p0.max())
    return (p / p.sum()).tolist()
