"""Target shape resolution and validation, parameter counting, and the paper's pruning configs."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny_models import llama_config, qwen2_config, tiny_model
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

from drpruning.config import ConfigError, PruningConfig, load_config
from drpruning.models.shape import (
    Shape,
    derive_config,
    parameter_count,
    parse_count,
    resolve_target,
    shape_parameter_count,
    source_shape,
)

CONFIGS = Path(__file__).resolve().parents[3] / "configs"


def pcfg(target=None, **kw) -> PruningConfig:
    return PruningConfig(enabled=True, target=dict(target or {}), **kw)


def smol_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        tie_word_embeddings=True,
    )


def llama2_7b() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
    )


def qwen2_7b() -> Qwen2Config:
    return Qwen2Config(
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        head_dim=128,
    )


@pytest.mark.parametrize("kind", ["llama", "tied", "qwen2", "mistral"])
def test_parameter_count_matches_module_count(kind):
    model = tiny_model(kind)
    assert parameter_count(model.config) == sum(p.numel() for p in model.parameters())


def test_parameter_count_with_llama_biases():
    cfg = llama_config(attention_bias=True, mlp_bias=True)
    model = AutoModelForCausalLM.from_config(cfg)
    assert parameter_count(cfg) == sum(p.numel() for p in model.parameters())


def test_explicit_target_fills_unchanged_and_derived_head_counts():
    cfg = llama_config()  # 3 layers, d 32, 4 heads / 2 KV, F 48
    shape = resolve_target(cfg, pcfg({"num_key_value_heads": 1, "intermediate_size": 24}))
    assert shape == Shape(3, 32, 2, 1, 24, 8)
    shape = resolve_target(cfg, pcfg({"num_attention_heads": 2}))
    assert (shape.num_attention_heads, shape.num_key_value_heads) == (2, 1)
    shape = resolve_target(cfg, pcfg({"num_attention_heads": 2}, head_mode="query"))
    assert (shape.num_attention_heads, shape.num_key_value_heads) == (2, 2)


def test_paper_shapes_resolve():
    assert resolve_target(
        llama2_7b(), load_config(CONFIGS / "prune-llama2-7b-1.3b.yaml", ["run_dir=x"]).pruning
    ) == Shape(24, 2048, 16, 16, 5504, 128)
    assert resolve_target(
        llama2_7b(), load_config(CONFIGS / "prune-llama2-7b-2.7b.yaml", ["run_dir=x"]).pruning
    ) == Shape(32, 2560, 20, 20, 6912, 128)
    # Qwen2 accepts hidden 1536 with 14 heads (attention width 1792 via explicit head_dim)
    shape = resolve_target(
        qwen2_7b(), load_config(CONFIGS / "prune-qwen2-7b-1.5b.yaml", ["run_dir=x"]).pruning
    )
    assert shape == Shape(28, 1536, 14, 2, 8960, 128)
    derived = derive_config(qwen2_7b(), shape)
    assert (derived.hidden_size, derived.num_attention_heads, derived.head_dim) == (1536, 14, 128)


@pytest.mark.parametrize(
    "name", ["prune-llama2-7b-1.3b.yaml", "prune-llama2-7b-2.7b.yaml", "prune-qwen2-7b-1.5b.yaml"]
)
def test_paper_configs_load(name):
    paper = load_config(CONFIGS / "paper" / name, ["run_dir=x"])  # the paper's learnt masks, as published
    assert paper.pruning.enabled and paper.train.steps == 3200 and paper.train.batch_size == 32
    assert paper.data.seq_len == 4096 and paper.train.eval_every == 50
    assert paper.pruning.method == "l0" and paper.pruning.mask_lr == 1.0
    assert paper.pruning.lagrangian_warmup_steps == 640 and paper.mixing.method == "drpruning"
    assert paper.train.lr == pytest.approx(1e-4)
    cfg = load_config(CONFIGS / name, ["run_dir=x"])  # its method: tests/unit/test_plan.py, from the evidence
    assert cfg.train.distill.weight == 0.5
    assert (cfg.pruning.target, cfg.data, cfg.mixing) == (paper.pruning.target, paper.data, paper.mixing)


@pytest.mark.parametrize("mode", ["kv_group", "query"])
@pytest.mark.parametrize("budget", ["30M", "60M", "100M"])
def test_target_params_rule(mode, budget):
    cfg = smol_config()
    n = parse_count(budget)
    shape = resolve_target(cfg, pcfg(target_params=budget, head_mode=mode))
    total = shape_parameter_count(cfg, shape)["total"]
    assert 0.85 * n <= total <= n
    assert shape.num_hidden_layers == 30 and shape.head_dim == 64
    assert shape.hidden_size % shape.num_attention_heads == 0  # LlamaConfig accepts it
    assert shape.num_attention_heads % shape.num_key_value_heads == 0
    if mode == "kv_group":
        assert shape.num_attention_heads == 3 * shape.num_key_value_heads
    else:
        assert shape.num_key_value_heads == 3
    derive_config(cfg, shape)  # loads as a LlamaConfig


def test_target_params_keeps_explicit_dims():
    shape = resolve_target(
        smol_config(), pcfg({"num_hidden_layers": 20, "intermediate_size": 1536}, target_params="60M")
    )
    assert shape.num_hidden_layers == 20 and shape.intermediate_size == 1536
    assert shape.hidden_size < 576


def test_parse_count():
    assert parse_count("60M") == 60_000_000
    assert parse_count("1.3B") == 1_300_000_000
    assert parse_count("500k") == 500_000
    assert parse_count(1234) == 1234
    with pytest.raises(ConfigError, match="target_params"):
        parse_count("lots")


BAD = [
    ({"hidden_size": 64}, {}, "larger than the source"),
    ({"num_hidden_layers": 4}, {}, "larger than the source"),
    ({"num_attention_heads": 3}, {}, "multiple of the KV group size 2"),
    ({"num_attention_heads": 4, "num_key_value_heads": 1}, {}, "must equal 2 x num_key_value_heads"),
    ({"num_key_value_heads": 1}, {"head_mode": "query"}, "keeps every KV head"),
    ({"num_attention_heads": 3}, {"head_mode": "query"}, "must be a multiple of 2"),
    ({"num_key_value_heads": 0}, {}, "no attention heads"),
    ({"num_attention_heads": 0}, {"head_mode": "query"}, "no attention heads"),
    ({"intermediate_size": 0}, {}, "no FFN channels"),
    ({"num_hidden_layers": 0}, {}, "no layers"),
    ({"hidden_size": 16}, {"structures": ["layer", "head", "intermediate"]}, "structure 'hidden' is not in"),
    ({"num_hidden_layers": 2}, {"structures": ["head"]}, "structure 'layer' is not in"),
    ({"num_key_value_heads": 1}, {"structures": ["layer"]}, "structure 'head' is not in"),
    ({"intermediate_size": 8}, {"structures": ["layer"]}, "structure 'intermediate' is not in"),
    ({"hidden_size": 30}, {}, "not a multiple of num_attention_heads"),
    ({"hidden_siz": 30}, {}, "unknown"),
    ({"hidden_size": "16"}, {}, "must be an integer"),
    ({}, {"target_params": "1G"}, "not smaller than the source"),
    ({}, {"target_params": 100}, "cannot be reached"),
    ({}, {}, "needs a target"),
    ({"intermediate_size": 24}, {"structures": []}, "structures is empty"),
]


@pytest.mark.parametrize("target,kw,message", BAD)
def test_bad_targets(target, kw, message):
    with pytest.raises(ConfigError, match=message):
        resolve_target(llama_config(), pcfg(target, **kw))


def test_qwen2_allows_hidden_not_multiple_of_heads_llama_does_not():
    shape = resolve_target(qwen2_config(), pcfg({"hidden_size": 30}))
    model = AutoModelForCausalLM.from_config(derive_config(qwen2_config(), shape))
    assert model.config.hidden_size == 30
    with pytest.raises(ConfigError, match="LlamaConfig refuses"):
        resolve_target(llama_config(), pcfg({"hidden_size": 30}))


def test_unsupported_architecture():
    gpt2 = GPT2Config(n_layer=2, n_embd=16, n_head=2)
    with pytest.raises(ConfigError, match="llama, qwen2, mistral"):
        resolve_target(gpt2, pcfg({"hidden_size": 8}))


def test_derive_config_slices_per_layer_lists():
    cfg = qwen2_config(num_hidden_layers=4, use_sliding_window=True, sliding_window=16, max_window_layers=2)
    assert cfg.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    shape = source_shape(cfg)
    small = derive_config(cfg, Shape(3, shape.hidden_size, 4, 2, 48, 10), kept_layers=[0, 2, 3])
    assert small.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    assert small.max_window_layers == 1
    assert AutoModelForCausalLM.from_config(small).model.layers[1].self_attn.sliding_window == 16
