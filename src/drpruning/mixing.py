"""Domain mixing: how the sampling proportions move after each evaluation.

Methods (see docs/mixing.md): `constant`; `sheared` (Sheared-LLaMA's exponentiated-gradient update);
`dro` (chi-square distributionally robust weights around a reference ratio, fixed reference losses);
`drpruning` (DRO with scaling-law references and a moving reference ratio, the paper's method). The formulas
follow shared/design/method.md section 5. The training loop calls `start` once before training,
`observe_train` every step and `update` after every evaluation (on rank 0; it broadcasts `proportions`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.optimize import brentq

from drpruning.scaling_law import ScalingLaw

__all__ = ["ScalingLaw", "Mixer", "ConstantMixer", "ShearedMixer", "DROMixer", "build_mixer", "dro_weights",
           "sheared_weights", "update_reference_ratio", "temperature_proportions", "chi_square", "excess"]

log = logging.getLogger(__name__)

METHODS = ("constant", "sheared", "dro", "drpruning")
RATIO_EMA = 0.1  # weight of q in the moving reference ratio (method.md 5.5); not the training-loss `ema`
MIN_FIT_POINTS = 11  # the law is fitted with more than 10 points (method.md 5.4)


# ====================================================================== pure functions
def _vector(name: str, values: Sequence[float], k: int | None = None) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"{name} must be a flat list of numbers, got shape {x.shape}")
    if k is not None and len(x) != k:
        raise ValueError(f"{name} has {len(x)} values but there are {k} domains: give one per domain")
    return x


def _distribution(name: str, values: Sequence[float], k: int | None = None) -> np.ndarray:
    p = _vector(name, values, k)
    if not (np.all(np.isfinite(p)) and np.all(p >= 0) and p.sum() > 0):
        raise ValueError(f"{name} must be non-negative numbers with a positive sum, got {list(values)}")
    return p / p.sum()


def _check_losses(name: str, values: Sequence[float], k: int | None = None) -> np.ndarray:
    x = _vector(name, values, k)
    if not (np.all(np.isfinite(x)) and np.all(x >= 0)):
        raise ValueError(f"{name} must be finite and non-negative, got {list(values)}")
    return x


def _check_dro_options(rho: float, min_prob: float) -> None:
    if not (isinstance(rho, (int, float)) and rho > 0):
        raise ValueError(f"rho must be > 0, got {rho!r}")
    if not (isinstance(min_prob, (int, float)) and 0 <= min_prob < 1):
        raise ValueError(f"min_prob must be in [0, 1), got {min_prob!r}")


def temperature_proportions(counts: Sequence[float], tau: float) -> list[float]:
    """p_i proportional to n_i^tau over per-domain token counts (tau = 0.3 in the paper's 8 languages)."""
    n = _vector("counts", counts)
    if len(n) == 0 or not (np.all(np.isfinite(n)) and np.all(n > 0)):
        raise ValueError(f"token counts must be positive, got {list(counts)}")
    if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau >= 0):
        raise ValueError(f"temperature must be a non-negative number, got {tau!r}")
    # in log space: counts of 1e12 to the power 1 would still be fine, but this never overflows
    w = np.exp(tau * (np.log(n) - np.log(n).max()))
    return (w / w.sum()).tolist()


def chi_square(q: Sequence[float], p: Sequence[float]) -> float:
    """0.5 * sum_i p_i (q_i / p_i - 1)^2, over the domains with p_i > 0."""
    q, p = np.asarray(q, dtype=np.float64), np.asarray(p, dtype=np.float64)
    m = p > 0
    return float(0.5 * np.sum(p[m] * (q[m] / p[m] - 1.0) ** 2))


def excess(losses: Sequence[float], reference_losses: Sequence[float]) -> tuple[list[float], float]:
    """(loss - c * ref, c): c = 1, or the first of 0.9, 0.8, ..., 0 that makes some excess positive.

    References above every loss (a model that beats them everywhere) would give DRO nothing to weigh;
    shrinking them keeps the ordering of the domains by how far they are from their references."""
    x = _check_losses("losses", losses)
    ref = _check_losses("reference_losses", reference_losses, len(x))
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
    ratio p that leans toward the domains with the largest excess loss (method.md 5.3)."""
    _check_dro_options(rho, min_prob)
    x = _check_losses("losses", losses)
    ref = _check_losses("reference_losses", reference_losses)
    p = _vector("reference_ratio", reference_ratio)
    if len(ref) != len(x) or len(p) != len(x):
        raise ValueError(f"got {len(x)} losses, {len(ref)} reference losses and {len(p)} reference "
                         "proportions: give one of each per domain")
    p = _distribution("reference_ratio", p)
    e = np.asarray(excess(x, ref)[0])
    active = p > 0
    if e[active].max() <= 0:
        q = p.copy()  # no loss anywhere: nothing to lean toward
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
    w = _distribution("weights", weights)
    x = _check_losses("losses", losses, len(w))
    ref = _check_losses("reference_losses", reference_losses, len(w))
    with np.errstate(divide="ignore"):
        z = np.log(w) + eta * np.maximum(x - ref, 0.0)
    z = np.exp(z - z.max())
    w = z / z.sum()
    return ((1 - smoothing) * w + smoothing / len(w)).tolist()


def update_reference_ratio(ratio: Sequence[float], weights: Sequence[float], initial_ratio: Sequence[float],
                           ema: float = RATIO_EMA) -> list[float]:
    """p = norm((1 - ema) p + ema q), clipped to [p0 / 2, 2 p0] and then to [min p0, max p0], renormalised."""
    p = _distribution("ratio", ratio)
    q = _distribution("weights", weights, len(p))
    p0 = _distribution("initial_ratio", initial_ratio, len(p))
    p = (1 - ema) * p + ema * q
    p = p / p.sum()
    p = np.clip(p, p0 / 2, 2 * p0)
    p = p / p.sum()
    p = np.clip(p, p0.min(), p0.max())
    return (p / p.sum()).tolist()


# ====================================================================== mixers
def _plain(value: Any) -> Any:
    """NaN -> None, numpy -> python: records and state must be JSON-able."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_plain(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


class Mixer:
    """Base class and the `constant` method: the proportions never move; losses and references are logged."""

    method = "constant"

    def __init__(self, cfg: Any, domains: Sequence[str], initial: Sequence[float], total_steps: int,
                 pruning: bool = False, final_sparsity: float | None = None):
        self.domains = [str(d) for d in domains]
        k = len(self.domains)
        if k == 0:
            raise ValueError("the mixer needs at least one domain")
        if len(initial) != k:
            raise ValueError(f"got {len(initial)} initial proportions for {k} domains "
                             f"({', '.join(self.domains)}): give one per domain")
        if not (isinstance(total_steps, int) and total_steps > 0):
            raise ValueError(f"total_steps must be a positive integer, got {total_steps!r}")
        _check_dro_options(cfg.rho, cfg.min_prob)
        if not 0 < cfg.ema <= 1:
            raise ValueError(f"ema must be in (0, 1], got {cfg.ema}")
        if cfg.signal not in ("eval", "train"):
            raise ValueError(f"signal must be eval or train, got {cfg.signal!r}")
        self.cfg = cfg
        self.total_steps = total_steps
        self.pruning = bool(pruning)
        self.final_sparsity = final_sparsity  # the loop sets it once the pruner knows its target
        self.initial = _distribution("initial proportions", initial, k).tolist()
        self._proportions = list(self.initial)
        self.ratio = list(self.initial)  # reference ratio p (moves only with dynamic_ratio)
        self.reference_mode, self.references = self._reference_setting(cfg.reference)
        self.reference_scale = 1.0
        self.train_ema: list[float | None] = [None] * k
        # scaling-law state, per domain
        self.points: list[list[list]] = [[] for _ in range(k)]  # [tokens, sparsity or None, loss]
        self.lowest: list[float | None] = [None] * k
        self.laws: list[dict | None] = [None] * k  # ScalingLaw.to_dict() of the latest fit
        self.fitted = [False] * k  # the first fit replaces the starting reference
        self.max_sparsity: float | None = None
        self.last_step = 0

    # ------------------------------------------------------------------ configuration
    def _reference_setting(self, reference: Any) -> tuple[str, list[float] | None]:
        k = len(self.domains)
        if isinstance(reference, str):
            if reference not in ("source", "scaling_law"):
                raise ValueError(f"reference must be source, scaling_law or a list of numbers, "
                                 f"got {reference!r}")
            return reference, None
        values = list(reference)
        if len(values) != k:
            raise ValueError(f"got {len(values)} reference losses for {k} domains: give one per domain")
        return "fixed", _check_losses("reference losses", values).tolist()

    @property
    def proportions(self) -> list[float]:
        return list(self._proportions)

    @proportions.setter
    def proportions(self, value: Sequence[float]) -> None:
        # other ranks receive rank 0's proportions this way; a resumed run sets the saved ones
        self._proportions = _distribution("proportions", value, len(self.domains)).tolist()

    # ------------------------------------------------------------------ inputs from the loop
    def start(self, source_losses: Sequence[float]) -> None:
        """Per-domain eval losses of the model before training: the references for `source` (and the starting
        references for `scaling_law`)."""
        x = _vector("source losses", source_losses, len(self.domains))
        if not (np.all(np.isfinite(x)) and np.all(x >= 0)):
            if self.reference_mode in ("source", "scaling_law") and self.method != "constant":
                raise ValueError(f"source losses must be finite and non-negative, got {list(source_losses)}: "
                                 "check the evaluation set of every domain")
            log.warning("source losses %s are not all finite; they are not used", list(source_losses))
            return
        if self.reference_mode in ("source", "scaling_law") and self.references is None:
            self.references = x.tolist()

    def observe_train(self, domain_losses: Sequence[float]) -> None:
        """Every step: per-domain training loss of the batch (nan for a domain absent from it)."""
        x = _vector("domain losses", domain_losses, len(self.domains))
        a = self.cfg.ema
        for i, value in enumerate(x.tolist()):
            if math.isnan(value):
                continue
            if not (math.isfinite(value) and value >= 0):
                log.warning("training loss %r of domain %s ignored", value, self.domains[i])
                continue
            old = self.train_ema[i]
            self.train_ema[i] = value if old is None else (1 - a) * old + a * value

    def signal(self, eval_losses: Sequence[float]) -> list[float]:
        if self.cfg.signal == "eval":
            return list(eval_losses)
        # a domain not sampled yet has no training EMA: its eval loss stands in
        return [float(e) if m is None else m for m, e in zip(self.train_ema, eval_losses, strict=True)]

    # ------------------------------------------------------------------ the update
    def update(self, step: int, eval_losses: Sequence[float], domain_tokens: Sequence[int],
               sparsity: float | None = None) -> dict:
        """After an evaluation at `step` (optimiser steps done): new proportions; returns the `mix` record."""
        began = time.perf_counter()
        k = len(self.domains)
        _vector("eval losses", eval_losses, k)
        tokens = _vector("domain tokens", domain_tokens, k)
        losses = self.signal([float(v) for v in eval_losses])
        fits: list[dict | None] = [None] * k
        predictions: list[float | None] = [None] * k
        skipped = None
        if not all(math.isfinite(v) and v >= 0 for v in losses):
            skipped = f"losses {losses} are not all finite and non-negative: proportions unchanged"
            log.warning("mixing update at step %d skipped: %s", step, skipped)
        elif self.method != "constant" and self.references is None:
            raise RuntimeError("the mixer has no reference losses: call start(source_losses) before update")
        else:
            if self.reference_mode == "scaling_law" and self.references is not None:
                fits, predictions = self._update_references(step, losses, tokens, sparsity)
            self._proportions = self.propose(step, losses)
        self.last_step = step
        refs = self.references
        e = [None] * k
        if refs is not None and skipped is None:
            e = excess(losses, refs)[0] if self.method in ("dro", "drpruning") else \
                [x - r for x, r in zip(losses, refs, strict=True)]
        def named(values: Sequence) -> dict:
            return dict(zip(self.domains, values, strict=True))

        record = {  # the `mix` record of docs/design.md, without `step` (the loop adds it)
            "method": self.method,
            "losses": named(losses),
            "references": named(refs if refs is not None else [None] * k),
            "reference_scale": self.reference_scale,
            "excess": named(e),
            "weights": named(self._proportions),
            "ratio": named(self.ratio),
            "fits": named(fits),
            "predictions": named(predictions),
            "skipped": skipped,
            "time_s": time.perf_counter() - began,
        }
        return _plain(record)

    def propose(self, step: int, losses: list[float]) -> list[float]:
        """The next proportions from valid losses (the method's rule)."""
        return list(self._proportions)

    # ------------------------------------------------------------------ dynamic references (scaling law)
    def _update_references(self, step: int, losses: list[float], tokens: np.ndarray,
                           sparsity: float | None) -> tuple[list[dict | None], list[float | None]]:
        k = len(self.domains)
        fits: list[dict | None] = [None] * k
        predictions: list[float | None] = [None] * k
        s = None
        if self.pruning and sparsity is not None and math.isfinite(sparsity):
            s = float(sparsity)
            self.max_sparsity = s if self.max_sparsity is None else max(self.max_sparsity, s)
        if step >= self.cfg.record_from * self.total_steps:
            for i in range(k):
                if tokens[i] > 0 and losses[i] > 0:
                    self._record(i, [float(tokens[i]), s, float(losses[i])])
        if step <= 0 or step < self.cfg.fit_from * self.total_steps:
            return fits, predictions
        final_s = self._final_sparsity()
        for i in range(k):
            pts = self.points[i]
            if len(pts) < MIN_FIT_POINTS or tokens[i] <= 0:
                continue  # too few points: the previous reference stays
            with_s = final_s is not None and all(pt[1] is not None for pt in pts)
            try:
                law = ScalingLaw.fit([pt[0] for pt in pts], [pt[2] for pt in pts],
                                     [pt[1] for pt in pts] if with_s else None)
                d_final = float(tokens[i]) * self.total_steps / step  # at the domain's current token rate
                value = float(law.predict(d_final, final_s if with_s else None))
            except (ValueError, FloatingPointError, np.linalg.LinAlgError) as err:
                log.warning("scaling-law fit of domain %s failed (%s); its reference stays",
                            self.domains[i], err)
                continue
            if not math.isfinite(value):
                continue
            value = min(max(value, 0.0), self.lowest[i])
            self.references[i] = value if not self.fitted[i] else min(self.references[i], value)
            self.fitted[i] = True
            self.laws[i] = law.to_dict()
            fits[i] = law.params
            predictions[i] = value
        return fits, predictions

    def _record(self, i: int, point: list) -> None:
        pts = self.points[i]
        pts.append(point)
        self.lowest[i] = point[2] if self.lowest[i] is None else min(self.lowest[i], point[2])
        if len(pts) > self.cfg.max_points:
            # thin the oldest half (every other point) so the history keeps its span, denser near now
            half = len(pts) // 2
            self.points[i] = pts[:half:2] + pts[half:]

    def _final_sparsity(self) -> float | None:
        if not self.pruning:
            return None
        if self.final_sparsity is not None:
            return float(self.final_sparsity)
        if self.max_sparsity is not None:
            log.warning("the mixer was not told the target sparsity; predicting at the largest seen (%.3f)",
                        self.max_sparsity)
        return self.max_sparsity

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return _plain({
            "method": self.method, "domains": self.domains, "proportions": self._proportions,
            "ratio": self.ratio, "initial": self.initial, "reference_mode": self.reference_mode,
            "references": self.references, "reference_scale": self.reference_scale,
            "train_ema": self.train_ema, "points": self.points, "lowest": self.lowest, "laws": self.laws,
            "fitted": self.fitted, "max_sparsity": self.max_sparsity, "final_sparsity": self.final_sparsity,
            "last_step": self.last_step,
        })

    def load_state_dict(self, state: dict) -> None:
        if state.get("domains") != self.domains or state.get("method") != self.method:
            raise ValueError(f"mixer state is for method {state.get('method')!r} over domains "
                             f"{state.get('domains')}, not {self.method!r} over {self.domains}")
        k = len(self.domains)
        self._proportions = [float(x) for x in state["proportions"]]
        self.ratio = [float(x) for x in state["ratio"]]
        self.initial = [float(x) for x in state["initial"]]
        self.reference_mode = state["reference_mode"]
        refs = state["references"]
        self.references = None if refs is None else [float(x) for x in refs]
        self.reference_scale = float(state["reference_scale"])
        self.train_ema = [None if x is None else float(x) for x in state["train_ema"]]
        self.points = [[[float(t), None if s is None else float(s), float(v)] for t, s, v in pts]
                       for pts in state["points"]]
        self.lowest = [None if x is None else float(x) for x in state["lowest"]]
        self.laws = [None if x is None else dict(x) for x in state["laws"]]
        self.fitted = [bool(x) for x in state["fitted"]]
        self.max_sparsity = state["max_sparsity"]
        if state.get("final_sparsity") is not None and self.final_sparsity is None:
            self.final_sparsity = float(state["final_sparsity"])
        self.last_step = int(state["last_step"])
        if not all(len(x) == k for x in (self._proportions, self.ratio, self.train_ema, self.points)):
            raise ValueError(f"mixer state has lists of the wrong length for {k} domains")


class ConstantMixer(Mixer):
    method = "constant"


class ShearedMixer(Mixer):
    """Sheared-LLaMA's update on the current proportions; no divergence bound."""

    method = "sheared"

    def propose(self, step: int, losses: list[float]) -> list[float]:
        return sheared_weights(self._proportions, losses, self.references, self.cfg.sheared_eta,
                               self.cfg.sheared_smoothing)


class DROMixer(Mixer):
    """`dro`: chi-square DRO around the reference ratio, references as configured (default: the source
    losses, fixed). `drpruning`: the same with scaling-law references and the moving reference ratio."""

    method = "dro"

    def __init__(self, cfg: Any, domains: Sequence[str], initial: Sequence[float], total_steps: int,
                 pruning: bool = False, final_sparsity: float | None = None, method: str = "dro"):
        self.method = method
        super().__init__(cfg, domains, initial, total_steps, pruning, final_sparsity)
        self.dynamic_ratio = bool(cfg.dynamic_ratio)
        if method == "drpruning":
            # the paper's method is both parts together, whatever the (ablation) settings say; a list of
            # reference numbers serves as the starting values that the first fit replaces
            self.reference_mode = "scaling_law"
            self.dynamic_ratio = True
        self._warned_scale = False

    def propose(self, step: int, losses: list[float]) -> list[float]:
        self.reference_scale = excess(losses, self.references)[1]
        if self.reference_scale < 1:
            # once as a warning, then quietly: in continued pretraining this can hold for the whole run
            level = logging.INFO if self._warned_scale else logging.WARNING
            log.log(level, "reference losses are too high (above every domain's loss) at step %d: "
                    "scaled by %.1f", step, self.reference_scale)
            self._warned_scale = True
        q = dro_weights(losses, self.references, self.ratio, self.cfg.rho, self.cfg.min_prob,
                        self.cfg.clamp_to_min)
        if self.dynamic_ratio and step >= self.cfg.ratio_from * self.total_steps:
            self.ratio = update_reference_ratio(self.ratio, q, self.initial)
        return q


def build_mixer(cfg: Any, domains: Sequence[str], initial: Sequence[float], total_steps: int,
                pruning: bool = False, final_sparsity: float | None = None) -> Mixer:
    """The mixer for `cfg.method` (a MixingConfig). `final_sparsity` (the pruning target's parameter sparsity)
    is where the scaling law predicts; it may also be set later as `mixer.final_sparsity`."""
    if cfg.method == "constant":
        return ConstantMixer(cfg, domains, initial, total_steps, pruning, final_sparsity)
    if cfg.method == "sheared":
        return ShearedMixer(cfg, domains, initial, total_steps, pruning, final_sparsity)
    if cfg.method in ("dro", "drpruning"):
        return DROMixer(cfg, domains, initial, total_steps, pruning, final_sparsity, method=cfg.method)
    raise ValueError(f"unknown mixing method {cfg.method!r}: use {', '.join(METHODS)}")
