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
    logits = model(input_ids=input_ids).logits
    if teacher is None:  # the last position's logits are ignored, not sliced off
        return nll_from_logits(logits, input_ids[:, 1:]), None
    with torch.no_grad():
        target = teacher(input_ids=input_ids).logits
    return nll_and_kl(logits, input_ids[:, 1:], target, temperature)


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


CHUNK_ROWS = 1024  # tokens per loss chunk: bounds the float32 [tokens, vocab] temporaries


def _spans(shape: torch.Size, rows: int) -> list[tuple[int, slice]]:
    """(sequence, token slice) pieces of at most `rows` tokens covering a [B, T, ...] tensor. A piece of
    logits[b] is a view; flattening logits[:, :-1] to [B * (T - 1), V] first would copy all of it."""
    return [(b, slice(i, min(i + rows, shape[1]))) for b in range(shape[0]) for i in range(0, shape[1], rows)]


def _nll_rows(s: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(s.float(), targets, reduction="none")


def _nll_rows_grad(s: torch.Tensor, targets: torch.Tensor, gn: torch.Tensor) -> torch.Tensor:
    """d nll / ds = softmax(s) - onehot(target), times the incoming gradient (the compiled backward)."""
    g = torch.softmax(s.float(), dim=-1).mul_(gn[:, None])
    return g.scatter_add_(-1, targets[:, None], -gn[:, None])


def _nll_kl_rows(s: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor,
                 temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy and T^2 KL(teacher || student) of one chunk of rows, float32."""
    s = s.float()
    log_q = torch.log_softmax(s, dim=-1)
    nll = -log_q.gather(-1, targets[:, None]).squeeze(-1)
    if temperature != 1.0:
        log_q = torch.log_softmax(s / temperature, dim=-1)
    log_p = torch.log_softmax(teacher.float() / temperature, dim=-1)
    diff = log_p - log_q
    return nll, log_p.exp_().mul_(diff).sum(-1) * temperature**2


def _nll_kl_rows_grad(s: torch.Tensor, teacher: torch.Tensor, targets: torch.Tensor, gn: torch.Tensor,
                      gk: torch.Tensor, temperature: float) -> torch.Tensor:
    """d nll / ds = q - onehot(target), d (T^2 KL) / ds = T (q_T - p_T), times the incoming gradients."""
    s, gn, gk = s.float(), gn[:, None].float(), gk[:, None].float() * temperature
    p = torch.softmax(teacher.float() / temperature, dim=-1)
    if temperature == 1.0:  # q (gn + gk) - p gk
        g = torch.softmax(s, dim=-1).mul_(gn + gk).sub_(p.mul_(gk))
    else:  # q gn + (q_T - p_T) gk
        g = torch.softmax(s / temperature, dim=-1).sub_(p).mul_(gk).add_(torch.softmax(s, dim=-1).mul_(gn))
    return g.scatter_add_(-1, targets[:, None], -gn)


_KERNELS = {"nll": _nll_rows, "nll_grad": _nll_rows_grad, "nll_kl": _nll_kl_rows, "nll_kl_grad": _nll_kl_rows_grad}
_COMPILED: dict = {}  # the same kernels compiled (`compile_loss`): their passes over [rows, vocab] fused


def compile_loss(on: bool = True) -> None:
    """`train.compile`: run the loss's per-chunk math through torch.compile (static shapes: one graph per chunk
    length). Off: the eager kernels, and the cross-entropy's backward through torch's own autograd."""
    _COMPILED.clear()
    if on:
        _COMPILED.update({k: torch.compile(f, dynamic=False) for k, f in _KERNELS.items()})


def _kernel(name: str):
    return _COMPILED.get(name, _KERNELS[name])


class _ChunkedNLL(torch.autograd.Function):
    """Per-token cross-entropy, `rows` tokens at a time in float32, whatever the logits' dtype.

    Forward keeps the logits themselves (no copy) for backward, which recomputes each chunk's float32
    log-softmax and writes its gradient into the logits' gradient, in the logits' dtype. So float32
    [tokens, vocab] tensors exist for one chunk at a time (its float32 copy and log-softmax in forward; the
    log-softmax and two gradients in backward), where autograd through F.cross_entropy on all the logits
    keeps a full float32 log-softmax and makes full float32 copies and gradients. Each chunk runs torch's
    own cross-entropy, forward and backward, and rows are computed independently: values and gradients are
    those of F.cross_entropy on a float32 copy of all the logits (bit for bit on the development CPU: the
    stored golden loss curve did not move)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, rows: int) -> torch.Tensor:
        nll = torch.empty(targets.shape, dtype=torch.float32, device=logits.device)
        rows_fn = _kernel("nll")
        with torch.no_grad(), torch.autocast(logits.device.type, enabled=False):
            for b, span in _spans(targets.shape, rows):
                nll[b, span] = rows_fn(logits[b, span], targets[b, span])
        ctx.save_for_backward(logits, targets)
        ctx.rows = rows
        return nll

    @staticmethod
    def backward(ctx, grad_nll: torch.Tensor):
        logits, targets = ctx.saved_tensors
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        grad[:, targets.shape[1]:].zero_()  # positions past the targets (the last one's logits) predict nothing
        if _COMPILED:
            rows_fn = _kernel("nll_grad")
            with torch.no_grad(), torch.autocast(logits.device.type, enabled=False):
                for b, span in _spans(targets.shape, ctx.rows):
                    grad[b, span] = rows_fn(logits[b, span], targets[b, span], grad_nll[b, span])
            return grad, None, None
        with torch.enable_grad(), torch.autocast(logits.device.type, enabled=False):
            for b, span in _spans(targets.shape, ctx.rows):
                # the leaf is the logits' own chunk: its float32 copy is not kept once the log-softmax exists
                x = logits[b, span].detach().requires_grad_()
                nll = F.cross_entropy(x.float(), targets[b, span], reduction="none")
                grad[b, span] = torch.autograd.grad(nll, x, grad_nll[b, span])[0]
        return grad, None, None


def _check_shapes(logits: torch.Tensor, targets: torch.Tensor) -> None:
    if logits.dim() != 3 or targets.dim() != 2 or logits.shape[0] != targets.shape[0] \
            or logits.shape[1] < targets.shape[1]:
        raise ValueError(f"logits [B, T' >= T, V] and targets [B, T] expected, got {tuple(logits.shape)} and "
                         f"{tuple(targets.shape)}")


def nll_from_logits(logits: torch.Tensor, targets: torch.Tensor, chunk_rows: int = CHUNK_ROWS) -> torch.Tensor:
    """Cross-entropy of next-token `logits` [B, T', V] against `targets` [B, T], per token, in float32.

    Positions from T on (T' >= T) are ignored, so a model's logits can be passed whole, without the
    slice `logits[:, :T]` whose backward would allocate a second full-size gradient. The same function for
    training and evaluation; `chunk_rows` tokens at a time, so memory beyond the logits and their gradient
    is a few float32 [chunk_rows, V] tensors (see `_ChunkedNLL`)."""
    _check_shapes(logits, targets)
    return _ChunkedNLL.apply(logits, targets.long(), chunk_rows)


class _ChunkedNLLKL(torch.autograd.Function):
    """Per-token cross-entropy and distillation KL from one log-softmax of the student's logits, `rows` tokens
    at a time in float32 (as `_ChunkedNLL`). Backward recomputes each chunk's softmaxes and writes the
    gradient of both terms at once: d nll / ds = q - onehot(target), d (T^2 KL) / ds = T (q_T - p_T). Beside
    separate cross-entropy and checkpointed KL passes this reads and writes the [tokens, vocab] tensors about
    half as often: a distillation step of the demo's compact SmolLM2 student took 17.1 s instead of 20.3 s
    (4 x 256 tokens, 2-core AVX2 CPU; the teacher's forward is 5.1 s of it)."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor, teacher: torch.Tensor, temperature: float,
                rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        nll = torch.empty(targets.shape, dtype=torch.float32, device=logits.device)
        kl = torch.empty_like(nll)
        rows_fn = _kernel("nll_kl")
        with torch.no_grad(), torch.autocast(logits.device.type, enabled=False):
            for b, span in _spans(targets.shape, rows):
                nll[b, span], kl[b, span] = rows_fn(logits[b, span], teacher[b, span], targets[b, span], temperature)
        ctx.save_for_backward(logits, targets, teacher)
        ctx.rows, ctx.temperature = rows, temperature
        return nll, kl

    @staticmethod
    def backward(ctx, grad_nll: torch.Tensor | None, grad_kl: torch.Tensor | None):
        logits, targets, teacher = ctx.saved_tensors
        temp = ctx.temperature
        grad_nll = torch.zeros(targets.shape, device=logits.device) if grad_nll is None else grad_nll.float()
        grad_kl = torch.zeros(targets.shape, device=logits.device) if grad_kl is None else grad_kl.float()
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        grad[:, targets.shape[1]:].zero_()  # positions past the targets predict nothing
        rows_fn = _kernel("nll_kl_grad")
        with torch.no_grad(), torch.autocast(logits.device.type, enabled=False):
            for b, span in _spans(targets.shape, ctx.rows):
                grad[b, span] = rows_fn(logits[b, span], teacher[b, span], targets[b, span], grad_nll[b, span],
                                        grad_kl[b, span], temp)
        return grad, None, None, None, None


def nll_and_kl(logits: torch.Tensor, targets: torch.Tensor, teacher_logits: torch.Tensor,
               temperature: float = 1.0, chunk_rows: int = CHUNK_ROWS) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy of next-token `logits` [B, T', V] against `targets` [B, T], KL(teacher || student) of
    the softened next-token distributions times T^2, so that its gradient keeps the cross-entropy's scale),
    each per token [B, T], float32. Positions from T on are ignored in both logits tensors (passed whole, no
    slice); `chunk_rows` tokens at a time, as `nll_from_logits`."""
    _check_shapes(logits, targets)
    if teacher_logits.shape != logits.shape:
        raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} do not match the student's "
                         f"{tuple(logits.shape)}")
    return _ChunkedNLLKL.apply(logits, targets.long(), teacher_logits.detach(), float(temperature), chunk_rows)
