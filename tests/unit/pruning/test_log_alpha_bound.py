"""The temperature-bounded log-alpha range of deterministic gates (`pruning.log_alpha_bound: temperature`):
its ends against the gate's edge computed with math, that bounding never changes a gate's value, and that a
gate at the top of the bounded range leaves its flat top within a few steps where the fixed range holds it."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import tiny_model

from drpruning.config import PruningConfig
from drpruning.pruning.hard_concrete import LOG_ALPHA_MAX, LOG_ALPHA_MIN, deterministic_gate, log_alpha_range
from drpruning.pruning.pruner import Pruner

TARGET = {"num_hidden_layers": 2, "num_key_value_heads": 1, "intermediate_size": 24, "hidden_size": 16}


def make(bound: str, **kw) -> Pruner:
    model = tiny_model("llama")
    kw = {"hardening_steps": 20, **kw}
    cfg = PruningConfig(enabled=True, method="l0", target=TARGET, gates="deterministic", log_alpha_bound=bound, **kw)
    return Pruner(model.config, cfg, 100)


def edge(temperature: float) -> float:
    """Where the stretched gate 1.2 sigmoid(x / t) - 0.1 reaches 1: sigmoid = 11/12, x = t ln 11."""
    return temperature * math.log(11.0)


@pytest.mark.parametrize("temperature", [2 / 3, 0.3, 2 / 15])
def test_the_range_ends_a_quarter_past_where_the_gate_reaches_0_or_1(temperature):
    lo, hi = log_alpha_range(temperature)
    assert hi == pytest.approx(1.25 * edge(temperature), rel=1e-9) and lo == -hi
    t = torch.tensor(temperature)
    at = lambda x: float(deterministic_gate(torch.tensor(x), t))  # noqa: E731
    assert at(hi) == 1.0 and at(lo) == 0.0
    assert at(0.99 * edge(temperature)) < 1.0 and at(-0.99 * edge(temperature)) > 0.0
    assert log_alpha_range(None) == (LOG_ALPHA_MIN, LOG_ALPHA_MAX)
    assert log_alpha_range(10.0) == (LOG_ALPHA_MIN, LOG_ALPHA_MAX)  # never wider than the fixed range


def test_bounding_changes_no_gate_only_how_far_a_saturated_one_sits():
    fixed, bounded = make("fixed"), make("temperature")
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for s, a in fixed.log_alpha.items():
            a.copy_((torch.randn(a.shape, generator=g) * 3).clamp(LOG_ALPHA_MIN, LOG_ALPHA_MAX))
            bounded.log_alpha[s].copy_(a)
    for step in (0, 40, 79):
        fixed.begin_step(step)
        bounded.begin_step(step)
        hi = 1.25 * edge(float(bounded.gate_temperature))
        for s, m in fixed.train().masks().items():
            assert torch.equal(bounded.train().masks()[s], m), (s, step)
            a = bounded.log_alpha[s].detach()
            assert torch.equal(a, fixed.log_alpha[s].detach().clamp(-hi, hi)), (s, step)
    widest = {p: float(p.log_alpha["hidden"].detach().abs().max()) for p in (bounded, fixed)}
    assert widest[bounded] < 0.5 < widest[fixed]


def steps_to_leave_the_top(pruner: Pruner, step: int) -> int | None:
    """Adam steps (lr 0.1) pushing layer 0's gate down from the top of the range until it is below 1 (None:
    not in 100)."""
    with torch.no_grad():
        pruner.log_alpha["layer"].fill_(LOG_ALPHA_MAX)
    opt = torch.optim.Adam(pruner.optimizer_groups(mask_lr=0.1)[:1])
    for n in range(1, 101):
        pruner.begin_step(step)
        pruner.train().masks()["layer"][0].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        pruner.after_step()
        pruner.begin_step(step)
        if float(pruner.train().masks()["layer"][0].detach()) < 1.0:
            return n
    return None


def test_a_bounded_gate_at_one_answers_a_push_within_a_few_steps():
    step = 79  # the last learnt step: temperature 0.137, the gate's edge at 0.33
    t = 2 / 3 * (1 - 0.8 * math.sqrt(79 / 80))
    # at ln 100 the straight-through gradient sigmoid'(x / t) 1.2 / t is far below Adam's eps (1e-8): the
    # gate cannot move; at the bounded top (0.41) it is 0.4, and one step of 0.1 takes it past the edge (0.33)
    sig = 1 / (1 + math.exp(-LOG_ALPHA_MAX / t))
    assert sig * (1 - sig) * 1.2 / t < 1e-12
    assert steps_to_leave_the_top(make("temperature"), step) == 1
    assert steps_to_leave_the_top(make("fixed"), step) is None


def test_init_at_the_one_shot_cut_keeps_its_exact_masks_when_bounded():
    g = torch.Generator().manual_seed(3)
    pruner = make("temperature", init="one_shot")
    pruner.set_importance({s: torch.rand(a.shape, generator=g) for s, a in pruner.log_alpha.items()})
    cut = {s: m != 0 for s, m in pruner.eval(exact=True).masks().items()}
    pruner.begin_step(0)
    for s, m in pruner.eval(exact=True).masks().items():
        assert torch.equal(m != 0, cut[s]), s

