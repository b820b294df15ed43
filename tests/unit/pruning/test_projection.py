"""The projected size constraint: each row's expected kept count equals its target after the shift, checked
against the gates computed with math, the shift is the smallest that gets there, and a projected pruner needs
no multipliers."""

from __future__ import annotations

import math

import pytest
import torch
from tiny_models import tiny_model

from drpruning.config import ConfigError, PruningConfig, RunConfig, validate
from drpruning.pruning.hard_concrete import LOG_ALPHA_MAX, LOG_ALPHA_MIN, deterministic_gate, prob_nonzero
from drpruning.pruning.projection import shift_to_count
from drpruning.pruning.pruner import Pruner

TEMPERATURE = 0.3


def gate(x: float, how: str, bounds: tuple[float, float] = (LOG_ALPHA_MIN, LOG_ALPHA_MAX)) -> float:
    """A unit's expected keep, with math: the deterministic gate at TEMPERATURE, or P(z > 0)."""
    x = min(max(x, bounds[0]), bounds[1])
    if how == "deterministic":
        return min(1.0, max(0.0, 1.2 / (1.0 + math.exp(-x / TEMPERATURE)) - 0.1))
    return 1.0 / (1.0 + math.exp(-(x - (2 / 3) * math.log(0.1 / 1.1))))


def count(row: list[float], tau: float, protected: list[bool], how: str, bounds: tuple[float, float]) -> float:
    return sum(1.0 if p else gate(x - tau, how, bounds) for x, p in zip(row, protected, strict=True))


KEEP = {"deterministic": lambda a: deterministic_gate(a, TEMPERATURE), "sampled": prob_nonzero}


FULL = (LOG_ALPHA_MIN, LOG_ALPHA_MAX)


# the bounded range is for deterministic gates: +-0.9 is a quarter past their edge at TEMPERATURE (+-0.72)
@pytest.mark.parametrize(("how", "bounds"),
                         [("deterministic", FULL), ("sampled", FULL), ("deterministic", (-0.9, 0.9))])
def test_shift_meets_each_rows_count_and_is_the_smallest_that_does(how, bounds):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 40, generator=g) * 2
    a[1] += 3.0  # every row's count differs from the target: above it, far above, below
    a[2] -= 3.0
    a = a.clamp(*bounds)
    protected = torch.zeros(4, 40, dtype=torch.bool)
    protected[0, :5] = True
    kept = 25.0
    tau = shift_to_count(a, KEEP[how], kept, protected, bounds)
    for r in range(4):
        row, prot, t = a[r].tolist(), protected[r].tolist(), float(tau[r])
        assert count(row, t, prot, how, bounds) == pytest.approx(kept, abs=2e-3)
        before = count(row, 0.0, prot, how, bounds)
        step = 1e-3 * (1 if t > 0 else -1)
        assert (before > kept) == (t > 0)  # too many kept: shift down the scale
        assert abs(count(row, t - step, prot, how, bounds) - kept) > 2e-3  # a smaller shift misses the target
    at_target = (a[3:4] - tau[3]).clamp(*bounds)  # a row already at its count is left alone
    assert float(shift_to_count(at_target, KEEP[how], kept, protected[3:4], bounds)[0]) == 0.0


def make(**kw) -> Pruner:
    model = tiny_model("llama")
    target = {"num_hidden_layers": 2, "num_key_value_heads": 1, "intermediate_size": 24}
    cfg = PruningConfig(enabled=True, method="l0", target=target, structures=["layer", "head", "intermediate"],
                        constraint="projected", **kw)
    return Pruner(model.config, cfg, 100)


@pytest.mark.parametrize("gates", ["deterministic", "sampled"])
def test_a_projected_pruner_holds_every_row_at_the_steps_target_without_multipliers(gates):
    pruner = make(gates=gates, hardening_steps=20, lagrangian_warmup_steps=20)
    with torch.no_grad():  # every unit kept, as the loss would have it
        for p in pruner.log_alpha.values():
            p.fill_(LOG_ALPHA_MAX)
    opt = torch.optim.Adam(pruner.optimizer_groups(mask_lr=0.5, lagrangian_lr=1.0))
    g = torch.Generator().manual_seed(1)
    for step in (10, 11, 12, 40):
        pruner.begin_step(step)
        probs = pruner.probabilities()
        temperature = float(pruner.gate_temperature) if gates == "deterministic" else None
        for s, a in pruner.log_alpha.items():
            size, _ = pruner.unit_count(s)
            want = size * (1 - pruner.target_sparsity(s, step))
            for row, row_probs in zip(a.detach().reshape(-1, size), probs[s].reshape(-1, size), strict=True):
                if temperature is not None:
                    direct = [min(1.0, max(0.0, 1.2 / (1 + math.exp(-x / temperature)) - 0.1)) for x in row.tolist()]
                else:
                    direct = [gate(x, "sampled") for x in row.tolist()]
                assert sum(direct) == pytest.approx(want, abs=2e-3), (s, step)
                assert float(row_probs.detach().sum()) == pytest.approx(sum(direct), abs=1e-4)
        penalty, record = pruner.penalty(step)
        assert not penalty.requires_grad and float(penalty) == 0.0
        for s in pruner.structures:
            assert record["expected_sparsity"][s] == pytest.approx(record["target_sparsity"][s], abs=1e-3)
        for p in pruner.mask_parameters():  # a gradient step of the loss, then the projection again
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
        opt.zero_grad(set_to_none=True)
        pruner.after_step()
    assert all(float(x) == 0.0 for x in pruner.lagrangian_parameters())


def test_the_constraint_is_validated():
    cfg = RunConfig()
    cfg.pruning.enabled, cfg.pruning.target = True, {"num_hidden_layers": 2}
    cfg.pruning.constraint = "penalty"
    with pytest.raises(ConfigError, match="'pruning.constraint' is 'penalty': use lagrangian or projected"):
        validate(cfg)
