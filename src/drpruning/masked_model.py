"""Apply a Pruner's masks to an unmodified transformers Llama / Qwen2 / Mistral model (method.md §3).

Hooks only, no copied modeling code, attention kernels (SDPA, flash) untouched:
- a forward pre-hook on the decoder samples every mask once per forward (so gradient checkpointing's
  recomputation sees the same masks) and precomputes the per-layer vectors below;
- `o_proj` pre-hook: per-head mask on its input (each head's head_dim slice);
- `o_proj` / `down_proj` forward hooks: output times layer gate times hidden mask;
- `down_proj` pre-hook: intermediate mask on its input;
- every RMSNorm's `forward` is overridden on the instance (state-dict keys unchanged) by a masked RMSNorm: the
  mean of squares runs only over dimensions whose hidden mask is non-zero, and the output is multiplied by the
  mask. A plain RMSNorm followed by a multiply would not equal the sliced model.
The embedding output is not masked: dimensions with a zero mask are never read downstream.
"""

from __future__ import annotations

import types
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from drpruning.target import check_supported

if TYPE_CHECKING:
    from drpruning.masks import Pruner


def decoder(model: nn.Module) -> nn.Module:
    """The decoder stack (`model.model` of a *ForCausalLM)."""
    check_supported(model.config)
    base = getattr(model, "model", model)
    if not hasattr(base, "layers") or not hasattr(base, "norm"):
        raise TypeError(f"{type(model).__name__} has no decoder with .layers and .norm")
    return base


def prepare_masks(pruner: Pruner) -> dict[str, torch.Tensor | None]:
    """Sample (or compute) the masks for one forward and expand them to what the hooks multiply."""
    m = pruner.masks()
    src = pruner.source
    L = src.num_hidden_layers
    cur: dict[str, torch.Tensor | None] = {
        "head": None,
        "intermediate": m.get("intermediate"),
        "out": None,
        "hidden": m.get("hidden"),
        "norm_avg": None,
    }
    if "head" in m:
        head = m["head"].reshape(L, -1)  # query mode: [L, H_kv, G] -> [L, H], query head j in group j // G
        if pruner.head_mode == "kv_group":
            head = head.repeat_interleave(src.group_size, dim=-1)
        cur["head"] = head.repeat_interleave(src.head_dim, dim=-1)  # [L, H * head_dim], o_proj input layout
    layer, hidden = m.get("layer"), m.get("hidden")
    if layer is not None and hidden is not None:
        cur["out"] = layer[:, None] * hidden[None, :]
    elif layer is not None:
        cur["out"] = layer[:, None]
    elif hidden is not None:
        cur["out"] = hidden[None, :].expand(L, -1)
    if hidden is not None:
        keep = (hidden != 0).to(torch.float32)
        cur["norm_avg"] = keep / keep.sum().clamp_min(1.0)
    # one view per layer: a single backward for all layers instead of a zero-filled [L, ...] gradient per hook
    for key in ("head", "intermediate", "out"):
        if cur[key] is not None:
            cur[key] = cur[key].unbind(0)
    return cur


def _masked_rms_forward(pruner: Pruner):
    def forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        z, avg = pruner.current.get("hidden"), pruner.current.get("norm_avg")
        input_dtype = hidden_states.dtype
        x = hidden_states.to(torch.float32)
        # mean over the kept dimensions only: one float32 matrix-vector product (autocast off, or it would
        # run in bf16); `avg` is 1/kept on kept dimensions and 0 elsewhere
        with torch.autocast(x.device.type, enabled=False):
            variance = x.pow(2) @ avg.to(torch.float32)[:, None]
        x = x * torch.rsqrt(variance + self.variance_epsilon)
        return (self.weight * z).to(input_dtype) * x.to(input_dtype)

    return forward


def attach(model: nn.Module, pruner: Pruner) -> list[Any]:
    """Install the hooks; returns the handles for `detach`."""
    base = decoder(model)
    if len(base.layers) != pruner.source.num_hidden_layers:
        raise ValueError(
            f"model has {len(base.layers)} layers, the pruner was built for {pruner.source.num_hidden_layers}"
        )
    handles: list[Any] = []

    def sample(_module, _args):
        pruner.current = prepare_masks(pruner)

    handles.append(base.register_forward_pre_hook(sample))

    for i, layer in enumerate(base.layers):
        o_proj, down = layer.self_attn.o_proj, layer.mlp.down_proj

        def head_pre(_m, args, i=i):
            z = pruner.current["head"]
            return (args[0] * z[i].to(args[0].dtype),) + tuple(args[1:])

        def ffn_pre(_m, args, i=i):
            z = pruner.current["intermediate"]
            return (args[0] * z[i].to(args[0].dtype),) + tuple(args[1:])

        def out_post(_m, _args, output, i=i):
            return output * pruner.current["out"][i].to(output.dtype)

        if "head" in pruner.structures:
            handles.append(o_proj.register_forward_pre_hook(head_pre))
        if "intermediate" in pruner.structures:
            handles.append(down.register_forward_pre_hook(ffn_pre))
        if "layer" in pruner.structures or "hidden" in pruner.structures:
            handles.append(o_proj.register_forward_hook(out_post))
            handles.append(down.register_forward_hook(out_post))

    if "hidden" in pruner.structures:
        forward = _masked_rms_forward(pruner)
        for norm in norms(base):
            norm.forward = types.MethodType(forward, norm)
            handles.append(("norm", norm))
    return handles


def norms(base: nn.Module) -> list[nn.Module]:
    """Every RMSNorm on the residual stream: input and post-attention norms of each layer, the final norm."""
    out = []
    for layer in base.layers:
        out += [layer.input_layernorm, layer.post_attention_layernorm]
    return out + [base.norm]


def detach(model: nn.Module, handles: list[Any]) -> None:
    for h in handles:
        if isinstance(h, tuple) and h[0] == "norm":
            h[1].__dict__.pop("forward", None)
        else:
            h.remove()
