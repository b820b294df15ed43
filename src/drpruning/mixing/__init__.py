"""Domain mixing: how the sampling proportions move after each evaluation (docs/method.md §5).

`rules` holds the update rules as pure functions, `references` the reference losses (source, fixed,
scaling law), `base.Mixer` the state every method shares, and one file per method holds its class. A new
rule is a `Mixer` subclass with a `propose` method in a new file, plus its line in `METHODS`
(docs/design.md, "Adding a mixing rule").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import fields
from typing import Any

from drpruning.mixing.base import Mixer
from drpruning.mixing.constant import ConstantMixer
from drpruning.mixing.dro import DROMixer, DRPruningMixer
from drpruning.mixing.rules import chi_square, dro_weights, excess, sheared_weights, update_reference_ratio
from drpruning.mixing.scaling_law import ScalingLaw
from drpruning.mixing.sheared import ShearedMixer

# the one list of method names: config validation, build_mixer and the docs read it
METHODS: dict[str, type[Mixer]] = {
    "constant": ConstantMixer,
    "sheared": ShearedMixer,
    "dro": DROMixer,
    "drpruning": DRPruningMixer,
}

__all__ = ["METHODS", "Mixer", "ConstantMixer", "ShearedMixer", "DROMixer", "DRPruningMixer", "ScalingLaw",
           "build_mixer", "check_options", "dro_weights", "sheared_weights", "update_reference_ratio",
           "chi_square", "excess"]


def check_options(cfg: Any) -> None:
    """Validate `cfg.method` and every method's options present in `cfg` (ValueError naming the key): a wrong
    value is refused even while another method is chosen."""
    if cfg.method not in METHODS:
        raise ValueError(f"unknown mixing method {cfg.method!r} (config key 'mixing.method'): "
                         f"use {', '.join(METHODS)}")
    METHODS[cfg.method].options(cfg)
    for method in METHODS.values():
        if all(hasattr(cfg, f.name) for f in fields(method.Options)):  # keys of their own in MixingConfig
            method.options(cfg)


def build_mixer(cfg: Any, domains: Sequence[str], initial: Sequence[float], total_steps: int,
                pruning: bool = False, final_sparsity: float | None = None) -> Mixer:
    """The mixer for `cfg.method` (a MixingConfig). `final_sparsity` (the pruning target's parameter sparsity)
    is where the scaling law predicts; it may also be set later as `mixer.final_sparsity`."""
    check_options(cfg)
    return METHODS[cfg.method](cfg, domains, initial, total_steps, pruning, final_sparsity)
