"""Model families: everything drpruning knows about one architecture, in one entry.

Shape resolution, the mask hooks, export and FSDP wrapping read a model only through its `Family`: module
paths, the bias layout, the hidden-size rule and how a config is rewritten for a pruned shape. Adding a
Llama-like family (pre-norm RMSNorm decoder, q/k/v/o attention, gated MLP) is one entry in `FAMILIES` and a
tiny test config (docs/design.md, "Adding a model family").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from drpruning.config import ConfigError


def _attention_bias(config: Any) -> tuple[bool, bool, bool]:
    attn = bool(getattr(config, "attention_bias", False))
    return attn, attn, bool(getattr(config, "mlp_bias", False))


def _qwen2_bias(config: Any) -> tuple[bool, bool, bool]:
    return True, False, False  # Qwen2 always has q/k/v biases, never o_proj or MLP ones


def _keep_window_layers(d: dict, kept: list[int]) -> None:
    # Qwen2: layers at index >= max_window_layers use sliding attention; keep each kept layer's kind
    if isinstance(d.get("max_window_layers"), int):
        d["max_window_layers"] = sum(1 for i in kept if i < d["max_window_layers"])


@dataclass(frozen=True)
class Family:
    """A Llama-like architecture; the defaults are Llama's names. Registered under its `model_type`."""

    biases: Callable[[Any], tuple[bool, bool, bool]] = _attention_bias  # (q/k/v, o_proj, MLP) bias present
    # transformers' LlamaConfig refuses hidden_size % num_attention_heads != 0 even with an explicit head_dim
    hidden_multiple_of_heads: bool = False
    per_layer_lists: tuple[str, ...] = ("layer_types",)  # config lists with one entry per layer
    rewrite: Callable[[dict, list[int]], None] | None = None  # any other config change for kept layers
    decoder: str = "model"  # attribute of the *ForCausalLM holding layers, norm and embed_tokens
    attention: str = "self_attn"
    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    o: str = "o_proj"
    mlp: str = "mlp"
    gate: str = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"
    norms: tuple[str, str] = ("input_layernorm", "post_attention_layernorm")
    final_norm: str = "norm"
    embedding: str = "embed_tokens"

    # ---- modules of a loaded model
    def base(self, model: nn.Module) -> nn.Module:
        """The decoder stack (`model.model` of a *ForCausalLM, or the bare decoder)."""
        base = getattr(model, self.decoder, model)
        if not isinstance(getattr(base, "layers", None), nn.ModuleList) or not hasattr(base, self.final_norm):
            raise TypeError(f"{type(model).__name__} has no decoder with .layers and .{self.final_norm}")
        return base

    def layers(self, model: nn.Module) -> nn.ModuleList:
        return self.base(model).layers

    def attn(self, layer: nn.Module, name: str) -> nn.Linear:
        return getattr(getattr(layer, self.attention), getattr(self, name))

    def ffn(self, layer: nn.Module, name: str) -> nn.Linear:
        return getattr(getattr(layer, self.mlp), getattr(self, name))

    def residual_norms(self, model: nn.Module) -> list[nn.Module]:
        """Every norm on the residual stream: both norms of each layer, then the final norm."""
        base = self.base(model)
        return [getattr(layer, n) for layer in base.layers for n in self.norms] + [getattr(base, self.final_norm)]

    # ---- state-dict keys of a compact model
    def prefix(self, model: nn.Module) -> str:
        return f"{self.decoder}." if getattr(model, self.decoder, None) is not None else ""

    def attn_key(self, layer: int, name: str, what: str = "weight") -> str:
        return f"layers.{layer}.{self.attention}.{getattr(self, name)}.{what}"

    def ffn_key(self, layer: int, name: str, what: str = "weight") -> str:
        return f"layers.{layer}.{self.mlp}.{getattr(self, name)}.{what}"

    def norm_key(self, layer: int, which: int) -> str:
        return f"layers.{layer}.{self.norms[which]}.weight"

    # ---- configs
    def rewrite_config(self, d: dict, kept_layers: list[int]) -> None:
        """Make a config dict (already holding the new shape) describe the kept layers."""
        for key in self.per_layer_lists:
            if isinstance(d.get(key), list):
                d[key] = [d[key][i] for i in kept_layers]
        if self.rewrite is not None:
            self.rewrite(d, kept_layers)


LLAMA = Family(hidden_multiple_of_heads=True)
FAMILIES: dict[str, Family] = {
    "llama": LLAMA,  # SmolLM2, Llama 2 / 3
    "qwen2": Family(biases=_qwen2_bias, rewrite=_keep_window_layers),
    "mistral": Family(),
    "smollm3": Family(per_layer_lists=("layer_types", "no_rope_layers")),  # every 4th layer NoPE
}
SUPPORTED = tuple(FAMILIES)


def family_of(config: Any) -> Family:
    """The family of a config (a transformers config or anything with `model_type`)."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise ConfigError(
            f"drpruning does not support model type {model_type!r}: supported architectures are "
            f"{', '.join(SUPPORTED)} (SmolLM2 is llama)"
        )
    return FAMILIES[model_type]
