"""Which pruning method a config's budget supports, from the measured equal-token study of learnt (L0) masks
against one-shot importance pruning + distillation (experiments/l0_budget).

The study's table command writes `l0_evidence.json` beside this file from its committed results: per total
budget, the tokens per source parameter and, for the same seeds, the end-of-pipeline worst-domain held-out loss
of one-shot + KD and of the best L0 arm, and that arm's recipe. A budget is read in tokens per source parameter,
the unit that carries from SmolLM2-135M to a 7B source.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

import yaml

EVIDENCE = Path(__file__).with_name("l0_evidence.json")


def load_evidence(path: Path = EVIDENCE) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {"points": []}


def noise(point: dict[str, Any]) -> float:
    """The larger seed range (max - min) of the two arms' worst-domain losses."""
    return max(max(v) - min(v) for v in (point["oneshot_worst"], point["l0_worst"]))


def at_par(point: dict[str, Any]) -> bool:
    """The best L0 arm is better than, or within seed noise of, one-shot + KD on worst-domain loss."""
    return statistics.fmean(point["gap_worst"]) <= noise(point)


def lower(point: dict[str, Any]) -> bool:
    """The best L0 arm is lower than one-shot + KD by more than the seed noise."""
    return statistics.fmean(point["gap_worst"]) < -noise(point)


def l0_wins(point: dict[str, Any]) -> bool:
    """Lower beyond the seed noise, and settled: by more than twice the noise, or on 3 or more seeds (the study
    runs a third seed where two arms are within twice the seed range). Only then does L0 pay for its mask phase
    (the whole source trained under masks, and more FLOPs a token)."""
    gap = statistics.fmean(point["gap_worst"])
    return lower(point) and (len(point["gap_worst"]) >= 3 or gap < -2 * noise(point))


def _gap(point: dict[str, Any]) -> str:
    g = point["gap_worst"]
    return (f"{statistics.fmean(g):+.3f} nats [{min(g):+.3f}, {max(g):+.3f}] over {len(g)} seeds (seed range "
            f"{noise(point):.3f}), {point['l0_arm']} against one-shot + KD at {point['tokens_per_param']:.4f} "
            f"tokens/parameter ({point['total_steps']} steps x {point['tokens_per_step']:,} tokens)")


def _recipe(point: dict[str, Any]) -> str:
    r = point.get("l0_recipe")
    if not r:
        return ""
    return (f"; its recipe: learn the masks over the first {r['share']:.0%} of the steps "
            f"(pruning.mask_phase_steps) with {', '.join(r['overrides'])}, then train the exported compact model "
            "for the rest")


def _crossing(points: list[dict[str, Any]], tpp: float) -> dict[str, Any] | None:
    """The smallest measured budget where L0 wins, if this budget is at or beyond it."""
    crossing = next((p for p in points if l0_wins(p)), None)
    return crossing if crossing is not None and tpp >= crossing["tokens_per_param"] else None


def recommend(tokens: int, source_params: int, evidence: dict[str, Any] | None = None) -> tuple[str, str]:
    """(pruning.method, why) for a pruning pipeline of `tokens` on a source of `source_params`."""
    ev = load_evidence() if evidence is None else evidence
    points = sorted(ev["points"], key=lambda p: p["tokens_per_param"])
    tpp = tokens / source_params
    here = f"this config: {tpp:.4f} tokens/parameter"
    if not points:
        return "importance", (f"{here}; no equal-token measurement of learnt masks has finished yet "
                              "(experiments/l0_budget), and one-shot + distillation is the recipe the demo measured")
    crossing = _crossing(points, tpp)
    if crossing is not None:
        return "l0", (f"{here}; learnt masks beat one-shot + KD on worst-domain loss from there: {_gap(crossing)}"
                      + _recipe(crossing))
    below = [p for p in points if p["tokens_per_param"] <= tpp]
    nearest = below[-1] if below else points[0]
    verdict = ("ended lower than, but within twice the seed range of," if lower(nearest)  # a third seed decides
               else "matched" if at_par(nearest) else "ended behind")
    why = (f"{here}; at the nearest measured budget learnt masks {verdict} one-shot + KD, which costs less: "
           f"{_gap(nearest)} (worst-domain loss)")
    if tpp > points[-1]["tokens_per_param"]:
        why += (f"; the budget is {tpp / points[-1]['tokens_per_param']:.0f}x the largest measured one, where the"
                " comparison has not been run")
    return "importance", why


def _tokens(cfg: Any) -> int:
    """A pruning config's whole token budget (both stages of a two-stage one)."""
    return cfg.train.steps * cfg.train.batch_size * cfg.data.seq_len


def recommend_config(cfg: Any, source_params: int) -> tuple[str, str]:
    """`recommend` for a pruning config's whole token budget."""
    return recommend(_tokens(cfg), source_params)


def recommended_recipe(cfg: Any, source_params: int, evidence: dict[str, Any] | None = None) -> dict | None:
    """The measured L0 recipe for a pruning config's budget, when L0 is what the evidence recommends there."""
    ev = load_evidence() if evidence is None else evidence
    point = _crossing(sorted(ev["points"], key=lambda p: p["tokens_per_param"]), _tokens(cfg) / source_params)
    return point.get("l0_recipe") if point else None


def recipe_mismatches(cfg: Any, recipe: dict[str, Any]) -> list[str]:
    """The settings where a config departs from a measured L0 recipe, as `key=value` it should have: the mask
    phase's share of train.steps, then each override (a step count as a share of the mask phase, to a step or
    half a percent of it)."""
    from omegaconf import OmegaConf

    tree, steps = OmegaConf.structured(cfg), cfg.train.steps
    phase, want = cfg.pruning.mask_phase_steps or steps, round(recipe["share"] * steps)
    out = [] if abs(phase - want) <= max(1, 0.005 * steps) else [f"pruning.mask_phase_steps={want}"]
    for item in recipe["overrides"]:
        key, value = item.split("=", 1)
        have = OmegaConf.select(tree, key)
        if value.endswith(" of the mask phase"):
            n = float(value.split("%")[0]) / 100 * phase
            if abs(have - n) > max(1, 0.005 * phase):
                out.append(f"{key}={round(n)}")
        elif have != yaml.safe_load(value):
            out.append(item)
    return out


def recommendation_line(cfg: Any, source_params: int) -> str:
    """`recommended: pruning.method=...` for the plan of a pruning config."""
    method, why = recommend_config(cfg, source_params)
    name = {"importance": "importance (one-shot + distillation)", "l0": "l0 (learnt masks)"}[method]
    change = "" if cfg.pruning.method == method else f" (this config has pruning.method={cfg.pruning.method})"
    recipe = recommended_recipe(cfg, source_params) if method == "l0" == cfg.pruning.method else None
    if recipe and (off := recipe_mismatches(cfg, recipe)):
        change = f" (this config departs from the measured recipe: set {', '.join(off)})"
    return f"recommended: pruning.method={name}{change}: {why}"
