"""A new mixing rule is one class plus one line in METHODS: the recipe of docs/design.md, run for real."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from drpruning.config import ConfigError, load_config
from drpruning.mixing import METHODS, build_mixer
from drpruning.mixing.base import Mixer


@dataclass(frozen=True)
class GreedyOptions:
    step: float = 0.5

    def __post_init__(self):
        if not 0 < self.step <= 1:
            raise ValueError(f"config key 'mixing.options.step' must be in (0, 1], got {self.step}")


class GreedyMixer(Mixer):
    method = "greedy"
    Options = GreedyOptions

    def propose(self, step, losses):
        gaps = [x - r for x, r in zip(losses, self.references)]
        worst = gaps.index(max(gaps))
        q = [(1 - self.opts.step) * p for p in self.proportions]
        q[worst] += self.opts.step
        return q


@pytest.fixture
def greedy(monkeypatch):
    monkeypatch.setitem(METHODS, "greedy", GreedyMixer)  # the one registry line


def test_a_registered_rule_is_configured_validated_and_used(greedy):
    cfg = load_config(None, ["run_dir=r", "mixing.method=greedy", "mixing.options={step: 0.3}"])
    mixer = build_mixer(cfg.mixing, ["a", "b"], [0.5, 0.5], 10)
    assert mixer.opts == GreedyOptions(step=0.3)
    mixer.start([2.0, 2.0])
    record = mixer.update(1, [2.1, 2.5], [100, 100])
    # independent: b lags its reference most, so it gets 0.7 * 0.5 + 0.3
    assert record["weights"] == pytest.approx({"a": 0.35, "b": 0.65}, abs=1e-12)
    assert record["method"] == "greedy" and record["excess"] == pytest.approx({"a": 0.1, "b": 0.5})
    with pytest.raises(ConfigError, match="mixing.options.step"):
        load_config(None, ["run_dir=r", "mixing.method=greedy", "mixing.options={step: 2}"])


def test_unregistered_rule_is_refused_with_the_known_names():
    with pytest.raises(ConfigError, match="constant, sheared, dro, drpruning"):
        load_config(None, ["run_dir=r", "mixing.method=greedy"])
