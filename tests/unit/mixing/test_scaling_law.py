"""The scaling-law fit against synthetic curves with known parameters (the oracle is the generating law)."""

import json

import numpy as np
import pytest

from drpruning.mixing import ScalingLaw as ReExported
from drpruning.mixing.scaling_law import ScalingLaw

A, ALPHA, E, BETA = 400.0, 0.35, 1.8, -0.5


def law(d, s=None):
    d = np.asarray(d, dtype=float)
    return A * d ** -ALPHA * (1.0 if s is None else np.asarray(s) ** -BETA) + E


def test_reexported_from_mixing():
    assert ReExported is ScalingLaw


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recovers_parameters_without_sparsity(seed):
    rng = np.random.default_rng(seed)
    d = np.geomspace(1e6, 1e9, 64)
    y = law(d) * (1 + 0.002 * rng.standard_normal(64))
    fit = ScalingLaw.fit(d, y)
    p = fit.params
    assert set(p) >= {"A", "alpha", "beta", "E"}
    assert p["alpha"] == pytest.approx(ALPHA, rel=0.05)
    assert p["E"] == pytest.approx(E, rel=0.02)
    assert p["A"] == pytest.approx(A, rel=0.25)
    assert p["beta"] == 0.0
    assert fit.predict(2e9) == pytest.approx(law(2e9), rel=0.02)
    assert isinstance(fit.predict(2e9), float)
    assert fit.predict([1e7, 1e8]).shape == (2,)


@pytest.mark.parametrize("seed", [0, 1])
def test_recovers_parameters_with_sparsity(seed):
    rng = np.random.default_rng(seed)
    d = np.exp(rng.uniform(np.log(1e6), np.log(1e9), 64))
    s = rng.uniform(0.1, 0.8, 64)
    y = law(d, s) * (1 + 0.002 * rng.standard_normal(64))
    fit = ScalingLaw.fit(d, y, s)
    p = fit.params
    assert p["alpha"] == pytest.approx(ALPHA, rel=0.05)
    assert p["beta"] == pytest.approx(BETA, rel=0.05)
    assert p["E"] == pytest.approx(E, rel=0.02)
    assert fit.predict(2e9, 0.8) == pytest.approx(law(2e9, 0.8), rel=0.02)
    with pytest.raises(ValueError, match="sparsity"):
        fit.predict(2e9)


@pytest.mark.parametrize("pruning", [False, True])
def test_predicts_the_end_of_a_run_from_its_first_half(pruning):
    """A pruning-like run: 3,200 steps, points from 2% to 50%, sparsity ramping to 0.6 over the first 20%."""
    rng = np.random.default_rng(3)
    steps = np.arange(64, 1601, 25)
    d = steps * 32 * 4096 * 0.15
    s = 0.6 * np.minimum(1.0, steps / 640) if pruning else None
    y = law(d, s) * (1 + 0.002 * rng.standard_normal(len(steps)))
    fit = ScalingLaw.fit(d[-64:], y[-64:], None if s is None else s[-64:])
    d_final = 3200 * 32 * 4096 * 0.15
    truth = law(d_final, 0.6 if pruning else None)
    assert fit.predict(d_final, 0.6 if pruning else None) == pytest.approx(truth, rel=0.02)


def test_keeps_best_three_and_averages_their_predictions():
    d = np.geomspace(1e6, 1e9, 40)
    fit = ScalingLaw.fit(d, law(d))
    assert 1 <= len(fit.fits) <= 3
    costs = [f["cost"] for f in fit.fits]
    assert costs == sorted(costs)
    by_hand = np.mean([np.exp(f["log_A"]) * 1e8 ** -f["alpha"] + np.exp(f["log_E"]) for f in fit.fits])
    assert fit.predict(1e8) == pytest.approx(by_hand, rel=1e-12)


def test_state_round_trip_is_exact():
    d = np.geomspace(1e6, 1e9, 30)
    fit = ScalingLaw.fit(d, law(d))
    again = ScalingLaw.from_dict(json.loads(json.dumps(fit.to_dict())))
    assert again.predict(3e9) == fit.predict(3e9)


def test_bad_input():
    with pytest.raises(ValueError, match="too few"):
        ScalingLaw.fit([1e6, 2e6, 3e6], [3.0, 2.9, 2.8])
    with pytest.raises(ValueError, match="positive"):
        ScalingLaw.fit([1e6, 2e6, 3e6, 4e6, 5e6], [3.0, float("nan"), 2.8, 2.7, 2.6])
    with pytest.raises(ValueError, match="same length"):
        ScalingLaw.fit([1e6, 2e6], [3.0])
