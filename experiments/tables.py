"""Helpers for a study's table command: its committed results, mean [min, max] over seeds, markdown tables, and
the generated part of the study's README (between markers), so that tables regenerate byte for byte."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from runner import arm_seeds, load_study, read_metrics, results_dir, units

BEGIN, END = "<!-- table.py: begin -->", "<!-- table.py: end -->"


def unit_results(spec: dict, arm: str, seed: int) -> dict | None:
    """{stage: {"records": metrics records, "heldout": {domain: {"loss", "stderr", ...}}, "heldout_meta": ...}} of a
    finished unit."""
    folder = results_dir(spec, arm, seed)
    if not folder.is_dir():
        return None
    out = {}
    for stage in (s["stage"] for s in spec["arms"][arm]):
        held = json.loads((folder / f"{stage}.heldout.json").read_text())
        out[stage] = {"records": read_metrics(folder / f"{stage}.metrics.jsonl.gz"), "heldout": held.pop("domains"),
                      "heldout_meta": held}  # parameter counts, the model's path, evaluation seconds
    return out


def all_results(spec: dict) -> dict[str, dict[int, dict]]:
    found: dict[str, dict[int, dict]] = {}
    for arm in spec["arms"]:
        for seed in arm_seeds(spec, arm):
            r = unit_results(spec, arm, seed)
            if r is not None:
                found.setdefault(arm, {})[seed] = r
    return found


def summary(heldout: dict[str, dict]) -> dict[str, float]:
    """Mean, worst and spread (worst - best) of the per-domain held-out losses."""
    losses = [d["loss"] for d in heldout.values()]
    return {"mean": statistics.fmean(losses), "worst": max(losses), "spread": max(losses) - min(losses)}


def pm(values: list[float | None], digits: int = 3) -> str:
    """mean [min, max] over seeds."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "-"
    m = statistics.fmean(values)
    if len(values) == 1:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} [{min(values):.{digits}f}, {max(values):.{digits}f}]"


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def write_between_markers(doc: Path, text: str) -> None:
    """Replace the generated part of `doc` (between BEGIN and END) with `text`."""
    body = doc.read_text()
    if BEGIN not in body or END not in body:
        raise SystemExit(f"{doc} has no {BEGIN} ... {END} markers for the generated tables")
    head, rest = body.split(BEGIN, 1)
    doc.write_text(head + BEGIN + "\n\n" + text.rstrip() + "\n\n" + END + rest.split(END, 1)[1])


def status_lines(spec: dict, results: dict) -> list[str]:
    """"- ARM seed K: finished | not finished", seed by seed, for the README."""
    return [f"- {arm} seed {seed}: {'finished' if seed in results.get(arm, {}) else 'not finished'}"
            for arm, seed in units(spec, None, None)]


__all__ = ["all_results", "load_study", "md_table", "pm", "status_lines", "summary", "write_between_markers"]
