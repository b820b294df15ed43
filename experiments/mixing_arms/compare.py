"""Does robust mixing win? Seven mixing arms (and an L0 one) for prune -> continued pretraining.

For each setting (mono: 7 RedPajama domains; multi: 8 languages), each seed and each arm, this prunes the default
SmolLM2-135M one-shot to a fixed shape (experiments/mixing_arms/configs/prune.yaml), continues pretraining the
pruned model with the same arm (cpt.yaml), scores the source, pruned and continued models on the whole held-out
split, and the continued model on downstream multiple-choice tasks and, for the multilingual setting, the
shifted UD-PUD sentences (bits per character).

    .venv/bin/python experiments/mixing_arms/compare.py run    # all runs, resumable (finished ones are skipped)
    .venv/bin/python experiments/mixing_arms/compare.py write  # tables into experiments/mixing_arms/README.md
                                               # (between its markers) and images/*.png, from results/

`run` is meant to be started in the background:

    nohup nice -n 10 .venv/bin/python experiments/mixing_arms/compare.py run > runs/compare/run.log 2>&1 &

A finished (setting, arm, seed) copies its metrics and evaluations into experiments/mixing_arms/results/
(committed: `write` reads only these, so the tables regenerate on any checkout) and is skipped from then on.
An interrupted run is resumed by starting the same command again: a stage whose RUN_DIR/model exists is
skipped, a stage with checkpoints continues from the last one (resume=true), an evaluation whose eval.json
exists is skipped. Runs go seed by seed (seed 0 of every setting and arm first), so a partial benchmark still
covers every arm.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import math
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the shared study runner and table helpers
from runner import acquire  # noqa: E402
from tables import md_table, pm  # noqa: E402

ROOT = HERE.parents[1]
CONFIGS = HERE / "configs"
SHARED = ROOT.parent / "shared"
OUT = ROOT / "runs" / "compare"  # working folders: checkpoints, models (not committed)
# what a finished (setting, arm, seed) leaves, committed, so that later sessions on fresh machines resume the
# comparison and regenerate its tables: the metrics of both stages (with their training clock), the evaluations
RESULTS = HERE / "results"
KEEP = ("prune/metrics.jsonl", "prune/heldout.json", "cpt/metrics.jsonl", "cpt/heldout.json", "heldout.json",
        "eval.json", "lm_eval.json")

SETTINGS = {"mono": "mono.yaml", "multi": "multi.yaml"}
DISTILL = ["train.distill.weight=0.5", "train.distill.temperature=2.0"]  # the demo's; teacher named in run()


def both(*overrides: str) -> tuple[list[str], list[str]]:
    return list(overrides), list(overrides)


ARMS: dict[str, tuple[list[str], list[str]]] = {  # (pruning overrides, continued-pretraining overrides)
    # the paper's initial proportions throughout
    "constant": both("mixing.method=constant"),
    # equal proportions throughout: the stratified baseline data-mixing studies find hard to beat
    "uniform": both("mixing.method=constant", "data.proportions=null"),
    # Sheared-LLaMA dynamic batch loading, references = the source model's per-domain losses
    "sheared": both("mixing.method=sheared", "mixing.reference=source"),
    # chi-square DRO around the fixed initial ratio, references = the source model's losses
    "dro": both("mixing.method=dro", "mixing.reference=source", "mixing.dynamic_ratio=false"),
    # DRPruning: DRO + scaling-law references + moving reference ratio
    "drpruning": both("mixing.method=drpruning"),
    # DRPruning with half cross-entropy, half KL to SmolLM2-135M in both stages
    "drpruning_distill": both("mixing.method=drpruning", *DISTILL),
    # Minitron's recipe, as the demo runs it: one-shot pruning (prune.yaml), half KL to SmolLM2, the paper's
    # constant mix
    "minitron": both("mixing.method=constant", *DISTILL),
    # DRPruning with the paper's learnt L0 masks instead of the one-shot cut (importance-initialised, the last
    # 30 steps under the exact masks; pilot 3 in the README): what the L0 method gives at this budget
    "drpruning_l0": (["mixing.method=drpruning", "pruning.method=l0", "pruning.lagrangian_warmup_steps=40",
                      "pruning.hardening_steps=30"],
                     ["mixing.method=drpruning"]),
}
SEEDS = [0, 1, 2]
CPT_SEED = 100  # the continued run of seed k samples with seed 100 + k
# every task of ../shared/eval, its first TASK_LIMIT items (`run --task-limit 0`: every item). The source's
# 100 items per task took 594 s here (one thread beside another run): every item (17,109) would take about
# 3 hours per model, so the arms are scored on a fixed prefix, the same items for every model
TASK_LIMIT = 100
TASKS = ["arc_easy", "piqa", "boolq", "copa", "openbook_qa", "logi_qa", "siqa", "winogrande", "lambada_openai"]
LM_EVAL_ARMS = ("constant", "drpruning")  # their final models are scored by lm-eval too: the scorers' agreement
UD_PUD = {"en": "en.txt", "ru": "ru.txt", "zh": "zh.txt", "ja": "ja-gsd.txt", "ar": "ar.txt", "tr": "tr.txt",
          "ko": "ko.txt", "th": "th.txt"}
UD_SEQ_LEN = 128
UD_SEQUENCES = 32  # sequences of UD_SEQ_LEN tokens per language

log = logging.getLogger("compare")


# ------------------------------------------------------------------------------------------------ running
def others_busy(seconds: float = 2.0) -> float:
    """CPU cores used by other processes over a short window (from /proc/stat minus this process)."""
    def sample():
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        own = os.times()
        return sum(fields) - fields[3] - fields[4], own.user + own.system
    tick = os.sysconf("SC_CLK_TCK")
    (busy0, own0), t0 = sample(), time.monotonic()
    time.sleep(seconds)
    (busy1, own1), t1 = sample(), time.monotonic()
    return max(0.0, (busy1 - busy0) / tick - (own1 - own0)) / (t1 - t0)


def set_threads() -> None:
    """Two threads on a quiet machine; one when other jobs keep a core busy. Two 2-thread processes on this
    2-core machine slow each other down ~10x (OpenMP threads wait on each other); it does not change results
    beyond floating-point summation order."""
    import torch

    fixed = int(os.environ.get("COMPARE_THREADS", "0"))  # set it to keep a core free for other work
    n = fixed or (1 if others_busy() > 0.5 else min(2, os.cpu_count() or 1))
    torch.set_num_threads(n)
    log.info("torch threads: %d", n)


def stage_config(setting: str, config: str):
    """A stage's config (prune.yaml or cpt.yaml) merged onto a setting's (its domains and proportions)."""
    from omegaconf import OmegaConf

    return OmegaConf.merge(OmegaConf.load(CONFIGS / SETTINGS[setting]), OmegaConf.load(CONFIGS / config))


def stage(config: str, setting: str, run_dir: Path, overrides: list[str]) -> Path:
    """One `train` run from the merged stage + setting configs; skipped when RUN_DIR/model exists."""
    from omegaconf import OmegaConf

    from drpruning.config import load_config
    from drpruning.training.trainer import train

    model_dir = run_dir / "model"
    if (model_dir / "config.json").is_file():
        log.info("%s: done, skipping", run_dir)
        return model_dir
    resume = (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir())
    merged = stage_config(setting, config)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "compare-input.yaml"
    OmegaConf.save(merged, path)
    cfg = load_config(path, [f"run_dir={run_dir}", f"resume={str(resume).lower()}", *overrides])
    set_threads()
    log.info("%s: %s", run_dir, "resuming" if resume else "starting")
    out = train(cfg)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # 1.6 GB each; the model is exported
    return out


def heldout(model_dir: Path, setting: str, out: Path) -> None:
    """Per-domain loss and standard error of a model on every held-out sequence of the stage configs' split
    (`data.eval_sequences` per domain, fewer where a domain's held-out documents hold less; the runs' own
    evaluations use the first `train.eval_limit`), into out (JSON)."""
    if out.is_file():
        return
    import torch
    from omegaconf import OmegaConf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from drpruning.config import DataConfig
    from drpruning.data.corpus import load_corpus
    from drpruning.evaluation.perplexity import domain_losses
    from drpruning.loss import autocast_dtype

    data = [stage_config(setting, c).data for c in ("prune.yaml", "cpt.yaml")]
    if data[0] != data[1]:
        raise SystemExit("prune.yaml and cpt.yaml must split the data alike (data.* keys): one held-out set")
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), data[0]))
    set_threads()
    t0 = time.perf_counter()
    corpus = load_corpus(cfg, AutoTokenizer.from_pretrained(model_dir))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    res = {"model": str(model_dir),
           "domains": domain_losses(model, corpus.eval_dict(), 16, autocast_dtype("auto", torch.device("cpu")))}
    res["wall_s"] = time.perf_counter() - t0
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(res, indent=2) + "\n")
    os.replace(tmp, out)
    log.info("%s: held-out loss in %.0f s", out, res["wall_s"])


def evaluate_final(model_dir: Path, setting: str, out: Path, limit: int | None = None,
                   lm_eval: bool = False) -> None:
    """Downstream accuracy (and UD-PUD bits per character for multi) of a model, into out (JSON); with
    `lm_eval`, the same tasks through lm-evaluation-harness too (lm_eval.json beside it)."""
    if lm_eval and not (out.parent / "lm_eval.json").is_file():
        from drpruning.evaluation.lm_eval_bridge import run_lm_eval

        set_threads()
        t0 = time.perf_counter()
        res = run_lm_eval(model_dir, TASKS, limit=limit, task_dir=SHARED / "eval", dtype="float32", device="cpu")
        res["wall_s"] = time.perf_counter() - t0
        (out.parent / "lm_eval.json").write_text(json.dumps(res, indent=2) + "\n")
    if out.is_file():
        return
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from drpruning.evaluation import evaluate
    from drpruning.loss import autocast_dtype

    set_threads()
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    data = {lang: SHARED / "data" / "ud-pud" / f for lang, f in UD_PUD.items()} if setting == "multi" else None
    results = evaluate(model, tokenizer, data=data, tasks=TASKS, seq_len=UD_SEQ_LEN, max_sequences=UD_SEQUENCES,
                       limit=limit, batch_size=16, task_dir=SHARED / "eval",
                       dtype=autocast_dtype("auto", torch.device("cpu")),  # bf16 only where the CPU has it
                       progress=False)
    results["model"] = str(model_dir)
    results["wall_s"] = time.perf_counter() - t0
    out.write_text(json.dumps(results, indent=2) + "\n")
    log.info("%s: evaluated in %.0f s", out, results["wall_s"])


def run(args) -> None:
    from drpruning.models import fetch_model

    os.chdir(ROOT)  # the setting configs name ../shared relative to the repository root
    source = fetch_model("smollm2-135m")
    for seed in args.seeds:
        for setting in args.settings:
            if not all((RESULTS / setting / "source" / f).is_file() for f in ("eval.json", "heldout.json")):
                heldout(Path(source), setting, mkdir(OUT / setting / "source") / "heldout.json")
                evaluate_final(Path(source), setting, OUT / setting / "source" / "eval.json", args.task_limit)
                keep(OUT / setting / "source", RESULTS / setting / "source")
            for arm in args.arms:
                base = OUT / setting / arm / f"seed{seed}"
                if (RESULTS / setting / arm / f"seed{seed}" / "eval.json").is_file():
                    continue
                if not acquire(base):
                    log.info("%s: another compare.py process is on it, skipping", base)
                    continue
                try:
                    prune, cpt = ARMS[arm]
                    pruned = stage("prune.yaml", setting, base / "prune",
                                   [f"model.source={source}", f"train.seed={seed}", *prune])
                    # the continued run draws other windows than the pruning run (another permutation; the
                    # library now also reads on from a same-seed pruning run, which these runs predate)
                    cont = stage("cpt.yaml", setting, base / "cpt",  # a distilling arm's teacher stays SmolLM2
                                 [f"model.source={pruned}", f"train.distill.teacher={source}",
                                  f"train.seed={CPT_SEED + seed}", *cpt])
                    heldout(pruned, setting, base / "prune" / "heldout.json")
                    heldout(cont, setting, base / "cpt" / "heldout.json")
                    evaluate_final(cont, setting, base / "eval.json", args.task_limit, arm in LM_EVAL_ARMS)
                    keep(base, RESULTS / setting / arm / f"seed{seed}")
                finally:
                    (base / "owner.pid").unlink(missing_ok=True)
    log.info("done: every (setting, arm, seed) of this process is finished or owned by another process")


def keep(base: Path, dest: Path) -> None:
    """Copy a finished unit's KEEP files from its working folder into `dest`, all or nothing (a temporary
    folder renamed into place), for `git add experiments/mixing_arms/results`."""
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for name in KEEP:
        if (base / name).is_file():
            mkdir((tmp / name).parent)
            if name.endswith(".jsonl"):  # ~5x smaller in git
                with open(base / name, "rb") as src, gzip.open(tmp / f"{name}.gz", "wb") as out:
                    shutil.copyfileobj(src, out)
            else:
                shutil.copy2(base / name, tmp / name)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(mkdir(tmp), dest)
    log.info("%s: kept in %s", base, dest)


def mkdir(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


# ------------------------------------------------------------------------------------------------ reading
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


def write(args) -> None:
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run (or resume) the benchmark into runs/compare")
    r.add_argument("--seeds", type=int, nargs="+", default=SEEDS)
    r.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    r.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    r.add_argument("--task-limit", type=int, default=TASK_LIMIT,
                   help=f"the first N items of each task (default {TASK_LIMIT}; 0: every item)")
    sub.add_parser("write", help="tables (runs/compare/tables.md, pasted into the README) and "
                                 "images/*.png from the finished runs")
    args = p.parse_args()
    if getattr(args, "task_limit", None) == 0:
        args.task_limit = None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stdout)
    run(args) if args.cmd == "run" else write(args)


if __name__ == "__main__":
    main()
