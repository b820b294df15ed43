"""Hard-concrete mask math against independent computations, the Lagrangian, and a short pruning run."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from tiny_models import tiny_model

from drpruning.config import ConfigError, PruningConfig, RunConfig, validate
from drpruning.pruning.masked_model import attach
from drpruning.pruning.pruner import (
    LOG_ALPHA_MAX,
    LOG_ALPHA_MIN,
    Pruner,
    prob_nonzero,
    sample_hard_concrete,
)
from drpruning.pruning.summary import shape_summary, tie_groups

ALL = ["layer", "head", "intermediate", "hidden"]
TARGET = {"num_hidden_layers": 2, "num_key_value_heads": 1, "intermediate_size": 24, "hidden_size": 16}
QUERY_TARGET = {"num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 24, "hidden_size": 16}


def make(mode="kv_group", structures=ALL, steps=100, target=None, **kw):
    model = tiny_model("llama")
    target = target or (TARGET if mode == "kv_group" else QUERY_TARGET)
    kw.setdefault("method", "l0")  # the learnt masks, unless a test asks for the one-shot cut
    cfg = PruningConfig(enabled=True, target=target, head_mode=mode, structures=list(structures), **kw)
    return model, Pruner(model.config, cfg, steps)


def randomise(pruner, std=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pruner.log_alpha.values():
            p.copy_(torch.randn(p.shape, generator=g) * std)


def test_prob_nonzero_matches_monte_carlo():
    la = torch.tensor([-3.0, -1.0, 0.0, 1.0, 3.0]).repeat_interleave(40000).reshape(5, 40000)
    z = sample_hard_concrete(la, torch.Generator().manual_seed(0))
    frac = (z > 0).double().mean(1).numpy()
    # independent closed form: P(s > -l / (r - l)) for s = sigmoid((logit(u) + a) / T)
    a, T, l, r = np.array([-3.0, -1.0, 0.0, 1.0, 3.0]), 2 / 3, -0.1, 1.1
    p = 1 / (1 + np.exp(-(a - T * np.log(-l / r))))
    assert np.allclose(prob_nonzero(torch.tensor(a)).numpy(), p, atol=1e-6)
    assert np.all(np.abs(frac - p) < 4 * np.sqrt(p * (1 - p) / 40000) + 1e-4)
    assert 0 <= z.min() and z.max() <= 1 and (z == 0).any() and (z == 1).any()


def test_deterministic_masks_exact_top_k():
    _, pruner = make()
    randomise(pruner)
    masks = pruner.deterministic_masks(exact=True)
    kept = {"layer": 2, "head": 1, "intermediate": 24, "hidden": 16}
    for s, m in masks.items():
        a = pruner.log_alpha[s].detach().numpy().reshape(-1, m.shape[-1])
        soft = 1 / (1 + np.exp(-a * 0.8 / (2 / 3)))
        mm = m.numpy().reshape(-1, m.shape[-1])
        for row_soft, row in zip(soft, mm, strict=True):
            top = np.sort(np.argsort(-row_soft)[: kept[s]])
            assert np.array_equal(np.nonzero(row)[0], top)
            assert np.allclose(row[top], row_soft[top], atol=1e-6)  # survivors keep their soft value


def test_deterministic_masks_expected_size():
    _, pruner = make(mode="query")
    randomise(pruner, std=3.0, seed=1)
    masks = pruner.deterministic_masks(exact=False)
    for s, m in masks.items():
        a = pruner.log_alpha[s].detach().double().numpy()
        p = 1 / (1 + np.exp(-(a - (2 / 3) * np.log(0.1 / 1.1))))
        k = np.round((1 - p).sum(-1))
        assert np.array_equal((m.numpy() == 0).sum(-1), k)


def test_expected_sparsity_per_structure_and_penalty():
    _, pruner = make(lagrangian_warmup_steps=10)
    randomise(pruner)
    with torch.no_grad():
        for i, s in enumerate(pruner.structures):
            pruner.lambda1[s].fill_(0.5 + i)
            pruner.lambda2[s].fill_(2.0 - i)
    loss, log = pruner.penalty(step=5)
    expected = 0.0
    final = {"layer": 1 / 3, "head": 1 / 2, "intermediate": 1 / 2, "hidden": 1 / 2}
    for i, s in enumerate(pruner.structures):
        p = prob_nonzero(pruner.log_alpha[s].detach()).double().numpy()
        sp = 1 - p.sum(-1) / p.shape[-1]
        t = final[s] * 0.5  # half way through the warmup
        expected += np.mean((0.5 + i) * (sp - t) + (2.0 - i) * (sp - t) ** 2)
        assert log["expected_sparsity"][s] == pytest.approx(np.mean(sp), abs=1e-6)
        assert log["target_sparsity"][s] == pytest.approx(t)
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5)
    assert pruner.penalty(step=50)[1]["target_sparsity"]["hidden"] == pytest.approx(0.5)
    assert pruner.penalty(step=0)[1]["target_sparsity"]["hidden"] == 0.0


def brute_force_params(model, masks: dict, mode: str) -> int:
    """Count q/k/v/o/gate/up/down weight elements kept by 0/1 unit indicators by slicing the real weights."""
    cfg = model.config
    hd, g = cfg.head_dim, cfg.num_attention_heads // cfg.num_key_value_heads
    dims = np.nonzero(masks["hidden"])[0]
    n = 0
    for i, layer in enumerate(model.model.layers):
        if not masks["layer"][i]:
            continue
        a, m = layer.self_attn, layer.mlp
        if mode == "kv_group":
            groups = np.nonzero(masks["head"][i])[0]
            heads = np.array([gr * g + j for gr in groups for j in range(g)], dtype=int)
        else:
            groups = np.arange(cfg.num_key_value_heads)
            heads = np.nonzero(masks["head"][i].reshape(-1))[0]
        q_rows = np.array([h * hd + d for h in heads for d in range(hd)], dtype=int)
        kv_rows = np.array([h * hd + d for h in groups for d in range(hd)], dtype=int)
        chans = np.nonzero(masks["intermediate"][i])[0]
        w = lambda t, rows, cols: t.detach().numpy()[np.ix_(rows, cols)].size  # noqa: E731
        n += w(a.q_proj.weight, q_rows, dims) + w(a.k_proj.weight, kv_rows, dims) + w(a.v_proj.weight, kv_rows, dims)
        n += w(a.o_proj.weight, dims, q_rows)
        n += w(m.gate_proj.weight, chans, dims) + w(m.up_proj.weight, chans, dims) + w(m.down_proj.weight, dims, chans)
    return n


@pytest.mark.parametrize("mode", ["kv_group", "query"])
def test_expected_params_factorised_vs_brute_force(mode):
    model, pruner = make(mode)
    randomise(pruner, std=1.5, seed=2)
    probs = {s: p.detach().double().numpy() for s, p in pruner.probabilities().items()}
    rng = np.random.default_rng(0)
    counts = []
    for _ in range(600):
        sample = {s: rng.random(p.shape) < p for s, p in probs.items()}
        counts.append(brute_force_params(model, sample, mode))
    mc, se = np.mean(counts), np.std(counts) / math.sqrt(len(counts))
    expected = float(pruner.expected_params().detach())
    assert abs(mc - expected) < 4 * se
    # exact for 0/1 masks: the deterministic exact masks give the target shape's count
    ind = {s: (m != 0).double() for s, m in pruner.deterministic_masks(exact=True).items()}
    n_target = brute_force_params(model, {s: m.numpy() for s, m in ind.items()}, mode)
    assert float(pruner.expected_params(ind)) == n_target
    assert pruner.final_sparsity() == pytest.approx(
        1 - n_target / brute_force_params(model, {s: np.ones(p.shape) for s, p in probs.items()}, mode)
    )


def test_expected_params_without_some_structures():
    # only FFN pruned: attention counted in full
    model, pruner = make(structures=["intermediate"], target={"intermediate_size": 24})
    randomise(pruner)
    p = prob_nonzero(pruner.log_alpha["intermediate"].detach()).double().numpy()
    ones = {"layer": np.ones(3), "head": np.ones((3, 2)), "hidden": np.ones(32)}
    full_attn = brute_force_params(model, {**ones, "intermediate": np.zeros((3, 48))}, "kv_group")
    assert float(pruner.expected_params().detach()) == pytest.approx(full_attn + 3 * 32 * p.sum(), rel=1e-6)


def test_clamp_and_lagrangian_ascent():
    _, pruner = make()
    randomise(pruner, std=10.0)
    pruner.clamp_()
    for p in pruner.mask_parameters():
        assert p.min() >= LOG_ALPHA_MIN - 1e-6 and p.max() <= LOG_ALPHA_MAX + 1e-6
    opt = torch.optim.AdamW(pruner.optimizer_groups(mask_lr=0.1, lagrangian_lr=0.1))
    loss, log = pruner.penalty(step=1000)
    loss.backward()
    opt.step()
    for s in pruner.structures:
        gap = log["expected_sparsity"][s] - log["target_sparsity"][s]
        # ascent: lambda1 follows the sign of the gap
        assert np.sign(float(pruner.lambda1[s].detach())) == np.sign(gap)
        assert float(pruner.lambda2[s].detach()) > 0  # the quadratic multiplier only grows


def test_sampling_seeded_and_fresh():
    _, a = make()
    _, b = make()
    a.seed(3)
    b.seed(3)
    sa, sb = a.sample(), b.sample()
    assert all(torch.equal(sa[s], sb[s]) for s in sa)
    again = a.sample()
    assert not torch.equal(again["intermediate"], sa["intermediate"])
    b.seed(4)
    assert not torch.equal(b.sample()["intermediate"], again["intermediate"])
    # resume: tensors in the state dict (safetensors-compatible), generator state beside them
    state, rng = {k: v.clone() for k, v in a.state_dict().items()}, a.generator.get_state()
    assert all(torch.is_tensor(v) for v in state.values())
    _, c = make()
    c.load_state_dict(state)
    c.generator.set_state(rng)
    assert torch.equal(c.sample()["intermediate"], a.sample()["intermediate"])


def test_train_eval_switch():
    _, pruner = make()
    randomise(pruner)
    pruner.train()
    assert not torch.equal(pruner.masks()["hidden"], pruner.masks()["hidden"])
    pruner.eval()
    assert torch.equal(pruner.masks()["hidden"], pruner.deterministic_masks(exact=False)["hidden"])
    pruner.eval(exact=True)
    assert int((pruner.masks()["hidden"] != 0).sum()) == 16
    pruner.train()
    assert pruner.training and not pruner.exact


@pytest.mark.parametrize("mode", ["kv_group", "query"])
def test_short_pruning_run_reaches_target(mode):
    """AdamW on weights and masks, ascent on the multipliers; the masks settle at the target shape."""
    torch.manual_seed(0)
    model, pruner = make(mode, steps=300, lagrangian_warmup_steps=100)
    attach(model, pruner)
    pruner.train()
    pruner.seed(0)
    model.train()
    opt = torch.optim.AdamW(
        [
            {"params": model.parameters(), "lr": 1e-3, "weight_decay": 0.0},
            *pruner.optimizer_groups(mask_lr=0.1, lagrangian_lr=0.1),
        ]
    )
    data = torch.randint(0, 128, (64, 17))
    for step in range(300):
        batch = data[torch.randint(0, 64, (8,))]
        out = model(batch[:, :-1], labels=batch[:, 1:])
        penalty, log = pruner.penalty(step)
        (out.loss + penalty).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        pruner.clamp_()
    for s in pruner.structures:
        assert abs(log["expected_sparsity"][s] - log["target_sparsity"][s]) < 0.02, (s, log)
    summary = shape_summary(pruner)  # units kept by the evaluation masks
    target = pruner.target
    assert summary["num_hidden_layers"] == target.num_hidden_layers
    assert summary["hidden_size"] == target.hidden_size
    assert summary["intermediate_per_layer"] == [target.intermediate_size] * 3
    assert summary["heads_per_layer"] == [target.num_attention_heads] * 3
    assert pruner.expected_sparsity() == pytest.approx(pruner.final_sparsity(), abs=0.02)


def test_no_structure_is_an_error():
    with pytest.raises(ConfigError, match="structures is empty"):
        make(structures=[], target={})


def _brute_force_cut(soft, key, k):
    """Zero the k units with the smallest (soft, key) pairs, by plain sorting of tuples."""
    order = sorted(range(len(soft)), key=lambda i: (float(soft[i]), float(key[i])))
    out = soft.clone()
    out[order[:k]] = 0
    return out


def test_ties_are_cut_by_the_tie_key_not_the_index():
    from drpruning.pruning.hard_concrete import topk_mask

    g = torch.Generator().manual_seed(3)
    for _ in range(50):
        soft = torch.randint(0, 3, (9,), generator=g).float() / 2  # many exact ties
        key = torch.rand(9, generator=g)
        k = int(torch.randint(0, 10, (1,), generator=g))
        assert torch.equal(topk_mask(soft, k, key), _brute_force_cut(soft, key, k))
    _, pruner = make()
    with torch.no_grad():
        pruner.log_alpha["layer"].fill_(LOG_ALPHA_MAX)  # all tied, as after the first steps of a real run
    masks = pruner.deterministic_masks(exact=True)
    dropped = (masks["layer"] == 0).nonzero().flatten().tolist()
    assert dropped == [int(pruner.tie_key("layer").argmin())]  # the tie key decides, not index 0
    assert tie_groups(pruner, exact=True)["layer"] == 3


def test_expected_cut_has_no_floor_and_never_passes_the_target():
    _, pruner = make()
    with torch.no_grad():
        for a in pruner.log_alpha.values():
            a.fill_(LOG_ALPHA_MAX)
    for s, k in pruner.cut_sizes().items():  # saturated rows: the 0.2% floor of 1 - P cuts nothing
        assert int(k.max()) == 0, s
    with torch.no_grad():
        pruner.log_alpha["intermediate"].fill_(LOG_ALPHA_MIN)  # everything far below: capped at the target
    size, kept = pruner.unit_count("intermediate")
    assert pruner.cut_sizes()["intermediate"].tolist() == [size - kept] * 3
    p = prob_nonzero(torch.tensor(LOG_ALPHA_MIN))
    assert round(float(size * (1 - p))) > size - kept  # ... where round(sum(1 - P)) would have cut more


def test_protected_units_are_never_pruned():
    _, pruner = make(protect={"hidden": [3, 7], "layer": [0]})
    with torch.no_grad():
        for a in pruner.log_alpha.values():
            a.fill_(LOG_ALPHA_MIN)  # every unit wants to go
    pruner.train()
    for _ in range(20):
        z = pruner.sample()
        assert torch.all(z["hidden"][[3, 7]] == 1) and z["layer"][0] == 1
    for exact in (False, True):
        m = pruner.deterministic_masks(exact)
        assert torch.all(m["hidden"][[3, 7]] == 1) and m["layer"][0] == 1
    assert pruner.probabilities()["hidden"][3] == 1
    with pytest.raises(ConfigError, match="names unit 99"):
        make(protect={"hidden": [99]})


def test_initial_masks_are_clamped_and_importance_spreads_them():
    _, pruner = make()
    assert all(float(a.detach().max()) <= LOG_ALPHA_MAX + 1e-6 for a in pruner.log_alpha.values())  # float32
    scores = {s: torch.rand(a.shape, generator=torch.Generator().manual_seed(0)) for s, a in pruner.log_alpha.items()}
    massive = torch.zeros(32, dtype=torch.bool)
    massive[5] = True
    pruner.set_importance(scores, massive)
    for s, a in pruner.log_alpha.items():
        rows = a.reshape(-1, a.shape[-1])
        assert all(len(set(r.tolist())) == r.numel() for r in rows), s  # no ties
        best = scores[s].reshape(rows.shape).argmax(-1)
        assert torch.allclose(rows.gather(-1, best[:, None]), torch.tensor(LOG_ALPHA_MAX))
    assert pruner.protected("hidden").nonzero().flatten().tolist() == [5]


def test_one_shot_keeps_the_most_important_units_whole_and_never_moves():
    _, pruner = make(method="importance")
    g = torch.Generator().manual_seed(3)
    scores = {s: torch.rand(a.shape, generator=g) for s, a in pruner.log_alpha.items()}
    massive = torch.zeros(32, dtype=torch.bool)
    massive[0] = True  # the least important hidden channel below, and protected
    scores["hidden"][0] = -1.0
    pruner.set_importance(scores, massive)
    pruner.train()
    assert pruner.hardening and not pruner.training  # fixed masks from the start, no sampling
    masks = pruner.masks()
    for s, m in masks.items():
        keep = pruner.unit_count(s)[1]
        rows, score = m.reshape(-1, m.shape[-1]), scores[s].reshape(-1, m.shape[-1]).clone()
        if s == "hidden":
            score[:, 0] = float("inf")
        top = score.topk(keep, dim=-1).indices.sort(-1).values  # independent: torch.topk of the scores
        assert torch.equal(torch.nonzero(rows)[:, 1].view(rows.shape[0], keep), top), s
        assert set(m.unique().tolist()) <= {0.0, 1.0}, s  # kept whole: the export only slices
    assert pruner.penalty_step(0) == {}
    assert pruner.expected_sparsity() == pytest.approx(pruner.final_sparsity())
    assert shape_summary(pruner)["num_hidden_layers"] == TARGET["num_hidden_layers"]
    with pytest.raises(ConfigError, match="pruning.init=importance"):
        validate(RunConfig(run_dir="x", pruning=PruningConfig(enabled=True, target=TARGET, method="importance",
                                                              init="uniform")))


@pytest.mark.parametrize("reset", [False, True])
def test_lagrangian_reset_zeroes_a_multiplier_that_pushes_against_the_gap(reset):
    _, pruner = make(lagrangian_reset=reset)  # masks near 1: every structure is below its target sparsity
    with torch.no_grad():
        for s in pruner.structures:
            pruner.lambda1[s].fill_(5.0 if s != "head" else -5.0)  # head pushes the right way (toward the gap)
    _, log = pruner.penalty(step=1000)
    assert all(log["expected_sparsity"][s] < log["target_sparsity"][s] for s in pruner.structures)
    pruner.after_step()
    for s in pruner.structures:
        expected = -5.0 if s == "head" else (0.0 if reset else 5.0)
        assert float(pruner.lambda1[s].detach()) == expected, s


def test_init_at_the_one_shot_cut_starts_from_its_exact_masks():
    g = torch.Generator().manual_seed(3)
    _, cut = make(method="importance")
    _, learnt = make(init="one_shot")
    scores = {s: torch.rand(a.shape, generator=g) for s, a in cut.log_alpha.items()}
    massive = torch.zeros(32, dtype=torch.bool)
    massive[0] = True
    for p in (cut, learnt):
        p.set_importance({s: v.clone() for s, v in scores.items()}, massive)
    one_shot = cut.eval(exact=True).masks()
    step0 = learnt.eval(exact=True).masks()
    for s in one_shot:  # the same units kept as the one-shot cut's
        assert torch.equal(step0[s] != 0, one_shot[s] != 0), s
        a = learnt.log_alpha[s].detach()
        kept, cut_out = a[one_shot[s] != 0], a[(one_shot[s] == 0) & ~learnt.protected(s)]
        # cut units start at the bottom of the range, kept ones where importance put them
        assert float(cut_out.max()) < LOG_ALPHA_MIN + 0.6 < LOG_ALPHA_MAX - 2.0 - 1e-6 <= float(kept.min()), s
    # the expected size starts near the target, and there is no Lagrangian ramp unless one is asked for
    assert learnt.expected_sparsity() == pytest.approx(learnt.final_sparsity(), abs=0.1)
    assert learnt.target_sparsity("intermediate", 0) == pytest.approx(learnt.target_sparsity("intermediate", 50))


def direct_gate(log_alpha: float, temperature: float) -> float:
    """The stretched, clamped gate, computed with math on one value."""
    s = 1.0 / (1.0 + math.exp(-log_alpha / temperature)) * 1.2 - 0.1
    return min(1.0, max(0.0, s))


def test_deterministic_gates_against_a_direct_computation():
    """Training forwards use the noise-free gate at the step's temperature: 2/3 at step 0, falling with
    sqrt(progress) to a fifth of it where hardening starts; the same values twice, and the penalty counts them."""
    _, pruner = make(gates="deterministic", steps=100, hardening_steps=20)
    randomise(pruner, std=1.5)
    pruner.train()
    for step, temperature in [(0, 2 / 3), (20, 2 / 3 * (1 - 0.8 * math.sqrt(20 / 80))), (80, 2 / 3 * 0.2)]:
        pruner.begin_step(step)
        assert float(pruner.gate_temperature) == pytest.approx(temperature, rel=1e-6)
        if step == 80:  # hardening: the exact masks, made of the gate values at the last temperature
            assert pruner.hardening and pruner.exact
            pruner.begin_step(79)
            pruner.train()
        masks = pruner.masks()
        assert torch.equal(masks["intermediate"], pruner.masks()["intermediate"])  # no noise
        a = pruner.log_alpha["intermediate"].detach().double()
        t = float(pruner.gate_temperature)
        want = torch.tensor([[direct_gate(float(x), t) for x in row] for row in a], dtype=torch.float64)
        torch.testing.assert_close(masks["intermediate"].double(), want, atol=1e-6, rtol=0)
        sparsity = pruner.structure_sparsity()["intermediate"]
        torch.testing.assert_close(sparsity.double(), 1 - want.sum(-1) / a.shape[-1], atol=1e-6, rtol=0)


def test_deterministic_gates_pass_gradients_through_the_clamp_and_export_what_they_trained():
    _, pruner = make(gates="deterministic")
    with torch.no_grad():
        pruner.log_alpha["hidden"].fill_(LOG_ALPHA_MAX)  # every gate at 1, inside the clamp
        pruner.log_alpha["hidden"][:4] = LOG_ALPHA_MIN  # and four at 0
    pruner.train()
    pruner.begin_step(0)
    gates = pruner.masks()["hidden"]
    assert torch.equal(gates[:4], torch.zeros(4)) and torch.equal(gates[4:], torch.ones(28))
    gates.sum().backward()  # the straight-through clamp: d gate / d log_alpha = sigmoid' (r - l) / t
    a, t = pruner.log_alpha["hidden"].detach(), 2 / 3
    sig = torch.sigmoid(a / t)
    torch.testing.assert_close(pruner.log_alpha["hidden"].grad, sig * (1 - sig) * 1.2 / t)
    # a saved and reloaded pruner (export) uses the temperature it trained at
    pruner.begin_step(50)
    _, again = make(gates="deterministic")
    again.load_state_dict(pruner.state_dict())
    for s, m in pruner.eval(exact=True).masks().items():
        assert torch.equal(again.eval(exact=True).masks()[s], m), s


def test_deterministic_gates_refuse_per_sequence_samples():
    cfg = RunConfig()
    cfg.pruning.enabled, cfg.pruning.target = True, {"num_hidden_layers": 2}
    cfg.pruning.gates, cfg.pruning.mask_samples = "deterministic", "sequence"
    with pytest.raises(ConfigError, match="mask_samples=micro_batch"):
        validate(cfg)
    cfg.pruning.gates = "noisy"
    with pytest.raises(ConfigError, match="sampled or deterministic"):
        validate(cfg)
    cfg.pruning.gates, cfg.pruning.lagrangian_optimizer = "sampled", "momentum"
    with pytest.raises(ConfigError, match="'pruning.lagrangian_optimizer' is 'momentum': use adam or sgd"):
        validate(cfg)


def test_an_exact_cut_is_no_gap_for_the_multipliers():
    """Masks started at the one-shot cut keep exactly the target: float32 rounding of that size must not reach
    the multipliers, whose Adam would turn its sign into full-size steps; one unit off target is a real gap."""
    g = torch.Generator().manual_seed(5)
    _, pruner = make(init="one_shot", gates="deterministic")
    pruner.set_importance({s: torch.rand(a.shape, generator=g) for s, a in pruner.log_alpha.items()},
                          torch.zeros(32, dtype=torch.bool))
    opt = torch.optim.Adam(pruner.lagrangian_parameters(), lr=0.1, maximize=True)
    pruner.begin_step(1)
    pruner.penalty(1)[0].backward()
    assert all(float(p.grad) == 0.0 for p in pruner.lagrangian_parameters())
    opt.step()
    assert all(float(p.detach()) == 0.0 for p in pruner.lagrangian_parameters())
    opt.zero_grad()
    rows, n = pruner.log_alpha["intermediate"].shape
    with torch.no_grad():  # cut one more FFN channel in the first layer: gap 1 / n there, 0 elsewhere
        row = pruner.log_alpha["intermediate"][0]
        row[int(torch.argmax(row))] = LOG_ALPHA_MIN
    pruner.penalty(1)[0].backward()
    assert float(pruner.lambda1["intermediate"].grad) == pytest.approx(1 / n / rows, rel=1e-4)
    assert float(pruner.lambda1["layer"].grad) == 0.0
    # without the tolerance the exact cut's rounding reaches the multipliers (what wound them up before)
    _, raw = make(init="one_shot", gates="deterministic", gap_tolerance=0.0)
    raw.set_importance({s: torch.rand(a.shape, generator=g) for s, a in raw.log_alpha.items()},
                       torch.zeros(32, dtype=torch.bool))
    raw.begin_step(1)
    raw.penalty(1)[0].backward()
    assert any(0 < abs(float(p.grad)) < 1e-6 for p in raw.lambda1.values())


@pytest.mark.parametrize("how", ["adam", "sgd"])
def test_multipliers_ascend_by_the_gap_under_sgd_and_by_its_sign_under_adam(how):
    from drpruning.config import TrainConfig
    from drpruning.training.optim import build_optimizers

    model, pruner = make(lagrangian_optimizer=how, lagrangian_lr=0.5)
    randomise(pruner, std=2.0)
    with torch.no_grad():
        for s in pruner.structures:
            pruner.lambda1[s].fill_(0.3)
            pruner.lambda2[s].fill_(0.2)
    before = {s: a.detach().double().numpy().copy() for s, a in pruner.log_alpha.items()}
    optimizers = build_optimizers(model, pruner, TrainConfig())
    assert sorted(optimizers) == (["masks", "multipliers", "weights"] if how == "sgd" else ["masks", "weights"])
    loss, _ = pruner.penalty(step=1000)
    loss.backward()
    for o in optimizers.values():
        o.step()
    # independent: each unit's closed-form P(gate > 0), row sparsity 1 - mean(P), the gap to the final target
    T, lo, hi = 2 / 3, -0.1, 1.1
    for s in pruner.structures:
        p = 1 / (1 + np.exp(-(before[s] - T * np.log(-lo / hi))))
        gaps = 1 - p.mean(-1) - pruner.target_sparsity(s, 1000)
        step1 = float(pruner.lambda1[s].detach()) - 0.3
        step2 = float(pruner.lambda2[s].detach()) - 0.2
        if how == "sgd":  # lambda += lr * d(penalty)/d(lambda)
            assert step1 == pytest.approx(0.5 * np.mean(gaps), abs=1e-5), s
            assert step2 == pytest.approx(0.5 * np.mean(gaps ** 2), abs=1e-5), s
        else:  # Adam's first step is the full lr on the gradient's sign, however small the gap
            assert step1 == pytest.approx(0.5 * np.sign(np.mean(gaps)), rel=1e-3), s
            assert step2 == pytest.approx(0.5, rel=1e-3), s
