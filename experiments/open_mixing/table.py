"""Tables and plots of the mixing comparison on seven real domains, from its committed results.

    .venv/bin/python experiments/open_mixing/table.py     # README.md (between markers) and images/

Held-out losses are on the whole held-out split (32 sequences a domain, documents disjoint from training), per
domain with the standard error over its sequences; across seeds mean [min, max]. Differences between arms are
paired by seed: mean, [min, max] and a 95% t-interval over the seeds. Downstream accuracies come from the
project's scorer (runner.py `tasks`), paired by item: the difference's standard error is that of the per-item
differences.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from runner import results_dir  # noqa: E402
from runner import units as study_units  # noqa: E402
from tables import all_results, load_study, md_table, pm, status_lines, summary, write_between_markers  # noqa: E402

ARMS = ("constant", "uniform", "sheared", "drpruning")
METRICS = ("mean", "worst", "spread")


def t_interval(values: list[float]) -> str:
    """mean ± the 95% t half-width over seeds (scipy's t quantile)."""
    from scipy.stats import t

    if len(values) < 2:
        return "-"
    half = t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return f"{statistics.fmean(values):+.3f} ± {half:.3f}"


def end_summary(unit: dict) -> dict[str, float]:
    return summary(unit["train"]["heldout"])


def arm_rows(results: dict) -> list[list[str]]:
    rows = []
    for arm in ARMS:
        units = results.get(arm, {})
        ends = [end_summary(u) for u in units.values()]
        worst = sorted({max(u["train"]["heldout"], key=lambda d: u["train"]["heldout"][d]["loss"])
                        for u in units.values()})
        rows.append([arm, ",".join(map(str, sorted(units))) or "-", *(pm([e[m] for e in ends]) for m in METRICS),
                     ", ".join(worst) or "-"])
    return rows


def domain_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    """Per domain, each arm's held-out loss: mean over seeds (± the mean standard error over sequences)."""
    domains = next((list(u["train"]["heldout"]) for a in ARMS for u in results.get(a, {}).values()), [])
    rows = []
    for d in domains:
        row = [d]
        for arm in ARMS:
            units = list(results.get(arm, {}).values())
            if not units:
                row.append("-")
                continue
            loss = statistics.fmean(u["train"]["heldout"][d]["loss"] for u in units)
            se = statistics.fmean(u["train"]["heldout"][d]["stderr"] for u in units)
            row.append(f"{loss:.3f} ± {se:.3f}")
        rows.append(row)
    return ["domain", *ARMS], rows


def paired_rows(results: dict) -> list[list[str]]:
    """drpruning minus each other arm, paired by seed (negative: drpruning lower)."""
    rows = []
    base = results.get("drpruning", {})
    for other in ARMS[:-1]:
        seeds = sorted(set(base) & set(results.get(other, {})))
        if not seeds:
            continue
        row = [f"drpruning - {other}", ",".join(map(str, seeds))]
        for m in METRICS:
            diffs = [end_summary(base[s])[m] - end_summary(results[other][s])[m] for s in seeds]
            row += [pm(diffs), t_interval(diffs), f"{sum(d < 0 for d in diffs)}/{len(diffs)}"]
        rows.append(row)
    return rows


def repetition(results: dict) -> tuple[float, str]:
    """The largest tokens read from a domain over its training tokens, over every finished run."""
    best, where = 0.0, "-"
    for arm, units in results.items():
        for seed, u in units.items():
            train_tokens = u["train"]["heldout_meta"].get("train_tokens")  # per domain, in whole windows
            read = next((r for r in reversed(u["train"]["records"]) if r["kind"] == "train"), None)
            if not train_tokens or read is None:
                continue
            for d, tokens in read["domain_tokens"].items():
                ratio = tokens / train_tokens[d]
                if ratio > best:
                    best, where = ratio, f"{d}, {arm} seed {seed}"
    return best, where


def task_results(spec: dict, arm: str, seed: int) -> dict | None:
    path = results_dir(spec, arm, seed) / "tasks.json"
    return json.loads(path.read_text()) if path.is_file() else None


def item_difference(found: dict, task: str, other: str) -> str:
    """drpruning minus `other` on one task, paired by item over the items both scored and pooled over seeds:
    mean ± the standard error of the per-item differences."""
    diffs = []
    for s in sorted({s for _, s in found}):
        d, o = found.get(("drpruning", s)), found.get((other, s))
        if d and o and task in d and task in o:
            n = min(len(d[task]["correct"]), len(o[task]["correct"]))
            diffs += [a - b for a, b in zip(d[task]["correct"][:n], o[task]["correct"][:n])]
    if len(diffs) < 2:
        return "-"
    return f"{statistics.fmean(diffs):+.3f} ± {statistics.stdev(diffs) / math.sqrt(len(diffs)):.3f} (n {len(diffs)})"


def task_rows(found: dict) -> list[list[str]]:
    """Accuracy per task and arm (mean over seeds, n items a seed), and drpruning minus each other arm, from
    {(arm, seed): tasks.json or None}."""
    rows = []
    tasks = sorted({t for r in found.values() if r for t, v in r.items() if isinstance(v, dict)})  # not wall_s
    for task in tasks:
        row = [task]
        for arm in ARMS:
            accs = [r[task] for (a, _), r in found.items() if a == arm and r and task in r]
            row.append(f"{statistics.fmean(x['acc'] for x in accs):.3f} (n {accs[0]['n']})" if accs else "-")
        rows.append(row + [item_difference(found, task, other) for other in ARMS[:-1]])
    return rows


def plots(results: dict, out: Path) -> list[Path]:
    """Proportions against tokens (seed 0 of each arm) and worst-domain in-run loss against tokens."""
    from matplotlib.figure import Figure

    arms = [a for a in ARMS if a in results]
    if not arms:
        return []
    out.mkdir(exist_ok=True)
    paths = []
    fig = Figure(figsize=(10, 3))
    for i, arm in enumerate(arms):
        unit = results[arm][min(results[arm])]
        train = [r for r in unit["train"]["records"] if r["kind"] == "train"]
        ax = fig.add_subplot(1, len(arms), i + 1)
        for d in train[0]["proportions"]:
            ax.plot([r["tokens"] for r in train], [r["proportions"][d] for r in train], label=d, linewidth=1)
        ax.set(title=arm, xlabel="tokens", ylim=(0, 0.6))
    fig.axes[0].legend(fontsize=6)
    fig.tight_layout()
    paths.append(out / "proportions.png")
    fig.savefig(paths[-1], dpi=80, metadata={"Software": None})
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot(1, 1, 1)
    for arm in arms:
        unit = results[arm][min(results[arm])]
        ev = [r for r in unit["train"]["records"] if r["kind"] == "eval" and r["step"] > 0]
        ax.plot([r["tokens"] for r in ev], [r["worst_loss"] for r in ev], label=arm, linewidth=1)
    ax.set(xlabel="tokens", ylabel="worst-domain held-out loss (in-run)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths.append(out / "worst-vs-tokens.png")
    fig.savefig(paths[-1], dpi=80, metadata={"Software": None})
    return paths


def main() -> None:
    spec = load_study(HERE)
    results = all_results(spec)
    text = ["### Held-out loss at the end (mean [min, max] over seeds)\n\n"
            + md_table(["arm", "seeds", "mean", "worst", "spread", "worst domain"], arm_rows(results))]
    header, rows = domain_rows(results)
    if rows:
        text.append("### Per domain (mean over seeds ± standard error over sequences)\n\n" + md_table(header, rows))
    rows = paired_rows(results)
    if rows:
        head = ["difference", "seeds"] + [f"{m} {k}" for m in METRICS for k in ("[min, max]", "95% t", "lower")]
        text.append("### Paired by seed\n\n" + md_table(head, rows))
    ratio, where = repetition(results)
    if ratio:
        text.append(f"Largest per-domain repetition: {ratio:.2f} reads of the domain's training tokens ({where}).")
    rows = task_rows({(a, s): task_results(spec, a, s) for a, s in study_units(spec, None, None) if a in ARMS})
    if rows:
        head = ["task", *ARMS, *(f"drpruning - {a}" for a in ARMS[:-1])]
        text.append("### Downstream accuracy\n\n" + md_table(head, rows))
    text += [f"![{p.stem}](images/{p.name})" for p in plots(results, HERE / "images")]
    status = status_lines(spec, results)
    write_between_markers(HERE / "README.md", "\n\n".join(text) + "\n\nRun status:\n\n" + "\n".join(status))
    print((HERE / "README.md").read_text())


if __name__ == "__main__":
    main()
