"""The shared study runner: a study is a folder with `study.yaml` (its stage configs, arms and seeds) and a
`table.py` (its tables, from committed results); this runs the arms, resumably, and keeps what they leave.

    .venv/bin/python experiments/runner.py run STUDY [--arms A B] [--seeds 0 1]   # resumable; skips finished
    .venv/bin/python experiments/runner.py status STUDY                            # what is finished
    .venv/bin/python experiments/table.py STUDY                                   # the study's tables

Run it in the background, one process per core (each takes whatever unit no live process owns):

    nohup nice -n 10 .venv/bin/python experiments/runner.py run experiments/STUDY > runs/STUDY.log 2>&1 &

study.yaml:
    base: base.yaml                      # run config every stage starts from (beside study.yaml)
    source: smollm2-135m                 # the model the first stage reads (and the default teacher)
    seeds: [0, 1]
    seeds_for: {NAME: [0, 1, 2]}         # optional: an arm's own seeds (a third where two arms are close)
    arms:
      NAME:                              # stages run in order, each from the previous stage's model
        - {stage: mask, overrides: [pruning.method=l0, train.steps=150]}
        - {stage: train, overrides: [pruning.enabled=false, train.steps=850]}
        # a stage may start from its own config instead of base (a path beside study.yaml); the held-out
        # evaluation always reads the base config's data
        - {stage: cpt, config: ../../src/drpruning/configs/demo_cpt.yaml, overrides: [train.steps=60]}
    tasks:                               # optional: downstream tasks of the last stage's model (tasks.json)
      dir: ../../../shared/eval          # task folder, relative to study.yaml
      names: [arc_easy, piqa]
      items: 100                         # the first N items of each task
      items_for: {drpruning: 300}        # per-arm overrides

A unit (arm, seed) works in runs/STUDY/ARM/seed-K/STAGE/ (checkpoints, models: not committed). A stage whose
model exists is skipped, one with checkpoints resumes (resume=true, exact), and one whose whole config (run
directory aside) equals a finished stage's of another unit copies that stage's model and metrics. Each stage's
model is evaluated on the whole held-out split (STAGE/heldout.json; the same documents for every arm: the split
depends on the data keys only). When the last stage is done, each stage's metrics.jsonl (gzipped) and held-out
losses are copied into STUDY/results/ARM/seed-K/, which is committed: tables regenerate from it on any checkout.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "runs"  # working folders (checkpoints, models), never committed
log = logging.getLogger("runner")


def load_study(study: Path) -> dict[str, Any]:
    from omegaconf import OmegaConf

    spec = OmegaConf.to_container(OmegaConf.load(study / "study.yaml"), resolve=True)
    for key in ("base", "source", "seeds", "arms"):
        if key not in spec:
            raise SystemExit(f"{study / 'study.yaml'}: key {key!r} is missing (see experiments/runner.py)")
    unknown = set(spec.get("seeds_for", {})) - set(spec["arms"])
    if unknown:
        raise SystemExit(f"{study / 'study.yaml'}: seeds_for names arms it does not have: {sorted(unknown)}")
    spec["dir"], spec["name"] = study, study.name
    return spec


def work_dir(spec: dict, arm: str, seed: int) -> Path:
    return RUNS / spec["name"] / arm / f"seed-{seed}"


def results_dir(spec: dict, arm: str, seed: int) -> Path:
    return spec["dir"] / "results" / arm / f"seed-{seed}"


def set_threads() -> None:
    """One thread per process (several processes share the cores); RUNNER_THREADS overrides it."""
    import torch

    torch.set_num_threads(int(os.environ.get("RUNNER_THREADS", "1")))


def run_stage(spec: dict, run_dir: Path, source: str, seed: int, overrides: list[str],
              config: str | None = None) -> Path:
    """One `train` run of the stage's config (default: the base config); skipped when RUN_DIR/model exists,
    resumed from its checkpoints."""
    from drpruning.config import load_config
    from drpruning.training.trainer import train

    model_dir = run_dir / "model"
    if (model_dir / "config.json").is_file():
        return model_dir
    resume = (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir())
    cfg = load_config(str(spec["dir"] / (config or spec["base"])),
                      [f"run_dir={run_dir}", f"resume={str(resume).lower()}", f"model.source={source}",
                       f"train.seed={seed}", f"train.distill.teacher={spec['source']}", *overrides])
    if not resume and (done := same_stage(spec, run_dir, cfg)):
        return copy_stage(done, run_dir, cfg)
    log.info("%s: %s", run_dir, "resuming" if resume else "starting")
    out = train(cfg)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # the model is exported; checkpoints are large
    return out


def settings(cfg: Any) -> dict:
    """A run config as plain data, less where it runs and whether it resumed."""
    from omegaconf import OmegaConf

    data = OmegaConf.to_container(OmegaConf.create(OmegaConf.to_yaml(cfg)))
    return {k: v for k, v in data.items() if k not in ("run_dir", "resume")}


def same_stage(spec: dict, run_dir: Path, cfg: Any) -> Path | None:
    """A finished stage of another unit (its held-out losses written) that ran this stage's config, if any: a
    run is deterministic given its config on one machine, so running it again would only repeat it."""
    from omegaconf import OmegaConf

    mine = settings(OmegaConf.structured(cfg))
    schema = OmegaConf.structured(type(cfg))  # a key added since a stage ran has its default there
    for saved in sorted((RUNS / spec["name"]).glob("*/seed-*/*/config.yaml")):
        other = saved.parent
        if other != run_dir and (other / "heldout.json").is_file() and (other / "model" / "config.json").is_file() \
                and settings(OmegaConf.merge(schema, OmegaConf.load(saved))) == mine:
            return other
    return None


def copy_stage(done: Path, run_dir: Path, cfg: Any) -> Path:
    """This stage's config, metrics and model, copied from `done`; the model last, as it marks the stage done
    (the held-out losses are evaluated again)."""
    from drpruning.config import save_config

    log.info("%s: the same config as %s, which is finished: copying its model and metrics", run_dir, done)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    shutil.copy2(done / "metrics.jsonl", run_dir / "metrics.jsonl.tmp")
    os.replace(run_dir / "metrics.jsonl.tmp", run_dir / "metrics.jsonl")
    tmp = run_dir / "model.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(done / "model", tmp)
    os.replace(tmp, run_dir / "model")
    return run_dir / "model"


def heldout(spec: dict, model_dir: Path, out: Path, extra: dict) -> None:
    """Per-domain loss and standard error of a model on every held-out sequence of the base config's split,
    with `extra` (the table's parameter counts) in the same file."""
    if out.is_file():
        return
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from drpruning.config import load_config
    from drpruning.data.corpus import load_corpus
    from drpruning.evaluation.perplexity import domain_losses
    from drpruning.loss import autocast_dtype

    # only the data section is read: pruning off, so that a base whose target is set per arm still loads
    data = load_config(str(spec["dir"] / spec["base"]), [f"run_dir={out.parent}", "pruning.enabled=false"]).data
    start = time.perf_counter()
    corpus = load_corpus(data, AutoTokenizer.from_pretrained(model_dir))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    amp = autocast_dtype("auto", torch.device("cpu"))
    result = {"model": str(model_dir), "domains": domain_losses(model, corpus.eval_dict(), 16, amp),
              "wall_s": time.perf_counter() - start, "train_tokens": dict(zip(corpus.names, corpus.train_tokens)),
              **extra}
    write_json(out, result)


def downstream(spec: dict, arm: str, model_dir: Path, out: Path) -> None:
    """The study's `tasks` through the project's scorer: accuracy, its standard error and each item's
    correctness (for differences paired by item), on the first `items` items (`items_for` overrides per arm)."""
    tasks = spec.get("tasks")
    if not tasks or out.is_file():
        return
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from drpruning.evaluation.tasks import score_task
    from drpruning.loss import autocast, autocast_dtype

    limit = tasks.get("items_for", {}).get(arm, tasks["items"])
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    task_dir = (spec["dir"] / tasks["dir"]).resolve()
    result, start = {}, time.perf_counter()
    with torch.no_grad(), autocast(torch.device("cpu"), autocast_dtype("auto", torch.device("cpu"))):
        for name in tasks["names"]:
            r = score_task(model, tokenizer, name, limit, task_dir=task_dir, progress=False, keep_items=True)
            r["correct"] = [item["correct"] for item in r.pop("items")]
            result[name] = r
    result["wall_s"] = time.perf_counter() - start
    write_json(out, result)


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def acquire(base: Path) -> bool:
    """Own one unit, so that several processes can share the work list (a dead owner's unit is taken over)."""
    base.mkdir(parents=True, exist_ok=True)
    path = base / "owner.pid"
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            pid = int(path.read_text().strip() or 0)
            os.kill(pid, 0)
            if pid != os.getpid():
                return False
        except (ValueError, ProcessLookupError, FileNotFoundError):
            pass
        fd = os.open(path, os.O_CREAT | os.O_TRUNC | os.O_WRONLY)
    os.write(fd, f"{os.getpid()}\n".encode())
    os.close(fd)
    return True


def keep(spec: dict, arm: str, seed: int) -> None:
    """Copy a finished unit's metrics (gzipped) and held-out losses into its results folder, all or nothing."""
    base, dest = work_dir(spec, arm, seed), results_dir(spec, arm, seed)
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for stage in (s["stage"] for s in spec["arms"][arm]):
        with open(base / stage / "metrics.jsonl", "rb") as src, open(tmp / f"{stage}.metrics.jsonl.gz", "wb") as raw, \
                gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as out:  # no time stamp: the same bytes every time
            shutil.copyfileobj(src, out)
        shutil.copy2(base / stage / "heldout.json", tmp / f"{stage}.heldout.json")
    if (base / "tasks.json").is_file():
        shutil.copy2(base / "tasks.json", tmp / "tasks.json")
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    log.info("%s %s seed %d: results kept in %s", spec["name"], arm, seed, dest)


def parameters(source: str) -> int:
    """Parameters of a model folder (or known model name), from its safetensors headers: nothing is loaded."""
    from safetensors import safe_open

    from drpruning.models.loading import resolve_model_source

    folder = Path(resolve_model_source(source)[0])
    total = 0
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            total += sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())
    return total


def run_unit(spec: dict, arm: str, seed: int) -> None:
    base = work_dir(spec, arm, seed)
    model, teacher = spec["source"], parameters(spec["source"])
    for stage in spec["arms"][arm]:
        run_dir, given = base / stage["stage"], model
        model = str(run_stage(spec, run_dir, model, seed, list(stage.get("overrides", [])), stage.get("config")))
        # for the table's FLOPs: the stage's input and output models and the teacher (the source)
        counts = {"input_params": parameters(given), "params": parameters(model), "teacher_params": teacher}
        heldout(spec, Path(model), run_dir / "heldout.json", counts)
    downstream(spec, arm, Path(model), base / "tasks.json")
    keep(spec, arm, seed)


def arm_seeds(spec: dict, arm: str) -> list[int]:
    """The study's seeds, or the arm's own in `seeds_for`."""
    return list(spec.get("seeds_for", {}).get(arm, spec["seeds"]))


def units(spec: dict, arms: list[str] | None, seeds: list[int] | None) -> list[tuple[str, int]]:
    """Seed by seed, so that a partial study still covers every arm; `seeds` given: those, for every arm."""
    chosen = arms or list(spec["arms"])
    unknown = set(chosen) - set(spec["arms"])
    if unknown:
        raise SystemExit(f"unknown arms {sorted(unknown)}; the study has {', '.join(spec['arms'])}")
    every = sorted({s for a in chosen for s in arm_seeds(spec, a)})
    return [(a, s) for s in (seeds or every) for a in chosen if seeds or s in arm_seeds(spec, a)]


def finished(spec: dict, arm: str, seed: int) -> bool:
    return results_dir(spec, arm, seed).is_dir()  # keep() renames it into place complete


def run(spec: dict, arms: list[str] | None, seeds: list[int] | None) -> None:
    set_threads()
    for arm, seed in units(spec, arms, seeds):
        if finished(spec, arm, seed) or not acquire(work_dir(spec, arm, seed)):
            continue
        run_unit(spec, arm, seed)


def read_metrics(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def status(spec: dict) -> None:
    for arm, seed in units(spec, None, None):
        base = work_dir(spec, arm, seed)
        state = "finished" if finished(spec, arm, seed) else "running or stopped" if base.is_dir() else "not started"
        print(f"{arm:32s} seed {seed}: {state}")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["run", "status"])
    ap.add_argument("study", type=Path)
    ap.add_argument("--arms", nargs="+")
    ap.add_argument("--seeds", nargs="+", type=int)
    args = ap.parse_args()
    spec = load_study(args.study.resolve())
    os.chdir(ROOT)  # data paths in the study configs are relative to the repository root
    if args.command == "run":
        run(spec, args.arms, args.seeds)
    else:
        status(spec)


if __name__ == "__main__":
    main()
