"""Run lm-evaluation-harness (`pip install lm-eval==0.4.13`) on a model folder, offline, with local tasks.

A task name is local when it names a .jsonl file (a path, or a file in the task dir such as ../shared/eval):
a task YAML over that file (`dataset_path: json`) is written to a temporary folder and given to lm-eval's
TaskManager. Any other name is passed to lm-eval as one of its registered tasks (those usually need the
Hugging Face hub). Local tasks are called `local_<stem>` in lm-eval so that they never shadow its own
`arc_easy`, `piqa`, ...
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from drpruning.evaluation.tasks import FEWSHOT_SEP, TaskError, available_tasks, load_task, resolve_task

INSTALL_HINT = "pip install lm-eval==0.4.13 (or pip install 'drpruning[eval]')"
LOCAL_PREFIX = "local_"
# lm-eval bootstraps the stderr of perplexity (100000 draws by default: minutes on lambada); 1000 is plenty
BOOTSTRAP_ITERS = 1000


def require_lm_eval():
    """Import lm_eval lazily: it is an optional dependency and slow to import."""
    try:
        import lm_eval
    except ImportError as e:
        raise ImportError(f"the lm-eval bridge needs lm-evaluation-harness, which is not installed: "
                          f"{INSTALL_HINT}. ({e})") from None
    return lm_eval


def lm_eval_available() -> bool:
    try:
        require_lm_eval()
    except ImportError:
        return False
    return True


def _metric(name: str, higher_is_better: bool = True, aggregation: str = "mean") -> dict:
    return {"metric": name, "aggregation": aggregation, "higher_is_better": higher_is_better}


def task_config(jsonl_path: str | Path, name: str | None = None) -> dict:
    """An lm-eval task config over one local JSONL file in one of the three shapes (see tasks.py)."""
    path = Path(jsonl_path).resolve()
    shape, _ = load_task(path)
    config = {
        "task": name or LOCAL_PREFIX + path.stem,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(path)}},
        "test_split": "test",
        "fewshot_split": "test",  # lm-eval's sampler leaves the scored item out of its own prompt
        "target_delimiter": " ",
        "fewshot_delimiter": FEWSHOT_SEP,
    }
    if shape == "choice":
        # a plain feature name makes lm-eval read the field as is
        config |= {"output_type": "multiple_choice", "doc_to_text": "query", "doc_to_choice": "choices",
                   "doc_to_target": "gold", "metric_list": [_metric("acc"), _metric("acc_norm")]}
    elif shape == "winogrande":
        # doc_to_text returning an int (the gold option) is lm-eval's "multiple inputs" mode (winogrande)
        config |= {"output_type": "multiple_choice", "doc_to_text": "gold",
                   "doc_to_choice": "context_options", "doc_to_target": "continuation",
                   "metric_list": [_metric("acc")]}
    else:
        config |= {"output_type": "loglikelihood", "doc_to_text": "context",
                   "doc_to_target": "{{' ' + continuation}}",
                   "metric_list": [_metric("perplexity", False, "perplexity"), _metric("acc")]}
    return config


def write_task_yaml(jsonl_path: str | Path, out_dir: str | Path, name: str | None = None) -> str:
    """Write `<name>.yaml` for one JSONL file into out_dir; returns the lm-eval task name."""
    config = task_config(jsonl_path, name)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # JSON is valid YAML and needs no quoting rules for the Jinja template
    (out / f"{config['task']}.yaml").write_text(json.dumps(config, indent=2) + "\n")
    return config["task"]


def _is_local(task: str, task_dir: str | Path | None) -> bool:
    return task.endswith(".jsonl") or "/" in task or task in available_tasks(task_dir)


def _clean_results(raw: dict) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for task, metrics in raw.items():
        clean = {}
        for key, value in metrics.items():
            metric, _, filt = key.partition(",")
            if key == "alias" or (filt and filt != "none"):
                continue
            if isinstance(value, (int, float)):
                clean[metric] = value
            elif metric.endswith("_stderr"):
                clean[metric] = None  # lm-eval writes "N/A" when it did not compute it
        out[task] = clean
    return out


def run_lm_eval(model_dir: str | Path, tasks: list[str] | str, limit: int | None = None, num_fewshot: int = 0,
                batch_size: int = 8, device: str | None = None, task_dir: str | Path | None = None,
                log_samples: bool = False, dtype: str = "auto") -> dict:
    """lm-eval's `simple_evaluate` with `HFLM` on a model folder.

    Returns {"results": {task: {metric: value}}, "tasks": {given name: lm-eval name}} and, with
    log_samples, "samples": {task: [per-item records as lm-eval logs them]}.
    """
    require_lm_eval()
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    if isinstance(tasks, str):
        tasks = [t for t in tasks.split(",") if t]
    if not tasks:
        raise TaskError("no lm-eval tasks given")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory(prefix="drpruning-lm-eval-") as tmp:
        names = {}
        for t in tasks:
            if _is_local(t, task_dir):
                names[t] = write_task_yaml(resolve_task(t, task_dir), tmp)
            else:
                names[t] = t
        out = simple_evaluate(
            model="hf",
            model_args={"pretrained": str(model_dir), "dtype": dtype},
            tasks=list(names.values()),
            task_manager=TaskManager(include_path=tmp),
            num_fewshot=num_fewshot,
            limit=limit,
            batch_size=batch_size,
            device=device,
            log_samples=log_samples,
            bootstrap_iters=BOOTSTRAP_ITERS,
        )
    result = {"results": _clean_results(out["results"]), "tasks": names}
    if log_samples:
        result["samples"] = out.get("samples", {})
    return result
