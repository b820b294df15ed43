"""Export a pruned model: tensor surgery at the exact target shape, then `save_pretrained` (docs/method.md §4).

With deterministic exact masks (survivors keep their soft value), the exported model computes the same
logits as the masked model:
- layers whose gate is 0 are dropped and the rest renumbered; the layer value is folded into o_proj and
  down_proj;
- kv_group mode: kept KV groups keep their G query heads; the group's value is folded into the v rows *and*
  v bias (attention output is linear in V, bias included). query mode: every KV head stays; kept query
  heads' values are folded into their o_proj input columns (a value per query head cannot go into a shared V);
- FFN channels: the channel value is folded into up rows (and up bias);
- hidden: hz is folded once, on the output side: o_proj / down_proj output rows and every norm weight;
  inputs of q/k/v/gate/up, embedding and LM head columns are only sliced, so a tied embedding stays tied and
  unscaled.
The source model is not modified.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.initialization import no_init_weights

from drpruning.models.families import family_of
from drpruning.models.loading import save_model
from drpruning.models.shape import Shape, derive_config
from drpruning.pruning.pruner import Pruner

CUT_DIR = "cut"  # in a one-shot run's folder: the compact model it trains (drpruning.pruning.one_shot)


def _kept(mask: torch.Tensor | None, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices of non-zero units, their values); all units with value 1 when the structure is not pruned."""
    if mask is None:
        return torch.arange(size), torch.ones(size)
    idx = torch.nonzero(mask != 0).flatten()
    return idx, mask[idx].float()


def _head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (heads[:, None] * head_dim + torch.arange(head_dim)[None, :]).flatten()


@torch.no_grad()
def pruned_state_dict(model: nn.Module, pruner: Pruner) -> tuple[dict[str, torch.Tensor], Shape, list[int]]:
    """The sliced and folded float32 state dict, its shape and the source indices of the kept layers."""
    masks = {k: v.detach().float().cpu() for k, v in pruner.deterministic_masks(exact=True).items()}
    family = family_of(model.config)
    src, base = pruner.source, family.base(model)
    hd, g = src.head_dim, src.group_size
    prefix = family.prefix(model)
    layers, layer_vals = _kept(masks.get("layer"), src.num_hidden_layers)
    dims, hz = _kept(masks.get("hidden"), src.hidden_size)

    def w(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.detach().float().cpu()

    sd: dict[str, torch.Tensor] = {}
    heads_out, kv_out, ffn_out = set(), set(), set()
    for j, (i, lv) in enumerate(zip(layers.tolist(), layer_vals, strict=True)):
        layer = base.layers[i]
        q, k, v, o = (family.attn(layer, name) for name in ("q", "k", "v", "o"))
        gate, up, down = (family.ffn(layer, name) for name in ("gate", "up", "down"))

        def a(name: str, what: str = "weight", j: int = j) -> str:
            return prefix + family.attn_key(j, name, what)

        def f(name: str, what: str = "weight", j: int = j) -> str:
            return prefix + family.ffn_key(j, name, what)

        out_scale = (lv * hz)[:, None]  # layer value and hidden values, folded into output rows once
        # attention heads
        head_mask = masks.get("head")
        v_scale = torch.ones(src.num_key_value_heads)
        if head_mask is None:
            groups, q_heads = torch.arange(src.num_key_value_heads), torch.arange(src.num_attention_heads)
            col_scale = torch.ones(src.num_attention_heads)
        elif pruner.head_mode == "kv_group":
            groups, gv = _kept(head_mask[i], src.num_key_value_heads)
            v_scale = gv
            q_heads = (groups[:, None] * g + torch.arange(g)[None, :]).flatten()
            col_scale = torch.ones(len(q_heads))
        else:
            groups = torch.arange(src.num_key_value_heads)
            q_heads, col_scale = _kept(head_mask[i].flatten(), src.num_attention_heads)
        q_rows, kv_rows = _head_rows(q_heads, hd), _head_rows(groups, hd)
        v_rows_scale = v_scale.repeat_interleave(hd)[:, None]
        sd[a("q")] = w(q.weight)[q_rows][:, dims]
        sd[a("k")] = w(k.weight)[kv_rows][:, dims]
        sd[a("v")] = w(v.weight)[kv_rows][:, dims] * v_rows_scale
        if q.bias is not None:
            sd[a("q", "bias")] = w(q.bias)[q_rows]
            sd[a("k", "bias")] = w(k.bias)[kv_rows]
            sd[a("v", "bias")] = w(v.bias)[kv_rows] * v_rows_scale[:, 0]
        o_w = w(o.weight)[:, q_rows] * col_scale.repeat_interleave(hd)[None, :]
        sd[a("o")] = o_w[dims] * out_scale
        if o.bias is not None:
            sd[a("o", "bias")] = w(o.bias)[dims] * out_scale[:, 0]
        heads_out.add(len(q_heads))
        kv_out.add(len(groups))
        # MLP channels
        chans, cv = _kept(
            masks["intermediate"][i] if "intermediate" in masks else None, src.intermediate_size
        )
        sd[f("gate")] = w(gate.weight)[chans][:, dims]
        sd[f("up")] = w(up.weight)[chans][:, dims] * cv[:, None]
        sd[f("down")] = w(down.weight)[:, chans][dims] * out_scale
        if up.bias is not None:
            sd[f("gate", "bias")] = w(gate.bias)[chans]
            sd[f("up", "bias")] = w(up.bias)[chans] * cv
        if down.bias is not None:
            sd[f("down", "bias")] = w(down.bias)[dims] * out_scale[:, 0]
        ffn_out.add(len(chans))
        for which, name in enumerate(family.norms):
            sd[prefix + family.norm_key(j, which)] = w(getattr(layer, name).weight)[dims] * hz
    sd[prefix + f"{family.final_norm}.weight"] = w(getattr(base, family.final_norm).weight)[dims] * hz
    sd[prefix + f"{family.embedding}.weight"] = w(getattr(base, family.embedding).weight)[:, dims]
    lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if lm_head is not None:
        sd["lm_head.weight"] = w(lm_head.weight)[:, dims]  # tied: the same (unscaled) embedding slice
        if getattr(lm_head, "bias", None) is not None:
            sd["lm_head.bias"] = w(lm_head.bias)
    if len(heads_out) != 1 or len(kv_out) != 1 or len(ffn_out) > 1:
        raise RuntimeError(f"layers kept unequal unit counts (heads {heads_out}, KV {kv_out}, FFN {ffn_out})")
    shape = Shape(
        len(layers),
        len(dims),
        heads_out.pop(),
        kv_out.pop(),
        ffn_out.pop() if ffn_out else src.intermediate_size,
        hd,
    )
    if shape != pruner.target:
        raise RuntimeError(f"exported shape {shape} differs from the target {pruner.target}")
    return sd, shape, layers.tolist()


def build_pruned_model(model: nn.Module, pruner: Pruner, dtype: torch.dtype | None = None) -> nn.Module:
    """A fresh compact model of the target config holding the sliced weights (loaded strictly)."""
    sd, shape, kept_layers = pruned_state_dict(model, pruner)
    config = derive_config(model.config, shape, kept_layers)
    dtype = dtype or next(model.parameters()).dtype
    with no_init_weights():  # every weight is overwritten below
        new = AutoModelForCausalLM.from_config(config, dtype=dtype)
    new.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=True)
    if getattr(config, "tie_word_embeddings", False):
        new.tie_weights()
    if getattr(model, "generation_config", None) is not None:
        new.generation_config = copy.deepcopy(model.generation_config)
    return new.eval()


def export_model(
    model: nn.Module,
    pruner: Pruner,
    out_dir: str | Path,
    tokenizer: Any = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write the compact model (safetensors, config.json with the target shape, generation config, tokenizer)
    to `out_dir`; `dtype` defaults to the source weights' dtype. Returns the folder."""
    return save_model(build_pruned_model(model, pruner, dtype), out_dir, tokenizer)


def export_run(run_dir: str | Path, checkpoint: str | None = None, out_dir: str | Path | None = None) -> Path:
    """Export a pruning run's compact model from one of its checkpoints (default: the newest good one)."""
    from drpruning.config import ConfigError, load_config
    from drpruning.models.card import write_model_card
    from drpruning.models.loading import load_model as load_source
    from drpruning.training.checkpoint import Checkpointer, read_pruner, read_weights

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir} has no config.yaml: pass the run directory of `drpruning prune`")
    cfg = load_config(run_dir / "config.yaml", [])
    if not cfg.pruning.enabled:
        raise ConfigError(f"{run_dir} is not a pruning run (pruning.enabled is false): its model/ is already "
                          "the full model")
    checkpointer = Checkpointer(run_dir)
    if checkpoint is None:
        steps = checkpointer.steps()
        if not steps:
            raise ConfigError(f"{run_dir} has no checkpoints to export from")
        checkpoint = f"step-{steps[0]}"
    folder = checkpointer.root / checkpoint
    if not folder.is_dir():
        raise ConfigError(f"checkpoint {folder} does not exist; available: "
                          f"{', '.join(f'step-{s}' for s in checkpointer.steps()) or 'none'}")
    checkpointer.verify(int(checkpoint.removeprefix("step-")))
    out = Path(out_dir or run_dir / "model")
    if cfg.pruning.method == "importance":  # a one-shot run trains the compact model cut in RUN_DIR/cut
        _export_compact(run_dir, folder, out, cfg.model.source)
    else:
        model, tokenizer = load_source(cfg.model.source)
        read_weights(folder, model)
        pruner = Pruner(model.config, cfg.pruning, cfg.train.steps)
        read_pruner(folder, pruner)
        export_model(model, pruner, out, tokenizer)
    write_model_card(out, cfg, run_dir, step=int(checkpoint.removeprefix("step-")))
    return out


def _export_compact(run_dir: Path, checkpoint: Path, out: Path, source: str) -> Path:
    from drpruning.config import ConfigError
    from drpruning.models.loading import load_model as load_compact
    from drpruning.models.loading import load_model_config, source_dtype
    from drpruning.training.checkpoint import read_weights

    cut = run_dir / CUT_DIR
    if not (cut / "config.json").is_file():
        raise ConfigError(f"{cut} is missing: a one-shot run writes its compact model there at step 0 and its "
                          "checkpoints hold that architecture; restore the folder from the run, or export "
                          f"{run_dir / 'model'} instead")
    model, tokenizer = load_compact(str(cut))
    read_weights(checkpoint, model)
    return save_model(model, out, tokenizer, source_dtype(load_model_config(source)[0]))
