"""`drpruning plan`'s method recommendation, on evidence written out by hand."""

import pytest

from drpruning.config import load_config
from drpruning.plan.recommend import at_par, l0_wins, recipe_mismatches, recommend, recommended_recipe


def point(tpp, one, l0, arm="t_l0_35"):
    return {"total_steps": 100, "tokens_per_step": 2048, "tokens_per_param": tpp, "l0_arm": arm,
            "oneshot_worst": one, "l0_worst": l0, "gap_worst": [b - a for a, b in zip(one, l0)]}


LOSING = point(0.004, [3.30, 3.34], [3.60, 3.70])  # +0.33 nats, seed ranges 0.04 / 0.10
PAR = point(0.010, [3.10, 3.20], [3.15, 3.22])  # +0.035 nats, within the 0.10 range
WINNING = point(0.015, [3.10, 3.14], [2.90, 2.95])  # -0.195 nats, beyond twice the 0.05 range
CLOSE = point(0.015, [3.10, 3.12], [3.07, 3.09])  # -0.030 nats, beyond the 0.02 range but within twice it


def test_at_par_means_within_the_larger_seed_range_and_winning_beyond_it():
    assert not at_par(LOSING) and at_par(PAR) and at_par(WINNING)
    assert not l0_wins(LOSING) and not l0_wins(PAR) and l0_wins(WINNING)


def test_a_win_within_twice_the_seed_range_needs_a_third_seed():
    assert not l0_wins(CLOSE)
    m, why = recommend(int(0.02 * 1e8), 100_000_000, {"points": [CLOSE]})
    assert m == "importance" and "ended lower than, but within twice the seed range of, one-shot + KD" in why, why
    third = point(0.015, [3.10, 3.12, 3.11], [3.07, 3.09, 3.08])  # the same gap on a third seed
    assert l0_wins(third) and recommend(int(0.02 * 1e8), 100_000_000, {"points": [third]})[0] == "l0"


@pytest.mark.parametrize("tpp,method,says", [
    (0.002, "importance", "ended behind one-shot + KD, which costs less: +0.330 nats [+0.300, +0.360] over 2"),
    (0.008, "importance", "ended behind"),  # the nearest measured budget below it
    (0.012, "importance", "matched one-shot + KD, which costs less: +0.035"),  # at par is not a win
    (0.020, "l0", "beat one-shot + KD on worst-domain loss from there: -0.195"),
])
def test_recommendation_follows_the_crossover(tpp, method, says):
    m, why = recommend(int(tpp * 1e8), 100_000_000, {"points": [PAR, LOSING, WINNING]})
    assert m == method and says in why, why
    assert f"{tpp:.4f} tokens/parameter" in why


def test_beyond_the_measured_budgets_it_says_so():
    m, why = recommend(int(0.04 * 1e8), 100_000_000, {"points": [LOSING]})
    assert m == "importance" and "10x the largest measured one" in why, why
    m, why = recommend(10**6, 10**8, {"points": []})
    assert m == "importance" and "no equal-token measurement" in why


def test_an_l0_recommendation_gives_the_measured_recipe():
    recipe = {"share": 0.15, "overrides": ["pruning.method=l0", "pruning.hardening_steps=10% of the mask phase"]}
    m, why = recommend(int(0.02 * 1e8), 100_000_000, {"points": [{**WINNING, "l0_recipe": recipe}]})
    assert m == "l0" and why.endswith("; its recipe: learn the masks over the first 15% of the steps "
                                      "(pruning.mask_phase_steps) with pruning.method=l0, pruning.hardening_steps="
                                      "10% of the mask phase, then train the exported compact model for the rest"), why


RECIPE = {"share": 0.15, "overrides": ["pruning.method=l0", "pruning.init=one_shot",
                                       "pruning.hardening_steps=10% of the mask phase", "pruning.mask_lr=0.1"]}


def l0_config(*extra):
    return load_config(None, ["run_dir=/tmp/x", "pruning.enabled=true", "pruning.target.num_hidden_layers=2",
                              "train.steps=1000", "pruning.method=l0", *extra])


def test_a_config_that_follows_the_recipe_has_no_mismatch_and_one_that_departs_is_told_the_fix():
    follows = ["pruning.mask_phase_steps=150", "pruning.init=one_shot", "pruning.hardening_steps=15",
               "pruning.mask_lr=0.1"]
    assert recipe_mismatches(l0_config(*follows), RECIPE) == []
    # a step off in hardening is rounding, not a departure
    assert recipe_mismatches(l0_config(*follows[:2], "pruning.hardening_steps=16", follows[3]), RECIPE) == []
    departs = l0_config("pruning.mask_phase_steps=350", "pruning.hardening_steps=15", "pruning.mask_lr=1.0")
    assert recipe_mismatches(departs, RECIPE) == ["pruning.mask_phase_steps=150", "pruning.init=one_shot",
                                                  "pruning.hardening_steps=35", "pruning.mask_lr=0.1"]
    whole_run = l0_config("pruning.init=one_shot", "pruning.hardening_steps=100", "pruning.mask_lr=0.1")
    assert recipe_mismatches(whole_run, RECIPE) == ["pruning.mask_phase_steps=150"]  # masks over all 1,000


def test_the_recipe_is_given_only_where_l0_is_recommended():
    cfg = l0_config("data.seq_len=256", "train.batch_size=8")  # 2,048,000 tokens
    win = {"points": [{**WINNING, "l0_recipe": RECIPE}]}  # from 0.015 tokens/parameter
    assert recommended_recipe(cfg, 100_000_000, win) == RECIPE  # 0.020
    assert recommended_recipe(cfg, 200_000_000, win) is None  # 0.010: below the crossover
    assert recommended_recipe(cfg, 100_000_000, {"points": [{**PAR, "l0_recipe": RECIPE}]}) is None
