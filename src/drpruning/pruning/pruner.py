"""The Pruner: hard-concrete masks and Lagrange multipliers for one model, their expected size and the
Lagrangian penalty (docs/method.md §2). The maths of one gate is in `hard_concrete`; putting the masks on a
model is `masked_model.attach`, so this module knows no model, only its config.

Structures and their `log_alpha` shapes (rows = all leading dimensions, units = the last one):
  layer        [L]            one gate per decoder block (attention and MLP branch)
  head         [L, H_kv]      head_mode kv_group: one gate per KV group, expanded to its G query heads
               [L, H_kv, G]   head_mode query: one gate per query head, the same count kept in every group
  intermediate [L, F]
  hidden       [d]            shared by every layer

What the training loop calls: `optimizer_groups()` once; per step `average_grads()` (the masks live outside
DDP/FSDP), `penalty(step)`, and `after_step()` once the optimisers stepped; `train()` / `eval(exact)` around
evaluations; `rng_state()` / `load_rng_state()` with checkpoints. Masks descend with the loss; the
multipliers lambda1 / lambda2 *ascend* (a per-group `maximize=True`: torch optimisers reject a negative lr).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as tdist
from torch import nn

from drpruning.config import ConfigError, PruningConfig, warmup_steps
from drpruning.models.families import family_of
from drpruning.models.shape import Shape, resolve_target, source_shape
from drpruning.pruning.expected_size import expected_params, prunable_params
from drpruning.pruning.hard_concrete import (
    GATE_FLOOR,
    LOG_ALPHA_MAX,
    LOG_ALPHA_MIN,
    TEMPERATURE,
    deterministic_gate,
    log_alpha_range,
    prob_nonzero,
    sample_hard_concrete,
    sharpened_temperature,
    soft_values,
    topk_mask,
)
from drpruning.pruning.importance import initial_log_alpha
from drpruning.pruning.projection import project_

STRUCTURES = ("layer", "head", "intermediate", "hidden")
INIT_SEED = 1234  # a fixed-seed CPU generator draws the initial log-alphas: every rank starts the same
SATURATED_FLOOR = float(1 - prob_nonzero(torch.tensor(LOG_ALPHA_MAX)))  # 1 - P of a unit at the top: 0.2%


class Pruner(nn.Module):
    """Masks and multipliers for a model with `config`, on `device`.

    `train()` samples fresh masks every forward; `eval()` uses deterministic masks at the current expected
    size, `eval(exact=True)` at the exact target size (what export keeps).
    """

    def __init__(self, config: Any, cfg: PruningConfig, total_steps: int,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        family_of(config)
        self.cfg = cfg
        self.source: Shape = source_shape(config)
        self.structures = tuple(s for s in STRUCTURES if s in cfg.structures)
        self.target: Shape = resolve_target(config, cfg)
        self.head_mode = cfg.head_mode
        self.warmup = warmup_steps(cfg, total_steps)
        self.exact = False
        self.one_shot = cfg.method == "importance"  # exact masks from the calibration scores, never learnt
        self.hardening = self.one_shot
        self.per_sequence = cfg.mask_samples == "sequence"
        self.deterministic = cfg.gates == "deterministic"
        self.projected = cfg.constraint == "projected"  # the size held by projection, not multipliers
        self.bounded = self.deterministic and cfg.log_alpha_bound == "temperature"
        self._step = 0
        self.mask_steps = max(1, total_steps - cfg.hardening_steps)  # the sharpening ends where hardening starts
        # the last step of learnt masks before hardening: the trainer evaluates them there (the export gap's base)
        self.last_learnt_step = self.mask_steps if cfg.hardening_steps and not self.one_shot else None
        self._gaps: dict[str, float] = {}  # the last penalty's mean sparsity gap per structure
        self._seed = 0
        self._generator: torch.Generator | None = None
        src = self.source
        heads = (src.num_key_value_heads,) + (() if self.head_mode == "kv_group" else (src.group_size,))
        shapes = {"layer": (src.num_hidden_layers,), "head": (src.num_hidden_layers, *heads),
                  "intermediate": (src.num_hidden_layers, src.intermediate_size), "hidden": (src.hidden_size,)}
        device = torch.device(device or "cpu")
        init = torch.Generator().manual_seed(INIT_SEED)
        # clamped at construction: above the range, every unit would get the same first step (exact ties)
        self.log_alpha = nn.ParameterDict({
            s: nn.Parameter((torch.randn(shapes[s], generator=init) * cfg.init_log_alpha_std + cfg.init_log_alpha)
                            .clamp(LOG_ALPHA_MIN, LOG_ALPHA_MAX).to(device))
            for s in self.structures})
        self.lambda1 = nn.ParameterDict({s: nn.Parameter(torch.zeros((), device=device)) for s in self.structures})
        self.lambda2 = nn.ParameterDict({s: nn.Parameter(torch.zeros((), device=device)) for s in self.structures})
        # ties among equal soft values are cut by this key (smaller first): seeded random, or the calibration
        # importance; saved with the masks, so `drpruning export` repeats the same choice
        for s in self.structures:
            self.register_buffer(f"tie_key_{s}", torch.rand(shapes[s], generator=init).to(device))
            protected = torch.zeros(shapes[s], dtype=torch.bool)
            for i in cfg.protect.get(s, []):
                if not 0 <= i < shapes[s][-1]:
                    raise ConfigError(f"pruning.protect.{s} names unit {i}, but the model has {shapes[s][-1]}")
                protected[..., i] = True
            self.register_buffer(f"protected_{s}", protected.to(device))
        if self.deterministic:  # saved with the masks: export folds the gate values at the last temperature
            self.register_buffer("gate_temperature", torch.tensor(TEMPERATURE, device=device))

    @torch.no_grad()
    def broadcast_(self) -> None:
        """Every rank takes rank 0's masks, multipliers, tie keys and protected units."""
        if tdist.is_initialized() and tdist.get_world_size() > 1:
            for t in [*self.parameters(), *self.buffers()]:
                tdist.broadcast(t.data, src=0)

    def tie_key(self, s: str) -> torch.Tensor:
        return getattr(self, f"tie_key_{s}")

    def protected(self, s: str) -> torch.Tensor:
        return getattr(self, f"protected_{s}")

    @torch.no_grad()
    def set_importance(self, scores: dict[str, torch.Tensor], massive: torch.Tensor | None = None) -> None:
        """Initial log-alphas and tie keys from calibration scores (`importance.importance_scores`); massive
        hidden channels become protected."""
        for s in self.structures:
            score = scores[s].to(self.log_alpha[s].device).reshape(self.log_alpha[s].shape)
            self.log_alpha[s].copy_(initial_log_alpha(score, LOG_ALPHA_MAX, self.cfg.importance_spread))
            self.tie_key(s).copy_(score)
        if massive is not None and "hidden" in self.structures and self.cfg.protect_massive:
            self.protected("hidden").logical_or_(massive.to(self.protected("hidden").device))
        if self.cfg.init == "one_shot":  # start at the one-shot cut: the units it removes go to the range's bottom,
            low = LOG_ALPHA_MAX - self.cfg.importance_spread  # in their order (no new ties) a quarter as spread:
            for s, mask in self.deterministic_masks(exact=True).items():  # P(z > 0) 0.05-0.08, kept 0.98-1
                a = self.log_alpha[s]
                a.copy_(torch.where(mask == 0, LOG_ALPHA_MIN + 0.25 * (a - low), a))

    # ---- sizes -----------------------------------------------------------------------------------
    def unit_count(self, structure: str) -> tuple[int, int]:
        """(source units per row, target units per row) of a structure."""
        s, t = self.source, self.target
        return {
            "layer": (s.num_hidden_layers, t.num_hidden_layers),
            "head": (
                (s.num_key_value_heads, t.num_key_value_heads)
                if self.head_mode == "kv_group"
                else (s.group_size, t.group_size)
            ),
            "intermediate": (s.intermediate_size, t.intermediate_size),
            "hidden": (s.hidden_size, t.hidden_size),
        }[structure]

    def target_sparsity(self, structure: str, step: int | None = None) -> float:
        size, kept = self.unit_count(structure)
        final = 1.0 - kept / size
        if step is None or self.warmup <= 0:
            return final
        return final * min(1.0, step / self.warmup)

    # ---- parameters, optimisation ----------------------------------------------------------------
    def mask_parameters(self) -> list[nn.Parameter]:
        return list(self.log_alpha.values())

    def lagrangian_parameters(self) -> list[nn.Parameter]:
        return list(self.lambda1.values()) + list(self.lambda2.values())

    def optimizer_groups(self, mask_lr: float | None = None, lagrangian_lr: float | None = None) -> list[dict]:
        """Param groups for torch Adam/AdamW: masks descend, multipliers ascend (`maximize=True`)."""
        return [
            {
                "params": self.mask_parameters(),
                "lr": self.cfg.mask_lr if mask_lr is None else mask_lr,
                "weight_decay": 0.0,
            },
            {
                "params": self.lagrangian_parameters(),
                "weight_decay": 0.0,
                "maximize": True,
                "lr": self.cfg.lagrangian_lr if lagrangian_lr is None else lagrangian_lr,
            },
        ]

    def log_alpha_range(self) -> tuple[float, float]:
        return log_alpha_range(float(self.gate_temperature) if self.bounded else None)

    @torch.no_grad()
    def clamp_(self) -> None:
        """Keep log_alpha in its range: [ln 0.01, ln 100], or bounded by the gates' temperature."""
        lo, hi = self.log_alpha_range()
        for p in self.log_alpha.values():
            p.clamp_(lo, hi)

    def after_step(self) -> None:
        """Call after every optimiser step: clamp the masks (projected: onto the next step's size); with
        `lagrangian_reset`, zero each lambda1 that pushes the wrong way for the gap of the step's penalty."""
        self.clamp_()
        if self.projected:
            project_(self, self._step + 1)
        if self.cfg.lagrangian_reset:
            with torch.no_grad():  # ascent makes lambda1 share the gap's sign; no host sync on the device
                for s, gap in self._gaps.items():
                    self.lambda1[s].masked_fill_(self.lambda1[s] * gap < 0, 0.0)

    def average_grads(self) -> None:
        """Average the masks' gradients over ranks (they live outside DDP/FSDP); a no-op in one process."""
        if not tdist.is_initialized() or tdist.get_world_size() == 1:
            return
        for q in self.mask_parameters():
            if q.grad is not None:
                tdist.all_reduce(q.grad, op=tdist.ReduceOp.SUM)
                q.grad.div_(tdist.get_world_size())

    def seed(self, seed: int) -> None:
        """Seed the sampling generator (use a different seed per rank)."""
        self._seed = int(seed)
        self._generator = None

    def _gen(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device).manual_seed(self._seed)
        return self._generator

    @property
    def generator(self) -> torch.Generator:
        """The sampling generator on the masks' device (save / restore its state to resume exactly)."""
        return self._gen(next(iter(self.log_alpha.values())).device)

    def rng_state(self) -> torch.Tensor:
        return self.generator.get_state()

    def load_rng_state(self, states: list[torch.Tensor], rank: int, fresh_seed: int) -> None:
        """This rank's saved sampling state; with more ranks than when saved, a fresh seed instead."""
        if rank < len(states):
            self.generator.set_state(states[rank])
        else:
            self.generator.manual_seed(fresh_seed)

    def train(self, mode: bool = True) -> Pruner:
        self.exact = False
        if mode and self.hardening:  # training forwards under the exact target masks, masks frozen
            return self.eval(exact=True)
        return super().train(mode)

    def begin_step(self, step: int) -> None:
        """Before step `step`'s forwards: harden from the last `pruning.hardening_steps`; sharpen
        deterministic gates to the step's temperature."""
        self._step = step
        self.harden(step >= self.mask_steps)
        if self.deterministic:
            self.gate_temperature.fill_(sharpened_temperature(step / self.mask_steps))
        if self.bounded and not self.hardening:  # the range narrows with the temperature
            self.clamp_()
        if self.projected:  # the sharper gates keep the count
            project_(self, step)

    def harden(self, on: bool) -> None:
        """The hardening phase: the weights train under the exact masks; no penalty, the masks stay put. A
        one-shot pruner is always in it."""
        self.hardening = bool(on) or self.one_shot
        if self.hardening:
            self.eval(exact=True)

    def penalty_step(self, step: int) -> dict:
        """After the micro-batches' backward: average the masks' gradients over ranks, add the penalty's
        gradient; returns the step's pruning record (empty while hardening)."""
        if self.hardening:
            return {}
        self.average_grads()
        penalty, record = self.penalty(step)
        if penalty.requires_grad:  # projected: no multipliers, the penalty is 0
            penalty.backward()
        return {"lagrangian": float(penalty.detach()), **record}

    def eval(self, exact: bool = False) -> Pruner:
        super().train(False)
        self.exact = exact
        return self

    @contextlib.contextmanager
    def evaluating(self, exact: bool = False) -> Iterator[None]:
        """Deterministic masks inside the block (expected size, or exact; exact while hardening), sampled ones
        again after it."""
        self.eval(exact=exact or self.hardening)
        try:
            yield
        finally:
            self.train()

    # ---- masks -----------------------------------------------------------------------------------
    def probabilities(self) -> dict[str, torch.Tensor]:
        """P(z > 0) per unit (deterministic gates: the gate's value); 1 for a protected unit; 1 or 0 for the
        fixed masks of a one-shot pruner."""
        if self.one_shot:
            return {s: (m != 0).float() for s, m in self.deterministic_masks(exact=True).items()}
        return {s: torch.where(self.protected(s), 1.0, self.keep(a)) for s, a in self.log_alpha.items()}

    def keep(self, a: torch.Tensor) -> torch.Tensor:
        return deterministic_gate(a, self.gate_temperature) if self.deterministic else prob_nonzero(a)

    def sample(self, batch: int | None = None) -> dict[str, torch.Tensor]:
        """A fresh training sample of every structure's mask (protected units at 1); with `batch`, one
        independent sample per sequence, stacked on a new leading dimension."""
        lead = () if batch is None else (batch,)
        if self.deterministic:  # no noise: the gate itself
            return self.probabilities()
        return {s: torch.where(self.protected(s), 1.0,
                               sample_hard_concrete(a.expand(*lead, *a.shape), self._gen(a.device)))
                for s, a in self.log_alpha.items()}

    def cut_sizes(self, exact: bool = False) -> dict[str, torch.Tensor]:
        """Units cut per row. Exact: size - target. Expected: round(sum(1 - P)) less the floor that a unit at
        the top of the range still counts (1 - P(ln 100) = 0.2%, 3 FFN channels per SmolLM2 row), at most the
        exact cut: the expected architecture never passes the target."""
        exact = exact or self.one_shot
        out, probs = {}, None if exact else self.probabilities()
        for s, a in self.log_alpha.items():
            size, kept = self.unit_count(s)
            if exact:
                out[s] = torch.full(a.shape[:-1], size - kept, dtype=torch.long, device=a.device)
                continue
            expected = (1 - probs[s]).sum(-1) - (0 if self.deterministic else size * SATURATED_FLOOR)
            out[s] = torch.round(expected).long().clamp(0, size - kept)
        return out

    @torch.no_grad()
    def deterministic_masks(self, exact: bool = False) -> dict[str, torch.Tensor]:
        """Soft values (protected units: 1), the k = cut_sizes(exact) smallest of each row zeroed, ties cut
        by the tie key (protected units never)."""
        out = {}
        for s, k in self.cut_sizes(exact).items():
            soft, key = self.soft_and_key(s)
            out[s] = topk_mask(soft, k, key)
            if self.one_shot:  # kept units are kept whole: the exported model is the source, sliced
                out[s] = (out[s] != 0).to(soft.dtype)
        return out

    def soft_and_key(self, s: str) -> tuple[torch.Tensor, torch.Tensor]:
        protected = self.protected(s)
        a = self.log_alpha[s]
        # deterministic gates hit 0 and 1 exactly: the tie key orders equal ones; a kept 0 becomes GATE_FLOOR
        gate = self.keep(a).clamp(min=GATE_FLOOR) if self.deterministic else soft_values(a)
        soft = torch.where(protected, 1.0, gate)
        return soft, torch.where(protected, torch.inf, self.tie_key(s))

    def masks(self, batch: int | None = None) -> dict[str, torch.Tensor]:
        """The masks the next forward (of `batch` sequences) uses: sampled when training (one per sequence
        when `pruning.mask_samples` is sequence), deterministic otherwise."""
        if not self.training:
            return self.deterministic_masks(self.exact)
        return self.sample(batch if self.per_sequence else None)

    # ---- expectations and penalty ----------------------------------------------------------------
    def expected_params(self, probs: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """E[#parameters of attention + MLP weights], factorised (docs/method.md §2.4); differentiable."""
        p = self.probabilities() if probs is None else probs
        return expected_params(self.source, self.head_mode, p, next(iter(self.log_alpha.values())).device)

    def source_params(self) -> float:
        return prunable_params(self.source)

    @torch.no_grad()
    def expected_sparsity(self) -> float:
        """Expected parameter sparsity 1 - E[N] / N_source of the prunable (attention + MLP) weights."""
        return float(1.0 - self.expected_params() / self.source_params())

    def final_sparsity(self) -> float:
        """Parameter sparsity of the target shape, same count as expected_sparsity."""
        return 1.0 - prunable_params(self.target) / self.source_params()

    def structure_sparsity(self, probs: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Expected sparsity of each row of each structure: 1 - sum(P) / size."""
        p = self.probabilities() if probs is None else probs
        return {s: 1.0 - p[s].sum(-1) / p[s].shape[-1] for s in self.structures}

    def penalty(self, step: int) -> tuple[torch.Tensor, dict]:
        """Sum over structures of mean_rows(lambda1 (s - t) + lambda2 (s - t)^2) (0 when projected) and a log
        record."""
        probs = self.probabilities()
        sparsity = self.structure_sparsity(probs)
        total = torch.zeros((), device=next(iter(self.log_alpha.values())).device)
        log: dict[str, Any] = {"expected_sparsity": {}, "target_sparsity": {}, "lambda1": {}, "lambda2": {}}
        for s in self.structures:
            t = self.target_sparsity(s, step)
            gap = (d := sparsity[s] - t) * (d.abs() > self.cfg.gap_tolerance)  # rounding is no gap
            if not self.projected:
                total = total + (self.lambda1[s] * gap + self.lambda2[s] * gap * gap).mean()
            log["expected_sparsity"][s] = float(sparsity[s].detach().mean())
            self._gaps[s] = log["expected_sparsity"][s] - t  # mean over rows of the gap, for after_step
            log["target_sparsity"][s] = t
            log["lambda1"][s] = float(self.lambda1[s].detach())
            log["lambda2"][s] = float(self.lambda2[s].detach())
        log["expected_params"] = float(self.expected_params(probs).detach())
        return total, log
