"""report.md and report.html with PNG plots from runs' metrics.jsonl (schema in docs/design.md).

Per run: per-domain train and eval loss over steps, domain proportions (stacked area), reference losses with
the scaling-law predictions, expected against target sparsity and expected parameter count, the final shape.
A run whose shape was searched also shows the ranking of its candidates (RUN_DIR/shapes.json).
Across runs: a side-by-side table of the last evaluation (per-domain perplexity, mean and worst loss) and of
downstream accuracy when the run dir has `downstream.json`.

downstream.json: {task: {"acc": float, "acc_norm": float | null, ...}} — `write_downstream` writes it from
`evaluate_model(...)["tasks"]`.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

from matplotlib.figure import Figure  # no pyplot: Figure.savefig renders with Agg and touches no global state

from drpruning.models.shape_search import read_table
from drpruning.training.metrics import read_metrics

SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "vocab_size")


class ReportError(ValueError):
    """A run directory the report cannot use; the message says what is missing."""


def fmt(value, digits: int = 4) -> str:
    """How every number appears in the tables (tests compare against this rounding of metrics.jsonl)."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def load_run(run_dir: Path) -> dict:
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not run_dir.is_dir():
        raise ReportError(f"run directory {run_dir} does not exist")
    if not path.is_file():
        raise ReportError(f"{run_dir} has no metrics.jsonl: a report needs the metrics.jsonl that "
                          "`drpruning train` / `drpruning prune` write into the run directory")
    records = read_metrics(path)
    if not records:
        raise ReportError(f"{path} has no records; the run wrote nothing yet")
    by_kind: dict[str, list[dict]] = {}
    for r in records:
        by_kind.setdefault(r.get("kind", "?"), []).append(r)
    run = {"dir": run_dir, "records": by_kind}
    downstream = run_dir / "downstream.json"
    if downstream.is_file():
        d = json.loads(downstream.read_text())
        run["downstream"] = d.get("tasks", d) if isinstance(d, dict) else {}
    final = by_kind.get("final", [])
    run["final"] = final[-1] if final else None
    config = None
    for candidate in ([Path(final[-1]["model_dir"]) / "config.json"] if final and final[-1].get("model_dir")
                      else []) + [run_dir / "model" / "config.json"]:
        if candidate.is_file():
            config = json.loads(candidate.read_text())
            break
    run["model_config"] = config
    return run


def write_downstream(run_dir: str | Path, task_results: dict[str, dict]) -> Path:
    """downstream.json in a run dir from native task results ({task: {acc, acc_norm, ...}})."""
    keep = {t: {k: r[k] for k in ("acc", "acc_norm", "ppl", "n") if k in r} for t, r in task_results.items()}
    path = Path(run_dir) / "downstream.json"
    path.write_text(json.dumps(keep, indent=2) + "\n")
    return path


def _domains(records: list[dict], key: str) -> list[str]:
    names: list[str] = []
    for r in records:
        for n in r.get(key) or {}:
            if n not in names:
                names.append(n)
    return names


def _series(records: list[dict], key: str, name: str) -> tuple[list, list]:
    xs, ys = [], []
    for r in records:
        v = (r.get(key) or {}).get(name)
        if v is not None:
            xs.append(r["step"])
            ys.append(v)
    return xs, ys


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def plot_losses(run: dict, path: Path) -> Path | None:
    train, evals = run["records"].get("train", []), run["records"].get("eval", [])
    if not train and not evals:
        return None
    fig = Figure(figsize=(11, 4))
    for ax, records, key, title in ((fig.add_subplot(1, 2, 1), train, "domain_loss", "train loss"),
                                    (fig.add_subplot(1, 2, 2), evals, "eval_loss", "eval loss")):
        for name in _domains(records, key):
            xs, ys = _series(records, key, name)
            ax.plot(xs, ys, label=name, marker="o" if key == "eval_loss" else None, linewidth=1)
        ax.set(title=title, xlabel="step", ylabel="loss (nats/token)")
        if records:
            ax.legend(fontsize=7)
    return _save(fig, path)


def plot_proportions(run: dict, path: Path) -> Path | None:
    train = [r for r in run["records"].get("train", []) if r.get("proportions")]
    if not train:
        return None
    names = _domains(train, "proportions")
    steps = [r["step"] for r in train]
    values = [[r["proportions"].get(n) or 0.0 for r in train] for n in names]
    fig = Figure(figsize=(8, 4))
    ax = fig.add_subplot(1, 1, 1)
    ax.stackplot(steps, values, labels=names)
    ax.set(title="domain proportions", xlabel="step", ylabel="proportion", ylim=(0, 1))
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(fig, path)


def plot_references(run: dict, path: Path) -> Path | None:
    mix = [r for r in run["records"].get("mix", []) if r.get("references")]
    if not mix:
        return None
    fig = Figure(figsize=(8, 4))
    ax = fig.add_subplot(1, 1, 1)
    colors = {}
    for name in _domains(mix, "references"):
        xs, ys = _series(mix, "losses", name)
        line = ax.plot(xs, ys, label=f"{name} loss", linewidth=1)[0]
        colors[name] = line.get_color()
        xs, ys = _series(mix, "references", name)
        ax.plot(xs, ys, "--", color=colors[name], label=f"{name} reference", linewidth=1)
        xs, ys = _series(mix, "predictions", name)
        if xs:
            ax.plot(xs, ys, "x", color=colors[name], label=f"{name} scaling-law prediction")
    ax.set(title="losses, reference losses and scaling-law predictions", xlabel="step", ylabel="loss")
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(fig, path)


def plot_sparsity(run: dict, path: Path) -> Path | None:
    train = [r for r in run["records"].get("train", []) if r.get("expected_sparsity")]
    if not train:
        return None
    fig = Figure(figsize=(11, 4))
    ax = fig.add_subplot(1, 2, 1)
    for name in _domains(train, "expected_sparsity"):
        xs, ys = _series(train, "expected_sparsity", name)
        color = ax.plot(xs, ys, label=f"{name} expected", linewidth=1)[0].get_color()
        xs, ys = _series(train, "target_sparsity", name)
        ax.plot(xs, ys, "--", color=color, label=f"{name} target", linewidth=1)
    ax.set(title="expected vs target sparsity", xlabel="step", ylabel="sparsity")
    ax.legend(fontsize=7)
    ax = fig.add_subplot(1, 2, 2)
    pts = [(r["step"], r["expected_params"]) for r in train if r.get("expected_params") is not None]
    if pts:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], linewidth=1)
    ax.set(title="expected parameter count", xlabel="step", ylabel="parameters")
    return _save(fig, path)


PLOTS = (("losses", plot_losses, "Per-domain train and eval loss"),
         ("proportions", plot_proportions, "Domain proportions"),
         ("references", plot_references, "Reference losses and scaling-law predictions"),
         ("sparsity", plot_sparsity, "Sparsity and expected parameters"))


def last_eval(run: dict) -> dict | None:
    evals = run["records"].get("eval", [])
    return evals[-1] if evals else None


def comparison_rows(runs: dict[str, dict]) -> tuple[list[str], list[list[str]]]:
    """Rows: per-domain eval perplexity at each run's last evaluation, mean and worst loss, downstream acc."""
    names = list(runs)
    header = ["metric"] + names
    lasts = {n: last_eval(r) for n, r in runs.items()}
    rows = [["last eval step"] + [fmt(e["step"]) if e else "-" for e in lasts.values()]]
    domains = _domains([e for e in lasts.values() if e], "eval_ppl")
    for d in domains:
        rows.append([f"ppl {d}"] + [fmt((e.get("eval_ppl") or {}).get(d)) if e else "-"
                                    for e in lasts.values()])
    rows.append(["mean loss"] + [fmt(e.get("mean_loss")) if e else "-" for e in lasts.values()])
    rows.append(["worst loss"] + [fmt(e.get("worst_loss")) if e else "-" for e in lasts.values()])
    rows.append(["worst domain"] + [fmt(e.get("worst_domain")) if e else "-" for e in lasts.values()])
    tasks: list[str] = []
    for r in runs.values():
        for t in r.get("downstream") or {}:
            if t not in tasks:
                tasks.append(t)
    for t in tasks:
        for metric in ("acc", "acc_norm"):
            values = [((r.get("downstream") or {}).get(t) or {}).get(metric) for r in runs.values()]
            if any(v is not None for v in values):
                rows.append([f"{t} {metric}"] + [fmt(v) for v in values])
    return header, rows


def shape_rows(run: dict) -> list[list[str]]:
    rows = []
    final = run.get("final")
    if final:
        for k, v in (final.get("shape") or {}).items():
            rows.append([f"final shape: {k}", fmt(v)])
    config = run.get("model_config")
    if config:
        for k in SHAPE_KEYS:
            if k in config:
                rows.append([f"model config: {k}", fmt(config[k])])
    return rows


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _run_names(run_dirs: list[Path]) -> list[str]:
    names = [p.resolve().name for p in run_dirs]
    if len(set(names)) < len(names):  # same leaf name: qualify with the parent folder, then the index
        names = [f"{p.resolve().parent.name}/{p.resolve().name}" for p in run_dirs]
    if len(set(names)) < len(names):
        names = [f"{i}:{n}" for i, n in enumerate(names)]
    return names


def write_report(run_dirs: list[Path], out_dir: Path | None = None) -> Path:
    """Write report.md, report.html and PNGs into out_dir (default: the first run dir); returns report.md."""
    if not run_dirs:
        raise ReportError("no run directories given")
    out_dir = Path(out_dir) if out_dir else Path(run_dirs[0])
    # a two-stage pruning run (pruning.mask_phase_steps): its mask phase is reported first, as a run of its own
    run_dirs = [q for p in map(Path, run_dirs)
                for q in ([p / "mask-phase"] if (p / "mask-phase" / "metrics.jsonl").is_file() else []) + [p]]
    runs = dict(zip(_run_names(run_dirs), (load_run(p) for p in run_dirs), strict=True))
    out_dir.mkdir(parents=True, exist_ok=True)

    md = ["# drpruning report", ""]
    hb = ["<!doctype html><html><head><meta charset='utf-8'><title>drpruning report</title>",
          "<style>body{font-family:sans-serif;max-width:1200px;margin:auto}table{border-collapse:collapse}"
          "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}img{max-width:100%}",
          "</style></head><body>",
          "<h1>drpruning report</h1>"]
    header, rows = comparison_rows(runs)
    md += ["## Comparison (last evaluation)", "", _md_table(header, rows), ""]
    hb += ["<h2>Comparison (last evaluation)</h2>", _html_table(header, rows)]
    for i, (name, run) in enumerate(runs.items()):
        md += [f"## Run {name}", "", f"`{run['dir']}`", ""]
        hb += [f"<h2>Run {html.escape(name)}</h2>", f"<p><code>{html.escape(str(run['dir']))}</code></p>"]
        e = last_eval(run)
        if e:
            domains = list((e.get("eval_loss") or {}).keys())
            erows = [[d, fmt(e["eval_loss"].get(d)), fmt((e.get("eval_ppl") or {}).get(d))] for d in domains]
            title = f"Last evaluation (step {e['step']})"
            md += [f"### {title}", "", _md_table(["domain", "eval loss", "eval ppl"], erows), ""]
            hb += [f"<h3>{title}</h3>", _html_table(["domain", "eval loss", "eval ppl"], erows)]
        srows = shape_rows(run)
        if srows:
            md += ["### Final shape", "", _md_table(["", "value"], srows), ""]
            hb += ["<h3>Final shape</h3>", _html_table(["", "value"], srows)]
        searched = read_table(run["dir"])
        if searched:
            title = "Shape search (ranked by the held-out loss right after the cut; RUN_DIR/shapes.md)"
            md += [f"### {title}", "", _md_table(*searched), ""]
            hb += [f"<h3>{html.escape(title)}</h3>", _html_table(*searched)]
        for key, plot, title in PLOTS:
            png = out_dir / f"run{i}-{key}.png"
            if plot(run, png):
                md += [f"### {title}", "", f"![{title}]({png.name})", ""]
                hb += [f"<h3>{html.escape(title)}</h3>", f"<img src='{png.name}' alt='{html.escape(title)}'>"]
    hb.append("</body></html>")
    (out_dir / "report.html").write_text("\n".join(hb) + "\n")
    report = out_dir / "report.md"
    report.write_text("\n".join(md) + "\n")
    return report
