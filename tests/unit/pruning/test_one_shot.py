"""One-shot pruning trains the compact model: the same training as the source under the cut's binary masks."""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import VOCAB, tiny_model, tiny_tokenizer

from drpruning.config import PruningConfig
from drpruning.loss import token_nll
from drpruning.pruning import one_shot
from drpruning.pruning.masked_model import attach
from drpruning.pruning.pruner import Pruner

TARGET = {"num_hidden_layers": 2, "num_key_value_heads": 1, "intermediate_size": 24, "hidden_size": 16}


def train(model: torch.nn.Module, batches: list[torch.Tensor], params: list[torch.nn.Parameter]) -> list[float]:
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    losses = []
    for ids in batches:
        loss = token_nll(model, ids).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.5)  # the norm of the kept weights' gradients in both
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("hidden", [False, True], ids=["keep-hidden", "prune-hidden"])
def test_compact_training_matches_the_source_under_the_binary_masks(hidden):
    source = tiny_model("llama").train()
    structures = ["layer", "head", "intermediate"] + (["hidden"] if hidden else [])
    target = TARGET if hidden else {k: v for k, v in TARGET.items() if k != "hidden_size"}
    cfg = PruningConfig(enabled=True, target=target, method="importance", structures=structures)
    g = torch.Generator().manual_seed(0)
    calib = [torch.randint(0, VOCAB, (8, 16), generator=g)]
    batches = [torch.randint(0, VOCAB, (4, 16), generator=g)] * 5  # one batch again and again: it is learnt

    pruner = Pruner(source.config, cfg, 4)
    compact, record = one_shot.cut(source, pruner, calib, 4)
    assert record["shape"]["target"] == pruner.target.as_dict()
    compact.train()

    masked = copy.deepcopy(source)
    attach(masked, pruner)
    pruner.harden(True)  # exact masks on every forward, as the trainer ran one-shot pruning before
    expected = train(masked, batches, list(masked.parameters()))
    got = train(compact, batches, list(compact.parameters()))
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert got[-1] < got[0] - 0.05  # it learnt something, so the comparison covers the updates


def test_save_and_read_cut_round_trip(tmp_path):
    source = tiny_model("llama")
    pruner = Pruner(source.config, PruningConfig(enabled=True, target=TARGET, method="importance"), 4)
    g = torch.Generator().manual_seed(1)
    compact, record = one_shot.cut(source, pruner, [torch.randint(0, VOCAB, (4, 16), generator=g)], 4)
    assert one_shot.read_cut(tmp_path) is None
    one_shot.save_cut(tmp_path, compact, tiny_tokenizer(), {**record, "source_eval": {"losses": [1.0], "se": [0.1]}})
    assert not (tmp_path / ".cut.partial").exists()
    reloaded, again = one_shot.cut_once(tmp_path, pruner, source, [], 4, lambda: {}, None, reload=True)
    assert again["source_eval"] == {"losses": [1.0], "se": [0.1]}
    for a, b in zip(reloaded.state_dict().values(), compact.state_dict().values(), strict=True):
        assert torch.equal(a, b)
