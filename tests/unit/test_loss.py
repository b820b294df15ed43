"""The one loss and the distillation term, against torch's own functions on full logits."""

import pytest
import torch
import torch.nn.functional as F

from drpruning.loss import distill_kl, nll_from_logits


def test_nll_is_torch_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(2, 5, 11, generator=g), torch.randint(0, 11, (2, 5), generator=g)
    ref = torch.stack([F.cross_entropy(logits[b], targets[b], reduction="none") for b in range(2)])
    assert torch.allclose(nll_from_logits(logits, targets), ref, atol=1e-6)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("chunk", [1, 3, 1024])
def test_distill_kl_equals_kl_div_on_full_logits_with_gradients(temperature, chunk):
    g = torch.Generator().manual_seed(1)
    student = torch.randn(2, 7, 13, generator=g, requires_grad=True)
    teacher = torch.randn(2, 7, 13, generator=g)
    got = distill_kl(student, teacher, temperature, chunk_rows=chunk)
    ref = F.kl_div(F.log_softmax(student / temperature, -1), F.log_softmax(teacher / temperature, -1),
                   log_target=True, reduction="none").sum(-1) * temperature**2
    assert got.shape == (2, 7)
    assert torch.allclose(got, ref, atol=1e-6)
    (g1,) = torch.autograd.grad(got.sum(), student)
    (g2,) = torch.autograd.grad(ref.sum(), student)
    assert torch.allclose(g1, g2, atol=1e-6)
    assert distill_kl(teacher.clone().requires_grad_(), teacher, temperature).abs().max() < 1e-6
