"""Failing loudly and early: user errors exit 2 with one clear line, a diverged run stops or refuses to
export, resume never silently starts over, and what the project writes is readable by the user's group."""

import json
import math
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from run_helpers import overrides
from tiny_models import save_tiny

from drpruning.cli import main
from drpruning.config import ConfigError, load_config
from drpruning.training.metrics import read_metrics
from drpruning.training.trainer import Trainer, TrainingError

SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.fixture
def model_dir(tmp_path):
    return save_tiny(tmp_path / "model", "llama")


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.run([sys.executable, "-m", "drpruning", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_yaml_syntax_error_is_one_line_and_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    proc = run_cli("train", str(bad), f"run_dir={tmp_path / 'run'}")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "drpruning: error:" in proc.stderr and "bad.yaml" in proc.stderr and "YAML" in proc.stderr


def test_bad_yaml_in_an_override_names_it():
    with pytest.raises(ConfigError, match="train.betas"):
        load_config(None, ["run_dir=r", "train.betas=[0.9,"])


def test_eval_of_a_missing_folder_exits_2(tmp_path, capsys):
    assert main(["eval", "--model", str(tmp_path / "nowhere"), "--tasks", "copa"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("drpruning: error:") and "does not exist" in err


def test_eval_accepts_the_same_model_names_as_train(tmp_path, monkeypatch, capsys):
    """A known short name resolves (and is fetched on demand) for eval as for train and prune."""
    from drpruning.models import loading

    tiny = save_tiny(tmp_path / "tiny", "llama")
    fetched = []
    monkeypatch.setattr(loading, "fetch_model", lambda name, *a, **k: fetched.append(name) or tiny)
    text = tmp_path / "d.txt"
    text.write_text("some text to score " * 20)
    out = tmp_path / "res.json"
    assert main(["eval", "--model", "smollm2-135m", "--data", f"d={text}", "--seq-len", "16",
                 "--out", str(out)]) == 0
    assert set(fetched) == {"smollm2-135m"}  # resolved by name, fetched (here: a stand-in) on demand
    assert json.loads(out.read_text())["perplexity"]["domains"]["d"]["loss"] > 0
    assert main(["eval", "--model", "no-such-model-name", "--tasks", "copa"]) == 2


def test_eval_of_an_unknown_task_exits_2(tmp_path, capsys):
    save_tiny(tmp_path / "m", "llama")
    assert main(["eval", "--model", str(tmp_path / "m"), "--tasks", "no_such_task",
                 "--task-dir", str(tmp_path)]) == 2
    assert "no_such_task" in capsys.readouterr().err


def test_resume_true_without_a_checkpoint_is_refused(tmp_path, model_dir):
    with pytest.raises(ConfigError, match="nothing to resume.*resume=auto"):
        Trainer(load_config(None, overrides(tmp_path, model_dir) + ["resume=true"])).run()
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_resume_auto_starts_then_resumes(tmp_path, model_dir):
    ov = overrides(tmp_path, model_dir, **{"train.steps": 4}) + ["resume=auto"]
    Trainer(load_config(None, ov)).run()  # nothing there yet: starts
    first = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["kind"] for r in first].count("train") == 4
    (tmp_path / "run" / "model" / "config.json").unlink()
    Trainer(load_config(None, ov)).run()  # a checkpoint at step 4: resumes there, trains nothing more
    again = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["kind"] for r in again].count("train") == 4 and again[-1]["kind"] == "final"
    with pytest.raises(ConfigError, match="resume"):
        load_config(None, ["run_dir=r", "resume=sometimes"])


def _nan_at(monkeypatch, steps: set[int]) -> None:
    """Make the training loss non-finite at the given (0-based) steps, as a diverged forward would."""
    import drpruning.training.trainer as T

    real = T.token_losses
    state = {"trainer": None}
    original_step = T.Trainer.train_step

    def train_step(self):
        state["trainer"] = self
        return original_step(self)

    def token_losses(model, ids, *args):
        nll, kl = real(model, ids, *args)
        if model.training and state["trainer"] is not None and state["trainer"].step in steps:
            return nll * float("nan"), kl
        return nll, kl

    monkeypatch.setattr(T.Trainer, "train_step", train_step)
    monkeypatch.setattr(T, "token_losses", token_losses)


def test_a_non_finite_step_is_skipped_and_logged(tmp_path, model_dir, monkeypatch):
    _nan_at(monkeypatch, {2})
    trainer = Trainer(load_config(None, overrides(tmp_path, model_dir, **{"train.steps": 4})))
    before = {}

    original = trainer.train_step

    def spy():
        if trainer.step == 2:
            before.update({k: v.clone() for k, v in trainer.model.state_dict().items()})
            before["proportions"] = list(trainer.mixer.proportions)
            before["ema"] = list(trainer.mixer.train_ema)
        record = original()
        if trainer.step == 2:  # the bad step changed neither the weights nor the mixer
            after = trainer.model.state_dict()
            assert all(torch.equal(before[k], after[k]) for k in after)
            assert trainer.mixer.train_ema == before["ema"]
        return record

    trainer.train_step = spy
    trainer.run()
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    bad = [r for r in records if r["kind"] == "bad_step"]
    assert [r["step"] for r in bad] == [3] and "non-finite" in bad[0]["reason"]
    assert records[-1]["kind"] == "final"


def test_consecutive_bad_steps_stop_the_run_naming_the_last_checkpoint(tmp_path, model_dir, monkeypatch):
    _nan_at(monkeypatch, {3, 4, 5})
    ov = overrides(tmp_path, model_dir, **{"train.steps": 8})
    # steps 4-6 are bad; the step-4 checkpoint holds the weights of step 3 (a skipped step changes nothing)
    with pytest.raises(TrainingError, match=r"(?s)3 consecutive.*step 6.*step-4"):
        Trainer(load_config(None, ov)).run()
    assert not (tmp_path / "run" / "model").exists()


def test_a_diverged_run_is_not_exported_unless_forced(tmp_path, model_dir, capsys):
    # a model clearly better than uniform first, then lr=1000 ruins it
    base = overrides(tmp_path / "a", model_dir, **{"train.steps": 30, "train.lr": 5e-3,
                                                   "train.checkpoint_every": 30, "train.warmup_fraction": 0.0})
    good = Trainer(load_config(None, base)).run()
    first = read_metrics(tmp_path / "a" / "run" / "metrics.jsonl")
    assert max(r["mean_loss"] for r in first if r["kind"] == "eval" and r["step"] == 30) < 0.9 * math.log(128)
    broken = overrides(tmp_path / "b", good, **{"train.steps": 3, "train.lr": 1000, "train.eval_every": 1,
                                                "train.warmup_fraction": 0.0})
    assert main(["train", *broken]) == 2
    err = capsys.readouterr().err
    assert "drpruning: error:" in err and "force=true" in err
    assert not (tmp_path / "b" / "run" / "model").exists()
    assert main(["train", *broken, "resume=true", "force=true"]) == 0
    assert (tmp_path / "b" / "run" / "model" / "config.json").is_file()


def test_loss_spike_is_a_warning_record(tmp_path, model_dir, monkeypatch):
    import drpruning.training.trainer as T

    real = T.token_losses
    calls = {"n": 0}

    def token_losses(model, ids, *args):
        nll, kl = real(model, ids, *args)
        if model.training:
            calls["n"] += 1
            if calls["n"] in (2 * 7 - 1, 2 * 7):  # both micro-batches of step 7: +3 nats on every token
                return nll + 3.0, kl
        return nll, kl

    monkeypatch.setattr(T, "token_losses", token_losses)
    Trainer(load_config(None, overrides(tmp_path, model_dir, **{"train.steps": 8}))).run()
    warnings = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "warning"]
    assert [w["step"] for w in warnings] == [7] and "spike" in warnings[0]["message"]


def test_written_files_follow_the_umask(tmp_path, model_dir):
    old = os.umask(0o022)
    try:
        ov = overrides(tmp_path, model_dir, **{"train.steps": 2})
        ov += ["pruning.enabled=true", "pruning.method=l0", "pruning.target.num_hidden_layers=2"]
        Trainer(load_config(None, ov)).run()
    finally:
        os.umask(old)
    run = tmp_path / "run"
    files = [p for p in run.rglob("*") if p.is_file()] + [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert any(p.name == "model.safetensors" for p in files) and any(p.suffix == ".safetensors" for p in files)
    modes = {str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode) for p in files}
    assert {k: oct(m) for k, m in modes.items() if m != 0o644} == {}

