"""The one next-token loss, used by the training step, the held-out evaluation and `drpruning eval`."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_nll(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of every predicted token, [batch, seq_len - 1], in float32."""
    logits = model(input_ids=input_ids).logits[:, :-1]
    targets = input_ids[:, 1:]
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast to `dtype` (e.g. bf16 compute over float32 weights); off for None or float32."""
    enabled = dtype is not None and dtype != torch.float32
    return torch.autocast(device.type, dtype=dtype if enabled else None, enabled=enabled)


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX). Without, oneDNN falls back to a generic
    kernel: 30x slower than float32 on an AVX2 machine, measured."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, p, lambda: False)() for p in probes)


def autocast_dtype(name: str, device: torch.device) -> torch.dtype:
    """The compute dtype for `train.dtype`: auto is bf16 where the hardware runs it fast, else float32."""
    if name == "float32":
        return torch.float32
    if name == "bfloat16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    # about twice as fast as float32 on x86 CPUs with AVX512-BF16 / AMX, far slower on the others
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
