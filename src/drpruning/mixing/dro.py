"""`dro`: chi-square distributionally robust proportions around a reference ratio (docs/method.md §5.3),
with the references as configured (default: the source losses, fixed). `drpruning`: the paper's method,
the same rule with scaling-law references (§5.4) and a reference ratio that moves toward the weights (§5.5)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from drpruning.mixing.base import Mixer
from drpruning.mixing.rules import dro_weights, excess, update_reference_ratio

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DROOptions:
    rho: float = 0.1  # radius of the chi-square ball
    min_prob: float = 0.2  # floor of each domain's ratio r_i
    clamp_to_min: bool = True  # the authors' final clamp to the smallest reference share
    dynamic_ratio: bool = False  # move the reference ratio toward the weights (always on for drpruning)
    ratio_from: float = 0.2  # fraction of training after which the ratio moves

    def __post_init__(self) -> None:
        if not (isinstance(self.rho, (int, float)) and self.rho > 0):
            raise ValueError(f"config key 'mixing.rho' must be > 0, got {self.rho!r}")
        if not (isinstance(self.min_prob, (int, float)) and 0 <= self.min_prob < 1):
            raise ValueError(f"config key 'mixing.min_prob' must be in [0, 1), got {self.min_prob!r}")


class DROMixer(Mixer):
    method = "dro"
    Options = DROOptions

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.dynamic_ratio = bool(self.opts.dynamic_ratio)
        self._warned_scale = False

    def excess(self, losses: list[float], references: list[float]) -> list[float]:
        return excess(losses, references)[0]

    def propose(self, step: int, losses: list[float]) -> list[float]:
        self.reference_scale = excess(losses, self.references)[1]
        if self.reference_scale < 1:
            # once as a warning, then quietly: in continued pretraining this can hold for the whole run
            level = logging.INFO if self._warned_scale else logging.WARNING
            log.log(level, "reference losses are too high (above every domain's loss) at step %d: "
                    "scaled by %.1f", step, self.reference_scale)
            self._warned_scale = True
        o = self.opts
        q = dro_weights(losses, self.references, self.ratio, o.rho, o.min_prob, o.clamp_to_min)
        if self.dynamic_ratio and step >= o.ratio_from * self.total_steps:
            self.ratio = update_reference_ratio(self.ratio, q, self.initial)
        return q


class DRPruningMixer(DROMixer):
    """The paper's method is both parts together, whatever the (ablation) settings say; a list of reference
    numbers serves as the starting values that the first fit replaces."""

    method = "drpruning"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.refs.mode = "scaling_law"
        self.dynamic_ratio = True
