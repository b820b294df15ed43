"""README.md model cards for exported folders, as `save_pretrained` folders on the hub carry them.

A card says what a user needs before loading the model: where it came from (source model), its shape against
the source's, the recipe (stage, method, steps, tokens, distillation, mixing), the data, and the results known
when it was written: the run's last held-out evaluation and RUN_DIR/downstream.json when present. It is
written from the run's own files (config.yaml's settings, metrics.jsonl), atomically (temp file, then rename).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from drpruning.models.shape import SHAPE_KEYS, parameter_count, source_shape
from drpruning.training.metrics import read_metrics

CARD = "README.md"


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(str(v) for v in r) + " |" for r in rows)]


def _shape_lines(config: Any, source_config: Any | None) -> list[str]:
    shape = source_shape(config)
    keys = [*SHAPE_KEYS, "head_dim"]
    if source_config is None:
        rows = [[k, getattr(shape, k)] for k in keys] + [["parameters", f"{parameter_count(config):,}"]]
        return _table(["", "this model"], rows)
    src = source_shape(source_config)
    rows = [[k, getattr(src, k), getattr(shape, k)] for k in keys]
    rows.append(["parameters", f"{parameter_count(source_config):,}", f"{parameter_count(config):,}"])
    return _table(["", "source", "this model"], rows)


def _recipe_lines(cfg: Any, run_dir: Path) -> list[str]:
    t, p, m = cfg.train, cfg.pruning, cfg.mixing
    lines = []
    shapes = run_dir / "shapes.json"
    if p.enabled and shapes.is_file():
        record = json.loads(shapes.read_text())
        lines.append(f"- shape: the best of {len(record['candidates'])} shapes within {record['band']:.0%} of "
                     f"{record['target_params']:,} parameters, by the held-out loss right after the one-shot cut "
                     "(the run folder's shapes.md)")
    if p.enabled:
        how = {"importance": "one-shot importance cut (Minitron's recipe), then training of the compact model",
               "l0": "learnt hard-concrete (L0) masks, exported at the exact target"}.get(p.method, p.method)
        lines.append(f"- pruning: {how}; structures {', '.join(p.structures)}; head mode {p.head_mode}")
        target = dict(p.target or {})
        lines.append(f"- target: {target or p.target_params}" + (
            f" (budget {p.target_params})" if p.target_params is not None and target else ""))
    else:
        lines.append("- continued pretraining (no pruning)")
    tokens = t.steps * t.batch_size * cfg.data.seq_len
    lines.append(f"- {t.steps} steps x {t.batch_size} sequences x {cfg.data.seq_len} tokens = {tokens:,} tokens; "
                 f"lr {t.lr:g} (warmup {t.warmup_fraction:g}, cosine to {t.min_lr_ratio:g}x), seed {t.seed}")
    if t.distill.weight > 0:
        lines.append(f"- distillation: weight {t.distill.weight:g}, temperature {t.distill.temperature:g}, "
                     f"teacher {t.distill.teacher or cfg.model.source}")
    lines.append(f"- domain mixing: {m.method} (signal {m.signal})")
    return lines


def _data_lines(cfg: Any) -> list[str]:
    domains = cfg.data.domains or {"embedded": "the embedded default corpus"}
    lines = [f"- {name}: `{source}`" for name, source in domains.items()]
    if cfg.data.proportions:
        lines.append(f"- initial proportions: {cfg.data.proportions}")
    lines.append(f"- held-out: {cfg.data.eval_sequences} sequences of {cfg.data.seq_len} tokens a domain, from "
                 "documents kept out of training")
    return lines


def _result_lines(run_dir: Path, step: int | None) -> list[str]:
    evals = [r for r in read_metrics(run_dir / "metrics.jsonl")
             if r.get("kind") == "eval" and (step is None or r["step"] <= step)]
    lines = []
    if evals:
        first, last = evals[0], evals[-1]
        rows = [[d, f"{first['eval_loss'].get(d, float('nan')):.4f}", f"{loss:.4f}"]
                for d, loss in last["eval_loss"].items()]
        rows += [["mean", f"{first['mean_loss']:.4f}", f"{last['mean_loss']:.4f}"],
                 ["worst", f"{first['worst_loss']:.4f}", f"{last['worst_loss']:.4f} ({last['worst_domain']})"]]
        lines += ["Held-out loss (nats per token): the input model before training, and this model at step "
                  f"{last['step']}.", "", *_table(["domain", "input model", "this model"], rows)]
    else:
        lines.append("Held-out loss: not recorded.")
    downstream = run_dir / "downstream.json"
    tasks = json.loads(downstream.read_text()) if downstream.is_file() else {}
    tasks = tasks.get("tasks", tasks) if isinstance(tasks, dict) else {}
    if tasks:
        rows = [[name, *(f"{r[k]:.4f}" if isinstance(r.get(k), (int, float)) else "-" for k in ("acc", "acc_norm"))]
                for name, r in tasks.items()]
        lines += ["", "Downstream tasks (zero-shot):", "", *_table(["task", "acc", "acc_norm"], rows)]
    else:
        lines += ["", "Downstream tasks: not measured (`drpruning eval --model FOLDER --tasks ...`)."]
    return lines


def model_card(model_dir: Path, cfg: Any, run_dir: Path, config: Any, source_config: Any | None = None,
               step: int | None = None) -> str:
    """The card's text for the model of `config` exported from the run in `run_dir` with settings `cfg`, at
    `step` (None: the run's end)."""
    source = cfg.model.source
    arch = (getattr(config, "architectures", None) or [type(config).__name__])[0]
    md = ["---", "library_name: transformers", "tags: [drpruning, pruned]" if cfg.pruning.enabled
          else "tags: [drpruning]", "---", "", f"# {Path(model_dir).name}", "",
          f"{'Structurally pruned' if cfg.pruning.enabled else 'Continued pretraining'} from `{source}` with "
          f"drpruning: a `{arch}` that plain transformers loads (`AutoModelForCausalLM.from_pretrained`).", "",
          "## Shape", "", *_shape_lines(config, source_config), "",
          "## Recipe", "", *_recipe_lines(cfg, Path(run_dir)), "", "## Data", "", *_data_lines(cfg), "",
          "## Results", "", *_result_lines(Path(run_dir), step), ""]
    return "\n".join(md)


def write_model_card(model_dir: str | Path, cfg: Any, run_dir: str | Path, step: int | None = None) -> Path:
    """Write MODEL_DIR/README.md (atomically) for a folder exported from the run in `run_dir` at `step`."""
    from transformers import AutoConfig

    from drpruning.models.loading import ModelSourceError, load_model_config

    model_dir, run_dir = Path(model_dir), Path(run_dir)
    config = AutoConfig.from_pretrained(model_dir)
    try:  # read when the run started; a card without the source column if it has gone since
        source_config = load_model_config(cfg.model.source)[0]
    except (ModelSourceError, OSError):
        source_config = None
    path = model_dir / CARD
    tmp = path.with_name(f".{CARD}.partial")
    tmp.write_text(model_card(model_dir, cfg, run_dir, config, source_config, step))
    os.replace(tmp, path)
    return path
