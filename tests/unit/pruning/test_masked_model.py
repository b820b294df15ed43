"""Masks applied by hooks to unmodified transformers models."""

from __future__ import annotations

import pytest
import torch
from tiny_models import CONFIGS, tiny_model
from transformers import AutoModelForCausalLM, GPT2Config

from drpruning.config import ConfigError, PruningConfig
from drpruning.pruning.masked_model import MaskedLinear, attach, prepare_masks
from drpruning.pruning.pruner import Pruner

KINDS = list(CONFIGS)
ALL = ["layer", "head", "intermediate", "hidden"]


def pruner_for(model, mode="kv_group", structures=ALL) -> Pruner:
    cfg = model.config
    target = {"num_hidden_layers": 2, "intermediate_size": 24, "hidden_size": cfg.num_attention_heads * 2}
    if mode == "kv_group":
        target["num_key_value_heads"] = 1
    else:
        target["num_attention_heads"] = cfg.num_key_value_heads
    target = {
        k: v
        for k, v in target.items()
        if {
            "num_hidden_layers": "layer",
            "intermediate_size": "intermediate",
            "hidden_size": "hidden",
            "num_key_value_heads": "head",
            "num_attention_heads": "head",
        }[k]
        in structures
    }
    cfg = PruningConfig(enabled=True, method="l0", target=target, head_mode=mode, structures=structures)
    pruner = Pruner(model.config, cfg, 10)
    pruner.handle = attach(model, pruner)
    return pruner


def ones_masks(pruner):
    return {s: torch.ones_like(a) for s, a in pruner.log_alpha.items()}


@pytest.mark.parametrize("mode", ["kv_group", "query"])
@pytest.mark.parametrize("kind", KINDS)
def test_all_ones_masks_equal_unhooked_model(kind, mode):
    model = tiny_model(kind)
    x = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        ref = model(x).logits
    pruner = pruner_for(model, mode)
    pruner.masks = lambda batch=None: ones_masks(pruner)
    with torch.no_grad():
        out = model(x).logits
    assert torch.allclose(out, ref, atol=1e-5, rtol=0)
    pruner.handle.detach()
    del pruner.masks
    with torch.no_grad():
        assert torch.equal(model(x).logits, ref)  # detach restores the plain model


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_masked_rmsnorm_equals_norm_of_sliced_vector(kind):
    model = tiny_model(kind)
    pruner = pruner_for(model)
    d = model.config.hidden_size
    g = torch.Generator().manual_seed(0)
    z = torch.rand(d, generator=g) * (torch.rand(d, generator=g) > 0.4)
    pruner.masks = lambda batch=None: {**ones_masks(pruner), "hidden": z}
    pruner.handle.current = prepare_masks(pruner)
    norm = model.model.layers[1].post_attention_layernorm
    x = torch.randn(3, 5, d, generator=g) * 3
    out = norm(x)
    kept = torch.nonzero(z).flatten()
    xs = x[..., kept].double()  # independent: plain RMSNorm of the kept sub-vector
    ref = xs / torch.sqrt(xs.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    ref = ref * norm.weight[kept].double() * z[kept].double()
    assert torch.allclose(out[..., kept].double(), ref, atol=1e-5)
    assert torch.all(out[..., z == 0] == 0)
    plain = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon) * norm.weight * z
    assert not torch.allclose(out, plain, atol=1e-3)  # a plain norm then a multiply is different


@pytest.mark.parametrize("mode", ["kv_group", "query"])
def test_training_forward_samples_fresh_masks_and_reaches_every_mask(mode):
    model = tiny_model("tied")
    pruner = pruner_for(model, mode).train()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in pruner.log_alpha.values():
            p.copy_(torch.randn(p.shape, generator=g))
    x = torch.randint(0, 128, (2, 10))
    a = model(x, labels=x)
    a.loss.backward()
    for s, p in pruner.log_alpha.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, s
    with torch.no_grad():
        b = model(x).logits
    assert not torch.allclose(a.logits.detach(), b)  # a fresh sample every forward
    pruner.eval()
    with torch.no_grad():
        assert torch.equal(model(x).logits, model(x).logits)  # deterministic masks in eval


@pytest.mark.parametrize("structures", [["layer"], ["head"], ["intermediate"], ["hidden"]])
def test_each_structure_changes_the_output(structures):
    model = tiny_model("llama")
    x = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        ref = model(x).logits
    pruner_for(model, "kv_group", structures).eval(exact=True)
    with torch.no_grad():
        out = model(x).logits
    assert not torch.allclose(out, ref, atol=1e-3)


def test_bf16_autocast_keeps_residual_dtype():
    model = tiny_model("llama")
    pruner_for(model).train()
    x = torch.randint(0, 128, (2, 10))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, labels=x, output_hidden_states=True)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert {h.dtype for h in out.hidden_states[1:-1]} == {out.hidden_states[1].dtype}


def test_unsupported_architecture_is_named():
    gpt2 = AutoModelForCausalLM.from_config(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=64))
    with pytest.raises(ConfigError, match="llama, qwen2, mistral"):
        Pruner(gpt2.config, PruningConfig(enabled=True, method="l0", target={"hidden_size": 8}), 10)


def _reference_linear(x, w, b, zo, zin):
    """The masked linear as plain autograd sees it: masks on the activations."""
    x = x * zin if zin is not None else x
    y = torch.nn.functional.linear(x, w, b)
    return y * zo if zo is not None else y


MASK_CASES = {  # (output mask, input mask, bias)
    "rows+cols+bias": ("full", "full", True),
    "rows+cols": ("full", "full", False),
    "layer-gate+cols": ("gate", "full", False),
    "layer-gate+bias": ("gate", None, True),
    "cols-only": (None, "full", False),
    "rows-only+bias": ("full", None, True),
}


def _linear_inputs(case, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    out_f, in_f = 5, 7
    zo_kind, zin_kind, bias = MASK_CASES[case]

    def t(*shape):
        return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_()

    x, w = t(2, 3, in_f), t(out_f, in_f)
    b = t(out_f) if bias else None
    zo = {"full": t(out_f), "gate": t(1), None: None}[zo_kind]
    zin = t(in_f) if zin_kind else None
    return x, w, b, zo, zin


@pytest.mark.parametrize("case", list(MASK_CASES))
def test_masked_linear_gradients_are_exact(case):
    # finite differences in float64 against the custom backward
    inputs = _linear_inputs(case, torch.float64)
    assert torch.autograd.gradcheck(MaskedLinear.apply, inputs)
    # and the same values as autograd through activation-side masks
    y = MaskedLinear.apply(*inputs)
    ref = _reference_linear(*inputs)
    torch.testing.assert_close(y, ref)
    live = [t for t in inputs if t is not None]
    seed = torch.randn_like(y)
    got = torch.autograd.grad(y, live, seed)
    want = torch.autograd.grad(ref, live, seed)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def test_masked_linear_under_bf16_autocast_matches_float32_within_bf16_error():
    x, w, b, zo, zin = _linear_inputs("rows+cols+bias", torch.float32, seed=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = MaskedLinear.apply(x, w, b, zo, zin)
    assert y.dtype == torch.bfloat16  # as nn.Linear under autocast
    y.float().sum().backward()
    assert w.grad.dtype == torch.float32 and zo.grad.dtype == torch.float32
    got = [y.float()] + [t.grad.clone() for t in (x, w, b, zo, zin)]
    for t in (x, w, b, zo, zin):
        t.grad = None
    ref = _reference_linear(x, w, b, zo, zin)
    ref.sum().backward()
    want = [ref] + [t.grad for t in (x, w, b, zo, zin)]
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("mode", ["kv_group", "query"])
@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_per_sequence_masks_equal_each_sequence_alone_with_its_sample(kind, mode):
    """One forward of B sequences with per-sequence samples gives, for each sequence, the logits and the
    mask gradients of a forward of that sequence alone with its sample on the weight-side path."""
    model = tiny_model(kind)
    pruner = pruner_for(model, mode).train()
    pruner.per_sequence = True
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for a in pruner.log_alpha.values():
            a.copy_(torch.randn(a.shape, generator=g) * 0.5)
    x = torch.randint(0, 128, (3, 9), generator=g)
    pruner.seed(5)
    samples = pruner.sample(3)
    assert all(m.shape[0] == 3 for m in samples.values())
    assert not torch.equal(samples["intermediate"][0], samples["intermediate"][1])  # independent samples
    pruner.masks = lambda batch=None: {s: m for s, m in samples.items()}
    out = model(x).logits
    out.sum().backward(retain_graph=True)  # the samples' graph is used again below
    batched = {s: a.grad.clone() for s, a in pruner.log_alpha.items()}
    for a in pruner.log_alpha.values():
        a.grad = None
    for b in range(3):
        pruner.masks = lambda batch=None, b=b: {s: m[b] for s, m in samples.items()}
        alone = model(x[b:b + 1]).logits
        assert torch.allclose(alone[0], out[b], atol=1e-5)
        alone.sum().backward(retain_graph=True)
    for s, a in pruner.log_alpha.items():
        assert torch.allclose(a.grad, batched[s], atol=1e-4, rtol=1e-4), s


def test_per_sequence_samples_follow_the_config():
    model = tiny_model("llama")
    per_batch = Pruner(model.config, PruningConfig(enabled=True, method="l0", target={"intermediate_size": 24},
                                                   structures=["intermediate"], mask_samples="micro_batch"), 10)
    assert prepare_masks(per_batch.train(), 4)["intermediate"][0].shape == (model.config.intermediate_size,)
    per_seq = Pruner(model.config, PruningConfig(enabled=True, method="l0", target={"intermediate_size": 24},
                                                 structures=["intermediate"], mask_samples="sequence"), 10)
    assert prepare_masks(per_seq.train(), 4)["intermediate"][0].shape == (4, model.config.intermediate_size)
    assert prepare_masks(per_seq.eval(), 4)["intermediate"][0].shape == (model.config.intermediate_size,)
