"""The L0 study's derived columns (export gap, ramp end, largest rise) on records written out by hand."""

import sys
from pathlib import Path

import pytest
from study_tables import load_table

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "experiments"))
table = load_table(ROOT / "experiments" / "l0_budget" / "table.py", "l0_budget_table")


def train(step, target, lagrangian=True):
    r = {"kind": "train", "step": step, "target_sparsity": {"layer": target, "intermediate": 2 * target}}
    return {**r, "lagrangian": 0.0} if lagrangian else r


def ev(step, loss):
    return {"kind": "eval", "step": step, "mean_loss": loss}


def unit(mask_records, train_losses):
    return {"mask": {"records": mask_records},
            "train": {"records": [ev(s, v) for s, v in train_losses]}}


# 10 mask steps, ramp over 4, hardening from step 8; evaluations at 0, 5, 8 (learnt) and 10 (exact)
MASK = [*(train(s, min(1.0, s / 4) * 0.2) for s in range(1, 9)), *(train(s, 0.2, False) for s in (9, 10)),
        ev(0, 3.0), ev(5, 3.9), ev(8, 3.5), ev(10, 3.56)]


def test_export_gap_is_against_the_evaluation_where_hardening_starts():
    assert table.learnt_until(MASK) == 8
    assert table.export_gap(unit(MASK, [])) == pytest.approx(3.56 - 3.5)
    older = [r for r in MASK if not (r["kind"] == "eval" and r["step"] == 8)]  # no evaluation at step 8
    assert table.export_gap(unit(older, [])) is None
    assert table.export_gap({"train": {"records": []}}) is None
    inside = [*MASK[:-1], ev(9, 3.9), ev(10, 3.56)]  # an in-run evaluation during hardening, then the exact one
    assert table.export_gap(unit(inside, [])) == pytest.approx(3.56 - 3.5)


def test_largest_rise_counts_from_the_end_of_the_ramp_through_training():
    assert table.ramp_end(MASK) == 4
    # after step 4: 3.9 (step 5), 3.5, 3.56, then training 3.56 -> 3.7 -> 3.2: largest rise 0.14 (the jump to
    # 3.9 at step 5 follows the ramp's evaluation at step 0, before the end of the ramp, so it does not count)
    assert table.largest_rise(unit(MASK, [(0, 3.56), (25, 3.7), (50, 3.2)])) == pytest.approx(0.14)
    no_ramp = [train(s, 0.2) for s in range(1, 9)] + [ev(0, 3.0), ev(5, 3.9), ev(8, 4.3)]
    assert table.ramp_end(no_ramp) == 0  # at the target from the first step
    assert table.largest_rise(unit(no_ramp, [])) == pytest.approx(0.4)  # not the cut's 0.9 from the source


def test_the_committed_evidence_is_what_the_committed_results_give():
    """`drpruning plan` reads src/drpruning/plan/l0_evidence.json: it must be table.py's output on the results."""
    import json

    spec = table.load_study(table.HERE)
    written = table.evidence(table.all_results(spec), spec["arms"])
    assert json.loads(table.EVIDENCE.read_text()) == json.loads(json.dumps(written))


def test_the_multiplier_rule_waits_for_candidates_and_takes_the_lowest_eligible():
    def masked(gap, worst):  # a mask phase whose exact cut ends `gap` above its last learnt evaluation
        records = [*MASK[:-1], ev(10, 3.5 + gap)]
        return {"mask": {"records": records, "heldout": {"a": {"loss": worst - 1}, "b": {"loss": worst}}}}

    tuned, fast, sgd5, sgd20 = table.MULTIPLIER_CANDIDATES
    results = {tuned: {0: masked(0.0, 4.6), 1: masked(0.09, 4.5)},  # out: 0.09 on seed 1, however low
               fast: {0: masked(0.0, 4.7), 1: masked(0.01, 4.7)},
               sgd5: {0: masked(0.2, 4.8)},  # out on its first seed: no second seed needed
               sgd20: {0: masked(-0.02, 4.6)}}
    said = table.multiplier_choice(results)
    assert said.startswith(f"undecided until {sgd20} has 2 seeds"), said
    assert f"Export gap above 0.05 on a seed: {tuned}, {sgd5}" in said
    results[sgd20][1] = masked(0.03, 4.62)
    said = table.multiplier_choice(results)
    assert said.startswith(sgd20) and f"Eligible: {sgd20} (after mask: worst 4.610); {fast}" in said, said


def test_the_evidence_takes_the_lowest_learnt_mask_arm_of_any_kind_on_shared_seeds():
    def end(worst, stage="train"):
        held = {"a": {"loss": worst - 1.0}, "b": {"loss": worst}}
        return {stage: {"heldout": held, "heldout_meta": {"input_params": 1_000_000}}}

    def l0(worst):
        return {"mask": {"heldout": {}}, **end(worst)}

    results = {"t250_oneshot": {0: end(4.40), 1: end(4.30)},
               "t250_tuned_35": {0: l0(4.35), 1: l0(4.33)},
               "t250_projected_35": {0: l0(4.30), 1: l0(4.26), 2: l0(4.0)},  # seed 2: no one-shot to pair with
               "t250_sweep_x": {0: l0(3.0), 1: l0(3.0)},  # a sweep is no whole pipeline
               "t250_l0_15": {0: l0(4.1)}}  # one seed: not yet evidence
    mask = {"stage": "mask", "overrides": ["pruning.method=l0", "train.steps=88", "pruning.hardening_steps=8",
                                           "pruning.mask_lr=0.1"]}
    arms = {"t250_projected_35": [mask, {"stage": "train", "overrides": ["train.steps=162"]}]}
    (point,) = table.evidence(results, arms)["points"]
    assert point["l0_arm"] == "t250_projected_35" and point["seeds"] == [0, 1]
    # its mask phase for a run of any length: 88 of 250 steps, hardening 8 of those 88
    assert point["l0_recipe"] == {"share": 0.352, "overrides": [
        "pruning.method=l0", "pruning.hardening_steps=9% of the mask phase", "pruning.mask_lr=0.1"]}
    assert point["gap_worst"] == [pytest.approx(4.30 - 4.40), pytest.approx(4.26 - 4.30)]
    assert point["tokens_per_param"] == pytest.approx(250 * 2048 / 1_000_000, abs=1e-6)
