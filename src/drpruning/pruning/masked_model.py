"""Apply a Pruner's masks to an unmodified transformers model of a supported family (docs/method.md §3).

`attach(model, pruner)` returns a `MaskedModel` handle; its `detach()` restores the plain model. The handle
holds the per-forward masks (`current`), so the pruner never needs to know the model.

A pre-hook and per-instance `forward` overrides, no copied modeling code, attention kernels (SDPA, flash)
untouched:
- a forward pre-hook on the decoder samples every mask once per forward (so gradient checkpointing's
  recomputation sees the same masks) and precomputes the per-layer vectors below;
- `o_proj` and `down_proj` run with masked weights: input columns times the head mask (each head's head_dim
  slice) or the intermediate mask, output rows (and bias) times layer gate times hidden mask. Scaling the
  weight instead of the activations gives the same function with elementwise work of the weight's size, not
  the batch's: a token batch is usually far larger than an output dimension. With one mask sample per
  sequence (`pruning.mask_samples: sequence`) the masks differ along the batch and are applied
  to the activations instead (measured in bench/bench_pruning.py: 0.94x a plain step's tokens/s);
- every RMSNorm's `forward` is overridden on the instance (state-dict keys unchanged) by a masked RMSNorm: the
  mean of squares runs only over dimensions whose hidden mask is non-zero, and the output is multiplied by the
  mask. A plain RMSNorm followed by a multiply would not equal the sliced model.
The embedding output is not masked: dimensions with a zero mask are never read downstream.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from drpruning.models.families import family_of

if TYPE_CHECKING:
    from drpruning.pruning.pruner import Pruner


def prepare_masks(pruner: Pruner, batch: int | None = None) -> dict[str, torch.Tensor | None]:
    """Sample (or compute) the masks for one forward of `batch` sequences and expand them to what the hooks
    multiply. Per-sequence samples carry a leading [batch] dimension on every vector below."""
    m = pruner.masks(batch)
    src = pruner.source
    L = src.num_hidden_layers
    any_s = next(iter(m))
    lead = m[any_s].dim() - pruner.log_alpha[any_s].dim()  # 1 for per-sequence samples, else 0
    cur: dict[str, torch.Tensor | None] = {
        "head": None,
        "intermediate": m.get("intermediate"),
        "out": None,
        "hidden": m.get("hidden"),
        "norm_avg": None,
    }
    if "head" in m:
        # query mode: [.., L, H_kv, G] -> [.., L, H], query head j in group j // G
        head = m["head"].reshape(*m["head"].shape[:lead], L, -1)
        if pruner.head_mode == "kv_group":
            head = head.repeat_interleave(src.group_size, dim=-1)
        cur["head"] = head.repeat_interleave(src.head_dim, dim=-1)  # [.., L, H * head_dim], o_proj input layout
    layer, hidden = m.get("layer"), m.get("hidden")
    if layer is not None:
        layer = layer.unsqueeze(-1)  # [.., L, 1]
    if hidden is not None:
        hidden_rows = hidden.unsqueeze(-2)  # [.., 1, d]
    if layer is not None and hidden is not None:
        cur["out"] = layer * hidden_rows
    elif layer is not None:
        cur["out"] = layer
    elif hidden is not None:
        cur["out"] = hidden_rows.expand(*hidden.shape[:lead], L, -1)
    if hidden is not None:
        keep = (hidden != 0).to(torch.float32)
        cur["norm_avg"] = keep / keep.sum(-1, keepdim=True).clamp_min(1.0)
    # one view per layer: a single backward for all layers instead of a zero-filled [L, ...] gradient per use
    for key in ("head", "intermediate", "out"):
        if cur[key] is not None:
            cur[key] = cur[key].unbind(lead)
    return cur


def _masked_rms_forward(handle: MaskedModel):
    def forward(self: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        z, avg = handle.current.get("hidden"), handle.current.get("norm_avg")
        input_dtype = hidden_states.dtype
        x = hidden_states.to(torch.float32)
        # mean over the kept dimensions only: one float32 matrix-vector product (autocast off, or it would
        # run in bf16); `avg` is 1/kept on kept dimensions and 0 elsewhere
        avg = avg.to(torch.float32)
        with torch.autocast(x.device.type, enabled=False):  # per-sequence masks: [B, T, d] @ [B, d, 1]
            variance = x.pow(2) @ avg.unsqueeze(-1)
        if z.dim() == 2:
            z = z[:, None, :]
        x = x * torch.rsqrt(variance + self.variance_epsilon)
        return (self.weight * z).to(input_dtype) * x.to(input_dtype)

    return forward


class MaskedLinear(torch.autograd.Function):
    """y = x @ (W * zo zin^T)^T + b * zo, with zo the output-row mask ([out] or a [1] gate) and zin the
    input-column mask ([in]); either may be None. Autograd would keep the [out, in] mask product and the
    masked weight for backward (a weight-sized tensor per layer: 5.8 GB for LLaMA-7B's down_proj alone);
    this keeps only x and the masks, recomputes the masked weight in backward, and gets the masks' gradients
    as two matrix-vector products. Under autocast it computes in the autocast dtype, as nn.Linear would."""

    @staticmethod
    def forward(ctx, x, weight, bias, zo, zin):
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        x = x.to(dtype)
        b = None if bias is None else (bias if zo is None else bias * zo.to(bias.dtype)).to(dtype)
        with torch.autocast(device, enabled=False):
            y = nn.functional.linear(x, _masked_weight(weight, zo, zin).to(dtype), b)
        ctx.save_for_backward(x, weight, bias, zo, zin)
        return y

    @staticmethod
    def backward(ctx, gy):
        x, weight, bias, zo, zin = ctx.saved_tensors
        need_x, need_w, need_b, need_zo, need_zin = ctx.needs_input_grad
        gx = gw = gb = gzo = gzin = None
        with torch.autocast(gy.device.type, enabled=False):
            gy = gy.to(x.dtype)
            if need_x:
                gx = gy @ _masked_weight(weight, zo, zin).to(x.dtype)
            gy2, x2 = gy.reshape(-1, gy.shape[-1]), x.reshape(-1, x.shape[-1])
            if need_w or need_zo or need_zin:
                g_masked = (gy2.t() @ x2).to(weight.dtype)  # gradient of the masked weight, [out, in]
            if need_w:
                gw = g_masked if zo is None and zin is None else g_masked * _scale(zo, zin, weight.dtype)
            if need_zo or need_zin:
                g = g_masked * weight  # d loss / d (zo zin^T), elementwise
                if need_zo:  # per output row, then summed to zo's shape (a [1] layer gate takes the total)
                    gzo = g @ zin.to(g.dtype) if zin is not None else g.sum(1)
                if need_zin:
                    gzin = zo.to(g.dtype).expand(g.shape[0]) @ g if zo is not None else g.sum(0)
            if bias is not None and (need_b or need_zo):
                g_bias = gy2.sum(0).to(bias.dtype)
                if need_b:
                    gb = g_bias if zo is None else g_bias * zo.to(bias.dtype)
                if need_zo:
                    gzo = gzo + g_bias * bias
        gzo = None if gzo is None else gzo.sum_to_size(zo.shape).to(zo.dtype)
        gzin = None if gzin is None else gzin.to(zin.dtype)
        return gx, gw, gb, gzo, gzin


def _scale(zo: torch.Tensor | None, zin: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The [out, in] (or broadcastable [out, 1] / [1, in]) product of the masks."""
    if zo is not None and zin is not None:
        return (zo[:, None] * zin[None, :]).to(dtype)
    return zo.to(dtype)[:, None] if zo is not None else zin.to(dtype)[None, :]


def _masked_weight(weight: torch.Tensor, zo: torch.Tensor | None, zin: torch.Tensor | None) -> torch.Tensor:
    return weight if zo is None and zin is None else weight * _scale(zo, zin, weight.dtype)


def _sequence_masked_linear(linear: nn.Linear, x: torch.Tensor, zo: torch.Tensor | None,
                            zin: torch.Tensor | None) -> torch.Tensor:
    """Masks with a leading [B] dimension (one sample per sequence of x [B, T, in]) scale the activations:
    (x * zin) @ W^T + b, times zo. The same function as MaskedLinear for a batch whose masks are equal."""
    if zin is not None:
        x = x * zin[:, None, :].to(x.dtype)
    y = nn.functional.linear(x, linear.weight, linear.bias)
    return y if zo is None else y * zo[:, None, :].to(y.dtype)


def _masked_linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """forward of a masked o_proj / down_proj: its masks are the module's `masks` attribute, (input-column
    mask, output-row mask), set by the decoder's pre-hook each forward. One function for every layer, with
    no per-layer constant, so `torch.compile` traces one decoder-layer graph for all layers."""
    zin, zo = self.masks
    if (zo if zo is not None else zin).dim() == 2:  # one mask per sequence: on the activations
        return _sequence_masked_linear(self, x, zo, zin)
    return MaskedLinear.apply(x, self.weight, self.bias, zo, zin)


class MaskedModel:
    """The masks installed on one model: `current` holds this forward's masks, `detach()` removes them,
    `unmasked()` runs a block on the plain model (e.g. the source model's own evaluation)."""

    def __init__(self, model: nn.Module, pruner: Pruner) -> None:
        self.model, self.pruner = model, pruner
        self.current: dict[str, Any] = {}
        self._handles: list[Any] = []

    def detach(self) -> None:
        for h in self._handles:
            if isinstance(h, nn.Module):  # an instance override: the class's forward returns
                h.__dict__.pop("forward", None)
                h.__dict__.pop("masks", None)
            else:
                h.remove()
        self._handles = []

    @contextlib.contextmanager
    def unmasked(self) -> Iterator[None]:
        self.detach()
        try:
            yield
        finally:
            self.install()

    def install(self) -> MaskedModel:
        model, pruner = self.model, self.pruner
        family = family_of(model.config)
        base = family.base(model)
        if len(base.layers) != pruner.source.num_hidden_layers:
            raise ValueError(
                f"model has {len(base.layers)} layers, the pruner was built for {pruner.source.num_hidden_layers}"
            )

        outputs = "layer" in pruner.structures or "hidden" in pruner.structures
        masked: list[tuple[nn.Module, int, str | None]] = []  # (module, layer, its input mask's key)
        for i, layer in enumerate(base.layers):
            for module, in_key in ((family.attn(layer, "o"), "head"), (family.ffn(layer, "down"), "intermediate")):
                in_key = in_key if in_key in pruner.structures else None
                if in_key is not None or outputs:
                    masked.append((module, i, in_key))

        def sample(_module, args, kwargs):
            ids = args[0] if args else kwargs.get("input_ids")
            ids = ids if ids is not None else kwargs.get("inputs_embeds")
            cur = self.current = prepare_masks(pruner, ids.shape[0] if ids is not None else None)
            for module, i, in_key in masked:
                module.masks = (cur[in_key][i] if in_key is not None and cur[in_key] is not None else None,
                                cur["out"][i] if cur["out"] is not None else None)

        self._handles.append(base.register_forward_pre_hook(sample, with_kwargs=True))
        for module, _, _ in masked:
            module.forward = types.MethodType(_masked_linear_forward, module)
            self._handles.append(module)
        if "hidden" in pruner.structures:
            forward = _masked_rms_forward(self)
            for norm in family.residual_norms(model):
                norm.forward = types.MethodType(forward, norm)
                self._handles.append(norm)
        return self


def attach(model: nn.Module, pruner: Pruner) -> MaskedModel:
    """Install the masks of `pruner` on `model` (its modules are not replaced, only their forwards)."""
    return MaskedModel(model, pruner).install()
