"""Initial domain proportions: given in the config, by temperature over token counts, or uniform."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from drpruning.config import ConfigError, DataConfig


def temperature_proportions(counts: Sequence[float], tau: float) -> list[float]:
    """p_i proportional to n_i^tau over per-domain token counts (tau = 0.3 in the paper's 8 languages)."""
    n = np.asarray(counts, dtype=np.float64)
    if n.ndim != 1 or len(n) == 0 or not (np.all(np.isfinite(n)) and np.all(n > 0)):
        raise ValueError(f"token counts must be positive, got {list(counts)}")
    if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau >= 0):
        raise ValueError(f"temperature must be a non-negative number, got {tau!r}")
    # in log space: counts of 1e12 to the power 1 would still be fine, but this never overflows
    w = np.exp(tau * (np.log(n) - np.log(n).max()))
    return (w / w.sum()).tolist()


def initial_proportions(cfg: DataConfig, names: Sequence[str], train_tokens: Sequence[int]) -> list[float]:
    """`data.proportions`, else temperature proportions over training tokens, else uniform; one per domain."""
    if cfg.proportions is not None:
        out = [float(x) for x in cfg.proportions]
    elif cfg.temperature is not None:
        out = temperature_proportions(train_tokens, cfg.temperature)
    else:
        out = [1.0 / len(train_tokens)] * len(train_tokens)
    if len(out) != len(names):
        raise ConfigError(f"data.proportions has {len(out)} values but the data has "
                          f"{len(names)} domains ({', '.join(names)})")
    return out
