"""`constant`: the proportions never move (the paper's fixed-mixture baseline); losses are still logged."""

from __future__ import annotations

from drpruning.mixing.base import Mixer


class ConstantMixer(Mixer):
    method = "constant"
    uses_references = False
