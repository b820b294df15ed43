"""The mixer: the sampling proportions and what moves them. A method is a subclass with a `propose` rule
(one file each: constant.py, sheared.py, dro.py) registered by name in `drpruning.mixing.METHODS`.

The training loop calls `start(source_losses)` once before training, `observe_train(domain_losses)` every
step and `update(step, eval_losses, domain_tokens, sparsity)` after every evaluation (on rank 0; the loop
broadcasts `proportions`). `update` returns the `mix` record written to metrics.jsonl.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import numpy as np

from drpruning.mixing.references import ReferenceLosses, reference_setting
from drpruning.mixing.rules import distribution, vector

log = logging.getLogger(__name__)


def plain(value: Any) -> Any:
    """NaN -> None, numpy -> python: records and state must be JSON-able."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [plain(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


@dataclass(frozen=True)
class NoOptions:
    """A method without options of its own."""


def check_common(cfg: Any) -> None:
    """The options every method shares (`mixing.signal`, `mixing.ema`); ValueError names the key."""
    if not 0 < cfg.ema <= 1:
        raise ValueError(f"config key 'mixing.ema' must be in (0, 1], got {cfg.ema}")
    if cfg.signal not in ("eval", "train"):
        raise ValueError(f"config key 'mixing.signal' is {cfg.signal!r}: use eval or train")
    if isinstance(cfg.reference, str):
        reference_setting(cfg.reference, 0)


class Mixer:
    """Base class: proportions, references and the training-loss EMA, the `mix` record and the state."""

    method: ClassVar[str]
    Options: ClassVar[type] = NoOptions  # a frozen dataclass of the method's own keys, checked in __post_init__
    uses_references: ClassVar[bool] = True  # False: references are only logged, never needed

    @classmethod
    def options(cls, cfg: Any) -> Any:
        """The method's typed options from a MixingConfig: a key of the same name, else `mixing.options`."""
        extra = dict(getattr(cfg, "options", None) or {})
        values = {}
        for f in fields(cls.Options):
            if hasattr(cfg, f.name):
                values[f.name] = getattr(cfg, f.name)
            elif f.name in extra:
                values[f.name] = extra[f.name]
        return cls.Options(**values)

    def __init__(self, cfg: Any, domains: Sequence[str], initial: Sequence[float], total_steps: int,
                 pruning: bool = False, final_sparsity: float | None = None):
        self.domains = [str(d) for d in domains]
        k = len(self.domains)
        if k == 0:
            raise ValueError("the mixer needs at least one domain")
        if len(initial) != k:
            raise ValueError(f"got {len(initial)} initial proportions for {k} domains "
                             f"({', '.join(self.domains)}): give one per domain")
        if not (isinstance(total_steps, int) and total_steps > 0):
            raise ValueError(f"total_steps must be a positive integer, got {total_steps!r}")
        check_common(cfg)
        self.cfg = cfg
        self.opts = self.options(cfg)
        self.total_steps = total_steps
        self.initial = distribution("initial proportions", initial, k).tolist()
        self._proportions = list(self.initial)
        self.ratio = list(self.initial)  # reference ratio p (moves only for methods that move it)
        mode, values = reference_setting(cfg.reference, k)
        self.refs = ReferenceLosses(mode, values, self.domains, total_steps, cfg, pruning, final_sparsity)
        self.reference_scale = 1.0
        self.train_ema: list[float | None] = [None] * k
        self.last_step = 0

    @property
    def reference_mode(self) -> str:
        return self.refs.mode

    @property
    def references(self) -> list[float] | None:
        return self.refs.values

    @property
    def final_sparsity(self) -> float | None:
        return self.refs.final_sparsity

    @final_sparsity.setter
    def final_sparsity(self, value: float | None) -> None:
        self.refs.final_sparsity = value

    @property
    def proportions(self) -> list[float]:
        return list(self._proportions)

    @proportions.setter
    def proportions(self, value: Sequence[float]) -> None:
        # other ranks receive rank 0's proportions this way; a resumed run sets the saved ones
        self._proportions = distribution("proportions", value, len(self.domains)).tolist()

    # ------------------------------------------------------------------ inputs from the loop
    def start(self, source_losses: Sequence[float]) -> None:
        """Per-domain eval losses of the model before training: the references for `source` (and the starting
        references for `scaling_law`)."""
        x = vector("source losses", source_losses, len(self.domains))
        if not (np.all(np.isfinite(x)) and np.all(x >= 0)):
            if self.reference_mode in ("source", "scaling_law") and self.uses_references:
                raise ValueError(f"source losses must be finite and non-negative, got {list(source_losses)}: "
                                 "check the evaluation set of every domain")
            log.warning("source losses %s are not all finite; they are not used", list(source_losses))
            return
        self.refs.start(x.tolist())

    def observe_train(self, domain_losses: Sequence[float]) -> None:
        """Every step: per-domain training loss of the batch (nan for a domain absent from it)."""
        x = vector("domain losses", domain_losses, len(self.domains))
        a = self.cfg.ema
        for i, value in enumerate(x.tolist()):
            if math.isnan(value):
                continue
            if not (math.isfinite(value) and value >= 0):
                log.warning("training loss %r of domain %s ignored", value, self.domains[i])
                continue
            old = self.train_ema[i]
            self.train_ema[i] = value if old is None else (1 - a) * old + a * value

    def jump(self, eval_losses: Sequence[float]) -> float | None:
        """How far the mean held-out loss is above the mean training-loss average, over the domains that
        have one; None before any."""
        pairs = [(float(e), m) for e, m in zip(eval_losses, self.train_ema, strict=True) if m is not None]
        if not pairs:
            return None
        return sum(e for e, _ in pairs) / len(pairs) - sum(m for _, m in pairs) / len(pairs)

    def signal(self, eval_losses: Sequence[float]) -> list[float]:
        if self.cfg.signal == "eval":
            return list(eval_losses)
        # a domain not sampled yet has no training EMA: its eval loss stands in
        return [float(e) if m is None else m for m, e in zip(self.train_ema, eval_losses, strict=True)]

    # ------------------------------------------------------------------ the update
    def update(self, step: int, eval_losses: Sequence[float], domain_tokens: Sequence[int],
               sparsity: float | None = None) -> dict:
        """After an evaluation at `step` (optimiser steps done): new proportions; returns the `mix` record."""
        began = time.perf_counter()
        k = len(self.domains)
        vector("eval losses", eval_losses, k)
        tokens = vector("domain tokens", domain_tokens, k)
        losses = self.signal([float(v) for v in eval_losses])
        fits: list[dict | None] = [None] * k
        predictions: list[float | None] = [None] * k
        skipped = None
        jump = self.jump(eval_losses)
        if not all(math.isfinite(v) and v >= 0 for v in losses):
            skipped = f"losses {losses} are not all finite and non-negative: proportions unchanged"
            log.warning("mixing update at step %d skipped: %s", step, skipped)
        elif jump is not None and jump > self.cfg.outlier_nats > 0:
            # a collapsed evaluation (e.g. masks that cut a unit the model cannot lose) is no signal: read as
            # excess it would move mass onto the domain with the lowest reference
            skipped = (f"held-out loss {jump:.2f} nats above the training-loss average (mixing.outlier_nats = "
                       f"{self.cfg.outlier_nats}): an outlier, proportions and references unchanged")
            log.warning("mixing update at step %d skipped: %s", step, skipped)
        elif self.uses_references and self.references is None:
            raise RuntimeError("the mixer has no reference losses: call start(source_losses) before update")
        else:
            fits, predictions = self.refs.update(step, losses, tokens, sparsity)
            self._proportions = self.propose(step, losses)
        self.last_step = step
        refs = self.references
        e = [None] * k
        if refs is not None and skipped is None:
            e = self.excess(losses, refs)

        def named(values: Sequence) -> dict:
            return dict(zip(self.domains, values, strict=True))

        record = {  # the `mix` record of docs/design.md, without `step` (the loop adds it)
            "method": self.method,
            "losses": named(losses),
            "references": named(refs if refs is not None else [None] * k),
            "reference_scale": self.reference_scale,
            "excess": named(e),
            "weights": named(self._proportions),
            "ratio": named(self.ratio),
            "fits": named(fits),
            "predictions": named(predictions),
            "skipped": skipped,
            "time_s": time.perf_counter() - began,
        }
        return plain(record)

    def propose(self, step: int, losses: list[float]) -> list[float]:
        """The next proportions from valid losses: the method's rule (here: unchanged)."""
        return list(self._proportions)

    def excess(self, losses: list[float], references: list[float]) -> list[float]:
        """What the record logs as each domain's excess loss."""
        return [x - r for x, r in zip(losses, references, strict=True)]

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict:
        return plain({
            "method": self.method, "domains": self.domains, "proportions": self._proportions,
            "ratio": self.ratio, "initial": self.initial, "reference_scale": self.reference_scale,
            "train_ema": self.train_ema, "last_step": self.last_step, **self.refs.state_dict(),
        })

    def load_state_dict(self, state: dict) -> None:
        if state.get("domains") != self.domains or state.get("method") != self.method:
            raise ValueError(f"mixer state is for method {state.get('method')!r} over domains "
                             f"{state.get('domains')}, not {self.method!r} over {self.domains}")
        k = len(self.domains)
        self._proportions = [float(x) for x in state["proportions"]]
        self.ratio = [float(x) for x in state["ratio"]]
        self.initial = [float(x) for x in state["initial"]]
        self.reference_scale = float(state["reference_scale"])
        self.train_ema = [None if x is None else float(x) for x in state["train_ema"]]
        self.refs.load_state_dict(state)
        self.last_step = int(state["last_step"])
        if not all(len(x) == k for x in (self._proportions, self.ratio, self.train_ema, self.refs.points)):
            raise ValueError(f"mixer state has lists of the wrong length for {k} domains")
