"""Reference losses, the "should be" loss of each domain that excess losses are measured against
(docs/method.md §5.4): the source model's losses (`source`), numbers from the config (`fixed`), or a scaling
law fitted online to each domain's own loss curve (`scaling_law`), predicted at the end of training."""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np

from drpruning.mixing.rules import check_losses
from drpruning.mixing.scaling_law import ScalingLaw

log = logging.getLogger(__name__)
MIN_FIT_POINTS = 11  # the law is fitted with more than 10 points (docs/method.md §5.4)
MODES = ("source", "fixed", "scaling_law")


def reference_setting(reference: Any, k: int) -> tuple[str, list[float] | None]:
    """The mode and the starting values for `mixing.reference`: source, scaling_law or k numbers."""
    if isinstance(reference, str):
        if reference not in ("source", "scaling_law"):
            raise ValueError(f"reference must be source, scaling_law or a list of numbers, got {reference!r}")
        return reference, None
    values = list(reference)
    if len(values) != k:
        raise ValueError(f"got {len(values)} reference losses for {k} domains: give one per domain")
    return "fixed", check_losses("reference losses", values).tolist()


class ReferenceLosses:
    """The reference losses of k domains, and for `scaling_law` the per-domain points and fits."""

    def __init__(self, mode: str, values: list[float] | None, domains: list[str], total_steps: int, cfg: Any,
                 pruning: bool = False, final_sparsity: float | None = None):
        if mode not in MODES:
            raise ValueError(f"reference mode must be one of {', '.join(MODES)}, got {mode!r}")
        k = len(domains)
        self.mode, self.values, self.domains, self.k = mode, values, domains, k
        self.total_steps, self.cfg = total_steps, cfg
        self.pruning = bool(pruning)
        self.final_sparsity = final_sparsity  # where the law predicts: the pruning target's sparsity
        self.points: list[list[list]] = [[] for _ in range(k)]  # [tokens, sparsity or None, loss]
        self.lowest: list[float | None] = [None] * k
        self.laws: list[dict | None] = [None] * k  # ScalingLaw.to_dict() of the latest fit
        self.fitted = [False] * k  # the first fit replaces the starting reference
        self.max_sparsity: float | None = None

    def start(self, source_losses: list[float]) -> None:
        """The source model's losses: the references of `source`, the starting ones of `scaling_law`."""
        if self.mode in ("source", "scaling_law") and self.values is None:
            self.values = list(source_losses)

    def update(self, step: int, losses: list[float], tokens: np.ndarray,
               sparsity: float | None) -> tuple[list[dict | None], list[float | None]]:
        """After an evaluation: record a point per domain and refit (scaling_law only); (fits, predictions)."""
        k = self.k
        fits: list[dict | None] = [None] * k
        predictions: list[float | None] = [None] * k
        if self.mode != "scaling_law" or self.values is None:
            return fits, predictions
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
            self.values[i] = value if not self.fitted[i] else min(self.values[i], value)
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

    # ---- state (the keys of the mixer's state dict they always had)
    def state_dict(self) -> dict:
        return {"reference_mode": self.mode, "references": self.values, "points": self.points,
                "lowest": self.lowest, "laws": self.laws, "fitted": self.fitted,
                "max_sparsity": self.max_sparsity, "final_sparsity": self.final_sparsity}

    def load_state_dict(self, state: dict) -> None:
        self.mode = state["reference_mode"]
        refs = state["references"]
        self.values = None if refs is None else [float(x) for x in refs]
        self.points = [[[float(t), None if s is None else float(s), float(v)] for t, s, v in pts]
                       for pts in state["points"]]
        self.lowest = [None if x is None else float(x) for x in state["lowest"]]
        self.laws = [None if x is None else dict(x) for x in state["laws"]]
        self.fitted = [bool(x) for x in state["fitted"]]
        self.max_sparsity = state["max_sparsity"]
        if state.get("final_sparsity") is not None and self.final_sparsity is None:
            self.final_sparsity = float(state["final_sparsity"])
