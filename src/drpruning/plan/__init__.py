"""`drpruning plan`: what a run will need, from its config alone (no weights are read): parameter counts,
tokens, memory per device (`plan.estimate`, formulas in `plan.memory`), disk (`plan.disk`), and whether it
fits. The trainer asks `check_memory` the same question before it loads any weights and refuses a run that
cannot fit (unless force=true). docs/distributed.md explains the memory model and shows the paper configs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any

import torch

from drpruning.config import ConfigError, RunConfig, two_stage
from drpruning.models.loading import ModelSourceError, load_model_config, source_dtype
from drpruning.models.shape import Shape, derive_config, resolve_target, source_shape
from drpruning.plan.disk import DataDisk, checkpoint_bytes, data_disk, token_bytes
from drpruning.plan.estimate import MemoryEstimate, Setup, estimate, fixes
from drpruning.plan.memory import GB, ParamCounts, parameter_counts, pruner_params
from drpruning.plan.recommend import recommendation_line

DEFAULT_DEVICE_GB = 80.0  # when no CUDA device is present to ask
TIGHT = 0.9  # warn above this share of the device memory

# The published config.json of the paper configs' sources, for planning where the hub cannot be reached
# (drpruning never downloads weights to plan). Training always reads the real config.
KNOWN_CONFIGS: dict[str, dict[str, Any]] = {
    "meta-llama/Llama-2-7b-hf": dict(
        model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=32000, hidden_size=4096,
        intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
        max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False, dtype="float16"),
    "Qwen/Qwen2-7B": dict(
        model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=152064, hidden_size=3584,
        intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
        max_position_embeddings=131072, max_window_layers=28, sliding_window=131072, use_sliding_window=False,
        rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=False, dtype="bfloat16"),
    "meta-llama/Llama-3.1-8B": dict(
        model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=128256, hidden_size=4096,
        intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192),
        tie_word_embeddings=False, dtype="bfloat16"),
    "Qwen/Qwen2.5-7B": dict(
        model_type="qwen2", architectures=["Qwen2ForCausalLM"], vocab_size=152064, hidden_size=3584,
        intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
        max_position_embeddings=131072, max_window_layers=28, sliding_window=131072, use_sliding_window=False,
        rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=False, dtype="bfloat16"),
}


@dataclass(frozen=True)
class Plan:
    cfg: RunConfig
    config: Any  # the source model's config
    config_note: str  # where the config came from
    source: ParamCounts
    target_shape: Shape | None
    target: ParamCounts | None
    setup: Setup
    memory: MemoryEstimate
    device_memory: int
    device_note: str
    data: DataDisk
    checkpoint: int  # bytes of one checkpoint
    export: int  # bytes of the exported model
    warnings: tuple[str, ...]
    fixes: tuple[str, ...]  # memory knobs that would make it fit (empty when it fits)

    @property
    def fits(self) -> bool:
        return self.memory.peak <= self.device_memory


def read_model_config(source: str) -> tuple[Any, str]:
    """The model config, and where it came from; a paper config's source from KNOWN_CONFIGS when offline."""
    try:
        config, path, _ = load_model_config(source)
        return config, f"config: {path}"
    except ModelSourceError:
        if source not in KNOWN_CONFIGS:
            raise
    from transformers import AutoConfig

    d = dict(KNOWN_CONFIGS[source])
    config = AutoConfig.for_model(d.pop("model_type"), **d)
    return config, "config: drpruning's copy of its config.json (the hub is unreachable here)"


def compute_bytes(train_dtype: str, weight_bytes: int, device: str) -> int:
    """Bytes of the compute dtype: bf16 under autocast, else the weights' own dtype (autocast off)."""
    from drpruning.loss import autocast_dtype

    if device == "cuda" and train_dtype == "auto" and not torch.cuda.is_available():
        amp = torch.bfloat16  # planning for GPUs from a machine without one: every current one runs bf16
    else:
        amp = autocast_dtype(train_dtype, torch.device(device))
    return 2 if amp == torch.bfloat16 else weight_bytes


def setup_of(cfg: RunConfig, config: Any, world: int, device: str) -> Setup:
    t, p = cfg.train, cfg.pruning
    w = 2 if cfg.model.dtype == "bfloat16" else 4
    return Setup(world=world, parallel=cfg.parallel, micro_batch=t.micro_batch_size, seq_len=cfg.data.seq_len,
                 micro_steps=max(1, t.batch_size // (t.micro_batch_size * world)), weight_bytes=w,
                 compute_bytes=compute_bytes(t.dtype, w, device), checkpointing=bool(t.activation_checkpointing),
                 structures=tuple(p.structures) if p.enabled else (), head_mode=p.head_mode,
                 distill=t.distill.weight > 0, foreach=device == "cuda")


def teacher_config(cfg: RunConfig, config: Any) -> Any | None:
    if cfg.train.distill.weight <= 0:
        return None
    teacher = cfg.train.distill.teacher
    return config if teacher in (None, cfg.model.source) else read_model_config(teacher)[0]


def trained(cfg: RunConfig, config: Any, setup: Setup, teacher: Any | None) -> tuple[Any, Setup, Any | None]:
    """(config, setup, teacher) of what the run trains. One-shot pruning trains the compact model, no masks,
    with the source resident: the teacher, or, without distillation, the model it cuts from (counted as a
    teacher, its logits too: an over-estimate there)."""
    if not (cfg.pruning.enabled and cfg.pruning.method == "importance"):
        return config, setup, teacher
    compact = derive_config(config, resolve_target(config, cfg.pruning))
    return compact, replace(setup, structures=(), distill=True), teacher or config


def device_memory(device: torch.device | str) -> tuple[int, str]:
    """Bytes one process may use: a CUDA device's total memory, or this machine's available RAM shared by
    its local processes (torchrun's LOCAL_WORLD_SIZE)."""
    device = torch.device(device)
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return int(props.total_memory), f"{props.name} total memory"
    import psutil

    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    share = f", shared by {local} processes" if local > 1 else ""
    return int(psutil.virtual_memory().available) // local, f"available RAM{share}"


def make_plan(cfg: RunConfig, world: int = 1, memory_gb: float | None = None, device: str = "cuda") -> Plan:
    """The plan of `cfg` on `world` processes of `device` (cuda: GPUs; cpu: this machine)."""
    config, note = read_model_config(cfg.model.source)
    src = source_shape(config)
    counts = parameter_counts(config, src)
    shape = resolve_target(config, cfg.pruning) if cfg.pruning.enabled else None
    setup = setup_of(cfg, config, world, device)
    model, trained_setup, teacher = trained(cfg, config, setup, teacher_config(cfg, config))
    mem = estimate(model, trained_setup, teacher)
    if memory_gb is not None:
        limit, where = int(memory_gb * GB), "--device-memory"
    elif device == "cpu":  # the processes of one machine share its RAM
        limit = device_memory(device)[0] // world
        where = "available RAM" + (f" / {world} processes" if world > 1 else "")
    elif torch.cuda.is_available():
        limit, where = device_memory(device)
    else:
        limit, where = int(DEFAULT_DEVICE_GB * GB), "the default (no CUDA device here; set --device-memory)"
    t = cfg.train
    warnings = []
    if t.batch_size % (t.micro_batch_size * world):
        warnings.append(f"train.batch_size={t.batch_size} is not a multiple of micro_batch_size x processes = "
                        f"{t.micro_batch_size * world}: the run would refuse to start; change either")
    if cfg.data.seq_len > int(config.max_position_embeddings):
        warnings.append(f"data.seq_len={cfg.data.seq_len} is beyond the model's context of "
                        f"{config.max_position_embeddings} tokens")
    if world > 1 and cfg.parallel == "ddp" and mem.peak > limit:
        warnings.append("parallel=ddp replicates weights, gradients and AdamW state on every device")
    if not cfg.pruning.enabled and (cfg.pruning.target or cfg.pruning.target_params is not None):
        warnings.append("pruning.enabled is false: this plans continued pretraining (`drpruning prune` sets "
                        "it; pass pruning.enabled=true to plan the pruning run)")
    act = mem.get("activations")
    if not setup.checkpointing and act > limit / 2:
        warnings.append(f"micro_batch_size {t.micro_batch_size} needs ~{act / GB:.1f} GB of activations per "
                        f"device: enable train.activation_checkpointing ({mem.activations_other / GB:.1f} GB) "
                        "or lower it")
    if cfg.pruning.enabled and cfg.pruning.mask_samples == "sequence":
        warnings.append("pruning.mask_samples=sequence masks activations, not weights: a pruning step measured "
                        "~10% more memory than with micro_batch, which this estimate does not count (bench_pruning.py)")
    if device == "cpu":
        warnings.append("on a CPU the trainer keeps freed memory in its heap (training/cpu_memory.py): its peak "
                        "RSS measured 23-32% above this estimate, the tensors' own peak (docs/distributed.md)")
    if limit * TIGHT < mem.peak <= limit:
        warnings.append(f"the estimate uses {mem.peak / limit:.0%} of the device memory: allocator overhead "
                        "(and on a GPU the CUDA context) may not fit in the rest")
    fix = () if mem.peak <= limit else tuple(fixes(model, trained_setup, limit, teacher))
    data = data_disk(cfg.data, config.vocab_size)
    n_pruner = pruner_params(src, setup.structures, setup.head_mode) if setup.structures else 0
    save = source_dtype(config)
    export_params = parameter_counts(config, shape).total if shape is not None else counts.total
    return Plan(cfg, config, note, counts, shape, parameter_counts(config, shape) if shape else None, setup, mem,
                limit, where, data, checkpoint_bytes(counts.total, setup.weight_bytes, n_pruner),
                export_params * (save.itemsize if save is not None else 4), tuple(warnings), fix)


def _gb(n: int) -> str:
    return f"{n / GB:8.2f} GB"


def _params(c: ParamCounts) -> str:
    head = "tied" if c.lm_head == 0 else f"LM head {c.lm_head:,}"
    return (f"{c.total:,} ({c.total / 1e9:.2f}B: embedding {c.embedding:,}, {head}, attention {c.attention:,}, "
            f"MLP {c.mlp:,}, norms {c.norms:,})")


def _shape(s: Shape) -> str:
    return (f"{s.num_hidden_layers} layers, hidden {s.hidden_size}, {s.num_attention_heads} heads / "
            f"{s.num_key_value_heads} KV heads (head_dim {s.head_dim}), FFN {s.intermediate_size}")


def format_plan(plan: Plan) -> str:
    cfg, s, mem, t = plan.cfg, plan.setup, plan.memory, plan.cfg.train
    dtype = {2: "bfloat16", 4: "float32"}
    lines = [f"model     {cfg.model.source} ({plan.config.model_type}); {plan.config_note}",
             f"source    {_shape(source_shape(plan.config))}",
             f"          {_params(plan.source)} parameters"]
    if plan.target_shape is not None:
        lines += [f"target    {_shape(plan.target_shape)}",
                  f"          {_params(plan.target)} parameters ({plan.target.total / plan.source.total:.1%})"]
    if cfg.pruning.enabled:
        lines.append(recommendation_line(cfg, plan.source.total))
    step = t.batch_size * cfg.data.seq_len
    lines += [f"tokens    {step:,} per optimiser step ({t.batch_size} x {cfg.data.seq_len}), "
              f"{step * t.steps:,} in total ({t.steps} steps)",
              *([f"stages    learnt masks over the first {cfg.pruning.mask_phase_steps} steps (RUN_DIR/mask-phase, the "
                 f"source under masks: the memory and checkpoints below), then the exported compact model for "
                 f"{t.steps - cfg.pruning.mask_phase_steps} (RUN_DIR), distilled from the source"]
                if two_stage(cfg.pruning) else []),
              f"run       {s.world} process{'es' if s.world > 1 else ''}"
              + (f", parallel={s.parallel}" if s.world > 1 else "")
              + f", weights {dtype[s.weight_bytes]}, compute {dtype[s.compute_bytes]}, micro-batch "
              f"{s.micro_batch} x {s.seq_len} tokens ({s.micro_steps} per step per process), activation "
              f"checkpointing {'on' if s.checkpointing else 'off'}", "", "memory per device"]
    for item in (*mem.resident, *mem.step):
        lines.append(f"  {item.name:<24}{_gb(item.bytes)}  {item.note}")
    other = "on" if not s.checkpointing else "off"
    lines.append(f"  {'(activations ' + other + ')':<24}{_gb(mem.activations_other)}  with train."
                 f"activation_checkpointing={'true' if other == 'on' else 'false'}")
    grads = "" if mem.grads_at_peak else " (one micro-batch per step: the gradients are not alive with the " \
                                          "activations; the larger phase counts)"
    lines.append(f"  {'peak':<24}{_gb(mem.peak)}{grads}")
    lines.append(f"  {'device memory':<24}{_gb(plan.device_memory)}  {plan.device_note}")
    d = plan.data
    if d.tokens or not d.unknown:
        what = "estimated from text sizes at ~4 bytes per token" if d.estimated else "prepared token files"
        data = f"{_gb(d.bytes)}  {d.tokens:,} tokens x {token_bytes(plan.config.vocab_size)} B ({what})"
    else:
        data = "     unknown  (no domain folder found)"
    if d.unknown and d.tokens:
        data += f"; not counted: {', '.join(d.unknown)} (not found)"
    k = t.keep_checkpoints
    lines += ["", "disk", f"  {'data':<24}{data}",
              f"  {'checkpoints':<24}{_gb(k * plan.checkpoint)}  {k} kept x {plan.checkpoint / GB:.1f} GB "
              f"(weights as trained + AdamW + pruner; one more while the next is written)",
              f"  {'exported model':<24}{_gb(plan.export)}"]
    if plan.warnings:
        lines += ["", "warnings"] + [f"  - {w}" for w in plan.warnings]
    limit = f"{plan.device_memory / GB:.3g} GB devices"
    if plan.fits:
        lines += ["", f"verdict   fits: ~{mem.peak / GB:.3g} GB per device of {limit} "
                      f"({s.world} process{'es' if s.world > 1 else ''})"]
    else:
        lines += ["", f"verdict   does NOT fit: ~{mem.peak / GB:.3g} GB per device on {limit}; to fit: "
                      + "; or ".join(plan.fixes)]
    return "\n".join(lines)


def check_memory(cfg: RunConfig, config: Any, device: torch.device, world: int,
                 limit: int | None = None) -> None:
    """Refuse (ConfigError) a run whose estimated peak exceeds `limit` bytes (default: `device_memory`),
    unless force=true. Called by the trainer before it loads any weights."""
    if cfg.force:
        return
    config, setup, teacher = trained(cfg, config, setup_of(cfg, config, world, device.type),
                                     teacher_config(cfg, config))
    mem = estimate(config, setup, teacher)
    where = "the given limit"
    if limit is None:
        limit, where = device_memory(device)
    if mem.peak > limit:
        raise ConfigError(f"this run needs ~{mem.peak / GB:.3g} GB per device (drpruning plan) but {where} is "
                          f"{limit / GB:.3g} GB: {'; or '.join(fixes(config, setup, limit, teacher))} "
                          "(or force=true to start anyway)")
