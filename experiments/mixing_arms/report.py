"""The mixing comparison's tables and plots, read from its committed results/ (compare.py runs the comparison).

    .venv/bin/python experiments/mixing_arms/compare.py write  # or: .venv/bin/python experiments/mixing_arms/report.py

writes the tables between the markers of experiments/mixing_arms/README.md and the plots into images/.
"""

from __future__ import annotations

import gzip
import json
import math
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the shared table helpers
sys.path.insert(0, str(HERE))
from compare import (  # noqa: E402
    ARMS,
    LM_EVAL_ARMS,
    OUT,
    RESULTS,
    SEEDS,
    SETTINGS,
    TASKS,
    UD_PUD,
    UD_SEQ_LEN,
    UD_SEQUENCES,
    mkdir,
)
from tables import md_table, pm  # noqa: E402


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl, or of the metrics.jsonl.gz that `keep` made of it."""
    packed = path.with_name(path.name + ".gz")
    if path.is_file():
        text = path.read_text()
    elif packed.is_file():
        text = gzip.decompress(packed.read_bytes()).decode()
    else:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def evals(records: list[dict]) -> list[dict]:
    return [r for r in records if r.get("kind") == "eval"]


def collect(setting: str, arm: str, seed: int) -> dict | None:
    """The numbers of one finished (prune, cpt, eval) triple, or None when any part is missing."""
    base = RESULTS / setting / arm / f"seed{seed}"
    prune, cpt = read_metrics(base / "prune" / "metrics.jsonl"), read_metrics(base / "cpt" / "metrics.jsonl")
    if not (base / "eval.json").is_file() or not any(r.get("kind") == "final" for r in cpt):
        return None
    ev = json.loads((base / "eval.json").read_text())
    # the whole held-out split where it was evaluated (heldout.json), else the runs' own evaluations
    held = {k: read_heldout(path) for k, path in (("source", RESULTS / setting / "source" / "heldout.json"),
                                                  ("pruned", base / "prune" / "heldout.json"),
                                                  ("cpt", base / "cpt" / "heldout.json"))}
    in_run = {"source": evals(prune)[0], "pruned": evals(cpt)[0], "cpt": evals(cpt)[-1]}
    losses = {k: held[k][0] if held[k] else in_run[k]["eval_loss"] for k in in_run}
    return {**losses, "se": {k: held[k][1] if held[k] else in_run[k].get("eval_se", {}) for k in in_run},
            "sequences": {k: held[k][2] if held[k] else None for k in in_run},
            "eval": ev, "prune_records": prune, "cpt_records": cpt,
            # training loop time (resumes joined) and evaluation time
            "wall_s": [max(training_clock(rs).values(), default=math.nan) for rs in (prune, cpt)]
            + [ev.get("wall_s", math.nan)]}


def read_heldout(path: Path) -> tuple[dict, dict, dict] | None:
    """Per-domain loss, standard error and sequence count from a heldout.json, or None."""
    if not path.is_file():
        return None
    d = json.loads(path.read_text())["domains"]
    return ({n: v["loss"] for n, v in d.items()}, {n: v["stderr"] for n, v in d.items()},
            {n: v["sequences"] for n, v in d.items()})


def summary(losses: dict[str, float]) -> dict[str, float]:
    v = list(losses.values())
    worst = max(losses, key=losses.get)
    return {"mean": statistics.fmean(v), "worst": losses[worst], "worst_domain": worst,
            "spread": statistics.pstdev(v), "range": max(v) - min(v)}


def task_average(ev: dict, metric: str, tasks: list[str] = TASKS) -> float:
    """An eval.json's downstream `metric` averaged over `tasks`."""
    return statistics.fmean(ev["tasks"][t][metric] for t in tasks)


def ud_mean(ev: dict) -> float:
    """An eval.json's UD-PUD bits per character averaged over the languages."""
    return statistics.fmean(ev["perplexity"]["domains"][x]["bpc"] for x in UD_PUD)


def ud_worst(ev: dict) -> float:
    """An eval.json's highest UD-PUD bits per character over the languages."""
    return max(ev["perplexity"]["domains"][x]["bpc"] for x in UD_PUD)


# ------------------------------------------------------------------------------------------------ writing
def plots(setting: str, results: dict[str, dict[int, dict]], out_dir: Path) -> list[Path]:
    """Proportions over time and per-domain eval loss curves (prune then CPT steps), seed 0 (or first)."""
    from matplotlib.figure import Figure

    arms = [a for a in ARMS if results.get(a)]
    if not arms:
        return []
    paths = []
    for kind in ("proportions", "losses"):
        fig = Figure(figsize=(12, 3.2))
        for i, arm in enumerate(arms):
            seed = min(results[arm])
            r = results[arm][seed]
            ax = fig.add_subplot(1, len(arms), i + 1)
            n_prune = max(x["step"] for x in r["prune_records"] if "step" in x)
            if kind == "proportions":
                recs = [(x["step"], x["proportions"]) for x in r["prune_records"]
                        if x.get("kind") == "train" and x.get("proportions")]
                recs += [(n_prune + x["step"], x["proportions"]) for x in r["cpt_records"]
                         if x.get("kind") == "train" and x.get("proportions")]
                names = list(recs[0][1])
                ax.stackplot([s for s, _ in recs], [[p[n] for _, p in recs] for n in names], labels=names,
                             step="post")
                ax.set(ylim=(0, 1), ylabel="proportion" if i == 0 else None)
            else:
                recs = [(x["step"], x["eval_loss"]) for x in evals(r["prune_records"])]
                recs += [(n_prune + x["step"], x["eval_loss"]) for x in evals(r["cpt_records"])]
                names = list(recs[0][1])
                for n in names:
                    ax.plot([s for s, _ in recs], [e[n] for _, e in recs], label=n, linewidth=1)
                ax.set(ylabel="held-out loss (nats/token)" if i == 0 else None, yscale="log")
            ax.axvline(n_prune, color="k", linewidth=0.6, linestyle="--")
            ax.set_title(f"{arm} (seed {seed})", fontsize=9)
            ax.set_xlabel("step (prune | CPT)", fontsize=8)
            ax.tick_params(labelsize=7)
            if i == len(arms) - 1:
                ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        fig.tight_layout()
        path = out_dir / f"{setting}-{kind}.png"
        fig.savefig(path, dpi=70)
        paths.append(path)
    return paths


def training_clock(records: list[dict]) -> dict[int, float]:
    """Step -> seconds of training since the stage started, resumed processes joined. Runs before the trainer
    kept its clock in checkpoints restart `elapsed_s` at zero on resume (records after the checkpoint are
    dropped, so a drop marks a new process): its time is added to the earlier processes'."""
    clock, offset, last = {}, 0.0, 0.0
    for x in records:
        if x.get("kind") == "train" and "elapsed_s" in x:
            if x["elapsed_s"] < last:
                offset += last
            last = x["elapsed_s"]
            clock[x["step"]] = offset + last
    return clock


def worst_vs_wall(setting: str, results: dict[str, dict[int, dict]], out_dir: Path) -> list[Path]:
    """The worst domain's held-out loss (the runs' own evaluations) against the training wall time of both
    stages, one line per arm (its first seed)."""
    from matplotlib.figure import Figure

    arms = [a for a in ARMS if results.get(a)]
    if not arms:
        return []
    fig = Figure(figsize=(7, 3.6))
    ax = fig.add_subplot(1, 1, 1)
    for arm in arms:
        r = results[arm][min(results[arm])]
        xs, ys, offset = [], [], 0.0
        for records in (r["prune_records"], r["cpt_records"]):
            # an evaluation at step k follows the train record of step k (step 0: the stage's start)
            wall = training_clock(records)
            for e in evals(records):
                xs.append((offset + wall.get(e["step"], 0.0)) / 60)
                ys.append(e["worst_loss"])
            offset += max(wall.values(), default=0.0)
        ax.plot(xs, ys, label=arm, linewidth=1)
    ax.set(xlabel="training wall time, pruning then continued (min; evaluations included)",
           ylabel="worst domain's held-out loss", title=f"{setting}: worst domain against wall time")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out_dir / f"{setting}-worst-vs-wall.png"
    fig.savefig(path, dpi=70)
    return [path]


def setting_tables(setting: str, results: dict[str, dict[int, dict]]) -> str:
    arms = [a for a in ARMS if results.get(a)]
    if not arms:
        return "No finished run yet.\n"
    parts = []
    names = list(next(iter(results[arms[0]].values()))["cpt"])
    # headline: mean / worst / spread after pruning and after CPT
    rows = []
    src = summary(next(iter(results[arms[0]].values()))["source"])
    rows.append(["source (SmolLM2-135M)", "-", f"{src['mean']:.3f}", f"{src['worst']:.3f} ({src['worst_domain']})",
                 f"{src['spread']:.3f}", "", "", ""])
    for arm in arms:
        seeds = sorted(results[arm])
        s_p = [summary(results[arm][s]["pruned"]) for s in seeds]
        s_c = [summary(results[arm][s]["cpt"]) for s in seeds]
        worst_names = sorted({x["worst_domain"] for x in s_c})
        rows.append([arm, ",".join(map(str, seeds)),
                     pm([x["mean"] for x in s_p]), pm([x["worst"] for x in s_p]), pm([x["spread"] for x in s_p]),
                     pm([x["mean"] for x in s_c]), pm([x["worst"] for x in s_c]) + f" ({'/'.join(worst_names)})",
                     pm([x["spread"] for x in s_c])])
    parts.append("Held-out loss (nats/token; perplexity = exp) over the domains: mean, worst domain, spread "
                 "(population standard deviation across domains). Mean [min, max] over seeds.\n")
    parts.append(md_table(["arm", "seeds", "pruned: mean", "pruned: worst", "pruned: spread", "CPT: mean",
                           "CPT: worst (domain)", "CPT: spread"], rows))
    parts.append(paired_differences(setting, results))
    # how precise each domain's figure is: the standard error of its held-out loss over the sequences
    first = next(iter(results[arms[0]].values()))
    rows = [[n, str((first["sequences"]["source"] or {}).get(n, "-")), f"{first['se']['source'].get(n, math.nan):.3f}",
             f"{max(results[a][s]['se']['cpt'].get(n, math.nan) for a in arms for s in results[a]):.3f}"]
            for n in names]
    parts.append("\nStandard error of a domain's held-out loss (nats; sequences of the held-out split, "
                 "disjoint documents): the source model, and the largest over the continued models:\n")
    parts.append(md_table(["domain", "sequences", "SE source", "SE after CPT (max)"], rows))
    # per-domain perplexity
    for label, key in (("after pruning", "pruned"), ("after continued pretraining", "cpt")):
        rows = [["source", "-"] + [f"{math.exp(src_l):.1f}" for src_l in
                              next(iter(results[arms[0]].values()))["source"].values()]]
        for arm in arms:
            seeds = sorted(results[arm])
            rows.append([arm, ",".join(map(str, seeds))]
                        + [pm([math.exp(results[arm][s][key][n]) for s in seeds], 1) for n in names])
        parts.append(f"\nPer-domain held-out perplexity {label} (source row: the unpruned model):\n")
        parts.append(md_table(["arm", "seeds"] + names, rows))
    # downstream
    src_path = RESULTS / setting / "source" / "eval.json"
    src_eval = json.loads(src_path.read_text()) if src_path.is_file() else None
    n_items = {t: (src_eval or next(iter(results[arms[0]].values()))["eval"])["tasks"][t]["n"] for t in TASKS}
    for metric in ("acc", "acc_norm"):  # acc_norm: the multiple-choice tasks that have it
        tasks = [t for t in TASKS if metric in (src_eval or next(iter(results[arms[0]].values()))["eval"])["tasks"][t]]
        rows = []
        if src_eval:
            rows.append(["source", "-"] + [f"{src_eval['tasks'][t][metric]:.3f}" for t in tasks]
                        + [f"{task_average(src_eval, metric, tasks):.3f}"])
        for arm in arms:
            seeds = sorted(results[arm])
            accs = {t: [results[arm][s]["eval"]["tasks"][t][metric] for s in seeds] for t in tasks}
            avg = [task_average(results[arm][s]["eval"], metric, tasks) for s in seeds]
            rows.append([arm, ",".join(map(str, seeds))] + [pm(accs[t]) for t in tasks] + [pm(avg)])
        parts.append(f"\nDownstream {metric} after continued pretraining (zero-shot, the project's scorer; items "
                     "per task: " + ", ".join(f"{t} {n_items[t]}" for t in tasks) + "):\n")
        parts.append(md_table(["arm", "seeds"] + tasks + ["average"], rows))
    parts.append(scorer_agreement(setting, results))
    if setting == "multi":
        rows = []
        langs = list(UD_PUD)
        if src_eval:
            d = src_eval["perplexity"]["domains"]
            rows.append(["source", "-"] + [f"{d[lang]['bpc']:.3f}" for lang in langs]
                        + [f"{ud_mean(src_eval):.3f}", f"{ud_worst(src_eval):.3f}"])
        for arm in arms:
            seeds = sorted(results[arm])
            per = {lang: [results[arm][s]["eval"]["perplexity"]["domains"][lang]["bpc"] for s in seeds]
                   for lang in langs}
            mean = [ud_mean(results[arm][s]["eval"]) for s in seeds]
            worst = [ud_worst(results[arm][s]["eval"]) for s in seeds]
            rows.append([arm, ",".join(map(str, seeds))] + [pm(per[lang]) for lang in langs] + [pm(mean), pm(worst)])
        parts.append(f"\nShifted set UD-PUD (news/Wikipedia sentences; ja: UD-GSD), bits per character after "
                     f"continued pretraining ({UD_SEQUENCES} sequences of {UD_SEQ_LEN} tokens per language):\n")
        parts.append(md_table(["arm", "seeds"] + langs + ["mean", "worst"], rows))
    # final proportions
    rows = []
    for arm in arms:
        seed = min(results[arm])
        r = results[arm][seed]
        last_p = [x for x in r["prune_records"] if x.get("kind") == "mix"][-2:-1] or \
            [x for x in r["prune_records"] if x.get("kind") == "mix"]
        last_c = [x for x in r["cpt_records"] if x.get("kind") == "mix"][-2:-1] or \
            [x for x in r["cpt_records"] if x.get("kind") == "mix"]
        for label, rec, recs in (("prune", last_p, r["prune_records"]), ("CPT", last_c, r["cpt_records"])):
            mixes = [x for x in recs if x.get("kind") == "mix"]
            fits = sum(1 for x in mixes if any(f is not None for f in (x.get("fits") or {}).values()))
            if rec:
                rows.append([arm, label, " ".join(f"{w:.3f}" for w in rec[0]["weights"].values()),
                             f"{fits} of {len(mixes)}"])
    parts.append(f"\nProportions in use for the last step of each stage (seed {min(SEEDS)}; domains in order "
                 f"{', '.join(names)}) and the number of mixing updates with a fitted scaling law:\n")
    parts.append(md_table(["arm", "stage", "proportions", "updates with a fit"], rows))
    return "\n".join(parts) + "\n"


# (arm, baseline) pairs the comparison asks about: does drpruning beat each baseline; what distillation and the
# importance initialisation add
PAIRS = [("drpruning", "constant"), ("drpruning", "uniform"), ("drpruning", "sheared"), ("drpruning", "dro"),
         ("drpruning_distill", "drpruning"), ("minitron", "constant"), ("drpruning_distill", "minitron"),
         ("drpruning_l0", "drpruning")]


def paired_differences(setting: str, results: dict[str, dict[int, dict]]) -> str:
    """arm minus baseline, seed by seed (the same seed: the same random streams, so only the recipe differs), on
    the held-out mean / worst / spread after CPT, the downstream average acc and (multi) the UD-PUD mean; mean
    [min, max] over the common seeds and on how many seeds the arm is better."""
    metrics = [  # (column, figure of one run, lower is better)
        ("CPT mean", lambda r: summary(r["cpt"])["mean"], True),
        ("CPT worst", lambda r: summary(r["cpt"])["worst"], True),
        ("CPT spread", lambda r: summary(r["cpt"])["spread"], True),
        ("downstream acc (avg)", lambda r: task_average(r["eval"], "acc"), False),
    ] + ([("UD-PUD bpc (mean)", lambda r: ud_mean(r["eval"]), True)] if setting == "multi" else [])
    rows = []
    for arm, base in PAIRS:
        seeds = sorted(set(results.get(arm, {})) & set(results.get(base, {})))
        if not seeds:
            continue
        cells = []
        for _, figure, lower in metrics:
            diffs = [figure(results[arm][s]) - figure(results[base][s]) for s in seeds]
            wins = sum(1 for d in diffs if (d < 0) == lower and d != 0)
            cells.append(f"{pm(diffs)} ({wins}/{len(seeds)})")
        rows.append([f"{arm} - {base}", ",".join(map(str, seeds))] + cells)
    if not rows:
        return ""
    return ("\nPaired differences, arm minus baseline on the same seed: held-out loss after CPT (nats; negative "
            "= the arm is better), downstream average acc (positive = better)"
            + (", UD-PUD mean bits per character (negative = better)" if setting == "multi" else "")
            + ". Mean [min, max] over the seeds both have, and (seeds on which the arm is better / seeds):\n\n"
            + md_table(["arm - baseline", "seeds"] + [m[0] for m in metrics], rows) + "\n")


def scorer_agreement(setting: str, results: dict[str, dict[int, dict]]) -> str:
    """The project's scorer against lm-eval on the same final models: the largest |difference| per task."""
    diffs: dict[tuple[str, str], list[float]] = {}
    for arm in LM_EVAL_ARMS:
        for seed in sorted(results.get(arm, {})):
            path = RESULTS / setting / arm / f"seed{seed}" / "lm_eval.json"
            if not path.is_file():
                continue
            lm = json.loads(path.read_text())
            ours = results[arm][seed]["eval"]["tasks"]
            for t in TASKS:
                theirs = lm["results"].get(lm["tasks"].get(t, t), {})
                for metric in ("acc", "acc_norm"):
                    if metric in ours[t] and isinstance(theirs.get(metric), (int, float)):
                        diffs.setdefault((t, metric), []).append(abs(ours[t][metric] - theirs[metric]))
    if not diffs:
        return "\nlm-eval agreement: no lm-eval result yet.\n"
    rows = [[t, m, str(len(v)), f"{max(v):.4f}"] for (t, m), v in sorted(diffs.items())]
    return ("\nThe project's scorer against `lm_eval --model hf` on the final models of "
            f"{' and '.join(LM_EVAL_ARMS)} (largest |difference| over those models):\n\n"
            + md_table(["task", "metric", "models", "max |ours - lm-eval|"], rows) + "\n")


def write(args: object = None) -> None:
    out_dir = mkdir(HERE / "images")
    text = []
    status = []
    for setting in SETTINGS:
        results: dict[str, dict[int, dict]] = {}
        for arm in ARMS:
            for seed in SEEDS:
                r = collect(setting, arm, seed)
                status.append(f"{setting}/{arm}/seed{seed}: {'finished' if r else 'NOT finished'}"
                              + (f" (training s: prune {r['wall_s'][0]:.0f}, CPT {r['wall_s'][1]:.0f}; "
                                 f"eval s {r['wall_s'][2]:.0f})" if r else ""))
                if r:
                    results.setdefault(arm, {})[seed] = r
        text.append(f"### {setting}\n\n" + setting_tables(setting, results))
        for p in [*plots(setting, results, out_dir), *worst_vs_wall(setting, results, out_dir)]:
            text.append(f"![{p.stem}](images/{p.name})\n")
    tables = "\n".join(text) + "\nRun status:\n\n" + "\n".join(f"- {s}" for s in status) + "\n"
    (mkdir(OUT) / "tables.md").write_text(tables)
    doc = HERE / "README.md"
    begin, end = "<!-- compare.py write: begin -->", "<!-- compare.py write: end -->"
    if doc.is_file() and begin in doc.read_text() and end in doc.read_text():
        head, rest = doc.read_text().split(begin, 1)
        doc.write_text(head + begin + "\n\n" + tables + "\n" + end + rest.split(end, 1)[1])
        print(f"tables written into {doc}")
    print(tables)

if __name__ == "__main__":
    write(None)
