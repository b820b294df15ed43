"""`drpruning export RUN_DIR`: the compact model from a pruning run's checkpoint."""

import pytest
import torch
from run_helpers import overrides
from tiny_models import save_tiny
from transformers import AutoModelForCausalLM

from drpruning.cli import main
from drpruning.config import ConfigError, load_config
from drpruning.training.trainer import Trainer

TARGET = ["pruning.enabled=true", "pruning.method=l0", "pruning.target.num_hidden_layers=2",
          "pruning.target.hidden_size=24", "pruning.target.intermediate_size=32",
          "pruning.target.num_attention_heads=2", "pruning.target.num_key_value_heads=1"]


def test_export_from_checkpoint_equals_final_model(tmp_path):
    model_dir = save_tiny(tmp_path / "model", "llama")
    ov = overrides(tmp_path, model_dir, **{"train.steps": 4, "train.checkpoint_every": 2}) + TARGET
    final = Trainer(load_config(None, ov)).run()
    run = tmp_path / "run"
    assert main(["export", str(run), "--checkpoint", "step-4", "--out", str(tmp_path / "again")]) == 0
    a = AutoModelForCausalLM.from_pretrained(final).eval()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "again").eval()
    ids = torch.randint(4, 100, (2, 16))
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)
    # an earlier checkpoint gives the same shape but other weights
    assert main(["export", str(run), "--checkpoint", "step-2", "--out", str(tmp_path / "early")]) == 0
    c = AutoModelForCausalLM.from_pretrained(tmp_path / "early")
    assert c.config.hidden_size == 24 and c.config.num_hidden_layers == 2


def test_export_refuses_bad_input(tmp_path):
    with pytest.raises(ConfigError, match="no config.yaml"):
        from drpruning.pruning.export import export_run

        export_run(tmp_path)
    model_dir = save_tiny(tmp_path / "model", "llama")
    Trainer(load_config(None, overrides(tmp_path, model_dir, **{"train.steps": 2}))).run()
    assert main(["export", str(tmp_path / "run")]) == 2  # not a pruning run: a clear error, exit code 2
    ov = overrides(tmp_path / "p", model_dir, **{"train.steps": 2}) + TARGET
    Trainer(load_config(None, ov)).run()
    with pytest.raises(ConfigError, match="available: step-2"):
        export_run(tmp_path / "p" / "run", checkpoint="step-9")
