"""The shape search: valid candidates near the budget, exact parameter counts, never worse than the
proportional shape right after the cut, and the `drpruning shapes` command."""

from __future__ import annotations

import json

import pytest
import torch
from run_helpers import overrides
from tiny_models import CONFIGS, VOCAB, save_tiny, tiny_model

from drpruning.cli import main
from drpruning.config import PruningConfig
from drpruning.evaluation.perplexity import domain_nll, loss_and_error
from drpruning.models.families import family_of
from drpruning.models.shape import parameter_count, source_shape
from drpruning.models.shape_search import (
    BAND,
    SCORE_SEQUENCES,
    enumerate_shapes,
    score_shapes,
    shape_config,
)
from drpruning.pruning import one_shot
from drpruning.pruning.export import build_pruned_model
from drpruning.pruning.pruner import Pruner

FAMILIES = list(CONFIGS)


def budget_cfg(config, fraction: float, **kw) -> PruningConfig:
    return PruningConfig(enabled=True, method="importance", target_params=int(fraction * parameter_count(config)),
                         **kw)


@pytest.mark.parametrize("head_mode", ["kv_group", "query"])
@pytest.mark.parametrize("kind", FAMILIES)
def test_candidates_are_valid_and_count_what_the_export_holds(kind, head_mode):
    model = tiny_model(kind)
    src = source_shape(model.config)
    cfg = budget_cfg(model.config, 0.7, head_mode=head_mode)
    candidates = enumerate_shapes(model.config, cfg)
    assert len(candidates) >= 5 and candidates[0].proportional
    assert len({c.shape for c in candidates}) == len(candidates)
    budget = cfg.target_params
    for c in candidates:
        s = c.shape
        assert 1 <= s.num_hidden_layers <= src.num_hidden_layers and 1 <= s.intermediate_size
        assert s.num_attention_heads % s.num_key_value_heads == 0
        if head_mode == "kv_group":
            assert s.group_size == src.group_size
        else:
            assert s.num_key_value_heads == src.num_key_value_heads
        if family_of(model.config).hidden_multiple_of_heads:
            assert s.hidden_size % s.num_attention_heads == 0
        assert c.proportional or abs(c.params - budget) <= BAND * budget
        # the exported model, counted directly (a tied embedding is one parameter tensor)
        pruner = Pruner(model.config, shape_config(cfg, s), 1)
        compact = build_pruned_model(model, pruner)
        assert sum(p.numel() for p in compact.parameters()) == c.params, c.describe()


def test_the_grid_holds_the_priors_it_tests():
    """Shapes that keep the full hidden size, the full KV groups and the full depth are all candidates."""
    config = CONFIGS["llama"]()
    src = source_shape(config)
    shapes = [c.shape for c in enumerate_shapes(config, budget_cfg(config, 0.7))]
    assert any(s.hidden_size == src.hidden_size for s in shapes)
    assert any(s.num_key_value_heads == src.num_key_value_heads for s in shapes)
    assert any(s.num_hidden_layers == src.num_hidden_layers for s in shapes)
    assert any(s.num_hidden_layers < src.num_hidden_layers for s in shapes)


def test_explicit_target_dimensions_stay_fixed():
    config = CONFIGS["llama"]()
    cfg = budget_cfg(config, 0.7, target={"num_hidden_layers": 2})
    assert {c.shape.num_hidden_layers for c in enumerate_shapes(config, cfg)} == {2}


def held_out_loss(compact, held_out) -> float:
    losses, _ = loss_and_error(domain_nll(compact, [h[:SCORE_SEQUENCES] for h in held_out], 4))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("kind", FAMILIES)
def test_the_search_never_loses_to_the_proportional_shape_after_the_cut(kind):
    model = tiny_model(kind, seed=3)
    g = torch.Generator().manual_seed(0)
    train = [torch.randint(4, VOCAB, (6, 16), generator=g) for _ in range(3)]
    held_out = [torch.randint(4, VOCAB, (3, 16), generator=g) for _ in range(3)]
    cfg = budget_cfg(model.config, 0.6)
    ranked = score_shapes(model, cfg, enumerate_shapes(model.config, cfg), train, held_out, batch_size=4)
    losses = [s.loss for s in ranked]
    assert losses == sorted(losses) and len(set(losses)) > 1  # the shapes differ, so the ranking matters

    # independently: each shape cut by its own calibration pass (the path a one-shot run takes)
    proportional = Pruner(model.config, cfg, 1)
    assert next(s for s in ranked if s.candidate.proportional).candidate.shape == proportional.target
    compact, _ = one_shot.cut(model, proportional, train, 4)
    baseline = held_out_loss(compact, held_out)
    compact, _ = one_shot.cut(model, Pruner(model.config, shape_config(cfg, ranked[0].candidate.shape), 1), train, 4)
    best = held_out_loss(compact, held_out)
    assert best == pytest.approx(ranked[0].loss, abs=1e-6)
    assert best <= baseline + 1e-6


def test_refinement_reranks_the_best_shapes_by_the_loss_after_training():
    model = tiny_model("qwen2", seed=1)
    g = torch.Generator().manual_seed(0)
    train = [torch.randint(4, VOCAB, (6, 16), generator=g) for _ in range(2)]
    held_out = [t[:2].clone() for t in train]  # scored on what it trains on: the loss must fall
    cfg = budget_cfg(model.config, 0.6)
    ranked = score_shapes(model, cfg, enumerate_shapes(model.config, cfg), train, held_out, batch_size=4,
                          refine_steps=4, refine_top=2, refine_options={"lr": 1e-2, "distill_weight": 0.0})
    refined = [s for s in ranked if s.refined is not None]
    assert len(refined) == 2 and ranked[:2] == sorted(refined, key=lambda s: s.refined)
    assert all(s.refined < s.loss for s in refined)


def test_shapes_command_prints_a_ranking_and_writes_the_table(tmp_path, capsys):
    model_dir = save_tiny(tmp_path / "model", "qwen2")
    from transformers import AutoConfig

    budget = int(0.6 * parameter_count(AutoConfig.from_pretrained(model_dir)))
    items = overrides(tmp_path, model_dir, **{"pruning.target_params": budget, "pruning.method": "importance"})
    assert main(["shapes", *items, "--top", "5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines[1:] if line[:1].isdigit()]
    assert [r[0] for r in rows] == ["1", "2", "3", "4", "5"]
    record = json.loads((tmp_path / "run" / "shapes.json").read_text())
    assert len(record["candidates"]) >= 5 and record["winner"] == record["candidates"][0]["shape"]
    losses = [c["loss"] for c in record["candidates"]]
    assert losses == sorted(losses)
    assert (tmp_path / "run" / "shapes.md").read_text().count("\n| ") == len(losses) + 2  # header, rule, rows


@pytest.mark.parametrize("extra, flags, message", [
    ({}, [], "target_params"),
    ({"pruning.target_params": "10k", "pruning.shape": "widest"}, [], "pruning.shape"),
    ({"pruning.target_params": "10k"}, ["--top", "0"], "--top 0"),
    ({"pruning.target_params": "1G"}, [], "not smaller than the source"),
])
def test_shapes_command_refuses_bad_input_before_any_work(tmp_path, capsys, extra, flags, message):
    model_dir = save_tiny(tmp_path / "model", "llama")
    assert main(["shapes", *overrides(tmp_path, model_dir, **extra), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()
