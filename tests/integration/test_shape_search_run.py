"""A pruning run with a parameter budget searches its shape, prunes to the winner, keeps it across a resume and
exports a folder with a model card."""

import json

from run_helpers import overrides
from tiny_models import save_tiny
from transformers import AutoConfig

from drpruning.cli import main
from drpruning.config import load_config
from drpruning.models import shape_search
from drpruning.models.shape import parameter_count
from drpruning.report import write_report
from drpruning.training.trainer import Trainer


def test_a_budget_run_prunes_to_the_searched_shape_and_documents_it(tmp_path, monkeypatch):
    model_dir = save_tiny(tmp_path / "model", "qwen2")
    budget = int(0.6 * parameter_count(AutoConfig.from_pretrained(model_dir)))
    ov = overrides(tmp_path, model_dir, **{"train.steps": 4, "train.checkpoint_every": 2,
                                           "pruning.enabled": "true", "pruning.method": "importance",
                                           "pruning.target_params": budget})
    out = Trainer(load_config(None, ov)).run()
    run = tmp_path / "run"
    winner = json.loads((run / "shapes.json").read_text())["winner"]
    exported = AutoConfig.from_pretrained(out)
    assert {k: getattr(exported, k) for k in winner} == winner
    saved = load_config(run / "config.yaml", [])  # what `drpruning export` rebuilds the run from
    assert saved.pruning.target == {k: v for k, v in winner.items() if k != "head_dim"}
    card = (out / "README.md").read_text()
    assert str(model_dir) in card and f"| num_hidden_layers | 3 | {winner['num_hidden_layers']} |" in card
    assert "shapes within 2%" in card and "| worst |" in card

    report = write_report([run]).read_text()
    assert "### Shape search" in report and report.count("| proportional |") == 1
    assert main(["export", str(run), "--checkpoint", "step-2", "--out", str(tmp_path / "early")]) == 0
    assert "at step 2." in (tmp_path / "early" / "README.md").read_text()


    # resumed, the run keeps the recorded winner: the search does not run again
    def fail(*args, **kwargs):
        raise AssertionError("the search ran again on a resumed run")

    monkeypatch.setattr(shape_search, "score_shapes", fail)
    out = Trainer(load_config(None, [*ov, "train.steps=6", "resume=true"])).run()
    exported = AutoConfig.from_pretrained(out)
    assert {k: getattr(exported, k) for k in winner} == winner
