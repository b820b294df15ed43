"""One-shot pruning (`pruning.method: importance`, Minitron's recipe): the calibration scores cut the source to
the target shape once, before the first step, and the run trains the compact model itself.

Training the compact model rather than the source under fixed binary masks gives the same numbers (the masks
are 0 or 1, so the export only slices) at the compact model's cost: 63% of the source's compute for the demo's
shape. The cut is kept in RUN_DIR/cut (a Hugging Face folder, in the training dtype, plus `cut.json`: what the
cut decided and the source model's held-out losses), so a resumed run rebuilds the same architecture without
the source pass, and `drpruning export` loads any checkpoint into it.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from drpruning.models.loading import load_model, save_model
from drpruning.pruning.export import CUT_DIR, build_pruned_model
from drpruning.pruning.importance import calibrate
from drpruning.pruning.pruner import Pruner
from drpruning.pruning.summary import tie_groups

RECORD = "cut.json"


def cut(model: nn.Module, pruner: Pruner, train: list[torch.Tensor], batch_size: int) -> tuple[nn.Module, dict]:
    """(the compact model, the cut's record): calibrate `pruner` on `model` (the unmodified source) and slice
    the source at the exact masks. The source is left as it was."""
    protected = calibrate(pruner, model, train, batch_size)
    compact = build_pruned_model(model, pruner)
    compact.config.use_cache = False
    shape = pruner.target.as_dict()
    record = {"protected_hidden": protected, "tie_groups": tie_groups(pruner, exact=True),
              "shape": {**shape, "target": shape}, "final_sparsity": pruner.final_sparsity()}
    return compact, record


def save_cut(run_dir: Path, model: nn.Module, tokenizer: Any, record: dict) -> Path:
    """Write RUN_DIR/cut atomically: a temporary folder, renamed once complete."""
    final = Path(run_dir) / CUT_DIR
    tmp = final.with_name(f".{CUT_DIR}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    save_model(model, tmp, tokenizer)
    (tmp / RECORD).write_text(json.dumps(record, indent=1) + "\n")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def read_cut(run_dir: Path) -> dict | None:
    """The record of RUN_DIR/cut, or None when the run has no finished cut."""
    path = Path(run_dir) / CUT_DIR / RECORD
    return json.loads(path.read_text()) if path.is_file() else None


def cut_once(run_dir: Path, pruner: Pruner, source: nn.Module, train: list[torch.Tensor], batch_size: int,
             source_eval: Callable[[], dict], tokenizer: Any, reload: bool, dtype: Any = torch.float32,
             main: bool = True) -> tuple[nn.Module, dict]:
    """(the compact model, the cut's record). `reload` (a run resumed from a checkpoint): read RUN_DIR/cut,
    whose record holds the source's evaluation; else cut `source`, record `source_eval()` of the source and
    write RUN_DIR/cut (on the main rank)."""
    record = read_cut(run_dir) if reload else None
    if record is not None:
        compact, _ = load_model(str(Path(run_dir) / CUT_DIR), dtype=dtype)
    else:
        compact, record = cut(source, pruner, train, batch_size)
        record["source_eval"] = source_eval()
        if main:
            save_cut(run_dir, compact, tokenizer, record)
    compact.config.use_cache = False
    return compact, record
