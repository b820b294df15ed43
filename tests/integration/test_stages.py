"""Learnt masks as two stages (pruning.mask_phase_steps): the same as the two runs made by hand, and a run
killed in either stage, or between them, resumes exactly."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from run_helpers import overrides, strip
from safetensors.torch import load_file
from tiny_models import save_tiny

from drpruning.config import ConfigError, load_config
from drpruning.report import write_report
from drpruning.training import stages
from drpruning.training.metrics import read_metrics
from drpruning.training.trainer import train

HELPERS = Path(__file__).resolve().parents[1] / "helpers"
L0 = ["pruning.enabled=true", "pruning.method=l0", "pruning.target.num_hidden_layers=2", "pruning.init=one_shot",
      "pruning.gates=deterministic", "pruning.hardening_steps=1", "pruning.mask_lr=0.1", "pruning.lagrangian_lr=0.1"]
COMMON = {"train.steps": 8, "mixing.method": "drpruning", "train.distill.weight": 0.5}


@pytest.fixture
def model_dir(tmp_path):
    return save_tiny(tmp_path / "model", "llama")


def pipeline(tmp_path: Path, model_dir: Path, *extra: str) -> list[str]:
    return overrides(tmp_path, model_dir, **COMMON) + L0 + ["pruning.mask_phase_steps=4", *extra]


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_two_stages_are_the_two_runs_made_by_hand(tmp_path, model_dir):
    out = stages.run(load_config(None, pipeline(tmp_path / "a", model_dir)))
    run = tmp_path / "a" / "run"
    assert out == run / "model" and (run / "pipeline.yaml").is_file()
    # by hand: the mask phase as its own l0 run of 4 steps, then the exported model trained for the other 4
    # with pruning off, distilled from the source
    mask = overrides(tmp_path / "b", model_dir, **{**COMMON, "train.steps": 4}) + L0
    mask_model = train(load_config(None, mask))
    compact = overrides(tmp_path / "c", mask_model, **{**COMMON, "train.steps": 4}) + [
        f"train.distill.teacher={model_dir}"]
    compact_model = train(load_config(None, compact))
    same_weights(run / "mask-phase" / "model", mask_model)
    same_weights(out, compact_model)
    assert strip(read_metrics(run / "mask-phase" / "metrics.jsonl")) == strip(
        read_metrics(tmp_path / "b" / "run" / "metrics.jsonl"))
    assert strip(read_metrics(run / "metrics.jsonl")) == strip(read_metrics(tmp_path / "c" / "run" / "metrics.jsonl"))
    assert load_config(str(run / "config.yaml"), []).model.source == str(run / "mask-phase" / "model")
    report = write_report([run]).read_text()  # both stages, the mask phase first
    assert report.index("## Run mask-phase") < report.index("## Run run") and (run / "report.md").is_file()


KILLER = """
import os, signal, sys
from drpruning.config import load_config
from drpruning.training import stages
from drpruning.training.trainer import Trainer

where, at = sys.argv[1], int(sys.argv[2])
save, finish = Trainer.save_checkpoint, Trainer.finish

def stage(self):
    return "mask" if self.run_dir.name == "mask-phase" else "compact"

def save_then_die(self):
    save(self)
    if stage(self) == where and self.step == at:
        os.kill(os.getpid(), signal.SIGKILL)

def finish_then_die(self):
    out = finish(self)
    if where == "between" and stage(self) == "mask":
        os.kill(os.getpid(), signal.SIGKILL)
    return out

Trainer.save_checkpoint, Trainer.finish = save_then_die, finish_then_die
stages.run(load_config(None, sys.argv[3:]))
"""


@pytest.mark.parametrize("where,at", [("mask", 2), ("between", 0), ("compact", 2)])
def test_a_run_killed_in_either_stage_or_between_resumes_exactly(tmp_path, model_dir, where, at):
    stages.run(load_config(None, pipeline(tmp_path / "a", model_dir)))
    broken = pipeline(tmp_path / "b", model_dir)
    env = {**os.environ, "PYTHONPATH": str(HELPERS)}
    proc = subprocess.run([sys.executable, "-c", KILLER, where, str(at), *broken], env=env, capture_output=True,
                          text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not (tmp_path / "b" / "run" / "model").exists()
    stages.run(load_config(None, broken + ["resume=true"]))
    a, b = tmp_path / "a" / "run", tmp_path / "b" / "run"
    for sub in ("mask-phase", "."):
        assert strip(read_metrics(b / sub / "metrics.jsonl")) == strip(read_metrics(a / sub / "metrics.jsonl"))
    same_weights(b / "model", a / "model")


def test_a_finished_stage_is_refused_without_resume_before_any_work(tmp_path, model_dir, monkeypatch):
    cfg = load_config(None, pipeline(tmp_path, model_dir))
    stages.run(cfg)
    monkeypatch.setattr(stages, "train", lambda cfg: pytest.fail("trained"))
    with pytest.raises(ConfigError, match="resume=true"):
        stages.run(cfg)
