"""Pruning: hard-concrete maths (`hard_concrete`), the `Pruner` (masks, multipliers, penalty), the masks on an
unmodified HF model (`masked_model`), and export to a compact model (`export`). Imports run one way:
hard_concrete <- pruner <- masked_model, export."""

from drpruning.pruning.export import build_pruned_model, export_model, export_run, pruned_state_dict
from drpruning.pruning.hard_concrete import prob_nonzero, sample_hard_concrete, soft_values, topk_mask
from drpruning.pruning.masked_model import MaskedLinear, MaskedModel, attach, prepare_masks
from drpruning.pruning.pruner import STRUCTURES, Pruner

__all__ = ["build_pruned_model", "export_model", "export_run", "pruned_state_dict", "prob_nonzero",
           "sample_hard_concrete", "soft_values", "topk_mask", "MaskedLinear", "MaskedModel", "attach",
           "prepare_masks", "STRUCTURES", "Pruner"]
