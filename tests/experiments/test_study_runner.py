"""The shared study runner (experiments/runner.py) and its table helpers, on a tiny model and tiny domains."""

import json
import sys
from pathlib import Path

import pytest
from run_helpers import make_domains
from tiny_models import save_tiny

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "experiments"))

import runner  # noqa: E402
import tables  # noqa: E402


@pytest.fixture
def study(tmp_path, monkeypatch):
    model = save_tiny(tmp_path / "model", "llama")
    domains = make_domains(tmp_path / "data")
    folder = tmp_path / "tiny_study"
    folder.mkdir()
    (folder / "base.yaml").write_text(json.dumps({
        "data": {"domains": domains, "seq_len": 32, "eval_sequences": 3, "cache_dir": str(tmp_path / "cache")},
        "train": {"batch_size": 4, "micro_batch_size": 2, "dtype": "float32", "eval_every": 2,
                  "checkpoint_every": 2, "lr": 1e-3, "eval_batch_size": 2, "distill": {"weight": 0.5}},
        "mixing": {"method": "drpruning"},
        # the target is set per arm, as a study of shapes does: the base alone does not validate
        "pruning": {"enabled": True, "method": "importance"}}))
    # the l0 arm's second stage starts from its own config, as a study of the demo's two configs does
    (folder / "cpt.yaml").write_text(json.dumps({
        "data": {"domains": domains, "seq_len": 32, "eval_sequences": 3, "cache_dir": str(tmp_path / "cache")},
        "train": {"batch_size": 4, "micro_batch_size": 2, "dtype": "float32", "eval_every": 2, "lr": 3e-4,
                  "checkpoint_every": 2, "eval_batch_size": 2}}))
    (folder / "tasks").mkdir()
    items = [{"query": f"the {w} is", "gold": i % 2, "choices": [" here", " there"]}
             for i, w in enumerate(["cat", "dog", "sun", "sea", "tree"])]
    (folder / "tasks" / "tiny_choice.jsonl").write_text("".join(json.dumps(x) + "\n" for x in items))
    (folder / "study.yaml").write_text(json.dumps({
        "base": "base.yaml", "source": str(model), "seeds": [0],
        "tasks": {"dir": "tasks", "names": ["tiny_choice"], "items": 3, "items_for": {"oneshot": 5}},
        "arms": {"oneshot": [{"stage": "train", "overrides": ["train.steps=4", "pruning.target.num_hidden_layers=2"]}],
                 "l0": [{"stage": "mask", "overrides": ["pruning.method=l0", "train.steps=4",
                                                         "pruning.target.num_hidden_layers=2",
                                                         "pruning.lagrangian_warmup_steps=2"]},
                        {"stage": "train", "config": "cpt.yaml", "overrides": ["train.steps=2"]}]}}))
    monkeypatch.setattr(runner, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(runner, "set_threads", lambda: None)  # the test process keeps its threads
    return runner.load_study(folder)


def test_a_study_runs_keeps_its_results_and_skips_what_is_finished(study, monkeypatch):
    runner.run(study, None, None)
    results = tables.all_results(study)
    assert set(results) == {"oneshot", "l0"}
    l0 = results["l0"][0]
    assert list(l0) == ["mask", "train"]
    # the mask stage trained the whole source under masks; the train stage the compact model it exported
    assert l0["mask"]["heldout_meta"]["input_params"] > l0["mask"]["heldout_meta"]["params"]
    assert l0["train"]["heldout_meta"]["input_params"] == l0["train"]["heldout_meta"]["params"]
    assert [r["step"] for r in l0["train"]["records"] if r["kind"] == "train"] == [1, 2]
    assert "lr: 0.0003" in (runner.RUNS / "tiny_study" / "l0" / "seed-0" / "train" / "config.yaml").read_text()
    held = l0["train"]["heldout"]
    assert set(held) == {"alpha", "beta", "gamma"}
    s = tables.summary(held)
    losses = [d["loss"] for d in held.values()]
    assert s == {"mean": sum(losses) / 3, "worst": max(losses), "spread": max(losses) - min(losses)}

    # downstream: the last model of each unit on the first `items` items (5 for oneshot), kept with the results
    for arm, n in (("oneshot", 5), ("l0", 3)):
        scored = json.loads((runner.results_dir(study, arm, 0) / "tasks.json").read_text())["tiny_choice"]
        assert scored["n"] == n and len(scored["correct"]) == n
        assert scored["acc"] == sum(scored["correct"]) / n

    def fail(*args):
        raise AssertionError("a finished unit ran again")

    monkeypatch.setattr(runner, "run_unit", fail)
    runner.run(study, None, None)


def test_mean_and_range_over_seeds():
    assert tables.pm([1.0, 2.0, 4.0]) == "2.333 [1.000, 4.000]"
    assert tables.pm([None, 1.5]) == "1.500"
    assert tables.pm([]) == "-"


def test_an_arm_can_have_its_own_seeds(tmp_path):
    folder = tmp_path / "study"
    folder.mkdir()
    spec = {"base": "base.yaml", "source": "m", "seeds": [0, 1], "seeds_for": {"a": [0, 1, 2]},
            "arms": {"a": [{"stage": "train"}], "b": [{"stage": "train"}]}}
    (folder / "study.yaml").write_text(json.dumps(spec))
    loaded = runner.load_study(folder)
    # seed by seed; the third seed only for the arm that has it; --seeds runs those seeds for every listed arm
    assert runner.units(loaded, None, None) == [("a", 0), ("b", 0), ("a", 1), ("b", 1), ("a", 2)]
    assert runner.units(loaded, ["b"], None) == [("b", 0), ("b", 1)]
    assert runner.units(loaded, None, [2]) == [("a", 2), ("b", 2)]
    assert tables.status_lines(loaded, {"a": {2: {}}})[-1] == "- a seed 2: finished"
    (folder / "study.yaml").write_text(json.dumps({**spec, "seeds_for": {"c": [0]}}))
    with pytest.raises(SystemExit, match=r"seeds_for names arms it does not have: \['c'\]"):
        runner.load_study(folder)


def test_a_stage_with_the_config_of_a_finished_one_is_copied_not_run_again(study, monkeypatch):
    import drpruning.training.trainer as trainer

    # l0's mask stage, then a longer second stage; and the same mask stage on another seed
    study["arms"]["l0_long"] = [study["arms"]["l0"][0], {"stage": "train", "config": "cpt.yaml",
                                                          "overrides": ["train.steps=3"]}]
    study["seeds_for"] = {"l0_long": [0, 1]}
    runner.run(study, ["l0"], None)
    # written before a config key was added: the key's default stands in for it
    saved = runner.RUNS / "tiny_study" / "l0" / "seed-0" / "mask" / "config.yaml"
    saved.write_text(saved.read_text().replace("  mask_phase_steps: 0\n", ""))
    ran = []
    real_train = trainer.train
    monkeypatch.setattr(trainer, "train", lambda cfg: ran.append(cfg.run_dir) or real_train(cfg))
    runner.run(study, ["l0_long"], None)
    units = runner.RUNS / "tiny_study"
    assert ran == [str(units / "l0_long" / "seed-0" / "train"),
                   str(units / "l0_long" / "seed-1" / "mask"), str(units / "l0_long" / "seed-1" / "train")]
    results = tables.all_results(study)
    first, copied, other_seed = results["l0"][0], results["l0_long"][0], results["l0_long"][1]
    assert copied["mask"]["records"] == first["mask"]["records"]
    # evaluated again from the copied model: the same losses as the original's
    assert copied["mask"]["heldout"] == first["mask"]["heldout"]
    assert other_seed["mask"]["heldout"] != first["mask"]["heldout"]
    assert [r["step"] for r in copied["train"]["records"] if r["kind"] == "train"] == [1, 2, 3]
    saved = (units / "l0_long" / "seed-0" / "mask" / "config.yaml").read_text()
    assert f"run_dir: {units / 'l0_long' / 'seed-0' / 'mask'}" in saved
