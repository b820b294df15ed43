"""Pruning-step cost and export speed-up, side by side, on one machine in one run.

    .venv/bin/python bench/bench_pruning.py --model /path/to/hf_folder [--batch 4 --seq 256 --steps 3]
        [--dtype bfloat16|float32]

Rows:
- plain training step: forward + CE, backward, AdamW step (weights fp32, --dtype autocast; float32: none);
- pruning step, for each `pruning.mask_samples`: the same with masks attached (a fresh sample every forward:
  one per sequence, applied to the activations, or one per micro-batch, folded into the weights), the
  Lagrangian penalty added, the mask/multiplier optimizer stepped and clamp_() called;
- inference of the source model and of a model exported at the target shape (forward only, no grad).

Speed: plain and pruning steps alternate on the same model in one process (the same machine load for
both; median of --steps each, after a warm-up round).
Memory: each training variant runs one step in its own subprocess, so the two cannot share allocator
state. On CUDA the figure is torch.cuda.max_memory_allocated; on CPU it is the growth of the process's
peak RSS (VmHWM, reset just before the first training step) over the RSS at that moment: gradients,
optimizer state, activations and allocator overhead, without the weights loaded before (the same in both).
On a CPU every child first applies the trainer's allocator setting (`drpruning.training.cpu_memory`: freed memory stays
in the heap); `--default-malloc` measures with glibc's default instead.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from rss import MB, peak_rss_bytes, reset_peak_rss, rss_bytes


def load(source: str, device: str):
    from transformers import AutoModelForCausalLM

    if Path(source).is_dir():
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    else:
        from drpruning.models import load_model

        model, _ = load_model(source, torch.float32)
    return model.to(device)


MASK_SAMPLES = ("sequence", "micro_batch")


def pruning_cfg(target_params: str, **options):
    from drpruning.config import PruningConfig

    return PruningConfig(enabled=True, target_params=target_params, **options)


def autocast(args):
    dtype = getattr(torch, args.dtype)
    return torch.autocast(args.device.split(":")[0], dtype=dtype, enabled=dtype != torch.float32)


def make_step(model, pruner, opts, ids, args):
    """One optimizer step; with `pruner` the masks are attached, the penalty added and clamp_() called."""

    def step(i: int) -> None:
        with autocast(args):
            loss = model(ids[:, :-1], labels=ids[:, 1:]).loss
            if pruner is not None:
                loss = loss + pruner.penalty(i)[0]
        loss.backward()
        for o in opts:
            o.step()
            o.zero_grad(set_to_none=True)
        if pruner is not None:
            pruner.clamp_()

    return step


def make_pruner(model, args, mask_samples: str):
    from drpruning.pruning import Pruner

    cfg = pruning_cfg(args.target_params, mask_samples=mask_samples)
    pruner = Pruner(model.config, cfg, total_steps=100, device=args.device)
    pruner.seed(0)
    return pruner, torch.optim.AdamW(pruner.optimizer_groups(), betas=(0.9, 0.95))


def setup(args):
    torch.manual_seed(0)
    model = load(args.model, args.device).train()
    weights = torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.0)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq + 1), device=args.device)
    return model, weights, ids


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def memory_variant(args) -> dict:
    """Peak memory of one training step of one variant (own process: no shared allocator state)."""
    model, weights, ids = setup(args)
    pruner = masks_opt = None
    if args.variant != "plain":
        from drpruning.pruning import attach

        pruner, masks_opt = make_pruner(model, args, args.variant)
        attach(model, pruner)
        pruner.train()
    step = make_step(model, pruner, [weights] + ([masks_opt] if masks_opt else []), ids, args)
    before = rss_bytes() / MB
    reset_peak_rss()
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    step(0)  # the first step also allocates gradients and optimizer state: the peak
    sync(args.device)
    cuda = args.device.startswith("cuda")
    mem = torch.cuda.max_memory_allocated() / MB if cuda else peak_rss_bytes() / MB - before
    return {"memory_mb": mem}


def timing(args) -> dict:
    """Plain and pruning steps alternated on one model, so all see the same machine load; median per step."""
    from drpruning.pruning import attach

    model, weights, ids = setup(args)
    steps = {"plain": (make_step(model, None, [weights], ids, args), None)}
    for mode in MASK_SAMPLES:
        pruner, masks_opt = make_pruner(model, args, mode)
        steps[mode] = (make_step(model, pruner, [weights, masks_opt], ids, args), pruner)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(args.steps + 1):  # the first round warms up
        for name, (fn, pruner) in steps.items():
            if pruner is not None:
                masked = attach(model, pruner)
                pruner.train()
            sync(args.device)
            t0 = time.perf_counter()
            fn(i)
            sync(args.device)
            if i:
                times[name].append(time.perf_counter() - t0)
            if pruner is not None:
                masked.detach()
    tokens = args.batch * args.seq
    return {k: tokens / statistics.median(v) for k, v in times.items()}


def forward_seconds(model, ids, device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    model(ids, use_cache=False)  # throughput of the forward itself, no KV-cache bookkeeping
    sync(device)
    return time.perf_counter() - t0


def export_variant(args) -> dict:
    """Export at the target (random masks: which units are kept does not change the speed), then time
    source and exported forwards alternately."""
    from transformers import AutoModelForCausalLM

    from drpruning.models import parameter_count
    from drpruning.pruning import Pruner, export_model

    model = load(args.model, args.device).eval()
    pruner = Pruner(model.config, pruning_cfg(args.target_params), total_steps=100, device=args.device)
    with torch.no_grad():
        for p in pruner.log_alpha.values():
            p.normal_(0.0, 2.0)
    with tempfile.TemporaryDirectory() as d:
        small = AutoModelForCausalLM.from_pretrained(export_model(model, pruner, d)).to(args.device).eval()
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), device=args.device)
    times: dict[str, list[float]] = {"source": [], "exported": []}
    with torch.no_grad(), autocast(args):
        for i in range(args.steps + 1):
            for name, m in (("source", model), ("exported", small)):
                dt = forward_seconds(m, ids, args.device)
                if i:
                    times[name].append(dt)
    tokens = args.batch * args.seq
    return {
        "source_tokens_per_s": tokens / statistics.median(times["source"]),
        "exported_tokens_per_s": tokens / statistics.median(times["exported"]),
        "source_params": parameter_count(model.config),
        "exported_params": parameter_count(small.config),
        "shape": pruner.target.as_dict(),
    }


def child(args, variant: str) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        variant,
        "--model",
        args.model,
        "--batch",
        str(args.batch),
        "--seq",
        str(args.seq),
        "--steps",
        str(args.steps),
        "--device",
        args.device,
        "--target-params",
        args.target_params,
        "--threads",
        str(args.threads),
        "--dtype",
        args.dtype,
        *(["--default-malloc"] if args.default_malloc else []),
    ]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="HF folder, or a name/hub id drpruning can load")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3, help="timed steps (median) after one warm-up step")
    ap.add_argument("--target-params", default="60M", help="target for the pruning step and the export")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                    help="autocast dtype (float32: no autocast; for CPUs without native bf16)")
    ap.add_argument("--default-malloc", action="store_true",
                    help="CPU: keep glibc's default malloc (the trainer stops it returning memory to the OS)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        if args.device == "cpu" and not args.default_malloc:
            from drpruning.training.cpu_memory import keep_freed_memory

            keep_freed_memory()  # as the trainer does on a CPU
        args.variant = args.child
        run = {"export": export_variant, "timing": timing}.get(args.child, memory_variant)
        result = run(args)
        print(json.dumps(result))
        return
    speed = child(args, "timing")
    variants = {name: child(args, name) for name in ("plain", *MASK_SAMPLES)}
    for name, v in variants.items():
        v["tokens_per_s"] = speed[name]
    exp = child(args, "export")
    mem_kind = "max allocated" if args.device.startswith("cuda") else "peak RSS growth"
    print(
        f"model {args.model}, batch {args.batch}x{args.seq}, {args.steps} timed steps, {args.dtype} autocast, "
        f"device {args.device}, threads {torch.get_num_threads()}, target {args.target_params}, "
        f"{'default' if args.default_malloc else 'kept-heap'} malloc "
        f"-> {exp['shape']}\n"
    )
    plain = variants["plain"]
    print("| measure | plain | pruning / exported | ratio |\n|---|---|---|---|")
    for mode in MASK_SAMPLES:
        prune = variants[mode]
        print(f"| training tokens/s, masks per {mode} | {plain['tokens_per_s']:.0f} | {prune['tokens_per_s']:.0f} | "
              f"{prune['tokens_per_s'] / plain['tokens_per_s']:.2f} |")
        print(f"| training memory, MiB ({mem_kind}), masks per {mode} | {plain['memory_mb']:.0f} | "
              f"{prune['memory_mb']:.0f} | {prune['memory_mb'] / plain['memory_mb']:.2f} |")
    print(
        f"| inference tokens/s (source vs exported) | {exp['source_tokens_per_s']:.0f} | "
        f"{exp['exported_tokens_per_s']:.0f} | {exp['exported_tokens_per_s'] / exp['source_tokens_per_s']:.2f} |"
    )
    print(
        f"| parameters | {exp['source_params']:,} | {exp['exported_params']:,} | "
        f"{exp['exported_params'] / exp['source_params']:.2f} |"
    )


if __name__ == "__main__":
    main()
