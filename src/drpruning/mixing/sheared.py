"""`sheared`: Sheared-LLaMA's exponentiated-gradient update on the current proportions, against the source
model's losses (docs/method.md §5.2); no divergence bound."""

from __future__ import annotations

from dataclasses import dataclass

from drpruning.mixing.base import Mixer
from drpruning.mixing.rules import sheared_weights


@dataclass(frozen=True)
class ShearedOptions:
    sheared_eta: float = 1.0  # step size on the clipped excess loss
    sheared_smoothing: float = 1e-4  # share mixed back in uniformly

    def __post_init__(self) -> None:
        if not self.sheared_eta > 0:
            raise ValueError(f"config key 'mixing.sheared_eta' must be > 0, got {self.sheared_eta}")
        if not 0 <= self.sheared_smoothing < 1:
            raise ValueError(f"config key 'mixing.sheared_smoothing' must be in [0, 1), got {self.sheared_smoothing}")


class ShearedMixer(Mixer):
    method = "sheared"
    Options = ShearedOptions

    def propose(self, step: int, losses: list[float]) -> list[float]:
        return sheared_weights(self._proportions, losses, self.references, self.opts.sheared_eta,
                               self.opts.sheared_smoothing)
