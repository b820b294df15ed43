"""The training loop: per-domain loss accounting, run directory, exact resume after SIGKILL."""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from run_helpers import overrides, strip
from tiny_models import save_tiny
from transformers import AutoModelForCausalLM

from drpruning.config import ConfigError, load_config
from drpruning.data.sampler import MixtureSampler
from drpruning.pruning import Pruner, attach, export_run
from drpruning.pruning.importance import calibrate
from drpruning.pruning.summary import shape_summary
from drpruning.training import health
from drpruning.training.checkpoint import CheckpointError
from drpruning.training.metrics import read_metrics
from drpruning.training.trainer import Trainer

HELPERS = Path(__file__).resolve().parents[1] / "helpers"


@pytest.fixture
def model_dir(tmp_path):
    return save_tiny(tmp_path / "model", "llama")


def test_per_domain_losses_match_direct_computation(tmp_path, model_dir):
    trainer = Trainer(load_config(None, overrides(tmp_path, model_dir)))
    # what the sampler will draw, replayed from its state
    replay = MixtureSampler([len(x) for x in trainer.corpus.train], seed=0)
    replay.load_state_dict(trainer.sampler.state_dict())
    batch = replay.next_batch(trainer.mixer.proportions, 4)
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    expected = {}
    with torch.no_grad():
        for d, i in batch:
            ids = trainer.corpus.train[d][i][None]
            # Hugging Face's own mean next-token loss of one sequence
            loss = reference(input_ids=ids, labels=ids).loss.item()
            expected.setdefault(d, []).append(loss)
    record = trainer.train_step()
    for d, name in enumerate(trainer.names):
        got = record["domain_loss"][name]
        if d in expected:
            assert got == pytest.approx(sum(expected[d]) / len(expected[d]), rel=1e-5)
        else:
            assert got != got  # nan: absent from the batch
    every = [x for v in expected.values() for x in v]
    assert record["loss"] == pytest.approx(sum(every) / len(every), rel=1e-5)
    assert sum(record["domain_tokens"].values()) == 4 * 32


@pytest.mark.parametrize("limit", [1, 2])
def test_eval_limit_evaluates_the_first_held_out_sequences(tmp_path, model_dir, limit):
    trainer = Trainer(load_config(None, overrides(tmp_path, model_dir, **{"train.eval_limit": limit})))
    assert all(len(e) == 3 for e in trainer.corpus.eval)  # the split keeps data.eval_sequences
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():  # every sequence has seq_len tokens: the domain loss is the mean of HF's losses
        expected = [sum(reference(input_ids=s[None], labels=s[None]).loss.item() for s in e[:limit]) / limit
                    for e in trainer.corpus.eval]
    assert trainer.evaluate() == pytest.approx(expected, rel=1e-5)


def test_a_run_from_an_exported_model_reads_on_in_its_data(tmp_path, model_dir):
    first = Trainer(load_config(None, overrides(tmp_path, model_dir, **{"train.steps": 3})))
    exported = first.run()
    continued = Trainer(load_config(None, overrides(tmp_path / "second", exported)))
    assert continued.sampler.position == first.sampler.position and any(first.sampler.position)
    assert continued.sampler.epoch == first.sampler.epoch
    fresh = Trainer(load_config(None, overrides(tmp_path / "third", exported, **{"train.seed": 1})))
    assert fresh.sampler.position == [0] * len(fresh.names)  # another seed: another permutation, read afresh


def test_run_directory_layout(tmp_path, model_dir):
    out = Trainer(load_config(None, overrides(tmp_path, model_dir))).run()
    run = tmp_path / "run"
    assert (run / "config.yaml").is_file()
    records = read_metrics(run / "metrics.jsonl")
    kinds = [r["kind"] for r in records]
    assert kinds.count("train") == 6 and kinds.count("eval") == 4 and kinds.count("mix") == 3
    assert kinds[-1] == "final"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-4", "step-6"]
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 3
    train = [r for r in records if r["kind"] == "train"]
    assert set(train[0]["domain_loss"]) == {"alpha", "beta", "gamma"}
    assert train[-1]["tokens"] == 6 * 4 * 32


def test_existing_run_without_resume_is_refused(tmp_path, model_dir):
    Trainer(load_config(None, overrides(tmp_path, model_dir, **{"train.steps": 2}))).run()
    with pytest.raises(ConfigError, match="resume=true"):
        Trainer(load_config(None, overrides(tmp_path / "again", model_dir, run_dir=str(tmp_path / "run"))))


def test_sequence_longer_than_context_is_refused(tmp_path, model_dir):
    with pytest.raises(ConfigError, match="context"):
        Trainer(load_config(None, overrides(tmp_path, model_dir, **{"data.seq_len": 4096})))


KILLER = """
import os, signal, sys
from drpruning.config import load_config
from drpruning.training import health
from drpruning.training.trainer import Trainer

health.SPIKE_NATS = float(os.environ["SPIKE_NATS"])

kill_at = int(sys.argv[1])
original = Trainer.save_checkpoint

def save_then_die(self):
    original(self)
    if self.step == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)

Trainer.save_checkpoint = save_then_die
Trainer(load_config(None, sys.argv[2:])).run()
"""


NEW_OPTIONS = ["pruning.enabled=true", "pruning.method=l0", "pruning.target.num_hidden_layers=2",
               "pruning.target.intermediate_size=32", "pruning.init=one_shot", "pruning.protect={hidden: [3]}",
               "pruning.mask_schedule=constant",
               "train.distill.weight=0.5", "train.distill.temperature=2.0", "mixing.outlier_nats=0.5",
               "train.activation_checkpointing=true", "log.tensorboard=true", "pruning.mask_samples=sequence",
               "pruning.lagrangian_optimizer=sgd", "pruning.lagrangian_lr=5.0"]


DETERMINISTIC = ["pruning.enabled=true", "pruning.method=l0", "pruning.target.num_hidden_layers=2",
                 "pruning.gates=deterministic", "pruning.init=one_shot", "pruning.hardening_steps=2",
                 "pruning.constraint=projected", "pruning.log_alpha_bound=temperature",
                 "train.distill.weight=0.5"]


ONE_SHOT = ["pruning.enabled=true", "pruning.method=importance", "pruning.target.num_hidden_layers=2",
            "train.distill.weight=0.5"]


@pytest.mark.parametrize("method,extra", [
    ("constant", []), ("drpruning", []), ("drpruning", NEW_OPTIONS),
    pytest.param("constant", ONE_SHOT, marks=pytest.mark.slow),  # in the slow tier: the default suite's 3 minutes
    pytest.param("constant", DETERMINISTIC, marks=pytest.mark.slow),
], ids=["constant", "drpruning", "drpruning-prune-importance-distill", "one-shot-distill", "deterministic-gates"])
def test_resume_after_sigkill_is_exact(tmp_path, model_dir, monkeypatch, method, extra):
    # a loss-spike threshold below any rise: every step after the first 5 writes a `warning` record holding the
    # guard's running loss average, so a guard that restarted on resume would change records
    spike = -100.0
    monkeypatch.setattr(health, "SPIKE_NATS", spike)
    common = {"train.steps": 8, "mixing.method": method, "train.dtype": "bfloat16"}
    whole = overrides(tmp_path / "a", model_dir, **common) + extra
    Trainer(load_config(None, whole)).run()
    expected = strip(read_metrics(tmp_path / "a" / "run" / "metrics.jsonl"))
    assert [r["step"] for r in expected if r["kind"] == "warning"] == [6, 7, 8]

    broken = overrides(tmp_path / "b", model_dir, **common) + extra
    env = {**os.environ, "PYTHONPATH": str(HELPERS), "SPIKE_NATS": str(spike)}
    proc = subprocess.run([sys.executable, "-c", KILLER, "6", *broken], env=env, capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    run_b = tmp_path / "b" / "run"
    assert not (run_b / "model").exists()
    # the newest checkpoint is damaged too: resume must refuse it and use step 4
    victim = run_b / "checkpoints" / "step-6" / "model.safetensors"
    victim.write_bytes(victim.read_bytes()[:100])
    Trainer(load_config(None, broken + ["resume=true"])).run()
    records = read_metrics(run_b / "metrics.jsonl")
    assert strip(records) == expected
    # wall time goes on from the checkpoint's (step 4), not from zero: plots against time stay whole
    elapsed = [r["elapsed_s"] for r in records if r["kind"] == "train"]
    assert len(elapsed) == 8 and elapsed == sorted(elapsed), elapsed


def _as_format_1(folder: Path) -> None:
    """Rewrite a checkpoint's state.pt as drpruning 0.1.0 wrote it (lists, proportions twice, no format key)."""
    state = torch.load(folder / "state.pt", weights_only=True)
    del state["format"]
    names = ("weights", "masks")
    state["optimizers"] = [state["optimizers"].get(n) for n in names if n in state["schedulers"]]
    state["schedulers"] = [state["schedulers"][n] for n in names if n in state["schedulers"]]
    state["proportions"] = state["mixer"]["proportions"]
    torch.save(state, folder / "state.pt")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["state.pt"] = (folder / "state.pt").stat().st_size
    (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("pruning", [False, True], ids=["train", "prune"])
def test_run_directory_of_the_previous_format_resumes_exactly(tmp_path, model_dir, pruning):
    extra = ["pruning.enabled=true", "pruning.method=l0", "pruning.target.num_hidden_layers=2"] if pruning else []
    common = {"mixing.method": "drpruning", "train.keep_checkpoints": 3}
    Trainer(load_config(None, overrides(tmp_path / "a", model_dir, **common) + extra)).run()
    expected = strip(read_metrics(tmp_path / "a" / "run" / "metrics.jsonl"))
    old = overrides(tmp_path / "b", model_dir, **common) + extra
    Trainer(load_config(None, old)).run()
    run = tmp_path / "b" / "run"
    shutil.rmtree(run / "checkpoints" / "step-6")
    shutil.rmtree(run / "model")
    _as_format_1(run / "checkpoints" / "step-4")
    Trainer(load_config(None, old + ["resume=true"])).run()
    assert strip(read_metrics(run / "metrics.jsonl")) == expected


def test_checkpoint_of_an_unknown_format_is_refused_with_its_version(tmp_path, model_dir):
    ov = overrides(tmp_path, model_dir, **{"train.steps": 2})
    Trainer(load_config(None, ov)).run()
    folder = tmp_path / "run" / "checkpoints" / "step-2"
    state = torch.load(folder / "state.pt", weights_only=True)
    torch.save({**state, "format": 99}, folder / "state.pt")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["state.pt"] = (folder / "state.pt").stat().st_size
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="checkpoint format 99.*start a new run_dir"):
        Trainer(load_config(None, ov + ["resume=true"])).run()


def test_distillation_logs_kl_and_starts_at_zero_against_itself(tmp_path, model_dir):
    """The default teacher is the source model, so before the first update the KL is 0 up to rounding."""
    ov = overrides(tmp_path, model_dir, **{"train.steps": 3, "train.distill.weight": 0.5})
    Trainer(load_config(None, ov)).run()
    train = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "train"]
    first = [v for v in train[0]["domain_kl"].values() if v is not None]
    assert first and max(abs(v) for v in first) < 1e-5
    later = [v for v in train[-1]["domain_kl"].values() if v is not None]
    assert max(later) > 1e-4  # the student moved away from its teacher
    with pytest.raises(ConfigError, match="train.distill.weight"):
        load_config(None, ov + ["train.distill.weight=2"])


def before_each_step(trainer: Trainer, take) -> dict:
    """{step: take()} recorded before every training step of `trainer`."""
    seen, original = {}, trainer.train_step

    def spy():
        seen[trainer.step] = take()
        return original()

    trainer.train_step = spy
    return seen


def test_hardening_trains_weights_under_the_exact_masks(tmp_path, model_dir):
    ov = overrides(tmp_path, model_dir, **{"train.steps": 6, "train.eval_every": 1}) + [
        "pruning.enabled=true", "pruning.method=l0", "pruning.target.num_hidden_layers=2",
        "pruning.target.intermediate_size=32",
        "pruning.hardening_steps=3"]
    trainer = Trainer(load_config(None, ov))
    seen = before_each_step(trainer, lambda: {k: v.detach().clone() for k, v in trainer.pruner.log_alpha.items()})
    trainer.run()
    for step in (4, 5):  # hardening (steps 4-6): the masks no longer move
        assert all(torch.equal(seen[3][s], seen[step][s]) for s in seen[3])
    assert not all(torch.equal(seen[0][s], seen[3][s]) for s in seen[0])
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    train = [r for r in records if r["kind"] == "train"]
    assert all("lagrangian" in r for r in train[:3]) and not any("lagrangian" in r for r in train[3:])
    evals = [r for r in records if r["kind"] == "eval" and r["step"] >= 4]
    assert all(r["shape"]["num_hidden_layers"] == 2 for r in evals)  # evaluated at the exact shape
    assert evals[-1]["mean_loss"] < evals[0]["mean_loss"] + 0.5  # training went on under the exact masks


def test_learnt_masks_are_evaluated_where_hardening_starts(tmp_path, model_dir):
    """The last learnt (expected-size) masks get an evaluation of their own, the base of the export gap, even
    when it falls between two `eval_every` steps."""
    ov = overrides(tmp_path, model_dir, **{"train.steps": 6, "train.eval_every": 4}) + [
        "pruning.enabled=true", "pruning.method=l0", "pruning.target.num_hidden_layers=2", "pruning.hardening_steps=3"]
    trainer = Trainer(load_config(None, ov))
    trainer.run()
    evals = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 3, 4, 6]
    trainer.pruner.harden(False)  # the masks have not moved since step 3: its evaluation used these
    expected, exact = (shape_summary(trainer.pruner, exact=e) for e in (False, True))
    assert expected != exact  # the ramp's one step leaves the expected size above the target
    assert evals[1]["shape"] == json.loads(json.dumps(expected)) and evals[2]["shape"] == json.loads(json.dumps(exact))
    # the export gap: the exact masks' last evaluation against the learnt masks' (hardening trains in between)
    final = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "final"][-1]
    assert final["export_gap"] == pytest.approx(evals[3]["mean_loss"] - evals[1]["mean_loss"], abs=1e-12)


def test_a_large_export_gap_is_a_warning(tmp_path, model_dir, monkeypatch, caplog):
    monkeypatch.setattr(health, "EXPORT_GAP_NATS", -100.0)  # any gap is above it
    ov = overrides(tmp_path, model_dir, **{"train.steps": 3, "train.eval_every": 4}) + [
        "pruning.enabled=true", "pruning.method=l0", "pruning.target.num_hidden_layers=2", "pruning.hardening_steps=1"]
    with caplog.at_level(logging.WARNING, logger=health.__name__):
        Trainer(load_config(None, ov)).run()
    assert any("export gap" in r.getMessage() and "at step 2" in r.getMessage() for r in caplog.records)


def test_one_shot_cuts_at_step_zero_and_trains_the_compact_model(tmp_path, model_dir):
    ov = overrides(tmp_path, model_dir, **{"train.steps": 4, "train.eval_every": 2}) + [
        "pruning.enabled=true", "pruning.method=importance", "pruning.target.num_hidden_layers=2",
        "pruning.target.intermediate_size=32", "train.distill.weight=0.5"]
    cfg = load_config(None, ov)
    trainer = Trainer(cfg)
    assert trainer.pruner is None and trainer.teacher is not None
    cut = tmp_path / "run" / "cut"
    compact = AutoModelForCausalLM.from_pretrained(cut).config
    assert (compact.num_hidden_layers, compact.intermediate_size) == (2, 32)
    # the trained model is the compact one, and the teacher is the whole source, not a second copy of it
    assert sum(p.numel() for p in trainer.model.parameters()) == \
        sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(cut).parameters())
    source = AutoModelForCausalLM.from_pretrained(model_dir)
    assert sum(p.numel() for p in trainer.teacher.parameters()) == sum(p.numel() for p in source.parameters())
    # the cut is the exact-mask model of an independently calibrated pruner, sliced
    pruner = Pruner(source.config, cfg.pruning, 4)
    calibrate(pruner, source, trainer.corpus.train, cfg.train.micro_batch_size)
    ids = trainer.corpus.eval[0][:2]
    attach(source, pruner)
    pruner.eval(exact=True)
    with torch.no_grad():
        expected = source(input_ids=ids).logits
        got = AutoModelForCausalLM.from_pretrained(cut)(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)

    out = trainer.run()
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["kind"] for r in records][:2] == ["calibration", "eval"]
    assert not any("lagrangian" in r for r in records if r["kind"] == "train")
    evals = [r for r in records if r["kind"] == "eval" and r["step"] > 0]
    assert all(r["shape"]["num_hidden_layers"] == 2 and r["shape"]["intermediate_size"] == 32 for r in evals)
    config = AutoModelForCausalLM.from_pretrained(out).config
    assert (config.num_hidden_layers, config.intermediate_size) == (2, 32)
    # `drpruning export` of a one-shot checkpoint: the compact model of that step
    exported = export_run(tmp_path / "run", "step-4", tmp_path / "exported")
    for a, b in zip(AutoModelForCausalLM.from_pretrained(exported).parameters(),
                    AutoModelForCausalLM.from_pretrained(out).parameters(), strict=True):
        assert torch.equal(a, b)
