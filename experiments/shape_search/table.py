"""Tables of the shape study (searched against proportional shapes), from its committed results.

    .venv/bin/python experiments/shape_search/table.py     # README.md (between markers)

Per arm, mean [min, max] over seeds, on the held-out split of the demo's data (8 sequences a domain): the
shape the prune stage exported and its parameters; mean and worst-domain held-out loss after the prune stage
and at the end (after the continued pretraining); training seconds of both stages.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from tables import all_results, load_study, md_table, pm, status_lines, summary, write_between_markers  # noqa: E402

HEADER = ["arm", "seeds", "shape (layers, hidden, heads / KV, FFN)", "parameters", "after prune: mean",
          "after prune: worst", "end: mean", "end: worst", "training s"]


def shape_of(unit: dict) -> str:
    final = [r for r in unit["prune"]["records"] if r["kind"] == "final"]
    if not final:
        return "-"
    s = final[-1]["shape"]
    return (f"{s['num_hidden_layers']}, {s['hidden_size']}, {s['num_attention_heads']} / "
            f"{s['num_key_value_heads']}, {s['intermediate_size']}")


def train_seconds(unit: dict) -> float:
    return sum(max(r["elapsed_s"] for r in s["records"] if r["kind"] == "train") for s in unit.values())


def row(arm: str, units: dict[int, dict]) -> list[str]:
    values = list(units.values())
    pruned = [summary(u["prune"]["heldout"]) for u in values]
    end = [summary(u["cpt"]["heldout"]) for u in values]
    shapes = sorted({shape_of(u) for u in values})
    params = pm([u["prune"]["heldout_meta"]["params"] / 1e6 for u in values], 2) + "M"
    return [arm, str(len(values)), "; ".join(shapes), params, pm([p["mean"] for p in pruned]),
            pm([p["worst"] for p in pruned]), pm([e["mean"] for e in end]), pm([e["worst"] for e in end]),
            pm([train_seconds(u) for u in values], 0)]


def main() -> None:
    spec = load_study(HERE)
    results = all_results(spec)
    rows = [row(arm, results[arm]) for arm in spec["arms"] if arm in results]
    text = md_table(HEADER, rows) if rows else "No results yet: run the study (see above)."
    status = status_lines(spec, results)
    write_between_markers(HERE / "README.md", text + "\n\nRun status:\n\n" + "\n".join(status))
    print((HERE / "README.md").read_text())


if __name__ == "__main__":
    main()
