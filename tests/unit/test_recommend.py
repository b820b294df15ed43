"""`drpruning plan`'s method recommendation, on evidence written out by hand."""

import pytest

from drpruning.plan.recommend import at_par, recommend


def point(tpp, one, l0, arm="t_l0_35"):
    return {"total_steps": 100, "tokens_per_step": 2048, "tokens_per_param": tpp, "l0_arm": arm,
            "oneshot_worst": one, "l0_worst": l0, "gap_worst": [b - a for a, b in zip(one, l0)]}


LOSING = point(0.004, [3.30, 3.34], [3.60, 3.70])  # +0.33 nats, seed ranges 0.04 / 0.10
PAR = point(0.015, [3.10, 3.20], [3.15, 3.22])  # +0.035 nats, within the 0.10 range


def test_at_par_means_within_the_larger_seed_range():
    assert not at_par(LOSING) and at_par(PAR)
    assert at_par(point(0.01, [3.0, 3.0], [2.9, 2.95]))  # better outright


@pytest.mark.parametrize("tpp,method,says", [
    (0.002, "importance", "+0.330 nats [+0.300, +0.360] over 2 seeds"),
    (0.010, "importance", "+0.330 nats"),  # nearest measured budget below it
    (0.020, "l0", "reach one-shot + KD"),
])
def test_recommendation_follows_the_crossover(tpp, method, says):
    m, why = recommend(int(tpp * 1e8), 100_000_000, {"points": [PAR, LOSING]})
    assert m == method and says in why, why
    assert f"{tpp:.4f} tokens/parameter" in why


def test_beyond_the_measured_budgets_it_says_so():
    m, why = recommend(int(0.04 * 1e8), 100_000_000, {"points": [LOSING]})
    assert m == "importance" and "10x the largest measured one" in why, why
    m, why = recommend(10**6, 10**8, {"points": []})
    assert m == "importance" and "no equal-token measurement" in why
