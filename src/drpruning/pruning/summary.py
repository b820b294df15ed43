"""What an evaluation or the export cuts: the kept architecture and the tie groups at the cut."""

from __future__ import annotations

from typing import Any

import torch

from drpruning.pruning.pruner import Pruner


@torch.no_grad()
def shape_summary(pruner: Pruner, exact: bool = False) -> dict[str, Any]:
    """The architecture the evaluation masks keep (expected size, or exact), the tie groups they cut
    through, and the target."""
    exact = exact or pruner.hardening
    masks = pruner.deterministic_masks(exact=exact)
    src = pruner.source
    kept = {s: (m != 0).sum(-1) for s, m in masks.items()}
    layers = int(kept["layer"]) if "layer" in kept else src.num_hidden_layers
    if "head" in kept:
        per_layer = kept["head"] if pruner.head_mode == "kv_group" else kept["head"].sum(-1)
        heads_per_layer = [int(h) * (src.group_size if pruner.head_mode == "kv_group" else 1) for h in per_layer]
    else:
        heads_per_layer = [src.num_attention_heads] * src.num_hidden_layers
    ffn_per_layer = (
        [int(f) for f in kept["intermediate"]]
        if "intermediate" in kept
        else [src.intermediate_size] * src.num_hidden_layers
    )
    return {
        "num_hidden_layers": layers,
        "hidden_size": int(kept["hidden"]) if "hidden" in kept else src.hidden_size,
        "num_attention_heads": round(sum(heads_per_layer) / len(heads_per_layer)),
        "intermediate_size": round(sum(ffn_per_layer) / len(ffn_per_layer)),
        "heads_per_layer": heads_per_layer,
        "intermediate_per_layer": ffn_per_layer,
        "expected_params": float(pruner.expected_params()),
        "tie_groups": tie_groups(pruner, exact),
        "target": pruner.target.as_dict(),
    }


@torch.no_grad()
def tie_groups(pruner: Pruner, exact: bool = False) -> dict[str, int]:
    """Per structure, the largest number of units (over rows) that share the soft value at the cut: more than 1
    means the tie key, not the masks, chose among them."""
    out = {}
    for s, k in pruner.cut_sizes(exact).items():
        soft, _ = pruner.soft_and_key(s)
        rows, ks = soft.reshape(-1, soft.shape[-1]), k.reshape(-1)
        sizes = [int((row == row.sort().values[kk - 1]).sum()) if kk > 0 else 0 for row, kk in zip(rows, ks)]
        out[s] = max(sizes)
    return out
