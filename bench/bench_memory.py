"""Activation memory with and without `train.activation_checkpointing`, and the cross-entropy's peak memory.

    .venv/bin/python bench/bench_memory.py [--model smollm2-135m --batch 2 --seq 1024 --steps 3]
    .venv/bin/python bench/bench_memory.py --only ce [--ce-batch 4 --ce-seq 1024 --vocab 151936]

(a) Activation checkpointing, float32 weights and compute, plain model and with pruning masks attached:
- saved for backward: one forward under torch.autograd.graph.saved_tensors_hooks, summing the bytes of the
  unique storages saved (parameters excluded), split into what the decoder layers save (attributed by
  forward pre/post hooks; with checkpointing, each layer's input) and the rest (embeddings, final norm,
  logits). Exact and independent of the allocator, so all four variants run in one process;
- peak memory of one training step (forward, cross-entropy, backward, AdamW step): each variant in its own
  subprocess; on CPU the growth of the peak RSS (VmHWM, reset just before the step) over the RSS at that
  moment, with the trainer's allocator setting (`drpruning.training.cpu_memory`), on CUDA
  torch.cuda.max_memory_allocated;
- step time: checkpointing off and on alternate on the same model in one process (same machine load for
  both), median of --steps after a warm-up round; the ratio is the point on a shared machine.
(b) Cross-entropy of bf16 logits [ce-batch, ce-seq + 1, vocab] against ce-seq targets per sequence, as
`token_losses` computes it: the old path (F.cross_entropy on `logits[:, :-1].float()`) against
`drpruning.loss.nll_from_logits` (chunks of CHUNK_ROWS tokens). Each in its own subprocess with glibc's
default malloc (blocks this large are mmap()ed and returned on free, so RSS follows the live bytes): peak RSS
growth over the RSS with the logits allocated, during forward and during backward, and what forward keeps.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch
from rss import peak_rss_bytes, reset_peak_rss, rss_bytes

GB = 1e9


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- (a) activation checkpointing
def setup(args, masks: bool):
    """The model in train mode, float32, its AdamW (and the masks' with `masks`), and a fixed batch."""
    from drpruning.config import PruningConfig
    from drpruning.models.loading import load_model
    from drpruning.pruning import Pruner, attach

    torch.manual_seed(0)
    model, _ = load_model(args.model, torch.float32)
    model = model.to(args.device).train()
    model.config.use_cache = False
    opts = [torch.optim.AdamW(model.parameters(), lr=1e-5, betas=(0.9, 0.95))]
    pruner = handle = None
    if masks:
        pruner = Pruner(model.config, PruningConfig(enabled=True, target_params="60M"), 100, args.device)
        pruner.seed(0)
        handle = attach(model, pruner)
        pruner.train()
        opts.append(torch.optim.AdamW(pruner.optimizer_groups(), betas=(0.9, 0.95)))
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), device=args.device,
                        generator=torch.Generator(args.device).manual_seed(0))
    return model, pruner, handle, opts, ids


def set_checkpointing(model, on: bool) -> None:
    from drpruning.training.parallel import enable_activation_checkpointing

    if on:
        enable_activation_checkpointing(model)
    else:
        model.activation_checkpointing_disable()


def train_step(model, pruner, opts, ids, step: int) -> None:
    from drpruning.loss import token_losses

    nll, _ = token_losses(model, ids)
    loss = nll.mean() + (pruner.penalty(step)[0] if pruner is not None else 0.0)
    loss.backward()
    for o in opts:
        o.step()
        o.zero_grad(set_to_none=True)
    if pruner is not None:
        pruner.clamp_()


def saved_by_forward(model, layers, ids, exclude: set[int]) -> tuple[int, int]:
    """(all, in the decoder layers): bytes of the unique storages one forward saves for backward."""
    from drpruning.loss import token_losses

    saved: dict[int, tuple[int, bool]] = {}
    where = {"layer": False}
    hooks = [h for layer in layers for h in (
        layer.register_forward_pre_hook(lambda *_: where.update(layer=True)),
        layer.register_forward_hook(lambda *_: where.update(layer=False)))]

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in exclude and s.data_ptr() not in saved:
            saved[s.data_ptr()] = (s.nbytes(), where["layer"])
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            nll, _ = token_losses(model, ids)
        del nll  # the graph and what it saved go with it
    finally:
        for h in hooks:
            h.remove()
    return sum(b for b, _ in saved.values()), sum(b for b, inside in saved.values() if inside)


def saved_variant(args) -> dict:
    """Bytes saved for backward by one forward, per variant; plain and masks on one model (exact counts)."""
    from drpruning.pruning import attach
    from drpruning.training.parallel import decoder_layers

    model, pruner, handle, _, ids = setup(args, masks=True)
    layers = decoder_layers(model)
    weights = {p.untyped_storage().data_ptr() for p in [*model.parameters(), *pruner.parameters()]}
    out = {}
    for masks in (False, True):
        if not masks:
            handle.detach()
        else:
            handle = attach(model, pruner)
        for on in (False, True):
            set_checkpointing(model, on)
            total, in_layers = saved_by_forward(model, layers, ids, weights)
            out[f"{'masks' if masks else 'plain'}-{'ac' if on else 'full'}"] = {
                "saved_bytes": total, "layers_bytes": in_layers,
                "per_token_per_layer": in_layers / ids.numel() / len(layers)}
    return out


def rss_variant(args) -> dict:
    """Peak memory of one training step of one variant (own process: no shared allocator state)."""
    masks, on = args.child.split(":")[1:]
    model, pruner, _, opts, ids = setup(args, masks == "masks")
    set_checkpointing(model, on == "ac")
    sync(args.device)
    before = rss_bytes()
    reset_peak_rss()
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    train_step(model, pruner, opts, ids, 0)  # the first step also allocates gradients and optimiser state
    sync(args.device)
    peak = torch.cuda.max_memory_allocated() if args.device.startswith("cuda") else peak_rss_bytes()
    return {"step_peak_bytes": peak - before,
            "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def timing(args) -> dict:
    """Checkpointing off and on alternated, plain then with masks, on one model: median seconds per step."""
    from drpruning.pruning import attach

    model, pruner, handle, opts, ids = setup(args, masks=True)
    handle.detach()
    times: dict[str, list[float]] = {}
    for masks in (False, True):
        if masks:
            handle = attach(model, pruner)
        for i in range(args.steps + 1):  # the first round warms up
            for on in (False, True):
                set_checkpointing(model, on)
                sync(args.device)
                t0 = time.perf_counter()
                train_step(model, pruner if masks else None, opts if masks else opts[:1], ids, i)
                sync(args.device)
                if i:
                    times.setdefault(f"{'masks' if masks else 'plain'}-{'ac' if on else 'full'}", []).append(
                        time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


# ----------------------------------------------------------------------------- (b) cross-entropy
def ce_variant(args) -> dict:
    import torch.nn.functional as F

    from drpruning.loss import CHUNK_ROWS, nll_from_logits

    path = args.child.split(":")[1]
    g = torch.Generator().manual_seed(0)
    b, t, v = args.ce_batch, args.ce_seq, args.vocab
    logits = torch.randn(b, t + 1, v, generator=g, dtype=torch.bfloat16).requires_grad_()  # pages touched
    targets = torch.randint(0, v, (b, t), generator=g)
    base = rss_bytes()
    reset_peak_rss()
    t0 = time.perf_counter()
    if path == "old":  # what nll_from_logits did before: a float32 copy of all the logits
        nll = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(), reduction="none")
    else:  # as token_losses calls it: all positions, the last one ignored
        nll = nll_from_logits(logits, targets)
    forward_peak, kept = peak_rss_bytes() - base, rss_bytes() - base
    reset_peak_rss()
    nll.sum().backward()
    seconds = time.perf_counter() - t0
    return {"forward_peak_bytes": forward_peak, "kept_bytes": kept, "backward_peak_bytes": peak_rss_bytes() - base,
            "seconds": seconds, "logits_bytes": logits.numel() * logits.element_size(), "chunk_rows": CHUNK_ROWS,
            "grad_dtype": str(logits.grad.dtype)}


def ce_timing(args) -> dict:
    """Old and chunked cross-entropy (forward + backward) alternated in one process: median seconds."""
    import torch.nn.functional as F

    from drpruning.loss import nll_from_logits

    g = torch.Generator().manual_seed(0)
    b, t, v = args.ce_batch, args.ce_seq, args.vocab
    logits = torch.randn(b, t + 1, v, generator=g, dtype=torch.bfloat16).requires_grad_()
    targets = torch.randint(0, v, (b, t), generator=g)
    paths = {"old": lambda: F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(),
                                            reduction="none"),
             "chunked": lambda: nll_from_logits(logits, targets)}
    times: dict[str, list[float]] = {k: [] for k in paths}
    for i in range(args.steps + 1):  # the first round warms up
        for name, loss in paths.items():
            t0 = time.perf_counter()
            loss().sum().backward()
            logits.grad = None
            if i:
                times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(x) for k, x in times.items()}


def child(args, variant: str) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--model", args.model, "--batch", str(args.batch),
           "--seq", str(args.seq), "--steps", str(args.steps), "--device", args.device, "--threads",
           str(args.threads), "--ce-batch", str(args.ce_batch), "--ce-seq", str(args.ce_seq), "--vocab",
           str(args.vocab)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def report_checkpointing(args) -> None:
    saved = child(args, "saved")
    speed = child(args, "timing")
    rss = {k: child(args, f"rss:{k.replace('-', ':')}") for k in saved}
    kind = "max allocated" if args.device.startswith("cuda") else "peak RSS growth"
    print(f"model {args.model}, batch {args.batch} x {args.seq}, float32, device {args.device}, "
          f"threads {torch.get_num_threads()}, {args.steps} timed steps per variant\n")
    print(f"| variant | saved for backward, MB | in the layers, bytes/token/layer | step {kind}, MB | "
          "s/step | time vs. no checkpointing |\n|---|---|---|---|---|---|")
    for k, s in saved.items():
        full = k.replace("-ac", "-full")
        print(f"| {k} | {s['saved_bytes'] / 1e6:.0f} | {s['per_token_per_layer']:.0f} | "
              f"{rss[k]['step_peak_bytes'] / 1e6:.0f} | {speed[k]:.2f} | {speed[k] / speed[full]:.2f} |")
    print("\n" + json.dumps({"saved": saved, "rss": rss, "seconds": speed}))


def report_ce(args) -> None:
    old, new = child(args, "ce:old"), child(args, "ce:chunked")
    speed = child(args, "ce_timing")
    n, v, r = args.ce_batch * args.ce_seq, args.vocab, min(new["chunk_rows"], args.ce_seq)
    # expected live bytes beyond the bf16 logits (2 bytes/element), from what each path allocates
    expect = {"old": {"forward_peak_bytes": 8 * n * v, "kept_bytes": 4 * n * v, "backward_peak_bytes": 12 * n * v},
              "chunked": {"forward_peak_bytes": 8 * r * v, "kept_bytes": 0,
                          "backward_peak_bytes": 2 * (n + args.ce_batch) * v + 12 * r * v}}
    print(f"bf16 logits [{args.ce_batch}, {args.ce_seq + 1}, {v}] ({old['logits_bytes'] / GB:.2f} GB), {n} targets, "
          f"chunks of {r} tokens; extra memory beyond the logits (GB), measured / expected\n")
    print("| path | forward peak | kept for backward | backward peak | s (fwd + bwd), alternated |\n"
          "|---|---|---|---|---|")
    for name, m in (("old", old), ("chunked", new)):
        e = expect[name]
        cells = " | ".join(f"{m[k] / GB:.2f} / {e[k] / GB:.2f}" for k in ("forward_peak_bytes", "kept_bytes",
                                                                          "backward_peak_bytes"))
        print(f"| {name} | {cells} | {speed[name]:.2f} |")
    print(f"\nchunked / old: backward peak {new['backward_peak_bytes'] / old['backward_peak_bytes']:.2f}, "
          f"time {speed['chunked'] / speed['old']:.2f}")
    print("\n" + json.dumps({"old": old, "chunked": new, "seconds": speed}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="HF folder, or a name/hub id drpruning can load")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per variant (median) after one warm-up")
    ap.add_argument("--ce-batch", type=int, default=4)
    ap.add_argument("--ce-seq", type=int, default=1024)
    ap.add_argument("--vocab", type=int, default=151936, help="cross-entropy vocabulary (Qwen2's by default)")
    ap.add_argument("--only", choices=["checkpointing", "timing", "ce"], default=None,
                    help="one part: (a), (a)'s step times alone, or (b)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        if args.device == "cpu" and not args.child.startswith("ce:"):
            from drpruning.training.cpu_memory import keep_freed_memory

            keep_freed_memory()  # as the trainer does on a CPU
        kind = args.child.split(":")[0]
        run = {"saved": saved_variant, "timing": timing, "rss": rss_variant, "ce": ce_variant,
               "ce_timing": ce_timing}[kind]
        print(json.dumps(run(args)))
        return
    if args.only == "timing":
        speed = child(args, "timing")
        print(" | ".join(f"{k} {v:.2f} s ({v / speed[k.replace('-ac', '-full')]:.2f})" for k, v in speed.items()))
    if args.only in (None, "checkpointing"):
        report_checkpointing(args)
    if args.only in (None, "ce"):
        report_ce(args)


if __name__ == "__main__":
    main()
