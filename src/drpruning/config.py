"""Typed run configuration: YAML plus `key=value` overrides, validated once before any expensive work."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import MISSING, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError


class ConfigError(ValueError):
    """A configuration problem; the message names the key and the fix."""


@dataclass
class ModelConfig:
    source: str = "smollm2-135m"  # a folder, a hub id, a .gguf file or a name known to `fetch-model`
    # dtype of the weights held and trained: auto = float32 master weights (train.dtype sets the compute dtype);
    # bfloat16 halves memory (pure bf16 training). Exported models keep the source's dtype either way.
    dtype: str = "auto"


@dataclass
class DataConfig:
    # domain name -> source (a directory of .jsonl/.json/.txt/.parquet files, or `hf:<dataset>[:<split>]`);
    # the source `embedded` expands into the embedded default corpus's domains; so does an empty mapping.
    domains: dict[str, str] = field(default_factory=dict)
    proportions: list[float] | None = None  # initial proportions in domain order; None: temperature or uniform
    temperature: float | None = None  # p_i ~ n_i^temperature over domain token counts when proportions is None
    seq_len: int = 256
    eval_sequences: int = 8  # held-out sequences per domain (from documents disjoint from training)
    eval_fraction: float = 0.1  # share of documents held out for evaluation, at most
    max_documents: int | None = None  # cap documents read per domain (quick runs)
    cache_dir: str | None = None  # prepared token files; None: $DRPRUNING_CACHE/tokens (~/.cache/drpruning)
    num_proc: int | None = None  # tokeniser processes for `prepare`; None: all cores


@dataclass
class DistillConfig:
    weight: float = 0.0  # loss = (1 - weight) * cross-entropy + weight * KL(teacher || student); 0: off
    temperature: float = 1.0
    teacher: str | None = None  # any model source; None: model.source (the model being pruned)


@dataclass
class TrainConfig:
    steps: int = 100
    batch_size: int = 8  # sequences per optimiser step, over all ranks and micro-batches
    micro_batch_size: int = 4  # sequences per forward per rank
    lr: float = 1e-4
    warmup_fraction: float = 0.1
    min_lr_ratio: float = 0.1  # cosine decays to this fraction of the peak
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0
    dtype: str = "auto"  # autocast dtype: auto (bf16 where supported) | bfloat16 | float32
    eval_every: int = 10
    # held-out sequences per domain that each in-run evaluation (and mixing update) uses; None: all
    # data.eval_sequences. A small limit keeps frequent evaluations cheap while a large split keeps the
    # documents of a thorough final evaluation out of training
    eval_limit: int | None = None
    log_every: int = 1
    checkpoint_every: int = 50
    keep_checkpoints: int = 2
    seed: int = 0
    eval_batch_size: int = 8
    max_bad_steps: int = 3  # consecutive steps with a non-finite loss or gradient norm before the run stops
    distill: DistillConfig = field(default_factory=DistillConfig)  # distillation from a frozen teacher
    # recompute each decoder layer's activations in backward instead of keeping them (memory for time)
    activation_checkpointing: bool = False
    # torch.compile each decoder layer (one graph serves them all): true | false | auto (on when the run's
    # estimated compute saving exceeds the compile time; drpruning.training.compiling)
    compile: Any = "auto"


@dataclass
class MixingConfig:
    method: str = "constant"  # a name in drpruning.mixing.METHODS: constant | sheared | dro | drpruning
    signal: str = "eval"  # eval | train (EMA of training loss)
    ema: float = 0.1
    rho: float = 0.1
    min_prob: float = 0.2
    clamp_to_min: bool = True
    # reference losses: "source" (the model's own losses before training), "scaling_law",
    # or a list of numbers in domain order
    reference: Any = "source"
    dynamic_ratio: bool = False
    sheared_eta: float = 1.0
    sheared_smoothing: float = 1e-4
    max_points: int = 64
    record_from: float = 0.02  # fraction of training after which scaling-law points are recorded
    fit_from: float = 0.10  # fraction of training after which the law is fitted
    ratio_from: float = 0.20  # fraction of training after which the reference ratio moves
    # an update whose mean held-out loss is this far above the training-loss average is skipped; 0: never
    outlier_nats: float = 1.0
    options: dict[str, Any] = field(default_factory=dict)  # options of a rule that has no key above


@dataclass
class PruningConfig:
    enabled: bool = False
    # importance: one shot, as Minitron: cut to the target by the calibration scores at step 0, then every step
    # trains the weights under those fixed masks; l0: learn hard-concrete masks to the target (the paper's).
    # importance is the default: learnt masks matched it at the smaller budget measured and ended lower at the
    # larger by less than twice the seed range (docs/pruning.md, "Learnt masks or one-shot, at equal tokens")
    method: str = "importance"
    # target shape: any of num_hidden_layers, hidden_size, num_attention_heads, num_key_value_heads,
    # intermediate_size; or target_params (e.g. "60M") from which a shape is derived
    target: dict[str, Any] = field(default_factory=dict)
    target_params: Any = None
    # with target_params: search (the default) scores the valid shapes within 2% of the budget by the held-out
    # loss right after the one-shot cut and prunes to the best (docs/pruning.md, "Choosing the shape");
    # proportional shrinks every enabled width dimension by one factor. Ignored without target_params
    shape: str = "search"
    structures: list[str] = field(default_factory=lambda: ["layer", "head", "intermediate", "hidden"])
    head_mode: str = "kv_group"  # kv_group: prune whole KV groups | query: prune query heads inside groups
    lagrangian_warmup_steps: int | None = None  # None: 20% of train.steps (the paper's setting)
    mask_lr: float = 1.0
    lagrangian_lr: float = 1.0
    # how the multipliers ascend: adam (the paper's: a full lr step on the sign of however small a gap) or sgd
    # (plain gradient ascent, lambda1 += lagrangian_lr * gap: the step shrinks with the gap, docs/method.md §2.5)
    lagrangian_optimizer: str = "adam"
    init_log_alpha: float = 5.0  # clamped to the log-alpha range (ln 100) at construction
    init_log_alpha_std: float = 0.01
    # importance: a calibration pass scores every unit; scores spread the initial log-alphas (the least
    # important start `importance_spread` lower) and break ties; uniform: the paper's N(init, std);
    # one_shot: as importance, then the units the one-shot cut removes start at the bottom of the range, so
    # the exact masks at step 0 are that cut and the expected size its size (no Lagrangian ramp by default)
    init: str = "importance"
    importance_spread: float = 2.0
    calibration_sequences: int = 16  # training sequences scored by the calibration pass
    protect_massive: bool = True  # hidden channels with massive activations are never pruned
    protect: dict[str, list[int]] = field(default_factory=dict)  # e.g. {hidden: [507], layer: [0]}: held at 1
    # the masks' and multipliers' learning-rate schedule: constant after a linear warmup (default: 25% of the
    # Lagrangian warmup), or `follow` the weights' warmup + cosine (the paper's, which leaves little lr after
    # the Lagrangian warmup in a short run)
    mask_schedule: str = "constant"
    mask_warmup_steps: int | None = None
    # anti-windup: a multiplier lambda1 whose sign disagrees with the sparsity gap (left over from a lag) is
    # reset to 0, so masks do not overshoot the target for as many steps as they lagged it
    lagrangian_reset: bool = False
    # a sparsity gap below this counts as 0 in the penalty: float32 rounding of an exact size (masks started at
    # the one-shot cut) is not a gap, and the multipliers' Adam would turn its sign into full-size steps
    gap_tolerance: float = 1e-6
    hardening_steps: int = 0  # the last N steps train the weights under the exact target masks (masks fixed)
    # l0 only: learn the masks over the first N of train.steps (RUN_DIR/mask-phase), then train the exported
    # compact model for the rest, distilled from the source (training/stages.py); 0: masks over the whole run
    mask_phase_steps: int = 0
    # one mask sample per `micro_batch` (folded into the weights), or one per `sequence` of it (applied to the
    # activations: a step averages more samples, at ~10% more activation memory than the planner counts)
    mask_samples: str = "micro_batch"
    # sampled: hard-concrete gates, a fresh random sample every forward (the paper's); deterministic: no noise,
    # the gate's value at a temperature that falls with sqrt(progress) to a fifth by the hardening (DDP's
    # sharpening, docs/method.md §2.10), so the forward approaches the exact masks it exports
    gates: str = "sampled"
    # deterministic gates' log-alpha range: fixed [ln 0.01, ln 100], or `temperature`: +-3 x the gates' temperature,
    # a quarter past where a gate reaches 0 or 1, so no gate freezes deep in a flat top (docs/method.md §2.10;
    # measured worse than fixed: freed gates swing or stay fractional)
    log_alpha_bound: str = "fixed"
    # lagrangian: multipliers price the gap between expected and target size (the paper's); projected: after
    # every step each row's log-alphas shift by one amount so that its expected size is the target exactly
    # (no multipliers; docs/method.md §2.11)
    constraint: str = "lagrangian"


def two_stage(p: PruningConfig) -> bool:
    """Learnt masks over a mask phase, then the exported compact model trained (training/stages.py)."""
    return bool(p.enabled and p.method == "l0" and p.mask_phase_steps)


def warmup_steps(p: PruningConfig, steps: int) -> int:
    """The Lagrangian's ramp: 20% of the run by default; none when the masks start at the one-shot cut."""
    if p.lagrangian_warmup_steps is not None:
        return p.lagrangian_warmup_steps
    return 0 if p.init == "one_shot" else round(0.2 * steps)


@dataclass
class WandbConfig:
    project: str | None = None  # set to log to Weights & Biases
    mode: str = "offline"  # offline (files under RUN_DIR/wandb, sync later) | online


@dataclass
class LogConfig:
    """Sinks besides RUN_DIR/metrics.jsonl (always written); rank 0 only, the same records."""
    tensorboard: bool = False  # event files under RUN_DIR/tensorboard
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class RunConfig:
    run_dir: str = MISSING
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mixing: MixingConfig = field(default_factory=MixingConfig)
    pruning: PruningConfig = field(default_factory=PruningConfig)
    log: LogConfig = field(default_factory=LogConfig)
    resume: Any = False  # true: continue the run in run_dir (refused when it has no checkpoint); false: start;
    # auto: continue when run_dir has a checkpoint, else start (for schedulers that restart jobs blindly)
    force: bool = False  # start a run the memory plan refuses; export a model whose held-out loss diverged
    parallel: str = "ddp"  # ddp | fsdp (only under torchrun)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Merge the YAML file and `key=value` overrides onto the typed defaults, then validate."""
    schema = OmegaConf.structured(RunConfig)
    parts = [schema]
    try:
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise ConfigError(f"config file {path} does not exist: pass the path of a YAML file")
            parts.append(OmegaConf.load(path))
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not key=value (e.g. train.steps=20)")
        for item in overrides:
            try:
                OmegaConf.from_dotlist([item])
            except (yaml.YAMLError, OmegaConfBaseException) as e:
                raise ConfigError(f"override {item!r} is not valid YAML after the '=' "
                                  f"({str(e).splitlines()[0]}); quote or fix the value") from None
        parts.append(OmegaConf.from_dotlist(list(overrides)))
        merged = OmegaConf.merge(*parts)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"config file {path} is not valid YAML{where}: {problem}; fix the file") from None
    except (ConfigKeyError, ValidationError) as e:
        key = getattr(e, "full_key", None) or getattr(e, "key", "")
        first = str(e).splitlines()[0]
        raise ConfigError(f"config key {key!r}: {first}. "
                          "Check the spelling against docs/configuration.md") from None
    except OmegaConfBaseException as e:  # e.g. a YAML file that is a list, not a mapping
        raise ConfigError(f"config file {path}: {str(e).splitlines()[0]}; the file must map section "
                          "names to settings (see docs/configuration.md)") from None
    if OmegaConf.is_missing(merged, "run_dir"):
        raise ConfigError("config key 'run_dir' is missing: set run_dir=PATH (the run's output folder)")
    cfg: RunConfig = OmegaConf.to_object(merged)
    validate(cfg)
    return cfg


def save_config(cfg: RunConfig, path: str | Path) -> None:
    OmegaConf.save(OmegaConf.structured(cfg), path)


def _positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and value > 0):
        raise ConfigError(f"config key '{name}' must be positive, got {value!r}")


def validate(cfg: RunConfig) -> None:
    """Checks that need no model or data; the model- and data-dependent ones run in their loaders."""
    t, d, m, p = cfg.train, cfg.data, cfg.mixing, cfg.pruning
    for key in ("steps", "batch_size", "micro_batch_size", "eval_every", "log_every", "checkpoint_every",
                "keep_checkpoints", "eval_batch_size"):
        _positive(f"train.{key}", getattr(t, key))
    _positive("train.lr", t.lr)
    if t.eval_limit is not None:
        _positive("train.eval_limit", t.eval_limit)
    _positive("data.seq_len", d.seq_len)
    _positive("data.eval_sequences", d.eval_sequences)
    if not 0 < d.eval_fraction < 1:
        raise ConfigError(f"config key 'data.eval_fraction' must be in (0, 1), got {d.eval_fraction}")
    if t.batch_size % t.micro_batch_size:
        raise ConfigError(f"train.batch_size ({t.batch_size}) must be a multiple of train.micro_batch_size "
                          f"({t.micro_batch_size}) times the number of ranks")
    if not 0 <= t.warmup_fraction < 1:
        raise ConfigError(f"config key 'train.warmup_fraction' must be in [0, 1), got {t.warmup_fraction}")
    for key, value in (("train.dtype", t.dtype), ("model.dtype", cfg.model.dtype)):
        if value not in ("auto", "bfloat16", "float32"):
            raise ConfigError(f"config key '{key}' must be auto, bfloat16 or float32, got {value!r}")
    k = len(d.domains)
    if d.proportions is not None and k:  # (the embedded corpus's size is checked once it is read)
        if len(d.proportions) != k:
            raise ConfigError(f"config key 'data.proportions' has {len(d.proportions)} values but there are "
                              f"{k} domains ({', '.join(d.domains)}): give one proportion per domain, in order")
        if any((not math.isfinite(x)) or x < 0 for x in d.proportions):
            raise ConfigError("config key 'data.proportions' must be non-negative numbers")
        if abs(sum(d.proportions) - 1) > 1e-3:
            raise ConfigError(f"config key 'data.proportions' sums to {sum(d.proportions):.6g}, not 1: "
                              "rescale the proportions")
    from drpruning.mixing import check_options
    from drpruning.mixing.base import check_common

    try:
        check_common(m)
        check_options(m)
    except ValueError as e:
        raise ConfigError(str(e) if "config key" in str(e) else f"config key 'mixing': {e}") from None
    ref = m.reference
    if isinstance(ref, str):
        if ref not in ("source", "scaling_law"):
            raise ConfigError(f"config key 'mixing.reference' is {ref!r}: use source, scaling_law "
                              "or a list of per-domain losses")
    elif isinstance(ref, (list, tuple)):
        if k and len(ref) != k:
            raise ConfigError(f"config key 'mixing.reference' has {len(ref)} values for {k} domains")
    else:
        raise ConfigError("config key 'mixing.reference' must be source, scaling_law or a list of numbers")
    if not 0 <= t.distill.weight <= 1:
        raise ConfigError(f"config key 'train.distill.weight' must be in [0, 1], got {t.distill.weight}")
    _positive("train.distill.temperature", t.distill.temperature)
    if cfg.resume not in (True, False, "auto"):
        raise ConfigError(f"config key 'resume' is {cfg.resume!r}: use true, false or auto")
    if t.compile not in (True, False, "auto"):
        raise ConfigError(f"config key 'train.compile' is {t.compile!r}: use true, false or auto")
    if not (isinstance(t.max_bad_steps, int) and t.max_bad_steps >= 1):
        raise ConfigError(f"config key 'train.max_bad_steps' must be an integer >= 1, got {t.max_bad_steps!r}")
    if cfg.log.wandb.mode not in ("offline", "online"):
        raise ConfigError(f"config key 'log.wandb.mode' is {cfg.log.wandb.mode!r}: use offline or online")
    if d.num_proc is not None and not (isinstance(d.num_proc, int) and d.num_proc >= 1):
        raise ConfigError(f"config key 'data.num_proc' must be an integer >= 1 (or null: all cores), "
                          f"got {d.num_proc!r}")
    if cfg.parallel not in ("ddp", "fsdp"):
        raise ConfigError(f"config key 'parallel' is {cfg.parallel!r}: use ddp or fsdp")
    if p.enabled:
        unknown = set(p.structures) - {"layer", "head", "intermediate", "hidden"}
        if unknown:
            raise ConfigError(f"config key 'pruning.structures' has unknown {sorted(unknown)}: "
                              "use layer, head, intermediate, hidden")
        if p.head_mode not in ("kv_group", "query"):
            raise ConfigError(f"config key 'pruning.head_mode' is {p.head_mode!r}: use kv_group or query")
        m = p.mask_phase_steps
        if m and not (p.method == "l0" and 0 < m < t.steps):
            raise ConfigError(f"config key 'pruning.mask_phase_steps' is {m!r}: with pruning.method=l0, a number of "
                              f"steps below train.steps ({t.steps}), the rest training the compact model; or 0")
        phase = m or t.steps  # the steps the masks learn over
        w = p.lagrangian_warmup_steps
        if w is not None and not 0 <= w <= phase:
            raise ConfigError(f"config key 'pruning.lagrangian_warmup_steps' is {w} but the masks learn over "
                              f"{phase} steps: the warmup must fit in them (e.g. 20% of train.steps)")
        if p.shape not in ("proportional", "search"):
            raise ConfigError(f"config key 'pruning.shape' is {p.shape!r}: use search (score the shapes within 2% "
                              "of pruning.target_params) or proportional (shrink every dimension by one factor)")
        if p.init not in ("uniform", "importance", "one_shot"):
            raise ConfigError(f"config key 'pruning.init' is {p.init!r}: use uniform, importance or one_shot")
        if p.method not in ("l0", "importance"):
            raise ConfigError(f"config key 'pruning.method' is {p.method!r}: use l0 or importance")
        if p.method == "importance" and p.init != "importance":
            raise ConfigError("pruning.method=importance cuts by the calibration scores, but pruning.init is "
                              "uniform: set pruning.init=importance (or pruning.method=l0)")
        if p.mask_samples not in ("sequence", "micro_batch"):
            raise ConfigError(f"config key 'pruning.mask_samples' is {p.mask_samples!r}: use sequence or "
                              "micro_batch")
        if p.gap_tolerance < 0:
            raise ConfigError(f"config key 'pruning.gap_tolerance' is {p.gap_tolerance}: use 0 or more (default 1e-6)")
        if p.gates not in ("sampled", "deterministic"):
            raise ConfigError(f"config key 'pruning.gates' is {p.gates!r}: use sampled or deterministic")
        if p.gates == "deterministic" and p.mask_samples == "sequence":
            raise ConfigError("pruning.mask_samples=sequence draws a mask per sequence, but deterministic gates "
                              "draw none: set pruning.mask_samples=micro_batch (or pruning.gates=sampled)")
        if p.log_alpha_bound not in ("fixed", "temperature"):
            raise ConfigError(f"config key 'pruning.log_alpha_bound' is {p.log_alpha_bound!r}: use fixed or "
                              "temperature")
        if p.log_alpha_bound == "temperature" and p.gates != "deterministic":
            raise ConfigError("pruning.log_alpha_bound=temperature bounds deterministic gates by their temperature, "
                              "but pruning.gates is sampled: set pruning.gates=deterministic (or the bound to fixed)")
        if not 0 <= p.hardening_steps < phase:
            raise ConfigError(f"config key 'pruning.hardening_steps' is {p.hardening_steps}: it must be below "
                              f"the {phase} steps the masks learn over (pruning.mask_phase_steps or train.steps)")
        if p.lagrangian_optimizer not in ("adam", "sgd"):
            raise ConfigError(f"config key 'pruning.lagrangian_optimizer' is {p.lagrangian_optimizer!r}: use adam "
                              "or sgd")
        if p.constraint not in ("lagrangian", "projected"):
            raise ConfigError(f"config key 'pruning.constraint' is {p.constraint!r}: use lagrangian or projected")
        if p.mask_schedule not in ("constant", "follow"):
            raise ConfigError(f"config key 'pruning.mask_schedule' is {p.mask_schedule!r}: use constant or follow")
        bad = set(p.protect) - {"layer", "hidden"}
        if bad:
            raise ConfigError(f"config key 'pruning.protect' has {sorted(bad)}: protect layer or hidden units "
                              "(e.g. {hidden: [507]})")
        if not p.target and p.target_params is None:
            raise ConfigError("pruning is enabled but neither 'pruning.target' nor 'pruning.target_params' is set")
