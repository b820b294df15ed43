"""Choosing the shape under a parameter budget (`pruning.shape: search`, `drpruning shapes`).

`pruning.target_params` names a size; many shapes have it. The search enumerates valid shapes within
BAND (±2%) of the budget on a coarse grid: every combination of the depths in LAYER_FRACTIONS, every KV
group count (or query heads per group, in head_mode query) and the hidden sizes in HIDDEN_FRACTIONS of the
source, each with the FFN width that brings the total to the budget (a multiple of 8 when the source FFN is
at least 256 wide). Only enabled structures vary; dimensions given in `pruning.target` stay fixed. The
proportional shape (`resolve_target`) is always a candidate, so the search can only match or beat it on its
own score.

Each candidate is scored by the held-out loss of the one-shot importance cut to it: one calibration pass on
the source scores every unit (the scores do not depend on the target), then for each shape the source is
sliced at the top-scored units and the compact model's mean per-domain loss is taken on the first
SCORE_SEQUENCES held-out sequences of each domain. Optionally the best few are trained K steps with
distillation from the source and re-scored (`refine`). The literature's priors (keep the hidden size and
its massive channels, prune KV groups last, depth against width) are not built in: the grid holds shapes
with the full hidden size, the full KV groups and the full depth, and the table shows how they rank.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from drpruning.config import ConfigError, PruningConfig
from drpruning.models.families import family_of
from drpruning.models.shape import (
    SHAPE_KEYS,
    Shape,
    parse_count,
    resolve_target,
    shape_parameter_count,
    source_shape,
    validate_shape,
)

BAND = 0.02  # candidates are within ±2% of pruning.target_params
LAYER_FRACTIONS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5)
HIDDEN_FRACTIONS = (1.0, 0.875, 0.75, 0.625)
HEAD_CHOICES = 4  # at most this many KV group counts (or heads per group): the full count and even steps down
SCORE_SEQUENCES = 2  # held-out sequences per domain that score a candidate
TABLE = "shapes"  # RUN_DIR/shapes.md and RUN_DIR/shapes.json


@dataclass(frozen=True)
class Candidate:
    shape: Shape
    params: int
    proportional: bool = False

    def describe(self) -> str:
        s = self.shape
        return (f"L{s.num_hidden_layers} d{s.hidden_size} heads {s.num_attention_heads}/{s.num_key_value_heads} "
                f"ffn {s.intermediate_size}")


@dataclass
class Scored:
    candidate: Candidate
    loss: float | None  # mean over domains of the held-out loss right after the cut; None: not scorable
    worst: float | None
    seconds: float
    refined: float | None = None  # mean held-out loss after the refinement steps
    note: str = ""


def applies(cfg: PruningConfig) -> bool:
    """Whether a run searches its shape: `shape: search` with a parameter budget."""
    return cfg.shape == "search" and cfg.target_params is not None


def _choices(size: int, fractions: tuple[float, ...], align: int) -> list[int]:
    out = set()
    for f in fractions:
        n = size if f == 1.0 else max(align, int(round(size * f / align)) * align)
        out.add(min(n, size))
    return sorted(out, reverse=True)


def _head_choices(size: int) -> list[int]:
    if size <= HEAD_CHOICES:
        return list(range(size, 0, -1))
    return sorted({max(1, round(size * (HEAD_CHOICES - i) / HEAD_CHOICES)) for i in range(HEAD_CHOICES)},
                  reverse=True)


def _solve_ffn(config: Any, shape: Shape, budget: int, src_ffn: int) -> Shape | None:
    """`shape` with the FFN width whose total is nearest the budget (total is linear in the width)."""
    n0 = shape_parameter_count(config, dataclasses.replace(shape, intermediate_size=0))["total"]
    slope = shape_parameter_count(config, dataclasses.replace(shape, intermediate_size=1))["total"] - n0
    align = 8 if src_ffn >= 256 else 1
    f = int(round((budget - n0) / slope / align)) * align
    if f < align or f > src_ffn:
        return None
    return dataclasses.replace(shape, intermediate_size=f)


def enumerate_shapes(config: Any, cfg: PruningConfig) -> list[Candidate]:
    """Valid shapes within BAND of `cfg.target_params`, the proportional one first (module docstring)."""
    if cfg.target_params is None:
        raise ConfigError("the shape search needs a parameter budget: set pruning.target_params (e.g. 60M)")
    budget = parse_count(cfg.target_params)
    src = source_shape(config)
    proportional = resolve_target(config, cfg)  # also every check of the budget, the target and structures
    fixed = dict(cfg.target or {})
    if cfg.head_mode == "kv_group" and "num_key_value_heads" not in fixed and "num_attention_heads" in fixed:
        fixed["num_key_value_heads"] = fixed["num_attention_heads"] // src.group_size
    on = set(cfg.structures)

    def free(key: str, structure: str) -> bool:
        return structure in on and key not in fixed and not (key == "num_key_value_heads"
                                                            and "num_attention_heads" in fixed)

    layers = _choices(src.num_hidden_layers, LAYER_FRACTIONS, 1) if free("num_hidden_layers", "layer") \
        else [fixed.get("num_hidden_layers", src.num_hidden_layers)]
    if not free("num_key_value_heads", "head"):
        heads = [(proportional.num_attention_heads, proportional.num_key_value_heads)]
    elif cfg.head_mode == "kv_group":
        heads = [(kv * src.group_size, kv) for kv in _head_choices(src.num_key_value_heads)]
    else:
        heads = [(g * src.num_key_value_heads, src.num_key_value_heads) for g in _head_choices(src.group_size)]
    ffn_free = free("intermediate_size", "intermediate")
    found = {proportional: Candidate(proportional, shape_parameter_count(config, proportional)["total"], True)}
    for n_layers in layers:
        for n_heads, n_kv in heads:
            align = 8 if src.hidden_size >= 256 else 1
            if family_of(config).hidden_multiple_of_heads:
                align = math.lcm(align, n_heads)
            hiddens = _choices(src.hidden_size, HIDDEN_FRACTIONS, align) if free("hidden_size", "hidden") \
                else [fixed.get("hidden_size", src.hidden_size)]
            for d in hiddens:
                shape = Shape(n_layers, d, n_heads, n_kv, fixed.get("intermediate_size", src.intermediate_size),
                              src.head_dim)
                if ffn_free:
                    shape = _solve_ffn(config, shape, budget, src.intermediate_size)
                if shape is None or shape in found:
                    continue
                n = shape_parameter_count(config, shape)["total"]
                if abs(n - budget) > BAND * budget:
                    continue
                try:
                    validate_shape(config, cfg, src, shape)
                except ConfigError:
                    continue
                found[shape] = Candidate(shape, n)
    return list(found.values())


def shape_config(cfg: PruningConfig, shape: Shape) -> PruningConfig:
    """`cfg` with `shape` as its explicit target (what the one-shot cut and a run then use)."""
    return dataclasses.replace(cfg, target={k: getattr(shape, k) for k in SHAPE_KEYS}, target_params=None)


def _cut_config(cfg: PruningConfig, shape: Shape) -> PruningConfig:
    return dataclasses.replace(shape_config(cfg, shape), enabled=True, method="importance", init="importance")


@torch.no_grad()
def _held_out_loss(model: nn.Module, held_out: list[torch.Tensor], batch_size: int,
                   dtype: torch.dtype | None) -> tuple[float, float]:
    from drpruning.evaluation.perplexity import domain_nll, loss_and_error

    losses, _ = loss_and_error(domain_nll(model, held_out, batch_size, dtype))
    return sum(losses) / len(losses), max(losses)


def refine(compact: nn.Module, source: nn.Module, train: list[torch.Tensor], steps: int, lr: float,
           batch_size: int, distill_weight: float, temperature: float) -> None:
    """`steps` AdamW steps on `compact`: cross-entropy and KL to `source`, mixed by `distill_weight`, on
    training windows taken from every domain in turn (past the calibration pass's first ones)."""
    from drpruning.loss import token_losses

    compact.train()
    opt = torch.optim.AdamW(compact.parameters(), lr=lr, weight_decay=0.0)
    order = [(d, i) for i in range(1, max(len(t) for t in train)) for d in range(len(train)) if i < len(train[d])]
    for step in range(steps):
        picked = [order[(step * batch_size + j) % len(order)] for j in range(batch_size)]
        ids = torch.stack([train[d][i] for d, i in picked]).to(next(compact.parameters()).device)
        nll, kl = token_losses(compact, ids, source if distill_weight > 0 else None, temperature)
        loss = nll.mean() if kl is None else (1 - distill_weight) * nll.mean() + distill_weight * kl.mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(compact.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    compact.eval()


def score_shapes(model: nn.Module, cfg: PruningConfig, candidates: list[Candidate], train: list[torch.Tensor],
                 held_out: list[torch.Tensor], batch_size: int = 4, dtype: torch.dtype | None = None,
                 refine_steps: int = 0, refine_top: int = 3, refine_options: dict | None = None,
                 progress: Callable[[str], None] | None = None) -> list[Scored]:
    """Candidates ranked by their score, best first (module docstring). `model` is the unmodified source;
    `train` / `held_out` are per-domain sequences."""
    from drpruning.loss import autocast
    from drpruning.pruning.export import build_pruned_model
    from drpruning.pruning.importance import calibration_batches, importance_scores
    from drpruning.pruning.pruner import Pruner

    device = next(model.parameters()).device
    batches = calibration_batches(train, cfg.calibration_sequences, batch_size)
    with autocast(device, dtype):  # shared: no target enters the scores
        scores, massive = importance_scores(model, batches, cfg.head_mode)
    held_out = [h[:SCORE_SEQUENCES] for h in held_out]
    compacts: dict[Shape, nn.Module] = {}
    out = []
    for i, c in enumerate(candidates):
        start = time.perf_counter()
        pruner = Pruner(model.config, _cut_config(cfg, c.shape), 1, device)
        pruner.set_importance(scores, massive)
        short = [s for s in pruner.structures if int(pruner.protected(s).sum(-1).max()) > pruner.unit_count(s)[1]]
        if short:
            out.append(Scored(c, None, None, time.perf_counter() - start, note=f"keeps fewer {short[0]} units "
                                                                               "than are protected"))
            continue
        compact = build_pruned_model(model, pruner)
        compact.config.use_cache = False
        loss, worst = _held_out_loss(compact, held_out, batch_size, dtype)
        if refine_steps:
            compacts[c.shape] = compact
        out.append(Scored(c, loss, worst, time.perf_counter() - start))
        if progress:
            progress(f"shape {i + 1}/{len(candidates)} {c.describe()}: held-out loss {loss:.3f}")
    ranked = sorted(out, key=lambda s: math.inf if s.loss is None else s.loss)
    if refine_steps:
        opts = {"lr": 1e-4, "distill_weight": 0.5, "temperature": 1.0, **(refine_options or {})}
        for s in ranked[:refine_top]:
            if s.loss is None:
                continue
            start = time.perf_counter()
            compact = compacts[s.candidate.shape]
            with autocast(device, dtype):
                refine(compact, model, train, refine_steps, batch_size=batch_size, **opts)
            s.refined = _held_out_loss(compact, held_out, batch_size, dtype)[0]
            s.seconds += time.perf_counter() - start
        ranked = sorted(ranked, key=lambda s: (s.refined is None, s.refined if s.refined is not None else
                                               math.inf if s.loss is None else s.loss))
    return ranked


def count_text(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n:,}"


def table_rows(ranked: list[Scored]) -> tuple[list[str], list[list[str]]]:
    refined = any(s.refined is not None for s in ranked)
    header = ["rank", "shape", "parameters", "score (loss after cut)", "worst domain", *(
        ["after refinement"] if refined else []), "seconds", "note"]
    rows = []
    for rank, s in enumerate(ranked, 1):
        c = s.candidate
        src_note = ", ".join(x for x in ("proportional" if c.proportional else "", s.note) if x)
        rows.append([str(rank), c.describe(), count_text(c.params),
                     "-" if s.loss is None else f"{s.loss:.4f}", "-" if s.worst is None else f"{s.worst:.4f}",
                     *([("-" if s.refined is None else f"{s.refined:.4f}")] if refined else []),
                     f"{s.seconds:.1f}", src_note])
    return header, rows


def format_table(ranked: list[Scored], top: int | None = None) -> str:
    header, rows = table_rows(ranked)
    rows = rows[:top] if top else rows
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in [header, *rows])


def markdown_table(ranked: list[Scored]) -> str:
    header, rows = table_rows(ranked)
    return "\n".join("| " + " | ".join(r) + " |" for r in [header, ["---"] * len(header), *rows])


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(text)
    os.replace(tmp, path)


def source_loss(model: nn.Module, held_out: list[torch.Tensor], batch_size: int, dtype: torch.dtype | None) -> float:
    """The source's own score: its mean held-out loss on the sequences that score the candidates."""
    return _held_out_loss(model, [h[:SCORE_SEQUENCES] for h in held_out], batch_size, dtype)[0]


def write_table(run_dir: str | Path, ranked: list[Scored], budget: int, source: str, seconds: float,
                source_score: float | None = None) -> Path:
    """RUN_DIR/shapes.json (every candidate and the winner) and RUN_DIR/shapes.md, each written atomically."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    rows = [{"shape": s.candidate.shape.as_dict(), "params": s.candidate.params,
             "proportional": s.candidate.proportional, "loss": s.loss, "worst": s.worst, "refined": s.refined,
             "seconds": s.seconds, "note": s.note} for s in ranked]
    record = {"source": source, "target_params": budget, "band": BAND, "score_sequences": SCORE_SEQUENCES,
              "source_loss": source_score, "seconds": seconds, "winner": rows[0]["shape"], "candidates": rows}
    _atomic_write(run_dir / f"{TABLE}.json", json.dumps(record, indent=1) + "\n")
    text = (f"# Shapes of {source} at {count_text(budget)} parameters (±{BAND:.0%})\n\n"
            f"Score: mean over domains of the held-out loss right after the one-shot importance cut, "
            f"{SCORE_SEQUENCES} sequences a domain"
            + (f" (the source model: {source_score:.4f})" if source_score is not None else "")
            + f"; {len(ranked)} candidates in {seconds:.0f} s.\n\n"
            + markdown_table(ranked) + "\n")
    _atomic_write(run_dir / f"{TABLE}.md", text)
    return run_dir / f"{TABLE}.md"


def read_winner(run_dir: str | Path) -> Shape | None:
    path = Path(run_dir) / f"{TABLE}.json"
    if not path.is_file():
        return None
    return Shape(**json.loads(path.read_text())["winner"])


def run_shapes(cfg: Any, refine_steps: int = 0, refine_top: int = 3) -> tuple[list[Scored], Path]:
    """`drpruning shapes`: enumerate (cheap checks first), load the source and the data, score, write the
    table into RUN_DIR. `cfg` is a RunConfig."""
    import logging

    from drpruning.data import check_sources, load_corpus
    from drpruning.loss import autocast_dtype
    from drpruning.models.loading import load_model, load_model_config

    log = logging.getLogger(__name__)
    model_config, _, _ = load_model_config(cfg.model.source)
    candidates = enumerate_shapes(model_config, cfg.pruning)
    sources = check_sources(cfg.data.domains)
    start = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model(cfg.model.source, dtype=cfg.model.dtype)
    model.to(device).eval()
    model.config.use_cache = False
    corpus = load_corpus(cfg.data, tokenizer, sources)
    dtype = autocast_dtype(cfg.train.dtype, device)
    log.info("%d candidate shapes within %.0f%% of %s parameters", len(candidates), 100 * BAND,
             cfg.pruning.target_params)
    options = {"lr": cfg.train.lr, "distill_weight": cfg.train.distill.weight,
               "temperature": cfg.train.distill.temperature}
    # no autocast around the loop: its weight cache would keep every candidate's model alive until the end
    ranked = score_shapes(model, cfg.pruning, candidates, corpus.train, corpus.eval, cfg.train.micro_batch_size,
                          dtype, refine_steps, refine_top, options, log.info)
    score = source_loss(model, corpus.eval, cfg.train.micro_batch_size, dtype)
    path = write_table(cfg.run_dir, ranked, parse_count(cfg.pruning.target_params), cfg.model.source,
                       time.perf_counter() - start, score)
    return ranked, path


def searched(cfg: Any, model: nn.Module, corpus: Any, dtype: torch.dtype | None, main: bool = True) -> PruningConfig:
    """The run's pruning config, with the searched shape as its explicit target when the run searches (so the
    Pruner, the saved config.yaml and `drpruning export` all see it). A resumed run takes the winner its
    RUN_DIR/shapes.json recorded; otherwise the main rank searches and writes the table, and every rank takes
    its winner. `cfg` is the RunConfig."""
    from drpruning.training import distributed as dist
    from drpruning.training.checkpoint import Checkpointer

    if not (cfg.pruning.enabled and applies(cfg.pruning)):
        return cfg.pruning
    run_dir = Path(cfg.run_dir)
    shape = read_winner(run_dir) if cfg.resume and Checkpointer(run_dir).steps() else None
    if shape is None:
        dims = [0.0] * len(dataclasses.fields(Shape))
        if main:
            start = time.perf_counter()
            candidates = enumerate_shapes(model.config, cfg.pruning)
            ranked = score_shapes(model, cfg.pruning, candidates, corpus.train, corpus.eval,
                                  cfg.train.micro_batch_size, dtype)
            score = source_loss(model, corpus.eval, cfg.train.micro_batch_size, dtype)
            write_table(run_dir, ranked, parse_count(cfg.pruning.target_params), cfg.model.source,
                        time.perf_counter() - start, score)
            dims = [float(v) for v in ranked[0].candidate.shape.as_dict().values()]
        shape = Shape(*(int(v) for v in dist.broadcast_floats(dims)))
    return shape_config(cfg.pruning, shape)


def read_table(run_dir: str | Path) -> tuple[list[str], list[list[str]]] | None:
    """(header, rows) of RUN_DIR/shapes.json as `drpruning shapes` prints them, or None without one."""
    path = Path(run_dir) / f"{TABLE}.json"
    if not path.is_file():
        return None
    rows = json.loads(path.read_text())["candidates"]
    return table_rows([Scored(Candidate(Shape(**r["shape"]), r["params"], r["proportional"]), r["loss"], r["worst"],
                              r["seconds"], r["refined"], r["note"]) for r in rows])
