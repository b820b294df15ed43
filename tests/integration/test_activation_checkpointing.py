"""`train.activation_checkpointing`: recomputing each decoder layer in backward changes memory, not numbers.

The pruning masks are sampled by a pre-hook on the decoder, outside every (checkpointed) layer, and the
recomputed layers read the same `MaskedModel.current`: same loss, same gradients for the weights and the
masks, one mask sample per forward, the same sampling state afterwards."""

from __future__ import annotations

import pytest
import torch
from run_helpers import overrides
from tiny_models import save_tiny, tiny_model

from drpruning.config import PruningConfig, load_config
from drpruning.loss import token_losses
from drpruning.plan.memory import saved_storages
from drpruning.pruning import Pruner, attach
from drpruning.training.parallel import decoder_layers, enable_activation_checkpointing
from drpruning.training.trainer import Trainer

TARGET = {"num_hidden_layers": 2, "num_key_value_heads": 1, "intermediate_size": 24, "hidden_size": 16}


def one_step(checkpointing: bool, prune: bool, kind: str = "llama") -> dict:
    """Loss, gradients, bytes saved for backward and mask samples of one float32 forward/backward."""
    model = tiny_model(kind).train()
    model.config.use_cache = False  # as the trainer sets it
    pruner, samples = None, []
    if prune:
        pruner = Pruner(model.config, PruningConfig(enabled=True, method="l0", target=TARGET), total_steps=10)
        pruner.seed(3)
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():  # log-alphas near 0: masks strictly inside (0, 1), every mask gets a gradient
            for a in pruner.log_alpha.values():
                a.copy_(torch.randn(a.shape, generator=g) * 0.3)
        attach(model, pruner)
        pruner.train()
        sample = pruner.masks
        # counts samples: once per forward, never again in the recompute
        pruner.masks = lambda batch=None: samples.append(1) or sample(batch)
    if checkpointing:
        enable_activation_checkpointing(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with saved_storages(model.parameters()) as saved:
        nll, _ = token_losses(model, ids)
        loss = nll.mean() + (pruner.penalty(0)[0] if pruner is not None else 0.0)
    loss.backward()
    grads = {f"model.{n}": p.grad for n, p in model.named_parameters()}
    if pruner is not None:
        grads.update({f"pruner.{n}": p.grad for n, p in pruner.named_parameters() if p.grad is not None})
    return {"loss": loss.detach(), "grads": grads, "samples": len(samples),
            "saved": sum(saved.values()),
            "rng": pruner.rng_state() if pruner is not None else None}


def assert_relative(a: torch.Tensor, b: torch.Tensor, what: str, rel: float = 1e-5) -> None:
    """max |a - b| within `rel` of max |b| (elementwise relative error is meaningless at zero crossings)."""
    scale = float(b.abs().max())
    assert float((a - b).abs().max()) <= rel * scale + 1e-12, what


@pytest.mark.parametrize("prune", [False, True], ids=["plain", "masks"])
def test_checkpointing_gives_the_same_loss_and_gradients(prune):
    ref, got = one_step(False, prune), one_step(True, prune)
    assert_relative(got["loss"], ref["loss"], "loss")
    assert got["grads"].keys() == ref["grads"].keys()
    if prune:
        masks = [n for n in ref["grads"] if n.startswith("pruner.log_alpha")]
        assert len(masks) == 4 and all(float(ref["grads"][n].abs().max()) > 0 for n in masks)
        assert ref["samples"] == got["samples"] == 1  # the recompute did not draw new masks
        assert torch.equal(ref["rng"], got["rng"])  # and the next step samples what it would have
    for name, g in ref["grads"].items():
        assert_relative(got["grads"][name], g, name)
    # it did checkpoint: only the layers' inputs (and what lies outside the layers) were kept
    assert got["saved"] < ref["saved"] / 3


def test_trainer_enables_it_on_every_layer_and_a_step_is_unchanged(tmp_path):
    model_dir = save_tiny(tmp_path / "model", "llama")
    records, params = [], []
    for on in (False, True):
        items = overrides(tmp_path / str(on), model_dir, **{"train.activation_checkpointing": str(on).lower(),
                                                            "pruning.enabled": "true", "pruning.method": "l0",
                                                            "pruning.target": str(TARGET).replace("'", "")})
        trainer = Trainer(load_config(None, items))
        assert all(layer.gradient_checkpointing is on for layer in decoder_layers(trainer.model))
        trainer.model.train()  # as run() does before the loop: checkpointing acts in train mode only
        records.append(trainer.train_step())
        params.append({**{f"model.{n}": p.detach() for n, p in trainer.model.named_parameters()},
                       **{f"pruner.{n}": p.detach() for n, p in trainer.pruner.named_parameters()}})
    ref, got = records
    for name, p in params[0].items():  # the same optimiser step on weights, masks and multipliers
        assert_relative(params[1][name], p, name)
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5)
    assert got["domain_loss"] == pytest.approx(ref["domain_loss"], rel=1e-5, nan_ok=True)
    assert got["lagrangian"] == pytest.approx(ref["lagrangian"], rel=1e-5)
