"""The size the masks keep: the expected number of prunable parameters (attention + MLP weights) under
per-unit keep probabilities, factorised over structures (docs/method.md §2.4), and the exact count of a shape.
"""

from __future__ import annotations

import torch

from drpruning.models.shape import Shape


def expected_params(src: Shape, head_mode: str, p: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    """E[#parameters] of a `src`-shaped model whose units are kept with probabilities `p` (a structure missing
    from `p` is kept whole); differentiable in `p`."""
    L, hd, g = src.num_hidden_layers, src.head_dim, src.group_size

    def full(n: int) -> torch.Tensor:
        return torch.full((L,), float(n), device=device)

    hidden = p["hidden"].sum() if "hidden" in p else torch.tensor(float(src.hidden_size), device=device)
    layer = p["layer"] if "layer" in p else torch.ones(L, device=device)
    if head_mode == "kv_group":
        groups = p["head"].sum(-1) if "head" in p else full(src.num_key_value_heads)
        attn = 2 * hd * (g + 1) * groups  # q and o: G heads per group; k and v: one head
    else:
        heads = p["head"].sum((-1, -2)) if "head" in p else full(src.num_attention_heads)
        attn = 2 * hd * heads + 2 * hd * src.num_key_value_heads  # every KV head stays
    ffn = p["intermediate"].sum(-1) if "intermediate" in p else full(src.intermediate_size)
    return hidden * (layer * (attn + 3 * ffn)).sum()


def prunable_params(shape: Shape) -> float:
    """The attention + MLP weights of `shape`, counted as `expected_params` counts them."""
    kv = shape.num_key_value_heads * 2 * shape.head_dim
    return float(shape.hidden_size * shape.num_hidden_layers
                 * (2 * shape.head_dim * shape.num_attention_heads + kv + 3 * shape.intermediate_size))
