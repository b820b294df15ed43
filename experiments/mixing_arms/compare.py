"""Does robust mixing win? Seven mixing arms (and an L0 one) for prune -> continued pretraining.

For each setting (mono: 7 RedPajama domains; multi: 8 languages), each seed and each arm, this prunes the default
SmolLM2-135M one-shot to a fixed shape (experiments/mixing_arms/configs/prune.yaml), continues pretraining the
pruned model with the same arm (cpt.yaml), scores the source, pruned and continued models on the whole held-out
split, and the continued model on downstream multiple-choice tasks and, for the multilingual setting, the
shifted UD-PUD sentences (bits per character).

    .venv/bin/python experiments/mixing_arms/compare.py run    # all runs, resumable (finished ones are skipped)
    .venv/bin/python experiments/mixing_arms/compare.py write  # tables into experiments/mixing_arms/README.md
                                               # (between its markers) and images/*.png, from results/
                                               # (report.py)

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
import os
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the shared study runner and table helpers
from runner import acquire  # noqa: E402

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
    if args.cmd == "run":
        run(args)
    else:
        from report import write  # the tables read what run() keeps; report.py imports this module's settings

        write(args)


if __name__ == "__main__":
    main()
