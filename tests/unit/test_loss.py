"""The one loss and the distillation term, against torch's own functions on full logits."""

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from drpruning.loss import nll_and_kl, nll_from_logits


def test_nll_is_torch_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(2, 5, 11, generator=g), torch.randint(0, 11, (2, 5), generator=g)
    ref = torch.stack([F.cross_entropy(logits[b], targets[b], reduction="none") for b in range(2)])
    assert torch.allclose(nll_from_logits(logits, targets), ref, atol=1e-6)



def logits_and_targets(dtype: torch.dtype, b: int = 3, t: int = 11, v: int = 37):
    """logits[:, :-1] of a [b, t + 1, v] tensor (non-contiguous, as token_losses passes them), targets [b, t]."""
    g = torch.Generator().manual_seed(2)
    full = (torch.randn(b, t + 1, v, generator=g) * 4).to(dtype).requires_grad_()
    return full, full[:, :-1], torch.randint(0, v, (b, t), generator=g)


@pytest.mark.parametrize("whole", [False, True], ids=["sliced", "whole"])  # logits[:, :-1], or all positions
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [1, 4, 1024])  # 4 does not divide the 11 tokens of a sequence
def test_chunked_nll_values_and_gradients_equal_cross_entropy_on_full_float32_logits(dtype, chunk, whole):
    full, logits, targets = logits_and_targets(dtype)
    weights = torch.rand(targets.shape, generator=torch.Generator().manual_seed(3))  # d loss / d nll per token
    got = nll_from_logits(full if whole else logits, targets, chunk_rows=chunk)
    (got * weights).sum().backward()
    # independent: torch's cross-entropy on a float32 copy of all the logits at once
    ref_logits = logits.detach().float().reshape(-1, logits.shape[-1]).requires_grad_()
    ref = F.cross_entropy(ref_logits, targets.flatten(), reduction="none").view(targets.shape)
    (ref * weights).sum().backward()
    assert got.dtype == torch.float32 and got.shape == targets.shape
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert full.grad.dtype == dtype
    assert torch.all(full.grad[:, -1] == 0)  # the last position predicts nothing
    # float32: to rounding; bf16: the float32 gradient rounded once to bf16 (8 bits of mantissa)
    rtol, atol = (1e-5, 1e-7) if dtype == torch.float32 else (1e-2, 1e-4)
    torch.testing.assert_close(full.grad[:, :-1].float(), ref_logits.grad.view(logits.shape), rtol=rtol, atol=atol)
    with torch.no_grad():  # evaluation runs the same function
        assert torch.equal(nll_from_logits(full if whole else logits, targets, chunk_rows=chunk), got.detach())


class Float32Sizes(TorchDispatchMode):
    """Element counts of the float32 tensors operations create (forward and backward run in this thread on
    CPU)."""

    def __init__(self):
        super().__init__()
        self.sizes: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        inputs = {t.untyped_storage().data_ptr() for t in tensors}
        for t in tree_leaves(out):  # new storage only: views and in-place results allocate nothing
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32:
                if t.untyped_storage().data_ptr() not in inputs:
                    self.sizes.append(t.numel())
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_nll_makes_float32_temporaries_of_one_chunk_only(dtype):
    full, logits, targets = logits_and_targets(dtype, b=2, t=24, v=50)
    chunk = 5
    with Float32Sizes() as new:
        nll_from_logits(logits, targets, chunk_rows=chunk).sum().backward()
    with Float32Sizes() as old:  # F.cross_entropy on a float32 copy, for contrast
        F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none").sum().backward()
    with Float32Sizes() as whole:  # all positions passed, as token_losses does: no slice to pad in backward
        nll_from_logits(full, targets, chunk_rows=chunk).sum().backward()
    big = [n for n in new.sizes if n > chunk * 50]
    if dtype == torch.bfloat16:  # never a float32 [tokens, vocab]: one chunk's copy / softmax at most
        assert max(new.sizes) == max(whole.sizes) == chunk * 50
    else:  # float32 logits have a float32 gradient: that one (and, for the slice, its zero-padding)
        assert len(big) == 2 and len([n for n in whole.sizes if n > chunk * 50]) == 1
    assert len([n for n in old.sizes if n > chunk * 50]) >= len(big) + 2


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("chunk", [1, 3, 1024])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_nll_and_kl_equal_cross_entropy_and_kl_div_on_full_logits_with_gradients(temperature, chunk, dtype):
    g = torch.Generator().manual_seed(1)
    student = torch.randn(2, 8, 13, generator=g).to(dtype).requires_grad_()
    teacher = torch.randn(2, 8, 13, generator=g).to(dtype)
    targets = torch.randint(0, 13, (2, 7), generator=g)
    nll, kl = nll_and_kl(student, targets, teacher, temperature, chunk_rows=chunk)
    # the reference: autograd through torch's own losses on float64 copies of the first 7 positions
    s, t = student.double()[:, :7], teacher.double()[:, :7]
    ref_nll = F.cross_entropy(s.flatten(0, 1), targets.flatten(), reduction="none").view(2, 7)
    ref_kl = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1),
                      log_target=True, reduction="none").sum(-1) * temperature**2
    assert nll.shape == kl.shape == (2, 7) and nll.dtype == kl.dtype == torch.float32
    assert torch.allclose(nll.double(), ref_nll, atol=1e-5) and torch.allclose(kl.double(), ref_kl, atol=1e-5)
    # a weighting of both terms, as the trainer's (1 - w) nll + w kl, so both gradient paths are checked
    wn, wk = torch.rand(2, 7, generator=g), torch.rand(2, 7, generator=g)
    (g1,) = torch.autograd.grad((nll * wn).sum() + (kl * wk).sum(), student, retain_graph=True)
    (g2,) = torch.autograd.grad((ref_nll * wn).sum() + (ref_kl * wk).sum(), student, retain_graph=True)
    assert g1.dtype == dtype and torch.equal(g1[:, 7:], torch.zeros_like(g1[:, 7:]))
    assert torch.allclose(g1.double(), g2.double(), atol=1e-5 if dtype == torch.float32 else 1e-2)
    (g3,) = torch.autograd.grad(kl.sum(), student)  # one term alone: the other's gradient is None
    (g4,) = torch.autograd.grad(ref_kl.sum(), student)
    assert torch.allclose(g3.double(), g4.double(), atol=1e-5 if dtype == torch.float32 else 1e-2)
    same = teacher.clone().requires_grad_()
    assert nll_and_kl(same, targets, teacher, temperature)[1].abs().max() < 1e-5
