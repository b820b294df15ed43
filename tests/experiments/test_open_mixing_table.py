"""The mixing study's derived columns on results written out by hand: paired differences, their t-interval,
the largest per-domain repetition, and downstream differences paired by item."""

import math
import sys
from pathlib import Path

import pytest
from study_tables import load_table

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "experiments"))
mixing_table = load_table(ROOT / "experiments" / "open_mixing" / "table.py", "open_mixing_table")


def unit(losses, read=None, train_tokens=None):
    held = {d: {"loss": v, "stderr": 0.1} for d, v in losses.items()}
    records = [{"kind": "train", "step": 500, "domain_tokens": read or {}, "proportions": {}}]
    return {"train": {"heldout": held, "records": records, "heldout_meta": {"train_tokens": train_tokens}}}


RESULTS = {
    "constant": {0: unit({"a": 3.0, "b": 4.0}), 1: unit({"a": 3.1, "b": 4.2}), 2: unit({"a": 2.9, "b": 4.1})},
    "drpruning": {0: unit({"a": 3.1, "b": 3.8}), 1: unit({"a": 3.2, "b": 3.9}), 2: unit({"a": 3.0, "b": 4.0},
                                                                                   {"a": 512, "b": 2560},
                                                                                   {"a": 1024, "b": 1280})},
}


def test_paired_differences_by_seed_with_a_t_interval():
    (row,) = mixing_table.paired_rows(RESULTS)
    assert row[:2] == ["drpruning - constant", "0,1,2"]
    worst = [3.8 - 4.0, 3.9 - 4.2, 4.0 - 4.1]  # the worst domain is b in every run
    assert row[5] == f"{sum(worst) / 3:.3f} [{min(worst):.3f}, {max(worst):.3f}]"
    half = 4.302653 * (sum((w - sum(worst) / 3) ** 2 for w in worst) / 2) ** 0.5 / math.sqrt(3)  # t(0.975, 2)
    assert row[6] == f"{sum(worst) / 3:+.3f} ± {half:.3f}"
    assert row[7] == "3/3"
    assert row[4] == "2/3"  # mean loss per seed: 3.45 < 3.5, 3.55 < 3.65, 3.5 = 3.5


def test_largest_repetition_is_tokens_read_over_training_tokens():
    ratio, where = mixing_table.repetition(RESULTS)
    assert ratio == pytest.approx(2560 / 1280) and where == "b, drpruning seed 2"


def test_downstream_difference_is_paired_by_item_over_the_items_both_scored():
    found = {
        ("drpruning", 0): {"copa": {"correct": [1, 1, 0, 1]}},
        ("constant", 0): {"copa": {"correct": [0, 1, 0, 0]}},
        ("drpruning", 1): {"copa": {"correct": [1, 0, 1, 1]}},
        ("constant", 1): {"copa": {"correct": [1, 1]}},  # scored fewer items: only the first two pair
    }
    diffs = [1, 0, 0, 1, 0, -1]
    mean = sum(diffs) / 6
    se = (sum((x - mean) ** 2 for x in diffs) / 5) ** 0.5 / math.sqrt(6)
    assert mixing_table.item_difference(found, "copa", "constant") == f"{mean:+.3f} ± {se:.3f} (n 6)"
    assert mixing_table.item_difference(found, "copa", "uniform") == "-"


def test_task_rows_average_accuracy_over_seeds_and_skip_the_timing_entry():
    found = {
        ("drpruning", 0): {"copa": {"acc": 0.75, "n": 4, "correct": [1, 1, 0, 1]}, "wall_s": 12.5},
        ("drpruning", 1): {"copa": {"acc": 0.25, "n": 4, "correct": [0, 0, 0, 1]}, "wall_s": 11.0},
        ("constant", 0): {"copa": {"acc": 0.5, "n": 4, "correct": [0, 1, 0, 1]}, "wall_s": 9.0},
        ("uniform", 0): None,  # not finished
    }
    [row] = mixing_table.task_rows(found)
    assert row[:5] == ["copa", "0.500 (n 4)", "-", "-", "0.500 (n 4)"]
    assert row[5] == "+0.250 ± 0.250 (n 4)"  # seed 0 pairs only: differences 1, 0, 0, 0
    assert row[6:] == ["-", "-"]
