"""Tables and plots of the equal-token L0 study, from its committed results (experiments/runner.py keeps them).

    .venv/bin/python experiments/l0_budget/table.py     # README.md (between markers) and images/

Per arm, mean [min, max] over seeds, on the whole held-out split (32 sequences a domain): mean, worst and spread
(worst - best domain) of the held-out loss after the mask phase (L0 arms) and at the end; the export gap (the
mask phase's exact-mask evaluation minus that of its last learnt masks, where hardening starts; in-run
sequences); the largest rise of an in-run evaluation over the previous one after the Lagrangian ramp (the
source's own evaluation at step 0 excluded); training seconds and FLOPs (6 N a trained
token, N the trained model: the masked source while masks are learnt, else the compact model; 2 N a teacher
token).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from tables import all_results, load_study, md_table, pm, status_lines, summary, write_between_markers  # noqa: E402

TOTALS = (250, 1000)
DOCS = HERE.parents[1] / "docs" / "pruning.md"  # its summary table, between markers
EVIDENCE = HERE.parents[1] / "src" / "drpruning" / "plan" / "l0_evidence.json"  # read by `drpruning plan`
SHARES = {"oneshot": 0.0, "l0_15": 0.15, "l0_35": 0.35, "l0_35_tuned": 0.35, "tuned_15": 0.15, "tuned_35": 0.35,
          "tuned_60": 0.6, "projected_35": 0.35}
L0_ARMS = ("l0", "tuned", "projected")  # the arm names' prefixes (after t<T>_) of learnt-mask arms


def evals(records: list[dict]) -> list[dict]:
    return [r for r in records if r["kind"] == "eval"]


def learnt_until(records: list[dict]) -> int:
    """The last step whose masks were learnt (a step with a Lagrangian record), before hardening."""
    return max(r["step"] for r in records if r["kind"] == "train" and "lagrangian" in r)


def export_gap(unit: dict) -> float | None:
    """Exact-mask mean loss at the mask phase's end minus the evaluation of the last learnt masks (the step
    where hardening starts; None for a run from before that evaluation existed)."""
    if "mask" not in unit:
        return None
    records = unit["mask"]["records"]
    e = evals(records)
    last = learnt_until(records)
    learnt = [r for r in e if r["step"] == last]  # hardening may hold further evaluations
    if not learnt or e[-1] is learnt[-1]:
        return None
    return e[-1]["mean_loss"] - learnt[-1]["mean_loss"]


def ramp_end(records: list[dict]) -> int:
    """The first step whose target sparsity is the final one for every structure (0 without a ramp)."""
    train = [r for r in records if r["kind"] == "train" and "target_sparsity" in r]
    final = train[-1]["target_sparsity"]
    return 1 + max((r["step"] for r in train if r["target_sparsity"] != final), default=-1)


def largest_rise(unit: dict) -> float | None:
    """The largest rise of the in-run mean loss over the previous evaluation, from the end of the Lagrangian
    ramp (and after the source's evaluation at step 0) through the training stage."""
    if "mask" not in unit:
        return None
    mask = unit["mask"]["records"]
    start = max(ramp_end(mask), 1)  # step 0 evaluates the source, before any cut
    seq = [r["mean_loss"] for r in evals(mask) if r["step"] >= start]
    seq += [r["mean_loss"] for r in evals(unit["train"]["records"])] if "train" in unit else []
    return max(b - a for a, b in zip(seq, seq[1:])) if len(seq) > 1 else None


def train_seconds(unit: dict) -> float:
    return sum(max(r["elapsed_s"] for r in s["records"] if r["kind"] == "train") for s in unit.values())


def flops(unit: dict) -> float:
    total = 0.0
    for stage in unit.values():
        train = [r for r in stage["records"] if r["kind"] == "train"]
        tokens = max(r["tokens"] for r in train)
        masked = any("expected_params" in r for r in train)
        h = stage["heldout_meta"]
        trained = h["input_params"] if masked else h["params"]
        teacher = h["teacher_params"] if any(r.get("domain_kl") for r in train) else 0
        total += tokens * (6 * trained + 2 * teacher)
    return total


def row(arm: str, units: dict[int, dict], share: str) -> list[str]:
    values = list(units.values())
    after = [summary(u["mask"]["heldout"]) if "mask" in u else None for u in values]
    end = [summary(u[list(u)[-1]]["heldout"]) for u in values]
    return [arm, share, str(len(values)),
            pm([a["mean"] if a else None for a in after]), pm([a["worst"] if a else None for a in after]),
            pm([e["mean"] for e in end]), pm([e["worst"] for e in end]), pm([e["spread"] for e in end]),
            pm([export_gap(u) for u in values]), pm([largest_rise(u) for u in values]),
            pm([train_seconds(u) for u in values], 0), pm([flops(u) / 1e15 for u in values], 2)]


def sweep_row(arm: str, units: dict[int, dict]) -> list[str]:
    values = list(units.values())
    after = [summary(u["mask"]["heldout"]) for u in values]
    only_mask = [{"mask": u["mask"]} for u in values]  # the rise within the mask phase, as for a sweep
    return [arm, str(len(values)), pm([a["mean"] for a in after]), pm([a["worst"] for a in after]),
            pm([export_gap(u) for u in values]), pm([largest_rise(u) for u in only_mask]),
            pm([train_seconds({"mask": u["mask"]}) for u in values], 0)]


SWEEP_HEADER = ["arm", "seeds", "after mask: mean", "after mask: worst", "export gap", "largest rise (mask phase)",
                "mask phase s"]

HEADER = ["arm", "L0 share", "seeds", "after mask: mean", "after mask: worst", "end: mean", "end: worst",
          "end: spread", "export gap", "largest rise", "training s", "PFLOPs"]


def plot(spec: dict, results: dict, total: int, out: Path) -> Path | None:
    """Worst-domain in-run loss against tokens, one line per arm of `total` (its first finished seed)."""
    from matplotlib.figure import Figure

    arms = finished(spec, results, f"t{total}_")
    if not arms:
        return None
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot(1, 1, 1)
    for i, arm in enumerate(arms):
        unit = results[arm][min(results[arm])]
        xs, ys, offset = [], [], 0
        for stage in unit.values():
            for r in evals(stage["records"]):
                xs.append(offset + r["tokens"])
                ys.append(r["worst_loss"])
            offset += max(r["tokens"] for r in stage["records"] if r["kind"] == "train")
        # matplotlib cycles 10 colours; past them a dashed line keeps each arm distinct
        ax.plot(xs, ys, label=arm, linewidth=1, linestyle=("-", "--", ":")[i // 10 % 3])
    ax.set(xlabel="training tokens (mask phase + compact model)", ylabel="worst-domain held-out loss (in-run)",
           title=f"T = {total} steps, seed {min(results[arms[0]])}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    out.mkdir(exist_ok=True)
    path = out / f"worst-vs-tokens-t{total}.png"
    fig.savefig(path, dpi=80, metadata={"Software": None})
    return path


def recipe(stages: list[dict], total: int) -> dict:
    """An L0 arm's mask phase as settings a run of any length can take: its share of the total steps and its
    overrides, step counts as shares of the mask phase."""
    settings = dict(o.split("=", 1) for o in stages[0]["overrides"])
    steps = int(settings.pop("train.steps"))
    return {"share": round(steps / total, 4),
            "overrides": [f"{k}={int(v) / steps:.0%} of the mask phase" if k.endswith("_steps") and int(v)
                          else f"{k}={v}"
                          for k, v in settings.items()]}


def evidence(results: dict, arms: dict[str, list[dict]]) -> dict:
    """Per total: the worst-domain end loss of one-shot + KD and of the best L0 arm (lowest mean), on the seeds
    both finished (at least 2), and that arm's recipe, for `drpruning plan`'s recommendation
    (src/drpruning/plan/recommend.py). `arms`: study.yaml's arms (their stages)."""
    points = []
    for total in TOTALS:
        base = results.get(f"t{total}_oneshot", {})
        end = {arm: {seed: summary(u[list(u)[-1]]["heldout"])["worst"] for seed, u in units.items()}
               for arm, units in results.items() if arm.startswith(tuple(f"t{total}_{p}" for p in L0_ARMS))}
        candidates = [(statistics.fmean(w[s] for s in seeds), arm, seeds) for arm, w in end.items()
                      if len(seeds := sorted(set(w) & set(base))) >= 2]
        if not candidates:
            continue
        _, arm, seeds = min(candidates)
        one = [summary(base[s]["train"]["heldout"])["worst"] for s in seeds]
        l0 = [end[arm][s] for s in seeds]
        source = base[seeds[0]]["train"]["heldout_meta"]["input_params"]
        points.append({"total_steps": total, "tokens_per_step": 2048, "source_params": source,
                       "tokens_per_param": round(total * 2048 / source, 6), "seeds": seeds, "l0_arm": arm,
                       "oneshot_worst": [round(v, 4) for v in one], "l0_worst": [round(v, 4) for v in l0],
                       "gap_worst": [round(b - a, 4) for a, b in zip(one, l0)], "l0_recipe": recipe(arms[arm], total)})
    return {"study": "experiments/l0_budget", "written_by": "experiments/l0_budget/table.py", "points": points}


MULTIPLIER_CANDIDATES = ("t250_l0_35_tuned", "t250_sweep_tuned_laglr0.5", "t250_sweep_tuned_sgd5",
                         "t250_sweep_tuned_sgd20")


def multiplier_choice(results: dict) -> str:
    """The rule for the T = 1,000 tuned arms' multipliers (README): of the candidates with 2 seeds whose export
    gap is at most 0.05 on both, the lowest mean worst-domain loss after the mask phase; decided once no
    candidate that could still qualify lacks a seed."""
    eligible, out, waiting = [], [], []
    for arm in MULTIPLIER_CANDIDATES:
        units = [u for s, u in results.get(arm, {}).items() if s in (0, 1)]
        if any(export_gap(u) > 0.05 for u in units):
            out.append(arm)
        elif len(units) < 2:
            waiting.append(arm)
        else:
            eligible.append((statistics.fmean(summary(u["mask"]["heldout"])["worst"] for u in units), arm))
    ranked = "; ".join(f"{a} (after mask: worst {w:.3f})" for w, a in sorted(eligible)) or "none"
    if waiting:
        head = f"undecided until {', '.join(waiting)} has 2 seeds"
    else:
        head = min(eligible)[1] if eligible else "none qualifies"
    return f"{head}. Eligible: {ranked}. Export gap above 0.05 on a seed: {', '.join(out) or 'none'}"


def docs_table(results: dict) -> str:
    """docs/pruning.md's summary: per total and arm, the end-of-pipeline losses and the worst-domain gap to
    one-shot + KD paired by seed."""
    rows = []
    for total in TOTALS:
        base = results.get(f"t{total}_oneshot", {})
        for arm, units in results.items():
            if not arm.startswith(f"t{total}_") or "sweep" in arm:  # sweeps stop after the mask phase
                continue
            ends = {s: summary(u[list(u)[-1]]["heldout"]) for s, u in units.items()}
            paired = [ends[s]["worst"] - summary(base[s]["train"]["heldout"])["worst"] for s in ends if s in base]
            share = next((f"{v:.0%}" for k, v in SHARES.items() if arm.startswith(f"t{total}_{k}")), "-")
            gap = pm(paired) if not arm.endswith("oneshot") else "-"
            rows.append([str(total), arm.split("_", 1)[1], share, str(len(units)),
                         pm([e["mean"] for e in ends.values()]), pm([e["worst"] for e in ends.values()]),
                         gap, pm([export_gap(u) for u in units.values()])])
    return md_table(["T (steps)", "arm", "L0 share", "seeds", "end: mean", "end: worst", "worst - one-shot",
                     "export gap"], rows)


def finished(spec: dict, results: dict, prefix: str) -> list[str]:
    """The study's arms named `prefix`... with at least one finished unit, in study order."""
    return [a for a in spec["arms"] if a.startswith(prefix) and a in results]


def sweep_table(scope: str, arms: list[str], results: dict) -> str:
    rows = [sweep_row(a, results[a]) for a in arms if a in results]
    return f"### Mask-phase sweeps, {scope}, then the exact cut)\n\n" + md_table(SWEEP_HEADER, rows)


def main() -> None:
    spec = load_study(HERE)
    results = all_results(spec)
    text = []
    for total in TOTALS:
        rows = [row(f"t{total}_{k}", results[f"t{total}_{k}"], f"{v:.0%}") for k, v in SHARES.items()
                if f"t{total}_{k}" in results]
        text.append(f"### T = {total} steps x 2,048 tokens\n\n" + md_table(HEADER, rows))
        path = plot(spec, results, total, HERE / "images")
        if path:
            text.append(f"![worst-domain loss against tokens, T = {total}](images/{path.name})")
    variants = finished(spec, results, "t250_l0_35_")
    if variants:
        rows = [row(a, results[a], "35%") for a in ["t250_l0_35", *variants] if a in results]
        text.append("### L0 variants, T = 250, 35% mask phase\n\n" + md_table(HEADER, rows))
    sweeps = finished(spec, results, "t250_sweep_")
    if sweeps:  # the mask phase alone: 88 steps and the exact cut; against the whole arms' mask phases
        whole = ["t250_l0_35", *variants, *finished(spec, results, "t250_projected")]
        text.append(sweep_table("T = 250, 35% (88 steps", whole + sweeps, results))
        text.append(f"Multipliers for the T = 1,000 `tuned` arms, by the rule above: {multiplier_choice(results)}.")
    sweeps = finished(spec, results, "t1000_sweep_")
    if sweeps:  # against the mask phase of the whole arm they vary
        text.append(sweep_table("T = 1,000, 15% (150 steps", ["t1000_tuned_15", *sweeps], results))
    status = status_lines(spec, results)
    write_between_markers(HERE / "README.md", "\n\n".join(text) + "\n\nRun status:\n\n" + "\n".join(status))
    EVIDENCE.write_text(json.dumps(evidence(results, spec["arms"]), indent=1) + "\n")
    write_between_markers(DOCS, "Generated by `experiments/l0_budget/table.py` from its committed results; mean "
                          "[min, max] over seeds, held-out losses in nats.\n\n" + docs_table(results))
    print((HERE / "README.md").read_text())


if __name__ == "__main__":
    main()
