"""The trainer's log sinks: a missing package stops the run before the model is read; a run with
log.tensorboard=true has its evaluations in TensorBoard as in metrics.jsonl."""

import sys

import pytest
from run_helpers import overrides
from tiny_models import save_tiny

from drpruning.config import ConfigError, load_config
from drpruning.training.metrics import read_metrics
from drpruning.training.trainer import Trainer


def test_missing_tensorboard_is_refused_before_the_model_is_read(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    # the model folder does not exist: the sinks' check comes first
    cfg = load_config(None, overrides(tmp_path, tmp_path / "no-model", **{"log.tensorboard": "true"}))
    with pytest.raises(ConfigError, match="pip install tensorboard"):
        Trainer(cfg)


def test_a_run_logs_its_evaluations_to_tensorboard(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator
    from tensorboard.util import tensor_util

    model_dir = save_tiny(tmp_path / "model", "llama")
    ov = overrides(tmp_path, model_dir, **{"train.steps": 2, "log.tensorboard": "true"})
    Trainer(load_config(None, ov)).run()
    run = tmp_path / "run"
    evals = [r for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 2]
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    for name in ("alpha", "beta", "gamma"):
        got = [(e.step, tensor_util.make_ndarray(e.tensor_proto).item())
               for e in events.Tensors(f"eval/eval_loss/{name}")]
        assert got == [(r["step"], pytest.approx(r["eval_loss"][name], rel=1e-6)) for r in evals]
