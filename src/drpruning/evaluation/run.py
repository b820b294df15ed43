"""`drpruning eval`: load a model folder, score perplexity on text and multiple-choice tasks, print tables.

`evaluate_model` returns JSON-able results that `format_table` prints.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from drpruning.data.documents import check_source, read_documents
from drpruning.data.packing import pack
from drpruning.evaluation.perplexity import domain_losses, summarize
from drpruning.evaluation.tasks import evaluate_tasks


def resolve_model_dir(source: str | Path) -> Path:
    """The local Hugging Face folder of a model source (folder, run directory, known name, cached hub id)."""
    from drpruning.models.loading import ModelSourceError, resolve_model_source

    path, kwargs = resolve_model_source(str(source))
    if kwargs or not (Path(path) / "config.json").is_file():
        raise ModelSourceError(f"model {source!r} is not a local Hugging Face folder (a .gguf file or a hub id "
                               "not in the local cache): convert it with save_pretrained, or pass a folder")
    return Path(path)


def evaluate(model: torch.nn.Module, tokenizer, data: dict[str, str | Path] | None = None,
             tasks: list[str] | None = None, seq_len: int = 512, max_sequences: int | None = 64,
             limit: int | None = None, num_fewshot: int = 0, batch_size: int = 8,
             task_dir: str | Path | None = None, dtype: torch.dtype | None = None,
             progress: bool = True) -> dict:
    """Perplexity / bits per byte on text files (name -> path) and native task accuracy, on a loaded model."""
    results: dict = {}
    if data:
        seqs, n_bytes, n_chars = {}, {}, {}
        for name, path in data.items():
            check_source(path, f"--data {name}")
            packed = pack(tokenizer, read_documents(path), seq_len, max_sequences, count_text=True)
            seqs[name], n_bytes[name], n_chars[name] = packed.sequences, packed.n_bytes, packed.n_chars
            if len(seqs[name]) == 0:
                raise ValueError(f"--data {name}={path}: too little text for one sequence of {seq_len} "
                                 "tokens; add text or lower --seq-len")
        results["perplexity"] = summarize(domain_losses(model, seqs, batch_size, dtype), n_bytes, n_chars)
    if tasks:
        results["tasks"] = evaluate_tasks(model, tokenizer, tasks, limit, num_fewshot, batch_size, task_dir,
                                          progress)
    return results


def evaluate_model(model_dir: str | Path, data: dict[str, str | Path] | None = None,
                   tasks: list[str] | None = None, seq_len: int = 512, max_sequences: int | None = 64,
                   limit: int | None = None, num_fewshot: int = 0, batch_size: int = 8,
                   lm_eval_tasks: list[str] | str | None = None, task_dir: str | Path | None = None,
                   device: str | None = None) -> dict:
    """Load a model (any source `drpruning train` accepts: folder, run directory, .gguf, known name, hub id)
    and evaluate it; lm-eval tasks run through the bridge, on a local folder."""
    from drpruning.models.loading import load_model, resolve_model_source

    source = str(model_dir)
    path, _ = resolve_model_source(source)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        from drpruning.training.cpu_memory import keep_freed_memory

        keep_freed_memory()
    # bf16 weights on a GPU; float32 on CPU, where bf16 matmuls are slow and less exact
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    results: dict = {"model": path}
    if data:  # bad data fails before the model loads
        for name, where in data.items():
            check_source(where, f"--data {name}")
    if data or tasks:
        model, tokenizer = load_model(source, dtype=dtype)
        model = model.to(device).eval()
        results |= evaluate(model, tokenizer, data, tasks, seq_len, max_sequences, limit, num_fewshot,
                            batch_size, task_dir)
        del model
    if lm_eval_tasks:
        from drpruning.evaluation.lm_eval_bridge import run_lm_eval

        results["lm_eval"] = run_lm_eval(resolve_model_dir(source), lm_eval_tasks, limit, num_fewshot,
                                         batch_size, device, task_dir)["results"]
    return results


def _fmt(value, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _table(header: list[str], rows: list[list]) -> str:
    cells = [header] + [[_fmt(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def format_table(results: dict) -> str:
    """Plain-text tables of evaluate_model's results."""
    parts = []
    if "model" in results:
        parts.append(f"model: {results['model']}")
    ppl = results.get("perplexity")
    if ppl:
        rows = [[n, d["loss"], d["ppl"], d.get("bpb"), d["tokens"]] for n, d in ppl["domains"].items()]
        rows.append(["mean", ppl["mean_loss"], ppl["mean_ppl"], ppl.get("mean_bpb"), None])
        parts.append(_table(["domain", "loss", "ppl", "bpb", "tokens"], rows))
        parts.append(f"worst domain: {ppl['worst_domain']} (loss {ppl['worst_loss']:.4f})")
    tasks = results.get("tasks")
    if tasks:
        rows = [[n, r["n"], r["acc"], r.get("acc_norm"), r.get("ppl")] for n, r in tasks.items()]
        parts.append(_table(["task", "n", "acc", "acc_norm", "ppl"], rows))
    lm = results.get("lm_eval")
    if lm:
        metrics = sorted({m for r in lm.values() for m in r if not m.endswith("_stderr")})
        rows = [[t] + [r.get(m) for m in metrics] for t, r in lm.items()]
        parts.append("lm-evaluation-harness:\n" + _table(["task"] + metrics, rows))
    return "\n\n".join(parts)
