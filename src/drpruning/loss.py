"""The one next-token loss, used by the training step, the held-out evaluation and `drpruning eval`."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_nll(model: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy of every predicted token, [batch, seq_len - 1], in float32."""
    return token_losses(model, input_ids)[0]


def token_losses(model: torch.nn.Module, input_ids: torch.Tensor, teacher: torch.nn.Module | None = None,
                 temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(next-token cross-entropy, KL from `teacher`'s next-token distribution or None), each [B, T - 1]."""
    logits = model(input_ids=input_ids).logits[:, :-1]
    nll = nll_from_logits(logits, input_ids[:, 1:])
    if teacher is None:
        return nll, None
    with torch.no_grad():
        target = teacher(input_ids=input_ids).logits[:, :-1]
    return nll, distill_kl(logits, target, temperature)


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


CHUNK_ROWS = 1024  # tokens per distillation chunk: bounds the float32 [tokens, vocab] temporaries


def nll_from_logits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of next-token `logits` [B, T, V] against `targets` [B, T], per token, in float32."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)


def _kl_rows(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    log_q = F.log_softmax(student.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher.float() / temperature, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
               chunk_rows: int = CHUNK_ROWS) -> torch.Tensor:
    """KL(teacher || student) of the softened next-token distributions, per token ([B, T]), times T^2 so
    that its gradient keeps the scale of the cross-entropy's. Computed `chunk_rows` tokens at a time and
    recomputed in backward, so float32 copies of the logits never exist for more than one chunk."""
    from torch.utils.checkpoint import checkpoint

    s, t = student_logits.flatten(0, -2), teacher_logits.detach().flatten(0, -2)
    parts = [checkpoint(_kl_rows, s[i:i + chunk_rows], t[i:i + chunk_rows], temperature, use_reentrant=False)
             if s.requires_grad else _kl_rows(s[i:i + chunk_rows], t[i:i + chunk_rows], temperature)
             for i in range(0, s.shape[0], chunk_rows)]
    return (torch.cat(parts) * temperature**2).view(student_logits.shape[:-1])
