"""Importance of every prunable unit, from one short calibration pass (docs/method.md §2.7).

As Minitron, LLM-Pruner and ShortGPT score units, on the unmodified source model:
- heads: mean |attention output| of each head (the `o_proj` input, head by head), summed over a KV group's
  heads in `kv_group` mode;
- FFN channels: mean |act(gate) * up| (the `down_proj` input);
- hidden channels: mean |h| of the residual stream entering every norm, over all layers;
- layers: block influence, 1 - cos(h_in, h_out) of the residual stream across the block, per token.

A hidden channel whose largest |h| is MASSIVE_RATIO times the median channel's is *massive* (SmolLM2's dim
507 reaches ~26,000 against ~80): removing it collapses the model, so it is protected (never pruned).
"""

from __future__ import annotations

import torch
from torch import nn

from drpruning.models.families import family_of
from drpruning.models.shape import source_shape

MASSIVE_RATIO = 20.0


@torch.no_grad()
def importance_scores(model: nn.Module, batches: list[torch.Tensor],
                      head_mode: str = "kv_group") -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """({structure: scores with the shape of its log_alpha}, massive hidden channels as a bool [d])."""
    family, src = family_of(model.config), source_shape(model.config)
    base = family.base(model)
    L, d = src.num_hidden_layers, src.hidden_size
    heads = torch.zeros(L, src.num_attention_heads, dtype=torch.float64)
    ffn = torch.zeros(L, src.intermediate_size, dtype=torch.float64)
    hidden = torch.zeros(d, dtype=torch.float64)
    hidden_max = torch.zeros(d, dtype=torch.float64)
    layer = torch.zeros(L, dtype=torch.float64)
    tokens = 0
    handles = []

    def mean_abs(x: torch.Tensor) -> torch.Tensor:
        return x.detach().abs().double().flatten(0, -2).sum(0)

    for i, block in enumerate(base.layers):
        def on_o(_m, args, i=i):
            heads[i] += mean_abs(args[0]).view(src.num_attention_heads, src.head_dim).sum(-1)

        def on_down(_m, args, i=i):
            ffn[i] += mean_abs(args[0])

        def on_block(_m, args, kwargs, out, i=i):
            h_in = (args[0] if args else kwargs["hidden_states"]).detach().double()
            h_out = (out[0] if isinstance(out, tuple) else out).detach().double()
            layer[i] += (1 - nn.functional.cosine_similarity(h_in, h_out, dim=-1)).sum()

        handles += [family.attn(block, "o").register_forward_pre_hook(on_o),
                    family.ffn(block, "down").register_forward_pre_hook(on_down),
                    block.register_forward_hook(on_block, with_kwargs=True)]
    for norm in family.residual_norms(model):
        def on_norm(_m, args):
            h = args[0].detach().abs().double().flatten(0, -2)
            hidden.add_(h.sum(0))
            torch.maximum(hidden_max, h.max(0).values, out=hidden_max)

        handles.append(norm.register_forward_pre_hook(on_norm))
    was_training = model.training
    model.eval()
    try:
        # eager even where the layers are compiled: each hook's layer index is a guard, so a compiled pass
        # would build a graph per layer and spend the recompile limit the training graphs need
        with torch.compiler.set_stance("force_eager"):
            for ids in batches:
                model(input_ids=ids.to(next(model.parameters()).device))
                tokens += ids.numel()
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    head = heads.view(L, src.num_key_value_heads, src.group_size)
    scores = {"layer": layer / tokens, "intermediate": ffn / tokens, "hidden": hidden / tokens,
              "head": (head.sum(-1) if head_mode == "kv_group" else head) / tokens}
    massive = hidden_max > MASSIVE_RATIO * hidden_max.median()
    return {k: v.float() for k, v in scores.items()}, massive


def initial_log_alpha(scores: torch.Tensor, top: float, spread: float) -> torch.Tensor:
    """Log-alphas from `top` (the most important unit of a row) down to `top - spread` (the least), by rank
    within each row, so that no two units start tied and the least important go first."""
    n = scores.shape[-1]
    ranks = scores.argsort(dim=-1, stable=True).argsort(dim=-1, stable=True).float()  # 0 = least important
    return top - spread * (1 - ranks / max(n - 1, 1))


def calibration_batches(train: list[torch.Tensor], sequences: int, batch_size: int) -> list[torch.Tensor]:
    """The first training sequences of every domain in turn (the sampler's own order is left untouched)."""
    picked, i = [], 0
    while len(picked) < sequences and any(i < len(t) for t in train):
        picked += [t[i] for t in train if i < len(t)][: sequences - len(picked)]
        i += 1
    return [torch.stack(picked[j:j + batch_size]) for j in range(0, len(picked), batch_size)]


def calibrate(pruner: torch.nn.Module, model: nn.Module, train: list[torch.Tensor], batch_size: int) -> list[int]:
    """Importance-initialise `pruner` from its run's training sequences (on the unmasked model; every rank
    then takes rank 0's result); returns the protected hidden channels."""
    cfg = pruner.cfg
    batches = calibration_batches(train, cfg.calibration_sequences, batch_size)
    scores, massive = importance_scores(model, batches, cfg.head_mode)
    pruner.set_importance(scores, massive)
    pruner.broadcast_()
    return pruner.protected("hidden").nonzero().flatten().tolist() if "hidden" in pruner.structures else []
