"""Downstream multiple-choice tasks scored natively from local JSONL (the three shapes of ../shared/eval).

Prompt and tokenisation follow lm-evaluation-harness, so that zero-shot scores agree with it:
- the continuation is `" " + choice` (lm-eval's default target_delimiter);
- context and continuation are encoded as lm-eval's `_encode_pair` does: trailing spaces of the context move
  to the continuation, `whole = tok(context + continuation)`, `cont = whole[len(tok(context)):]` (the
  tokenizer's default special tokens, e.g. a Llama BOS, are kept as lm-eval keeps them);
- acc_norm is lm-eval's: argmax of log-likelihood / len(choice) in characters (without the delimiter);
  lm-eval's byte-length variant is `acc_bytes`, not reported here.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import torch
from tqdm import tqdm

from drpruning.paths import default_task_dir

SHAPES = {
    "choice": ("query", "choices", "gold"),
    "winogrande": ("context_options", "continuation", "gold"),
    "completion": ("context", "continuation"),
}
SHAPES_HELP = ('accepted JSONL shapes: {"query", "choices", "gold"} (multiple choice), '
               '{"context_options", "continuation", "gold"} (winogrande-style), '
               '{"context", "continuation"} (lambada-style completion)')
DELIMITER = " "
FEWSHOT_SEP = "\n\n"
FEWSHOT_SEED = 1234


class TaskError(ValueError):
    """A task that cannot be found or read; the message says what to give instead."""



def available_tasks(task_dir: str | Path | None = None) -> list[str]:
    d = Path(task_dir) if task_dir else default_task_dir()
    return sorted(p.stem for p in d.glob("*.jsonl")) if d.is_dir() else []


def resolve_task(task: str, task_dir: str | Path | None = None) -> Path:
    """A task name (a .jsonl file in the task dir) or a path to a .jsonl file."""
    if task.endswith(".jsonl") or "/" in task:
        path = Path(task).expanduser()
        if not path.is_file():
            raise TaskError(f"task file {path} does not exist")
        return path
    d = Path(task_dir).expanduser() if task_dir else default_task_dir()
    path = d / f"{task}.jsonl"
    if not path.is_file():
        known = available_tasks(d)
        listing = ", ".join(known) if known else f"none: {d} has no .jsonl files or does not exist"
        raise TaskError(f"unknown task {task!r}: no {path}. Known tasks in {d}: {listing}. "
                        "Give a task name from that folder (--task-dir to change it) or a path to a .jsonl "
                        "file")
    return path


def detect_shape(item: dict, where: str = "item") -> str:
    if not isinstance(item, dict):
        raise TaskError(f"{where} is not a JSON object; {SHAPES_HELP}")
    for shape, keys in SHAPES.items():
        if all(k in item for k in keys):
            return shape
    raise TaskError(f"{where} has keys {sorted(item)}, which match no task shape; {SHAPES_HELP}")


def load_task(path: str | Path) -> tuple[str, list[dict]]:
    """Items of a task file and their shape (all items must share it)."""
    path = Path(path)
    items = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                items.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise TaskError(f"{path}:{i} is not valid JSON ({e.msg})") from None
    if not items:
        raise TaskError(f"{path} has no items")
    shape = detect_shape(items[0], f"{path}:1")
    for i, item in enumerate(items, 1):
        if detect_shape(item, f"{path}:{i}") != shape:
            raise TaskError(f"{path}:{i} has shape {detect_shape(item)!r} but the file starts with {shape!r}")
    return shape, items


def example_text(shape: str, item: dict) -> str:
    """A solved example for a few-shot prompt."""
    if shape == "choice":
        return item["query"] + DELIMITER + item["choices"][item["gold"]]
    if shape == "winogrande":
        return item["context_options"][item["gold"]] + DELIMITER + item["continuation"]
    return item["context"] + DELIMITER + item["continuation"]


def fewshot_prefix(shape: str, items: list[dict], index: int, k: int, seed: int = FEWSHOT_SEED) -> str:
    """k solved examples drawn deterministically (per item) from the other items, each + a blank line."""
    if k <= 0:
        return ""
    if k >= len(items):
        raise TaskError(f"num_fewshot={k} needs more than {k} items; the task has {len(items)}")
    rng = random.Random(f"{seed}:{index}")
    others = [j for j in rng.sample(range(len(items)), k + 1) if j != index][:k]
    return "".join(example_text(shape, items[j]) + FEWSHOT_SEP for j in others)


def item_requests(shape: str, item: dict, prefix: str = "") -> list[tuple[str, str]]:
    """(context, continuation) pairs to score for one item, one per choice."""
    if shape == "choice":
        return [(prefix + item["query"], DELIMITER + c) for c in item["choices"]]
    if shape == "winogrande":
        return [(prefix + c, DELIMITER + item["continuation"]) for c in item["context_options"]]
    return [(prefix + item["context"], DELIMITER + item["continuation"])]


def _ids(tokenizer, text: str, add_special_tokens: bool = True) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of context and continuation, as lm-evaluation-harness encodes them for causal models."""
    if not context:
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        return [prefix], _ids(tokenizer, continuation, add_special_tokens=False)
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = _ids(tokenizer, context + continuation)
    ctx = _ids(tokenizer, context)
    return ctx, whole[len(ctx):]


def model_max_length(model: torch.nn.Module) -> int:
    cfg = model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


@torch.no_grad()
def loglikelihoods(model: torch.nn.Module, tokenizer, requests: list[tuple[str, str]], batch_size: int = 8,
                   max_length: int | None = None, progress: bool = True,
                   desc: str = "scoring") -> list[tuple[float, bool, int]]:
    """Per request: (sum log p(continuation | context), whether greedy decoding gives it, its tokens).

    Contexts too long for the model are cut from the left, as lm-eval does.
    """
    max_length = max_length or model_max_length(model)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    encoded = []
    for ctx_text, cont_text in requests:
        ctx, cont = encode_pair(tokenizer, ctx_text, cont_text)
        if not cont:
            raise TaskError(f"continuation {cont_text!r} encodes to no tokens")
        if len(cont) > max_length:
            raise TaskError(f"continuation of {len(cont)} tokens does not fit the model's {max_length} "
                            "positions")
        inp = (ctx + cont)[-(max_length + 1):][:-1]
        encoded.append((inp, cont))
    # longest first: batches hold similar lengths, so little padding
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    results: list[tuple[float, bool, int] | None] = [None] * len(encoded)
    was_training = model.training
    model.eval()
    try:
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        for batch in tqdm(batches, desc=desc, disable=not progress, unit="batch", dynamic_ncols=True):
            width = len(encoded[batch[0]][0])
            ids = torch.full((len(batch), width), pad, dtype=torch.long)
            for row, i in enumerate(batch):
                inp = encoded[i][0]
                ids[row, :len(inp)] = torch.tensor(inp)
            # right padding and no attention mask: causal attention never lets a real position see the pads
            logits = model(input_ids=ids.to(device)).logits
            for row, i in enumerate(batch):
                inp, cont = encoded[i]
                end = len(inp)
                logp = torch.log_softmax(logits[row, end - len(cont):end].float(), dim=-1)
                target = torch.tensor(cont, device=logp.device)
                ll = float(logp.gather(1, target[:, None]).sum())
                greedy = bool((logp.argmax(-1) == target).all())
                results[i] = (ll, greedy, len(cont))
    finally:
        model.train(was_training)
    return results  # type: ignore[return-value]


def _stderr(values: list[float]) -> float:
    n = len(values)
    if n < 2:
        return float("nan")
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def score_task(model: torch.nn.Module, tokenizer, task: str, limit: int | None = None, num_fewshot: int = 0,
               batch_size: int = 8, task_dir: str | Path | None = None, progress: bool = True,
               keep_items: bool = False, seed: int = FEWSHOT_SEED) -> dict:
    """Score one task (name in task_dir or .jsonl path).

    choice: acc, acc_norm; winogrande: acc; completion: acc (greedy continuation equals the target) and ppl
    (lm-eval's lambada perplexity: exp of minus the mean per-item log-likelihood) and token_ppl.
    """
    path = resolve_task(task, task_dir)
    shape, items = load_task(path)
    n = len(items) if limit is None else min(limit, len(items))
    requests, spans = [], []
    for i in range(n):
        reqs = item_requests(shape, items[i], fewshot_prefix(shape, items, i, num_fewshot, seed))
        spans.append((len(requests), len(requests) + len(reqs)))
        requests.extend(reqs)
    scored = loglikelihoods(model, tokenizer, requests, batch_size, progress=progress, desc=Path(task).stem)
    acc, acc_norm, per_item = [], [], []
    for i, (a, b) in enumerate(spans):
        item, lls = items[i], [s[0] for s in scored[a:b]]
        if shape == "completion":
            acc.append(float(scored[a][1]))
        else:
            gold = item["gold"]
            acc.append(float(max(range(len(lls)), key=lambda j: lls[j]) == gold))
            if shape == "choice":
                norm = [ll / len(c) for ll, c in zip(lls, item["choices"], strict=True)]
                acc_norm.append(float(max(range(len(norm)), key=lambda j: norm[j]) == gold))
        if keep_items:
            per_item.append({"loglikelihoods": lls, "greedy": [s[1] for s in scored[a:b]], "correct": acc[-1]})
    result = {"task": Path(task).stem, "path": str(path), "shape": shape, "n": n, "num_fewshot": num_fewshot,
              "acc": sum(acc) / n, "acc_stderr": _stderr(acc)}
    if acc_norm:
        result["acc_norm"] = sum(acc_norm) / n
        result["acc_norm_stderr"] = _stderr(acc_norm)
    if shape == "completion":
        lls = [s[0] for s in scored]
        result["ppl"] = math.exp(-sum(lls) / n)
        result["token_ppl"] = math.exp(-sum(lls) / sum(s[2] for s in scored))
    if keep_items:
        result["items"] = per_item
    return result


def evaluate_tasks(model: torch.nn.Module, tokenizer, tasks: list[str], limit: int | None = None,
                   num_fewshot: int = 0, batch_size: int = 8, task_dir: str | Path | None = None,
                   progress: bool = True) -> dict[str, dict]:
    # resolve every name first: a typo in the last task should fail before minutes of scoring
    for t in tasks:
        resolve_task(t, task_dir)
    return {Path(t).stem: score_task(model, tokenizer, t, limit, num_fewshot, batch_size, task_dir, progress)
            for t in tasks}
