"""Domain mixing against hand computations and independent solvers, never the implementation's formulas."""

import functools
import json
import logging
import math
from dataclasses import replace

import numpy as np
import pytest
from scipy.optimize import minimize

from drpruning.config import MixingConfig
from drpruning.data import temperature_proportions
from drpruning.mixing import (
    ScalingLaw,
    build_mixer,
    dro_weights,
    excess,
    sheared_weights,
    update_reference_ratio,
)


def divergence(q, p):
    """0.5 * sum p (q/p - 1)^2, written out independently of the module."""
    return 0.5 * sum(pi * (qi / pi - 1) ** 2 for qi, pi in zip(q, p, strict=True))


# ---------------------------------------------------------------------- dro_weights
@pytest.mark.parametrize("p1", [0.5, 0.3, 0.7])
def test_two_domains_closed_form(p1):
    # two domains: q = (p1 + d, p2 - d) has divergence d^2 / (2 p1 p2), so d = sqrt(2 rho p1 p2)
    p2, rho = 1 - p1, 0.1
    d = math.sqrt(2 * rho * p1 * p2)
    q = dro_weights([3.0, 2.0], [2.0, 2.0], [p1, p2], rho=rho, clamp_to_min=False)
    assert q == pytest.approx([p1 + d, p2 - d], abs=1e-12)
    # the larger excess is the second domain's: the mass moves the other way
    q = dro_weights([2.0, 2.6], [1.9, 2.0], [p1, p2], rho=rho, clamp_to_min=False)
    assert q == pytest.approx([p1 - d, p2 + d], abs=1e-12)


def test_two_domains_with_the_final_clamp():
    # (0.5 + d, 0.5 - d) with d = sqrt(0.05); the second is raised to min p = 0.5, then renormalised
    d = math.sqrt(0.05)
    q = dro_weights([3.0, 2.0], [2.0, 2.0], [0.5, 0.5])
    assert q == pytest.approx([(0.5 + d) / (1.0 + d), 0.5 / (1.0 + d)], abs=1e-12)


def test_two_domains_floor_binds_but_ball_is_reached():
    # p = (.5, .5): the divergence of (1 - x, x) is 0.5 (1 - 2x)^2 whatever the floor does, so for rho = 0.33
    # x = (1 - sqrt(0.66)) / 2 = 0.0938..., reachable since the floored limit is (10/11, 1/11) with 0.3347
    x = (1 - math.sqrt(0.66)) / 2
    q = dro_weights([3.0, 2.0], [2.0, 2.0], [0.5, 0.5], rho=0.33, min_prob=0.2, clamp_to_min=False)
    assert q == pytest.approx([1 - x, x], abs=1e-12)


def test_unreachable_ball_takes_the_limit():
    # eta -> max e puts ratio 2 on the first domain and 0 on the second; the floor lifts it to 0.2:
    # r p = (1, 0.1) -> q = (10/11, 1/11), divergence 0.3347 < rho = 5
    q = dro_weights([3.0, 2.0], [2.0, 2.0], [0.5, 0.5], rho=5.0, min_prob=0.2, clamp_to_min=False)
    assert q == pytest.approx([10 / 11, 1 / 11], abs=1e-15)
    assert divergence(q, [0.5, 0.5]) < 5.0
    # without a floor the limit is all on the first domain
    q = dro_weights([3.0, 2.0], [2.0, 2.0], [0.5, 0.5], rho=5.0, min_prob=0.0, clamp_to_min=False)
    assert q == pytest.approx([1.0, 0.0], abs=1e-15)


def test_three_domains_symmetric_by_hand():
    # p uniform, e = (1, 0, 0): q = (a, b, b) with divergence (3a - 1)^2 / 4, so a = (1 + 2 sqrt(rho)) / 3
    rho = 0.1
    a = (1 + 2 * math.sqrt(rho)) / 3
    b = (1 - a) / 2
    q = dro_weights([3.0, 2.0, 2.0], [2.0, 2.0, 2.0], [1 / 3] * 3, rho=rho, clamp_to_min=False)
    assert q == pytest.approx([a, b, b], abs=1e-12)
    q = dro_weights([3.0, 2.0, 2.0], [2.0, 2.0, 2.0], [1 / 3] * 3, rho=rho)
    total = a + 2 / 3
    assert q == pytest.approx([a / total, 1 / 3 / total, 1 / 3 / total], abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_binding_constraint_has_divergence_rho_and_is_optimal(seed):
    rng = np.random.default_rng(seed)
    k, rho = 6, 0.05
    p = rng.dirichlet(np.ones(k) * 5)
    losses = rng.uniform(2.0, 3.0, k)
    refs = rng.uniform(1.8, 2.2, k)
    q = dro_weights(losses, refs, p, rho=rho, min_prob=0.0, clamp_to_min=False)
    assert divergence(q, p) == pytest.approx(rho, abs=1e-12)
    assert sum(q) == pytest.approx(1.0, abs=1e-15)
    # an independent solver: maximise sum q e over the simplex within the chi-square ball
    e = losses - refs
    cons = [{"type": "eq", "fun": lambda x: x.sum() - 1},
            {"type": "ineq", "fun": lambda x: rho - 0.5 * np.sum(p * (x / p - 1) ** 2)}]
    best = minimize(lambda x: -x @ e, p, constraints=cons, bounds=[(0, 1)] * k, method="SLSQP",
                    options={"ftol": 1e-14, "maxiter": 500})
    assert best.success
    assert np.asarray(q) == pytest.approx(best.x, abs=1e-5)


def test_binding_with_the_floor_active_still_meets_rho():
    p = [0.25, 0.25, 0.25, 0.25]
    losses, refs = [4.0, 3.0, 2.2, 2.0], [2.0] * 4
    q = dro_weights(losses, refs, p, rho=0.5, min_prob=0.2, clamp_to_min=False)
    assert divergence(q, p) == pytest.approx(0.5, abs=1e-12)
    unfloored = dro_weights(losses, refs, p, rho=0.5, min_prob=0.0, clamp_to_min=False)
    assert divergence(unfloored, p) == pytest.approx(0.5, abs=1e-12)
    assert unfloored[3] == 0.0 and q[3] > 0.0  # the floor keeps the last domain alive


def test_rho_to_zero_gives_p():
    p = [0.1, 0.2, 0.3, 0.4]
    q = dro_weights([3.0, 2.5, 2.0, 4.0], [2.0] * 4, p, rho=1e-14, clamp_to_min=False)
    assert q == pytest.approx(p, abs=1e-6)
    q = dro_weights([3.0, 2.5, 2.0, 4.0], [2.0] * 4, p, rho=1e-14)
    assert q == pytest.approx(p, abs=1e-6)


def test_equal_excesses_give_p():
    p = [0.1, 0.2, 0.3, 0.4]
    q = dro_weights([2.3, 3.3, 4.3, 5.3], [2.0, 3.0, 4.0, 5.0], p)
    assert q == pytest.approx(p, abs=1e-15)


def test_references_above_every_loss_shrink_by_tenths():
    # c = 1: e = (-1, 0); c = 0.9: e = (2 - 2.7, 1 - 0.9) = (-0.7, 0.1) > 0
    e, c = excess([2.0, 1.0], [3.0, 1.0])
    assert c == 0.9
    assert e == pytest.approx([-0.7, 0.1], abs=1e-15)
    # refs (5, 1.5): c = 0.7 gives (-1.5, -0.05); c = 0.6 gives (-1, 0.1), the first with a positive excess
    e, c = excess([2.0, 1.0], [5.0, 1.5])
    assert c == 0.6 and e == pytest.approx([2 - 3.0, 1 - 0.9], abs=1e-15)
    d = math.sqrt(2 * 0.1 * 0.25)
    q = dro_weights([2.0, 1.0], [3.0, 1.0], [0.5, 0.5], clamp_to_min=False)
    assert q == pytest.approx([0.5 - d, 0.5 + d], abs=1e-12)


def test_dro_bad_input():
    with pytest.raises(ValueError, match="2 losses, 3 reference losses and 2"):
        dro_weights([1.0, 2.0], [1.0, 1.0, 1.0], [0.5, 0.5])
    with pytest.raises(ValueError, match="rho"):
        dro_weights([1.0, 2.0], [1.0, 1.0], [0.5, 0.5], rho=0.0)
    with pytest.raises(ValueError, match="min_prob"):
        dro_weights([1.0, 2.0], [1.0, 1.0], [0.5, 0.5], min_prob=1.0)
    with pytest.raises(ValueError, match="min_prob"):
        dro_weights([1.0, 2.0], [1.0, 1.0], [0.5, 0.5], min_prob=-0.1)
    with pytest.raises(ValueError, match="non-negative"):
        dro_weights([1.0, float("nan")], [1.0, 1.0], [0.5, 0.5])
    with pytest.raises(ValueError, match="non-negative"):
        dro_weights([1.0, -2.0], [1.0, 1.0], [0.5, 0.5])


# ---------------------------------------------------------------------- other rules
def test_sheared_update_by_hand():
    w, losses, refs = [0.5, 0.3, 0.2], [3.0, 2.0, 2.5], [2.5, 2.2, 2.0]
    # excess clipped at 0: (0.5, 0, 0.5); w_i exp(excess_i) normalised, then smoothed with c = 1e-4
    raw = [0.5 * math.exp(0.5), 0.3, 0.2 * math.exp(0.5)]
    soft = [x / sum(raw) for x in raw]
    expected = [(1 - 1e-4) * x + 1e-4 / 3 for x in soft]
    assert sheared_weights(w, losses, refs) == pytest.approx(expected, abs=1e-15)


def test_reference_ratio_by_hand():
    # 0.9 p + 0.1 q = (.46, .28, .26); [p0/2, 2 p0] does not bind; [.2, .4] clips .46 -> .4; sum .94
    got = update_reference_ratio([0.5, 0.3, 0.2], [0.1, 0.1, 0.8], [0.4, 0.4, 0.2])
    assert got == pytest.approx([0.4 / 0.94, 0.28 / 0.94, 0.26 / 0.94], abs=1e-15)
    # 0.9 p + 0.1 q = (.45, .27, .28); 2 p0 clips .28 -> .2; sum .92; [.1, .6] does not bind
    got = update_reference_ratio([0.5, 0.3, 0.2], [0.0, 0.0, 1.0], [0.6, 0.3, 0.1])
    assert got == pytest.approx([0.45 / 0.92, 0.27 / 0.92, 0.2 / 0.92], abs=1e-15)


def test_temperature_proportions():
    # by hand: counts 1 and 8 with tau = 1/3 -> 1 : 2
    assert temperature_proportions([1, 8], 1 / 3) == pytest.approx([1 / 3, 2 / 3], abs=1e-15)
    assert temperature_proportions([5, 7, 9], 0.0) == pytest.approx([1 / 3] * 3, abs=1e-15)
    # CulturaX token counts (billions) of en ru zh ja ar tr ko th with tau = 0.3 give the paper's proportions
    counts = [2846.97e9, 737.20e9, 227.06e9, 107.87e9, 69.35e9, 64.29e9, 24.77e9, 15.72e9]
    paper = [0.2770, 0.1847, 0.1297, 0.1038, 0.0909, 0.0889, 0.0667, 0.0582]
    assert temperature_proportions(counts, 0.3) == pytest.approx(paper, abs=6e-4)
    with pytest.raises(ValueError):
        temperature_proportions([1, 0], 0.3)


# ---------------------------------------------------------------------- mixers
NAMES = ["a", "b", "c"]


def cfg(**kw) -> MixingConfig:
    return replace(MixingConfig(), **kw)


def test_drpruning_forces_scaling_law_and_dynamic_ratio():
    m = build_mixer(cfg(method="drpruning"), NAMES, [0.5, 0.3, 0.2], 100, False)
    assert m.reference_mode == "scaling_law" and m.dynamic_ratio
    m = build_mixer(cfg(method="dro"), NAMES, [0.5, 0.3, 0.2], 100, False)
    assert m.reference_mode == "source" and not m.dynamic_ratio


def test_constant_never_moves():
    m = build_mixer(cfg(), NAMES, [0.5, 0.3, 0.2], 100, False)
    m.start([2.0, 2.0, 2.0])
    rec = m.update(10, [3.0, 2.0, 2.0], [100, 100, 100])
    assert m.proportions == [0.5, 0.3, 0.2]
    assert rec["weights"] == {"a": 0.5, "b": 0.3, "c": 0.2}


def test_dro_mixer_record_and_update():
    m = build_mixer(cfg(method="dro"), ["x", "y"], [0.5, 0.5], 100, False)
    m.start([2.0, 2.0])
    rec = m.update(10, [3.0, 2.0], [1000, 1000])
    d = math.sqrt(0.05)
    assert m.proportions == pytest.approx([(0.5 + d) / (1 + d), 0.5 / (1 + d)], abs=1e-12)
    assert "step" not in rec  # the loop adds it
    for key in ("method", "losses", "references", "excess", "weights", "ratio", "fits", "predictions",
                "time_s"):
        assert key in rec
    assert rec["method"] == "dro"
    assert rec["losses"] == {"x": 3.0, "y": 2.0}
    assert rec["references"] == {"x": 2.0, "y": 2.0}
    assert rec["excess"] == {"x": 1.0, "y": 0.0}
    assert rec["ratio"] == {"x": 0.5, "y": 0.5}
    assert rec["fits"] == {"x": None, "y": None}
    json.dumps(rec, allow_nan=False)


def test_dro_mixer_logs_too_high_references(caplog):
    m = build_mixer(cfg(method="dro", reference=[3.0, 1.0]), ["x", "y"], [0.5, 0.5], 100, False)
    with caplog.at_level(logging.WARNING, logger="drpruning.mixing"):
        rec = m.update(10, [2.0, 1.0], [10, 10])
    assert rec["reference_scale"] == 0.9
    assert rec["excess"] == pytest.approx({"x": -0.7, "y": 0.1})
    assert "too high" in caplog.text
    assert m.proportions[1] > 0.5


def test_sheared_mixer_uses_source_references():
    m = build_mixer(cfg(method="sheared"), NAMES, [0.5, 0.3, 0.2], 100, False)
    m.start([2.5, 2.2, 2.0])
    m.update(10, [3.0, 2.0, 2.5], [10, 10, 10])
    raw = [0.5 * math.exp(0.5), 0.3, 0.2 * math.exp(0.5)]
    assert m.proportions == pytest.approx([(1 - 1e-4) * x / sum(raw) + 1e-4 / 3 for x in raw], abs=1e-15)


def test_train_signal_is_an_ema_skipping_absent_domains():
    m = build_mixer(cfg(method="dro", signal="train", ema=0.1), ["x", "y"], [0.5, 0.5], 100, False)
    m.start([1.0, 1.0])
    m.observe_train([2.0, float("nan")])
    m.observe_train([3.0, 4.0])
    rec = m.update(10, [9.0, 9.0], [10, 10])
    assert rec["losses"] == {"x": pytest.approx(0.9 * 2.0 + 0.1 * 3.0), "y": 4.0}


class LaggingRun:
    """A synthetic run: loss_i = A_i (D_i + D0)^-alpha_i + E_i (times a sparsity factor when pruning), where
    D_i are the tokens the mixer's own proportions gave domain i. Domain `b` lags: far from its end loss."""

    A, ALPHA, E = np.array([30.0, 400.0, 30.0]), np.array([0.3, 0.35, 0.3]), np.array([2.0, 2.0, 1.5])

    def __init__(self, steps=1000, every=10, pruning=False):
        self.steps, self.every, self.pruning = steps, every, pruning
        self.tokens = np.zeros(3)

    def mixer(self, method="drpruning", signal="eval"):
        return build_mixer(cfg(method=method, signal=signal), NAMES, [0.4, 0.3, 0.3], self.steps,
                           self.pruning, final_sparsity=0.5 if self.pruning else None)

    def loss(self, step):
        s = 0.5 * min(1.0, step / (0.2 * self.steps)) if self.pruning else None
        factor = 1.0 if s is None else (max(s, 0.01) / 0.5) ** 0.2
        return (self.A * (self.tokens + 1e5) ** -self.ALPHA * factor + self.E).tolist(), s

    def drive(self, mixer, first, last):
        records = []
        for step in range(first, last + 1):
            self.tokens += np.round(np.asarray(mixer.proportions) * 8 * 512)
            train = [x * 1.01 for x in self.loss(step)[0]]
            train[step % 3] = float("nan")  # one domain absent from each batch
            mixer.observe_train(train)
            if step % self.every == 0:
                losses, s = self.loss(step)
                records.append(mixer.update(step, losses, self.tokens.astype(int).tolist(), s))
        return records


@functools.cache
def lagging_run(method="drpruning", steps=1000, pruning=False):
    """(mixer, records) of a whole run; cached, so treat both as read-only."""
    run = LaggingRun(steps, pruning=pruning)
    mixer = run.mixer(method)
    mixer.start(run.loss(0)[0])
    return mixer, run.drive(mixer, 1, steps)


def test_drpruning_moves_toward_the_lagging_domain():
    mixer, records = lagging_run()
    fitted = [r for r in records if r["fits"]["b"] is not None]
    assert fitted, "the scaling law was never fitted"
    # while b is far from its predicted end loss it gets the most (it starts at 0.3 of 0.4/0.3/0.3); at the
    # very end every domain reaches its prediction and the excesses vanish, so look before that
    late = [r["weights"]["b"] for r in fitted[:-5]]
    assert np.mean(late) > 0.45
    assert all(r["weights"]["b"] == max(r["weights"].values()) for r in fitted[:-5])
    assert mixer.ratio[1] > 0.3  # the reference ratio follows
    # references only go down after the first fit and never exceed the lowest observed loss
    refs = [r["references"]["b"] for r in fitted]
    assert all(x >= y for x, y in zip(refs, refs[1:], strict=False))
    assert refs[-1] <= min(r["losses"]["b"] for r in records) + 1e-12
    for r in records:
        assert sum(r["weights"].values()) == pytest.approx(1.0, abs=1e-12)


def test_scaling_law_reference_predicts_the_end_loss():
    mixer, records = lagging_run(method="drpruning")
    # the run's true final losses (no noise): predicted references should sit near them
    last = records[-1]
    for name in NAMES:
        assert last["predictions"][name] is not None
        assert last["references"][name] <= last["losses"][name] + 1e-12
        assert last["references"][name] == pytest.approx(last["losses"][name], rel=0.02)


def test_first_fit_replaces_the_starting_reference_while_pruning():
    # while pruning, losses rise above the source's: the first fit must raise the reference above the source
    mixer, records = lagging_run(pruning=True, steps=400)
    source = records[0]["references"]
    first = next(r for r in records if r["fits"]["a"] is not None)
    assert first["references"]["a"] > source["a"]
    assert first["fits"]["a"]["beta"] <= 0


def test_points_are_thinned_from_the_oldest():
    m = build_mixer(cfg(method="drpruning", fit_from=2.0), ["x"], [1.0], 1000, False)
    m.start([5.0])
    for step in range(1, 201):
        m.update(step * 5, [5.0 - step * 0.01], [step * 1000])
    pts = m.refs.points[0]
    assert len(pts) <= 64
    tokens = [p[0] for p in pts]
    assert tokens == sorted(tokens)
    assert tokens[-1] == 200 * 1000  # the newest is kept
    assert tokens[0] <= 10 * 1000  # ... and so is (nearly) the oldest: the span survives
    assert m.refs.lowest[0] == pytest.approx(5.0 - 200 * 0.01)


def test_too_few_points_keep_the_previous_reference():
    m = build_mixer(cfg(method="drpruning"), ["x", "y"], [0.5, 0.5], 100, False)
    m.start([3.0, 3.0])
    for step in range(10, 60, 10):  # 5 points: fewer than the fit needs
        rec = m.update(step, [2.9 - step * 0.001, 2.8], [step * 100, step * 100])
    assert rec["fits"] == {"x": None, "y": None}
    assert rec["references"] == {"x": 3.0, "y": 3.0}


@pytest.mark.parametrize("pruning,signal", [(False, "eval"), (True, "train")])
def test_resume_is_exact(pruning, signal):
    """Stop at step 150, restore a fresh mixer from the JSON of its state, continue: bit-identical to a run
    that never stopped (records, proportions and state)."""
    steps = 300
    run = LaggingRun(steps, pruning=pruning)
    straight = run.mixer(signal=signal)
    straight.start(run.loss(0)[0])
    expected = run.drive(straight, 1, steps)

    run = LaggingRun(steps, pruning=pruning)
    first = run.mixer(signal=signal)
    first.start(run.loss(0)[0])
    head = run.drive(first, 1, 150)
    resumed = run.mixer(signal=signal)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict(), allow_nan=False)))
    resumed.proportions = first.proportions  # as the loop restores them
    tail = run.drive(resumed, 151, steps)

    for got, want in zip(head + tail, expected, strict=True):
        got, want = dict(got), dict(want)
        got.pop("time_s"), want.pop("time_s")
        assert got == want
    assert any(r["fits"]["a"] is not None for r in tail)  # the resumed part really fitted laws
    assert resumed.proportions == straight.proportions
    assert resumed.state_dict() == straight.state_dict()


def test_bad_input_to_the_mixer(caplog):
    with pytest.raises(ValueError, match="2 initial proportions for 3 domains"):
        build_mixer(cfg(method="dro"), NAMES, [0.5, 0.5], 100, False)
    with pytest.raises(ValueError, match="2 reference losses for 3 domains"):
        build_mixer(cfg(method="dro", reference=[1.0, 2.0]), NAMES, [0.4, 0.3, 0.3], 100, False)
    with pytest.raises(ValueError, match="rho"):
        build_mixer(cfg(method="dro", rho=0.0), NAMES, [0.4, 0.3, 0.3], 100, False)
    with pytest.raises(ValueError, match="min_prob"):
        build_mixer(cfg(method="dro", min_prob=1.0), NAMES, [0.4, 0.3, 0.3], 100, False)
    with pytest.raises(ValueError, match="unknown mixing method"):
        build_mixer(cfg(method="magic"), NAMES, [0.4, 0.3, 0.3], 100, False)
    m = build_mixer(cfg(method="dro"), NAMES, [0.4, 0.3, 0.3], 100, False)
    with pytest.raises(RuntimeError, match="start"):
        m.update(10, [2.0, 2.0, 2.0], [1, 1, 1])
    with pytest.raises(ValueError, match="2 values but there are 3 domains"):
        m.start([2.0, 2.0])
    m.start([2.0, 2.0, 2.0])
    with pytest.raises(ValueError, match="2 values but there are 3 domains"):
        m.update(10, [2.0, 2.0], [1, 1, 1])
    m.update(10, [3.0, 2.0, 2.0], [1, 1, 1])
    before = m.proportions
    for bad in ([float("nan"), 2.0, 2.0], [2.0, -1.0, 2.0], [2.0, float("inf"), 2.0]):
        with caplog.at_level(logging.WARNING, logger="drpruning.mixing"):
            rec = m.update(20, bad, [1, 1, 1])
        assert rec["skipped"] and m.proportions == before
        assert "skipped" in caplog.text
        json.dumps(rec, allow_nan=False)
    m.update(30, [2.0, 3.0, 2.0], [1, 1, 1])  # the next valid update works
    assert m.proportions[1] > m.proportions[0]
    with pytest.raises(ValueError, match="for method 'dro'"):
        build_mixer(cfg(method="sheared"), NAMES, [0.4, 0.3, 0.3], 100, False).load_state_dict(m.state_dict())


def test_scaling_law_is_reexported():
    from drpruning.mixing.scaling_law import ScalingLaw as Original

    assert ScalingLaw is Original


def test_equal_excess_everywhere_gives_the_reference_ratio():
    """Every domain +0.1 over its reference: a tie, whatever the rounding of loss - reference says."""
    refs = [2.3, 1.7, 3.1, 0.9, 2.2]
    losses = [r + 0.1 for r in refs]  # 0.1 up to rounding: 2.4 - 2.3 != 1.8 - 1.7 in float64
    ratio = [0.4, 0.25, 0.15, 0.1, 0.1]
    assert len({x - r for x, r in zip(losses, refs)}) > 1  # the rounding noise is really there
    assert dro_weights(losses, refs, ratio) == pytest.approx(ratio, abs=1e-12)
    # a real difference still moves the weights
    assert dro_weights([losses[0] + 0.05] + losses[1:], refs, ratio)[0] > ratio[0] + 0.01


def test_an_evaluation_far_above_the_training_average_is_skipped():
    m = build_mixer(cfg(method="dro"), ["x", "y"], [0.5, 0.5], 100, False)
    m.start([2.0, 1.0])
    for _ in range(5):
        m.observe_train([2.5, 1.5])
    rec = m.update(10, [10.5, 10.5], [100, 100])  # a collapse: 8.5 nats above the training average
    assert rec["skipped"] and "outlier" in rec["skipped"] and rec["weights"] == {"x": 0.5, "y": 0.5}
    rec = m.update(20, [2.6, 1.4], [200, 200])  # an ordinary evaluation moves the weights
    assert rec["skipped"] is None and rec["weights"]["x"] > 0.5
    off = build_mixer(cfg(method="dro", outlier_nats=0.0), ["x", "y"], [0.5, 0.5], 100, False)
    off.start([2.0, 1.0])
    off.observe_train([2.5, 1.5])
    assert off.update(10, [10.5, 10.5], [100, 100])["skipped"] is None
