"""Training health: a non-finite step is skipped and counted, too many in a row stop the run, a loss spike is
a warning record, and a model that diverged is not exported (unless force=true)."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from drpruning.training.checkpoint import Checkpointer
from drpruning.training.metrics import MetricsLog, read_metrics

log = logging.getLogger(__name__)
SPIKE_NATS, SPIKE_EMA, SPIKE_AFTER = 1.0, 0.1, 5  # warn when a loss is 1 nat above its running average
UNIFORM_LEVEL = 0.99  # a held-out loss at this fraction of ln(vocab) or above: the model predicts ~uniformly
EXPORT_GAP_NATS = 0.05  # exact masks this far above the last learnt ones: the masks had not settled


class TrainingError(RuntimeError):
    """A run that cannot go on or must not export; the message names the step, the cause and the fix."""


class HealthGuard:
    def __init__(self, max_bad_steps: int, metrics: MetricsLog, checkpointer: Checkpointer):
        self.max_bad_steps, self.metrics, self.checkpointer = max_bad_steps, metrics, checkpointer
        self.bad_steps = 0  # in a row
        self.loss_ema: float | None = None

    def state_dict(self) -> dict:
        """What the checks carry from step to step: a resumed run warns exactly where an unbroken one would."""
        return {"bad_steps": self.bad_steps, "loss_ema": self.loss_ema}

    def load_state_dict(self, state: dict) -> None:
        self.bad_steps, self.loss_ema = int(state["bad_steps"]), state["loss_ema"]

    def check(self, step: int, record: dict) -> None:
        """After optimiser step `step`: its training record says whether it was skipped (`bad`)."""
        if "bad" in record:
            self.bad_steps += 1
            self.metrics.write("bad_step", step=step, reason=record.pop("bad"), loss=record["loss"])
            log.warning("step %d skipped: loss %s", step, record["loss"])
            if self.bad_steps >= self.max_bad_steps:
                good = self.checkpointer.steps()
                raise TrainingError(
                    f"{self.bad_steps} consecutive steps had a non-finite loss or gradient norm (the last at step "
                    f"{step}): the run diverged. The last good checkpoint is "
                    f"{self.checkpointer.path(good[0]) if good else 'none'}; lower train.lr or raise "
                    "train.warmup_fraction, then resume=true (or start a new run_dir)")
            return
        self.bad_steps = 0
        loss = record["loss"]
        if self.loss_ema is not None and step > SPIKE_AFTER and loss > self.loss_ema + SPIKE_NATS:
            self.metrics.write("warning", step=step, loss=loss, loss_ema=self.loss_ema,
                               message=f"loss spike: {loss:.3f} is {loss - self.loss_ema:.2f} nats above its "
                                       "running average")
        self.loss_ema = loss if self.loss_ema is None else (1 - SPIKE_EMA) * self.loss_ema + SPIKE_EMA * loss


def check_exportable(metrics_path: Path, vocab_size: int) -> str:
    """Why the run's model must not be exported ("" when it may): its last held-out loss is non-finite, or at
    the uniform-prediction level having started below it (a model that diverged, not one that never learnt)."""
    evals = [r for r in read_metrics(metrics_path) if r["kind"] == "eval"]
    if not evals:
        return ""
    losses = [math.nan if x is None else x for x in evals[-1]["eval_loss"].values()]
    if not all(math.isfinite(x) for x in losses):
        return f"held-out losses {losses} are not all finite"
    mean, uniform = sum(losses) / len(losses), math.log(vocab_size)
    start = evals[0]["mean_loss"]
    if mean >= UNIFORM_LEVEL * uniform > start:
        return (f"mean held-out loss {mean:.3f} is at the level of a uniform prediction (ln vocab = {uniform:.2f}; "
                f"it started at {start:.3f})")
    return ""


def export_gap_record(metrics_path: Path, pruner: Any) -> dict[str, float]:
    """{"export_gap": the exact masks' held-out mean loss (the last evaluation) minus that of the last learnt
    masks (evaluated where hardening starts)}, or {} for a run without hardening or either evaluation."""
    step = pruner.last_learnt_step
    if step is None:
        return {}
    evals = [r for r in read_metrics(metrics_path) if r["kind"] == "eval"]
    learnt = [r for r in evals if r["step"] == step]
    if not learnt or evals[-1] is learnt[-1]:
        return {}
    gap = evals[-1]["mean_loss"] - learnt[-1]["mean_loss"]
    if gap > EXPORT_GAP_NATS:
        log.warning("export gap %.3f nats: the exact masks' held-out mean loss is above the learnt masks' at step "
                    "%d, so the masks had not settled into the target shape. A longer mask phase, or "
                    "pruning.method=importance (docs/pruning.md, 'Learnt masks or one-shot')", gap, step)
    return {"export_gap": gap}


def export_refusal(out: Path, problem: str) -> str:
    return (f"not exporting {out}: {problem or 'see rank 0'}; the run diverged (lower train.lr). Checkpoints are "
            "kept; pass force=true with resume=true to export anyway")
