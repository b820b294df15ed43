"""Target shapes: resolve and validate a pruning target against the source config before any training.

A target is a dict with any of `num_hidden_layers`, `hidden_size`, `num_attention_heads`,
`num_key_value_heads`, `intermediate_size` (missing keys keep the source value), and/or a parameter budget
`target_params` ("60M", "1.3B", 60_000_000).

Rule for `target_params` (also in docs/pruning.md): the dimensions given explicitly in `target` stay fixed;
every other *width* dimension whose structure is enabled (`hidden` -> hidden_size, `intermediate` ->
intermediate_size, `head` -> KV groups in kv_group mode or query heads per group in query mode) is scaled by
one common factor s in (0, 1]; the number of layers is never changed by the rule (give it in `target`). Each
scaled dimension is rounded to the nearest multiple of 8 when the source dimension is at least 256 (1
otherwise), and for the Llama family hidden_size is also kept a multiple of num_attention_heads. Among all s
on a grid of step 0.001, the shape with the largest `parameter_count` not above the budget is chosen.
`parameter_count` counts every parameter of the exported model, embeddings included, a tied embedding once.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, replace
from typing import Any

from drpruning.config import ConfigError, PruningConfig
from drpruning.models.families import family_of

SHAPE_KEYS = (
    "num_hidden_layers",
    "hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
)


@dataclass(frozen=True)
class Shape:
    num_hidden_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    head_dim: int

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.num_attention_heads // self.num_key_value_heads

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


def head_dim_of(config: Any) -> int:
    hd = getattr(config, "head_dim", None)
    return int(hd) if hd else config.hidden_size // config.num_attention_heads


def source_shape(config: Any) -> Shape:
    return Shape(
        config.num_hidden_layers,
        config.hidden_size,
        config.num_attention_heads,
        config.num_key_value_heads or config.num_attention_heads,
        config.intermediate_size,
        head_dim_of(config),
    )


def shape_parameter_count(config: Any, shape: Shape) -> dict[str, int]:
    """Parameters of a model of `config`'s family with `shape`: embedding, non-embedding and total."""
    d, f, hd = shape.hidden_size, shape.intermediate_size, shape.head_dim
    q, kv = shape.num_attention_heads * hd, shape.num_key_value_heads * hd
    qkv_bias, o_bias, mlp_bias = family_of(config).biases(config)
    attn = d * (q + 2 * kv) + q * d + (q + 2 * kv) * qkv_bias + d * o_bias
    mlp = 3 * d * f + (2 * f + d) * mlp_bias
    layer = attn + mlp + 2 * d
    non_embedding = shape.num_hidden_layers * layer + d  # + final norm
    tied = bool(getattr(config, "tie_word_embeddings", False))
    embedding = config.vocab_size * d * (1 if tied else 2)
    return {"embedding": embedding, "non_embedding": non_embedding, "total": embedding + non_embedding}


def parameter_count(config: Any) -> int:
    """Total parameters (non-embedding + embedding, a tied embedding once) of a model with `config`."""
    return shape_parameter_count(config, source_shape(config))["total"]


def parse_count(value: Any) -> int:
    """`60M`, `1.3B`, `500k`, `60_000_000` or an int -> int."""
    if isinstance(value, bool):
        raise ConfigError(
            f"config key 'pruning.target_params' must be a count like 60M or 1.3B, got {value!r}"
        )
    if isinstance(value, (int, float)):
        n = value
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kKmMbBgG]?)\s*", str(value).replace("_", ""))
        if not m:
            raise ConfigError(
                f"config key 'pruning.target_params' must be a count like 60M or 1.3B, got {value!r}"
            )
        n = float(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9}[m.group(2).lower()]
    if not n > 0:
        raise ConfigError(f"config key 'pruning.target_params' must be positive, got {value!r}")
    return int(round(n))


def _needs(cfg: PruningConfig, structure: str, key: str, src: int, tgt: int) -> None:
    if tgt != src and structure not in cfg.structures:
        raise ConfigError(
            f"target {key}={tgt} differs from the source ({src}) but structure {structure!r} is "
            f"not in pruning.structures {list(cfg.structures)}: add {structure!r} or keep "
            f"{key}={src}"
        )


def validate_shape(config: Any, cfg: PruningConfig, src: Shape, tgt: Shape) -> None:
    """Raise ConfigError unless `tgt` is reachable from `src` with the enabled structures and head mode."""
    family = family_of(config)
    for key in SHAPE_KEYS:
        s, t = getattr(src, key), getattr(tgt, key)
        if t <= 0:
            what = {
                "num_hidden_layers": "no layers",
                "hidden_size": "no hidden dimensions",
                "num_attention_heads": "a layer with no attention heads",
                "num_key_value_heads": "a layer with no KV heads",
                "intermediate_size": "a layer with no FFN channels",
            }[key]
            raise ConfigError(
                f"target {key}={t} would leave {what}: give a value >= 1 (pruning removes units, "
                "it never removes a whole sublayer)"
            )
        if t > s:
            raise ConfigError(f"target {key}={t} is larger than the source model's {s}: pruning only shrinks")
    _needs(cfg, "layer", "num_hidden_layers", src.num_hidden_layers, tgt.num_hidden_layers)
    _needs(cfg, "hidden", "hidden_size", src.hidden_size, tgt.hidden_size)
    _needs(cfg, "intermediate", "intermediate_size", src.intermediate_size, tgt.intermediate_size)
    _needs(cfg, "head", "num_attention_heads", src.num_attention_heads, tgt.num_attention_heads)
    g = src.group_size
    if cfg.head_mode == "kv_group":
        if tgt.num_attention_heads != g * tgt.num_key_value_heads:
            kv = max(1, tgt.num_attention_heads // g)
            raise ConfigError(
                f"target heads {tgt.num_attention_heads} / KV heads {tgt.num_key_value_heads} do not fit "
                f"head_mode kv_group: whole KV groups of {g} query heads are pruned, so num_attention_heads "
                f"must equal {g} x num_key_value_heads (e.g. num_key_value_heads={kv}, "
                f"num_attention_heads={g * kv}), or use head_mode=query"
            )
    else:
        if tgt.num_key_value_heads != src.num_key_value_heads:
            raise ConfigError(
                f"head_mode query keeps every KV head, so num_key_value_heads must stay "
                f"{src.num_key_value_heads} (got {tgt.num_key_value_heads}); use head_mode=kv_group "
                "to prune KV groups"
            )
        if tgt.num_attention_heads % tgt.num_key_value_heads:
            raise ConfigError(
                f"head_mode query prunes the same number of query heads in each of the "
                f"{tgt.num_key_value_heads} KV groups, so num_attention_heads "
                f"({tgt.num_attention_heads}) must be a multiple of {tgt.num_key_value_heads}"
            )
    if family.hidden_multiple_of_heads and tgt.hidden_size % tgt.num_attention_heads:
        raise ConfigError(
            f"target hidden_size {tgt.hidden_size} is not a multiple of num_attention_heads "
            f"{tgt.num_attention_heads}: transformers' LlamaConfig refuses such a config (even with "
            "an explicit head_dim), so the exported model would not load; pick a multiple"
        )


def _explicit(config: Any, cfg: PruningConfig, src: Shape) -> tuple[Shape, set[str]]:
    target = dict(cfg.target or {})
    unknown = set(target) - set(SHAPE_KEYS)
    if unknown:
        raise ConfigError(
            f"config key 'pruning.target' has unknown {sorted(unknown)}: use "
            f"{', '.join(SHAPE_KEYS)} (or pruning.target_params)"
        )
    for k, v in target.items():
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"config key 'pruning.target.{k}' must be an integer, got {v!r}")
    g = src.group_size
    heads, kv = target.get("num_attention_heads"), target.get("num_key_value_heads")
    # fill the other head count from the one given, following the head mode
    if cfg.head_mode == "kv_group":
        if heads is None and kv is not None:
            heads = g * kv
        elif kv is None and heads is not None:
            if heads % g:
                raise ConfigError(
                    f"target num_attention_heads={heads} is not a multiple of the KV group size "
                    f"{g}: head_mode kv_group prunes whole groups, so use a multiple of {g} "
                    "or head_mode=query"
                )
            kv = heads // g
    elif kv is None:
        kv = src.num_key_value_heads
    if heads is not None:
        target.update(num_attention_heads=heads, num_key_value_heads=kv)
    shape = replace(src, **target)
    fixed = set(target) | ({"num_attention_heads", "num_key_value_heads"} if heads is not None else set())
    return shape, fixed


def _round(x: float, src: int, align: int) -> int:
    n = max(align, int(round(x / align)) * align)
    return n if n <= src else max(align, src // align * align)


def _scaled(config: Any, cfg: PruningConfig, src: Shape, base: Shape, fixed: set[str], s: float) -> Shape:
    shape = base
    if "head" in cfg.structures and "num_attention_heads" not in fixed:
        if cfg.head_mode == "kv_group":
            kv = max(1, round(s * src.num_key_value_heads))
            shape = replace(shape, num_key_value_heads=kv, num_attention_heads=kv * src.group_size)
        else:
            g = max(1, round(s * src.group_size))
            shape = replace(shape, num_attention_heads=g * src.num_key_value_heads)
    if "intermediate" in cfg.structures and "intermediate_size" not in fixed:
        f = src.intermediate_size
        shape = replace(shape, intermediate_size=_round(s * f, f, 8 if f >= 256 else 1))
    if "hidden" in cfg.structures and "hidden_size" not in fixed:
        d = src.hidden_size
        align = 8 if d >= 256 else 1
        if family_of(config).hidden_multiple_of_heads:
            align = math.lcm(align, shape.num_attention_heads)
        shape = replace(shape, hidden_size=_round(s * d, d, align))
    return shape


def resolve_target(config: Any, cfg: PruningConfig) -> Shape:
    """The validated target shape for pruning a model with `config` under `cfg` (see the module docstring)."""
    family_of(config)
    if not cfg.structures:
        raise ConfigError("pruning.structures is empty: enable at least one of layer, head, intermediate, hidden")
    src = source_shape(config)
    base, fixed = _explicit(config, cfg, src)
    if cfg.target_params is None:
        if not cfg.target:
            raise ConfigError("pruning needs a target: set pruning.target (a shape) or pruning.target_params")
        validate_shape(config, cfg, src, base)
        return base
    budget = parse_count(cfg.target_params)
    source_total = parameter_count(config)
    if budget >= source_total:
        raise ConfigError(
            f"pruning.target_params={cfg.target_params} ({budget:,}) is not smaller than the source "
            f"model ({source_total:,} parameters)"
        )
    best, best_n, smallest = None, -1, None
    for i in range(1000, 0, -1):
        shape = _scaled(config, cfg, src, base, fixed, i / 1000)
        try:
            validate_shape(config, cfg, src, shape)
        except ConfigError:
            continue
        n = shape_parameter_count(config, shape)["total"]
        smallest = n if smallest is None else min(smallest, n)
        if best_n < n <= budget:
            best, best_n = shape, n
    if best is None:
        raise ConfigError(
            f"pruning.target_params={cfg.target_params} ({budget:,}) cannot be reached with "
            f"structures {list(cfg.structures)} and target {dict(cfg.target)}: the smallest "
            f"shape has {smallest:,} parameters (enable more structures or lower num_hidden_layers)"
        )
    return best


def derive_config(config: Any, shape: Shape, kept_layers: list[int] | None = None) -> Any:
    """A config of the same class with `shape` (explicit head_dim); per-layer lists follow `kept_layers`."""
    d = config.to_dict()
    d.update({k: getattr(shape, k) for k in SHAPE_KEYS}, head_dim=shape.head_dim)
    kept = list(kept_layers) if kept_layers is not None else list(range(shape.num_hidden_layers))
    if len(kept) != shape.num_hidden_layers:
        raise ValueError(f"{len(kept)} kept layers for a {shape.num_hidden_layers}-layer shape")
    family_of(config).rewrite_config(d, kept)
    return type(config).from_dict(d)
