"""The distillation teacher: a frozen copy of a model (by default the source being pruned) whose next-token
distributions the student learns as well as the data (`train.distill`, the loss in `drpruning.loss`)."""

from __future__ import annotations

import torch

from drpruning.config import ConfigError, RunConfig
from drpruning.loss import autocast_dtype
from drpruning.models.loading import load_model
from drpruning.training import distributed as dist
from drpruning.training import parallel


def load_teacher(cfg: RunConfig, student: torch.nn.Module, device: torch.device,
                 loaded_source: torch.nn.Module | None = None) -> torch.nn.Module:
    """The frozen teacher; `loaded_source` (the source model, already in memory after a one-shot cut) is used
    instead of a second copy when the teacher is the source."""
    source = cfg.train.distill.teacher or cfg.model.source
    if loaded_source is not None and source == cfg.model.source:
        teacher = loaded_source
    else:
        teacher, _ = load_model(source, dtype=cfg.model.dtype)
    if teacher.config.vocab_size != student.config.vocab_size:
        raise ConfigError(f"train.distill.teacher {source!r} has a vocabulary of {teacher.config.vocab_size}, the "
                          f"student {student.config.vocab_size}: the teacher must share the student's tokenizer")
    teacher.requires_grad_(False)
    teacher.config.use_cache = False
    teacher = teacher.to(device).eval()
    if dist.world() > 1 and cfg.parallel == "fsdp":  # sharded like the student, never trained
        # under the student's mixed-precision policy too: its forward runs inside the student's (no autocast)
        teacher = parallel.wrap_model(teacher, "fsdp", device, autocast_dtype(cfg.train.dtype, device))
    return teacher
