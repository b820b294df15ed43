"""Calibration scores against direct computations on a tiny model."""

import torch
import torch.nn.functional as F
from tiny_models import tiny_model

from drpruning.pruning.importance import MASSIVE_RATIO, importance_scores, initial_log_alpha


def batches(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, 120, (2, 9), generator=g) for _ in range(n)]


def test_layer_scores_are_block_influence_from_hidden_states():
    model = tiny_model("llama")
    data = batches()
    scores, _ = importance_scores(model, data)
    expected = torch.zeros(3, dtype=torch.float64)
    tokens = 0
    with torch.no_grad():
        for ids in data:
            hs = model(ids, output_hidden_states=True).hidden_states  # hs[l] enters layer l (last: normed)
            for i in range(2):
                expected[i] += (1 - F.cosine_similarity(hs[i].double(), hs[i + 1].double(), dim=-1)).sum()
            tokens += ids.numel()
    assert torch.allclose(scores["layer"][:2].double(), expected[:2] / tokens, rtol=1e-5)
    assert scores["layer"].shape == (3,)


def test_ffn_scores_are_mean_gated_activations():
    model = tiny_model("llama")
    data = batches()
    scores, _ = importance_scores(model, data)
    mlp = model.model.layers[1].mlp
    seen = []
    handle = mlp.register_forward_hook(lambda m, args, out: seen.append(args[0].detach()))
    with torch.no_grad():
        for ids in data:
            model(ids)
    handle.remove()
    x = torch.cat([s.flatten(0, 1) for s in seen])
    act = F.silu(x @ mlp.gate_proj.weight.T) * (x @ mlp.up_proj.weight.T)
    assert torch.allclose(scores["intermediate"][1], act.abs().mean(0), rtol=1e-4, atol=1e-7)


def test_a_head_with_zero_values_scores_zero_and_groups_sum_their_heads():
    model = tiny_model("llama")  # 4 heads, 2 KV heads: groups of 2
    with torch.no_grad():
        model.model.layers[0].self_attn.v_proj.weight[:8] = 0  # KV head 0 -> query heads 0 and 1 output 0
    data = batches()
    query, _ = importance_scores(model, data, head_mode="query")
    group, _ = importance_scores(model, data, head_mode="kv_group")
    assert query["head"].shape == (3, 2, 2) and group["head"].shape == (3, 2)
    assert query["head"][0, 0].abs().max() == 0 and (query["head"][0, 1] > 0).all()
    assert torch.allclose(group["head"], query["head"].sum(-1))


def test_a_massive_channel_is_found():
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 5] = 1000.0  # a residual channel that dwarfs the others
    _, massive = importance_scores(model, batches())
    assert massive.nonzero().flatten().tolist() == [5]
    _, none = importance_scores(tiny_model("llama"), batches())
    assert not none.any() and MASSIVE_RATIO > 1


def test_initial_log_alpha_spreads_by_rank_without_ties():
    scores = torch.tensor([[0.3, 0.1, 0.9, 0.5], [1.0, 1.0, 2.0, 0.0]])
    la = initial_log_alpha(scores, top=4.6, spread=2.0)
    assert torch.allclose(la[0], torch.tensor([4.6 - 2 / 3 * 2 * 1, 2.6, 4.6, 4.6 - 2 / 3]), atol=1e-6)
    assert len(set(la[1].tolist())) == 4  # equal scores still get distinct starting points
    assert la[1].argmin() == 3 and la[1].argmax() == 2
