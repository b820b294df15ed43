"""Export: the compact model's logits equal the masked model's (deterministic exact masks), for every
structure combination, both head modes and every supported family; config, tying, source untouched,
per-layer lists."""

from __future__ import annotations

import itertools
import json

import pytest
import torch
from tiny_models import tiny_model
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from drpruning.config import PruningConfig
from drpruning.pruning.export import export_model
from drpruning.pruning.masked_model import attach
from drpruning.pruning.pruner import Pruner

STRUCTURES = ["layer", "head", "intermediate", "hidden"]
SUBSETS = [list(c) for n in range(1, 5) for c in itertools.combinations(STRUCTURES, n)]
HIDDEN = {"llama": 16, "tied": 24, "qwen2": 20, "mistral": 20, "smollm3": 20}  # 20: not a multiple of heads
CASES = [
    (kind, subset, mode)
    for kind in HIDDEN
    for subset in SUBSETS
    for mode in (["kv_group", "query"] if "head" in subset else ["kv_group"])
]



def target_for(model, kind, subset, mode) -> dict:
    cfg = model.config
    t = {}
    if "layer" in subset:
        t["num_hidden_layers"] = 2
    if "intermediate" in subset:
        t["intermediate_size"] = 24
    if "hidden" in subset:
        t["hidden_size"] = HIDDEN[kind]
    if "head" in subset:
        if mode == "kv_group":
            t["num_key_value_heads"] = 1
        else:  # one query head fewer in each KV group
            g = cfg.num_attention_heads // cfg.num_key_value_heads
            t["num_attention_heads"] = (g - 1) * cfg.num_key_value_heads
    return t


def prepared(kind, subset, mode, seed=0):
    model = tiny_model(kind, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # larger weights: O(1) logits, so a folding error cannot hide under the tolerance
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.15)
    cfg = PruningConfig(enabled=True, method="l0", target=target_for(model, kind, subset, mode), structures=subset,
                        head_mode=mode)
    pruner = Pruner(model.config, cfg, total_steps=10)
    with torch.no_grad():  # random log_alphas: soft values well below 1, so folding is really exercised
        for p in pruner.log_alpha.values():
            p.copy_(torch.randn(p.shape, generator=g) * 1.5)
    return model, pruner


@pytest.mark.parametrize("kind,subset,mode", CASES, ids=[f"{k}-{'+'.join(s)}-{m}" for k, s, m in CASES])
def test_export_matches_masked_model(kind, subset, mode, tmp_path):
    model, pruner = prepared(kind, subset, mode)
    x = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    attach(model, pruner)
    pruner.eval(exact=True)
    with torch.no_grad():
        masked = model(x).logits
    out = export_model(model, pruner, tmp_path / "out")
    small = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        exported = small(x).logits
    assert masked.abs().max() > 0.5
    assert (masked - exported).abs().max() < 1e-4
    saved = json.loads((out / "config.json").read_text())
    t = pruner.target
    for key in (
        "num_hidden_layers",
        "hidden_size",
        "num_attention_heads",
        "num_key_value_heads",
        "intermediate_size",
        "head_dim",
    ):
        assert saved[key] == getattr(t, key), key
    assert (out / "model.safetensors").is_file()
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())


def test_source_untouched_tied_stays_tied_and_unscaled(tmp_path):
    model, pruner = prepared("tied", STRUCTURES, "kv_group")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = export_model(model, pruner, tmp_path / "out")
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    small = AutoModelForCausalLM.from_pretrained(out)
    assert small.config.tie_word_embeddings
    assert small.lm_head.weight.data_ptr() == small.model.embed_tokens.weight.data_ptr()
    dims = torch.nonzero(pruner.deterministic_masks(exact=True)["hidden"]).flatten()
    assert torch.equal(small.model.embed_tokens.weight, before["model.embed_tokens.weight"][:, dims])


def _export_keeping_layers(model, gates, out):
    """Export with only layer pruning and the given layer gates; (compact model, masked logits, input)."""
    cfg = PruningConfig(enabled=True, method="l0", target={"num_hidden_layers": 2}, structures=["layer"])
    pruner = Pruner(model.config, cfg, 10)
    with torch.no_grad():
        pruner.log_alpha["layer"].copy_(torch.tensor(gates))
    attach(model, pruner)
    pruner.eval(exact=True)
    x = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        masked = model(x).logits
    return AutoModelForCausalLM.from_pretrained(export_model(model, pruner, out)), masked, x


def test_qwen2_per_layer_attention_kinds_follow_kept_layers(tmp_path):
    model = tiny_model("qwen2", num_hidden_layers=4, use_sliding_window=True, sliding_window=4, max_window_layers=2)
    kinds = list(model.config.layer_types)
    small, masked, x = _export_keeping_layers(model, [3.0, -2.0, -3.0, 2.0], tmp_path / "q")  # keep 0 and 3
    assert small.config.layer_types == [kinds[0], kinds[3]] == ["full_attention", "sliding_attention"]
    with torch.no_grad():
        assert (small(x).logits - masked).abs().max() < 1e-4  # sequence longer than the window


def test_smollm3_no_rope_layers_follow_kept_layers(tmp_path):
    """The family added as one adapter entry: its per-layer NoPE list is sliced like layer_types."""
    model = tiny_model("smollm3")
    assert model.config.no_rope_layers == [1, 1, 1, 0]
    small, masked, x = _export_keeping_layers(model, [-3.0, 3.0, -2.0, 2.0], tmp_path / "s")  # keep 1 and 3
    assert small.config.no_rope_layers == [1, 0]
    with torch.no_grad():
        assert (small(x).logits - masked).abs().max() < 1e-4


def test_tokenizer_and_generation_config_saved(tmp_path):
    model, pruner = prepared("llama", ["intermediate"], "kv_group")
    vocab = {f"t{i}": i for i in range(128)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="t0")
    model.generation_config.max_new_tokens = 7
    out = export_model(model, pruner, tmp_path / "t", tokenizer=tok)
    assert AutoTokenizer.from_pretrained(out)("t5 t9")["input_ids"] == [5, 9]
    assert AutoModelForCausalLM.from_pretrained(out).generation_config.max_new_tokens == 7
