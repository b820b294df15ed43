"""`drpruning demo`: the embedded default end to end, in minutes on a laptop CPU.

fetch SmolLM2-135M -> prune it to a smaller shape with DRPruning mixing on the embedded corpus -> continue
pretraining the compact model -> evaluate source, pruned and continued models -> report. Each stage that
finished is skipped on a rerun and an interrupted stage resumes from its last checkpoint.
"""

from __future__ import annotations

import json
import logging
from importlib.resources import files
from pathlib import Path

from drpruning.config import load_config
from drpruning.paths import default_task_dir
from drpruning.training.trainer import train

log = logging.getLogger(__name__)
DEMO_TASKS = ["arc_easy", "piqa", "copa"]


def _stage(config: str, run_dir: Path, overrides: list[str]) -> Path:
    model_dir = run_dir / "model"
    if (model_dir / "config.json").is_file():
        log.info("%s: already done, skipping", run_dir)
        return model_dir
    path = files("drpruning.configs") / config
    cfg = load_config(str(path), [f"run_dir={run_dir}", "resume=auto", *overrides])
    return train(cfg)


def _downstream(model_dir: Path, run_dir: Path, limit: int) -> None:
    """Multiple-choice accuracy on a few ../shared/eval tasks, when that folder exists."""
    out = run_dir / "downstream.json"
    task_dir = default_task_dir()
    if out.is_file() or not task_dir.is_dir():
        return
    from drpruning.evaluation import evaluate_model

    results = evaluate_model(str(model_dir), data={}, tasks=DEMO_TASKS, limit=limit, task_dir=str(task_dir))
    out.write_text(json.dumps(results.get("tasks", {}), indent=2) + "\n")


def run_demo(out: Path, quick: bool = False) -> Path:
    from drpruning.models import fetch_model
    from drpruning.report import write_report

    source = fetch_model("smollm2-135m")
    # quick (the smoke test): a few steps of half the batch, 2 held-out sequences per domain, one checkpoint
    # kept at a time (each is ~1.6 GB); 6 steps to the target can leave a model at the uniform-loss level,
    # which it exports anyway (force) to test the machinery
    small = ["train.batch_size=2", "train.micro_batch_size=2", "data.eval_sequences=2", "train.keep_checkpoints=1"]
    shrink = ["train.steps=6", "train.eval_every=3", "train.checkpoint_every=3", "pruning.lagrangian_warmup_steps=2",
              "pruning.calibration_sequences=4", "force=true", *small] if quick else []
    shrink_cpt = ["train.steps=4", "train.eval_every=2", "train.checkpoint_every=2", *small] if quick else []
    pruned = _stage("demo_prune.yaml", out / "prune", [f"model.source={source}", *shrink])
    continued = _stage("demo_cpt.yaml", out / "cpt", [f"model.source={pruned}", *shrink_cpt])
    limit = 10 if quick else 100
    _source_run(out)
    _downstream(source, out / "source", limit)
    _downstream(pruned, out / "prune", limit)
    _downstream(continued, out / "cpt", limit)
    return write_report([out / "source", out / "prune", out / "cpt"], out)


def _source_run(out: Path) -> None:
    """The source model's row in the report: its held-out losses are the pruning run's step-0 evaluation."""
    from drpruning.training.metrics import MetricsLog, read_metrics

    folder = out / "source"
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "metrics.jsonl").is_file():
        first = next(r for r in read_metrics(out / "prune" / "metrics.jsonl") if r["kind"] == "eval")
        MetricsLog(folder / "metrics.jsonl").write(**first)
