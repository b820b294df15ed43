"""`drpruning plan`: parameter counts against the models' own tensors, the activation formula against what
autograd really saves (saved_tensors_hooks), disk, the refusal, and the shipped paper configs fitting."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from run_helpers import overrides
from tiny_models import CONFIGS, tiny_model
from transformers import AutoModelForCausalLM

from drpruning.cli import main
from drpruning.config import ConfigError, PruningConfig, load_config
from drpruning.loss import autocast
from drpruning.models.shape import derive_config, resolve_target, shape_parameter_count, source_shape
from drpruning.plan import KNOWN_CONFIGS, check_memory, make_plan, read_model_config, setup_of
from drpruning.plan.disk import data_disk
from drpruning.plan.estimate import Setup, estimate, masked_linears
from drpruning.plan.memory import parameter_counts, pruner_bytes, saved_bytes, saved_storages
from drpruning.pruning import Pruner, attach

ROOT = Path(__file__).resolve().parents[2]


def numel(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # a tied weight is one parameter, counted once


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_parameter_counts_match_the_model_tensors(kind):
    model = tiny_model(kind)
    counts = parameter_counts(model.config, source_shape(model.config))
    assert counts.total == numel(model)
    assert counts.total == shape_parameter_count(model.config, source_shape(model.config))["total"]
    assert (counts.lm_head == 0) == bool(model.config.tie_word_embeddings)


@pytest.mark.parametrize("kind", ["llama", "tied", "qwen2"])
def test_target_parameter_counts_match_a_model_of_that_shape(kind):
    config = CONFIGS[kind]()
    target = {"num_hidden_layers": 2, "intermediate_size": 24, "num_key_value_heads": 1}
    shape = resolve_target(config, PruningConfig(enabled=True, target=target))
    compact = AutoModelForCausalLM.from_config(derive_config(config, shape))
    assert parameter_counts(config, shape).total == numel(compact)


def test_published_parameter_counts_of_the_paper_sources():
    # the published counts: Llama-2-7B 6,738,415,616; Qwen2-7B and Qwen2.5-7B 7,615,616,512 (the same
    # architecture); Llama-3.1-8B 8,030,261,248
    published = {"meta-llama/Llama-2-7b-hf": 6_738_415_616, "Qwen/Qwen2-7B": 7_615_616_512,
                 "Qwen/Qwen2.5-7B": 7_615_616_512, "meta-llama/Llama-3.1-8B": 8_030_261_248}
    for source, n in published.items():
        from transformers import AutoConfig

        d = dict(KNOWN_CONFIGS[source])
        config = AutoConfig.for_model(d.pop("model_type"), **d)
        assert parameter_counts(config, source_shape(config)).total == n


def measured_saved(model, ids, amp, exclude=()) -> int:
    """Bytes autograd saves for backward in a forward (distinct storages, parameters excluded)."""
    with saved_storages([*model.parameters(), *exclude]) as seen, autocast(torch.device("cpu"), amp):
        model(input_ids=ids)
    return sum(seen.values())


# (weights, compute): float32; bf16 autocast over float32 master weights (GPU default); pure bf16
DTYPES = [(torch.float32, torch.float32), (torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16)]


@pytest.mark.parametrize("kind", sorted(CONFIGS))
@pytest.mark.parametrize("dtypes", DTYPES, ids=["fp32", "autocast", "bf16"])
def test_activation_formula_is_what_autograd_saves(kind, dtypes):
    weights, compute = dtypes
    model = tiny_model(kind, dtype=weights).train()
    model.config.use_cache = False
    # 100 tokens: beyond the tiny Mistral's 64-token window, so its masked attention path is covered too
    for batch, seq in ((2, 32), (1, 100)):
        ids = torch.randint(0, 100, (batch, seq))
        want = saved_bytes(model.config, source_shape(model.config), batch, seq, weights.itemsize, compute.itemsize)
        assert measured_saved(model, ids, compute) == want


@pytest.mark.parametrize("structures", [("layer", "head", "intermediate", "hidden"), ("head",), ("intermediate",)])
@pytest.mark.parametrize("dtypes", DTYPES, ids=["fp32", "autocast", "bf16"])  # bf16: as under FSDP's policy
def test_activation_formula_with_the_pruning_masks(structures, dtypes):
    weights, compute = dtypes
    model = tiny_model("llama", dtype=weights).train()
    model.config.use_cache = False
    cfg = PruningConfig(enabled=True, method="l0", structures=list(structures),
                        target={"num_key_value_heads": 1} if "head" in structures else {"intermediate_size": 16})
    pruner = Pruner(model.config, cfg, 10, "cpu")
    attach(model, pruner)
    shape, mo_md = source_shape(model.config), masked_linears(structures)
    got = [measured_saved(model, torch.randint(0, 100, (b, 32)), compute, list(pruner.parameters())) for b in (2, 4)]
    want = [saved_bytes(model.config, shape, b, 32, weights.itemsize, compute.itemsize, *mo_md) for b in (2, 4)]
    assert got[1] - got[0] == want[1] - want[0]  # per token: exact
    assert 0 <= got[0] - want[0] <= pruner_bytes(shape, structures, cfg.head_mode)  # the masks: bounded


def test_checkpointing_and_fsdp_lower_the_estimate_as_they_should():
    config = CONFIGS["llama"](num_hidden_layers=8)
    plain = estimate(config, Setup(micro_batch=4, seq_len=64, micro_steps=2))
    ckpt = estimate(config, Setup(micro_batch=4, seq_len=64, micro_steps=2, checkpointing=True))
    assert ckpt.get("activations") < plain.get("activations") == ckpt.activations_other
    fsdp = estimate(config, Setup(world=4, parallel="fsdp", micro_batch=4, seq_len=64))
    ddp = estimate(config, Setup(world=4, parallel="ddp", micro_batch=4, seq_len=64))
    assert fsdp.get("weights") == ddp.get("weights") // 4 and fsdp.get("AdamW state") == ddp.get("AdamW state") // 4
    # one micro-batch per step: the gradients are not alive with the activations
    assert not ddp.grads_at_peak and plain.grads_at_peak


def test_fsdp_gathers_bf16_instead_of_keeping_autocast_copies():
    config = CONFIGS["llama"](num_hidden_layers=8)
    one = estimate(config, Setup(micro_batch=4, seq_len=64, compute_bytes=2))
    fsdp = estimate(config, Setup(world=4, parallel="fsdp", micro_batch=4, seq_len=64, compute_bytes=2))
    fsdp32 = estimate(config, Setup(world=4, parallel="fsdp", micro_batch=4, seq_len=64, compute_bytes=4))
    assert one.get("autocast weight copies") > 0  # one process (and DDP) autocast over float32 weights
    assert "autocast weight copies" not in {i.name for i in fsdp.step}  # MixedPrecisionPolicy: no autocast
    assert 2 * fsdp.get("FSDP gathered units") == fsdp32.get("FSDP gathered units")  # gathered in bf16
    # its forward is a bf16 model's (the formula measured on one above), over float32 shards
    bf16 = estimate(config, Setup(micro_batch=4, seq_len=64, weight_bytes=2, compute_bytes=2))
    assert fsdp.get("activations") == bf16.get("activations") < one.get("activations")
    assert fsdp.get("weights") == fsdp.get("gradients") == one.get("weights") // 4  # float32 shards


@pytest.fixture
def offline(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # no 3 s probe of an unreachable hub


@pytest.mark.parametrize("name", ["prune-llama2-7b-1.3b", "prune-llama2-7b-2.7b", "prune-qwen2-7b-1.5b",
                                  "prune-llama3.1-8b-4b", "prune-qwen2.5-7b-3b", "paper/prune-llama2-7b-1.3b",
                                  "paper/prune-llama2-7b-2.7b", "paper/prune-qwen2-7b-1.5b"])
def test_shipped_paper_configs_fit_80gb_devices_on_8(name, offline):
    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    plan = make_plan(cfg, world=8, memory_gb=80)
    assert plan.fits, plan.memory
    assert plan.target is not None and plan.target.total < plan.source.total


def test_one_shot_plans_the_compact_model_with_the_source_resident(offline):
    path = ROOT / "configs" / "prune-llama2-7b-1.3b.yaml"  # distillation from the source
    one_shot = ["pruning.method=importance", "pruning.init=importance", "pruning.mask_phase_steps=0"]
    l0 = make_plan(load_config(ROOT / "configs" / "paper" / "prune-llama2-7b-1.3b.yaml"), world=8, memory_gb=80)
    plan = make_plan(load_config(path, one_shot), world=8, memory_gb=80)
    assert plan.config.num_hidden_layers == l0.config.num_hidden_layers  # the same source
    config = l0.config
    compact = derive_config(config, resolve_target(config, load_config(path, one_shot).pruning))
    setup = replace(plan.setup, structures=(), distill=True)  # no masks; the 7B source held as the teacher
    assert plan.memory.peak == estimate(compact, setup, config).peak < l0.memory.peak
    assert parameter_counts(compact, source_shape(compact)).total == plan.target.total


def test_fsdp_paper_plan_counts_no_autocast_copies(offline):
    cfg = load_config(ROOT / "configs" / "prune-llama2-7b-1.3b.yaml")  # parallel: fsdp, bf16 compute
    fsdp, one = make_plan(cfg, world=8, memory_gb=80), make_plan(cfg, world=1, memory_gb=80)
    assert fsdp.setup.compute_bytes == 2 and fsdp.setup.mixed_precision and not one.setup.mixed_precision
    assert "autocast weight copies" not in {i.name for i in fsdp.memory.step}
    assert one.memory.get("autocast weight copies") > 0
    assert not any("autocast" in w for w in fsdp.warnings)


def test_per_sequence_masks_are_named_as_uncounted_memory(offline):
    path = ROOT / "configs" / "paper" / "prune-llama2-7b-1.3b.yaml"  # learnt masks
    assert not any("mask_samples" in w for w in make_plan(load_config(path), world=8, memory_gb=80).warnings)
    plan = make_plan(load_config(path, ["pruning.mask_samples=sequence"]), world=8, memory_gb=80)
    assert any("mask_samples=sequence" in w for w in plan.warnings)


def test_a_known_source_plans_offline(offline):
    config, note = read_model_config("meta-llama/Llama-2-7b-hf")
    assert config.num_hidden_layers == 32 and "copy" in note


def test_plan_command_prints_the_verdict(capsys, offline):
    rc = main(["plan", str(ROOT / "configs" / "prune-llama2-7b-1.3b.yaml"), "--nproc", "8", "--device-memory", "80"])
    out = capsys.readouterr().out
    assert rc == 0 and "verdict   fits" in out and "419,430,400 in total" in out  # 32 x 4096 x 3200
    # 419,430,400 tokens over 6,738,415,616 source parameters, and the method the evidence supports
    assert "recommended: pruning.method=" in out and "0.0622 tokens/parameter" in out
    rc = main(["plan", str(ROOT / "configs" / "prune-llama2-7b-1.3b.yaml"), "parallel=ddp",
               "train.activation_checkpointing=false", "--nproc", "8"])
    out = capsys.readouterr().out
    assert rc == 0 and "does NOT fit" in out and "activation_checkpointing" in out


def tiny_cfg(tmp_path, **extra):
    model_dir = tmp_path / "model"
    CONFIGS["llama"]().save_pretrained(model_dir)  # planning reads the config only
    return load_config(None, overrides(tmp_path, model_dir, **extra)), model_dir


def test_refusal_names_the_fix_and_force_starts_anyway(tmp_path):
    cfg, model_dir = tiny_cfg(tmp_path, **{"train.micro_batch_size": 4, "data.seq_len": 128})
    config = read_model_config(str(model_dir))[0]
    setup = setup_of(cfg, config, 1, "cpu")
    plain, ckpt = estimate(config, setup).peak, estimate(config, replace(setup, checkpointing=True)).peak
    limit = (plain + ckpt) // 2  # fits only with activation checkpointing
    with pytest.raises(ConfigError, match="enable train.activation_checkpointing"):
        check_memory(cfg, config, torch.device("cpu"), 1, limit=limit)
    check_memory(cfg, config, torch.device("cpu"), 1, limit=plain)  # exactly enough: no refusal
    cfg.force = True
    check_memory(cfg, config, torch.device("cpu"), 1, limit=1000)


def test_the_trainer_refuses_before_loading_weights(tmp_path, monkeypatch, capsys):
    import drpruning.plan as plan
    from drpruning.training import trainer

    monkeypatch.setattr(plan, "device_memory", lambda device: (10**6, "a 1 MB test device"))
    monkeypatch.setattr(trainer, "load_model", lambda *a, **k: pytest.fail("weights loaded"))
    CONFIGS["llama"]().save_pretrained(tmp_path / "model")  # the refusal comes before weights or tokenizer
    rc = main(["train", *overrides(tmp_path, tmp_path / "model")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "a 1 MB test device" in err[0] and "force=true" in err[0]


def test_data_disk_exact_when_prepared_else_estimated(tmp_path):
    text = tmp_path / "text"
    text.mkdir()
    (text / "a.txt").write_text("x" * 4000)
    prepared = tmp_path / "prepared"
    prepared.mkdir()
    (prepared / "train.bin").write_bytes(b"\0" * 600)
    (prepared / "eval.bin").write_bytes(b"\0" * 64)
    (prepared / "index.json").write_text(json.dumps({"tokens": {"train": 300, "eval": 32}}))
    cfg = load_config(None, ["run_dir=unused", f"data.domains={{a: '{text}', b: '{prepared}', c: /nowhere}}"]).data
    d = data_disk(cfg, vocab_size=32000)
    assert (d.tokens, d.bytes, d.estimated, d.unknown) == (1000 + 332, 1000 * 2 + 664, True, ("c",))
    assert data_disk(cfg, vocab_size=152064).bytes == 1000 * 4 + 664


SHIPPED = [*(pytest.param(ROOT / "configs" / f"{n}.yaml", id=n) for n in (
    "prune-llama2-7b-1.3b", "prune-llama2-7b-2.7b", "prune-qwen2-7b-1.5b", "prune-llama3.1-8b-4b",
    "prune-qwen2.5-7b-3b")),
    # SmolLM2 sources: their parameter count needs the converted default model (the slow suite has it)
    *(pytest.param(p, id=p.stem, marks=pytest.mark.slow) for p in (
        ROOT / "configs" / "prune-smollm2-60m.yaml", ROOT / "src" / "drpruning" / "configs" / "demo_prune.yaml"))]


@pytest.mark.parametrize("path", SHIPPED)
def test_shipped_pruning_configs_use_the_method_the_committed_evidence_recommends(path, offline, request,
                                                                              tmp_path):
    from drpruning.plan.recommend import recipe_mismatches, recommend_config, recommended_recipe

    cfg = load_config(path, [f"run_dir={tmp_path}"])  # the demo's config leaves run_dir to its command
    if "smollm2" in cfg.model.source:
        request.getfixturevalue("default_model_dir")
    params = make_plan(cfg, world=8, memory_gb=80).source.total
    method, why = recommend_config(cfg, params)
    assert cfg.pruning.method == method, (f"{path.name} has pruning.method={cfg.pruning.method} but the committed "
                                          f"equal-token evidence recommends {method}: {why}")
    if method == "l0":  # and with the settings it was measured with
        assert not (off := recipe_mismatches(cfg, recommended_recipe(cfg, params))), f"{path.name}: set {off}"
