"""The planner's memory estimate (`drpruning plan`) against the measured peak of a few training steps on CPU.

Each case runs in a fresh subprocess: it runs one step of a tiny model (so that code loaded on first use is
in the baseline), loads the tokenizer and the data, and records its resident memory just before the trainer
loads the model (the baseline: imports, code, tokenizer, data; freed memory handed back first), runs a few steps of
`Trainer.train_step` in float32 (this CPU has no fast bf16), and reports the peak resident memory
(ru_maxrss) minus the baseline, against the plan's peak (weights + gradients + AdamW + activations + logits
+ pruner; with 2 micro-batches per step the gradients coexist with the activations). On CPU the trainer keeps
freed memory in the process heap (training/cpu_memory.py), whose fragmentation adds to the tensors' peak;
`--allocator mmap` measures with glibc's mmap for large blocks instead, where RSS follows the live tensors.

    .venv/bin/python bench/bench_plan.py [--cases small,small-prune,...] [--steps 2] [--allocator both]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rss import rss_bytes

ROOT = Path(__file__).resolve().parents[1]
SMALL = dict(vocab_size=4096, hidden_size=512, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=8,
             num_key_value_heads=4, head_dim=64, max_position_embeddings=512)
SMALL_TARGET = "{num_hidden_layers: 4, hidden_size: 384, num_attention_heads: 4, intermediate_size: 768}"
SMOL_TARGET = "{num_hidden_layers: 24, num_attention_heads: 6, num_key_value_heads: 2, intermediate_size: 1024}"
# name: (model, pruning target or None, activation checkpointing)
CASES = {
    "small": ("small", None, False),
    "small-prune": ("small", SMALL_TARGET, False),
    "small-ckpt": ("small", None, True),
    "small-prune-ckpt": ("small", SMALL_TARGET, True),
    "smollm2": ("smollm2-135m", None, False),
    "smollm2-prune": ("smollm2-135m", SMOL_TARGET, False),
    "smollm2-ckpt": ("smollm2-135m", None, True),
    "smollm2-prune-ckpt": ("smollm2-135m", SMOL_TARGET, True),
}


def overrides(case: str, source: str, run_dir: str, batch: int, micro: int, seq: int, steps: int) -> list[str]:
    _, target, ckpt = CASES[case]
    out = [f"run_dir={run_dir}", f"model.source={source}", "train.dtype=float32", f"train.steps={steps}",
           f"train.batch_size={batch}", f"train.micro_batch_size={micro}", f"data.seq_len={seq}",
           "train.eval_every=1000", "train.checkpoint_every=1000", "mixing.method=constant",
           "data.max_documents=300", f"train.activation_checkpointing={str(ckpt).lower()}"]
    if target is not None:
        out += ["pruning.enabled=true", f"pruning.target={target}", "pruning.init=uniform",
                "pruning.structures=[layer,head,intermediate,hidden]"]
    return out


def child(items: list[str], steps: int, allocator: str) -> dict:
    from drpruning.training import trainer as trainer_module
    from drpruning.training.cpu_memory import keep_freed_memory

    if allocator == "kept":
        keep_freed_memory()  # as the trainer does, but before the baseline so that all of it counts alike
    else:  # glibc's mmap for blocks >= 64 KiB, unmapped when freed: RSS follows the live tensors
        trainer_module.keep_freed_memory = lambda: False
    import torch

    from drpruning.config import load_config
    from drpruning.data import check_sources, load_corpus
    from drpruning.models.loading import load_model_config, load_tokenizer
    from drpruning.plan import setup_of
    from drpruning.plan.estimate import estimate

    torch.set_num_threads(2)
    warm_up()
    cfg = load_config(None, items)
    corpus = load_corpus(cfg.data, load_tokenizer(cfg.model.source), check_sources(cfg.data.domains))
    marks = {}

    def load_model(*args, **kw):
        # hand back the memory freed so far (the kept-freed heap would otherwise hide it in the baseline)
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        marks["baseline"] = rss_bytes()
        return real_load(*args, **kw)

    real_load = trainer_module.load_model
    trainer_module.load_model = load_model
    trainer_module.load_corpus = lambda *a, **k: corpus  # the data is part of the baseline
    tr = trainer_module.Trainer(cfg)
    marks["after_init"] = rss_bytes()
    tr.model.train()
    t0 = time.perf_counter()
    peaks = []
    for _ in range(steps):
        tr.train_step()
        peaks.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - marks["baseline"])
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    config = load_model_config(cfg.model.source)[0]
    mem = estimate(config, setup_of(cfg, config, 1, "cpu"))
    return {"measured": peak - marks["baseline"], "planned_peak": mem.peak, "training_state": mem.training_state,
            "weights": mem.get("weights"), "activations": mem.get("activations"), "logits": mem.get("logits"),
            "loaded": marks["after_init"] - marks["baseline"], "seconds": seconds,
            "per_step": peaks}


def warm_up() -> None:
    """One step of a tiny model first, so that the baseline holds the code (modules imported on first use,
    kernels), not only the imports: else their ~80 MB would count as training memory."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from drpruning.loss import token_losses

    model = AutoModelForCausalLM.from_config(LlamaConfig(**{**SMALL, "num_hidden_layers": 1, "hidden_size": 64,
                                                           "intermediate_size": 96, "num_attention_heads": 2,
                                                           "num_key_value_heads": 1, "head_dim": 32}))
    model.config.use_cache = False
    model.train()
    opt = torch.optim.AdamW(model.parameters())
    token_losses(model, torch.randint(0, 4096, (2, 64)))[0].sum().backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()


def make_small(folder: Path) -> str:
    sys.path.insert(0, str(ROOT / "tests" / "helpers"))
    import torch
    from tiny_models import tiny_tokenizer
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(LlamaConfig(**SMALL)).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return str(folder)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--steps", type=int, default=2, help="the second step is the first with AdamW state")
    ap.add_argument("--allocator", default="kept", choices=["kept", "mmap", "both"],
                    help="kept: the trainer's CPU policy (freed memory stays in the heap); mmap: glibc mmap for "
                         "blocks >= 64 KiB (RSS follows the live tensors); both")
    ap.add_argument("--batch", type=int, default=4, help="sequences per step (2 micro-batches: gradients "
                                                          "coexist with the activations)")
    ap.add_argument("--micro", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--child", nargs="*", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        print("RESULT " + json.dumps(child(args.child, args.steps, args.allocator)))
        return
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-plan-") as tmp:
        small = None
        for case in args.cases.split(","):
            model = CASES[case][0]
            if model == "small" and small is None:
                small = make_small(Path(tmp) / "small")
            source = small if model == "small" else model
            items = overrides(case, source, f"{tmp}/run-{case}", args.batch, args.micro, args.seq, args.steps)
            for allocator in ("kept", "mmap") if args.allocator == "both" else (args.allocator,):
                env = {**os.environ, **({"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
                                        if allocator == "mmap" else {})}
                proc = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--allocator", allocator,
                                       "--child", *items], capture_output=True, text=True, env=env)
                lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
                if proc.returncode or not lines:
                    sys.exit(f"{case} failed:\n{proc.stderr[-3000:]}")
                r = json.loads(lines[-1][7:])
                rows.append((case, allocator, r))
                print(f"{case} {allocator}: {json.dumps(r)}", file=sys.stderr)
    print(f"steps {args.steps}, batch {args.batch} = {args.batch // args.micro} micro-batches of {args.micro} x "
          f"{args.seq} tokens, float32, 1 process; MB = 2^20 bytes\n")
    print("| case | allocator | measured peak - baseline | planned peak | planned / measured | activations "
          "| logits | s/step |")
    print("|---|---|---|---|---|---|---|---|")
    mb = 2**20
    for case, allocator, r in rows:
        print(f"| {case} | {allocator} | {r['measured'] / mb:.0f} | {r['planned_peak'] / mb:.0f} | "
              f"{r['planned_peak'] / r['measured']:.2f} | {r['activations'] / mb:.0f} | {r['logits'] / mb:.0f} | "
              f"{r['seconds'] / args.steps:.1f} |")


if __name__ == "__main__":
    main()
