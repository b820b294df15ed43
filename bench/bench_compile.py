"""Eager against compiled training steps (`train.compile`), side by side in one process: `bench_train_step.py
--compile` runs this.

Three steps, each forward + backward + AdamW under bf16 autocast, with the trainer's loss (`token_losses`):
  plain     the source model (SmolLM2-135M by default);
  pruning   the source with L0 masks attached (the demo's target; one mask sample per micro-batch);
  one-shot  the demo's compact shape (24 layers, 6 / 2 heads, FFN 1024; random weights: speed does not depend on
            them) trained on half cross-entropy, half KL to the frozen source (temperature 2).
Each model's decoder layers and the loss's per-chunk kernels are compiled as the trainer compiles them (on a
CPU at up to 256 tokens a sequence the trained models' attention as matmul, softmax, matmul); eager steps
run the same modules as `train.compile=false` does: under `torch.compiler.set_stance("force_eager")`, with
the default attention kernel. The first compiled step (which
compiles; inductor's on-disk cache makes it shorter on a second run) is timed on its own; then each round runs
an eager and a compiled step of every kind back to back, so machine noise hits both alike, and the ratio of each
such pair is taken: its median and range over the rounds are the figure. MFU is model FLOPs/s over the
measured bf16 matmul FLOP/s (bench_train_step.py).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable

import torch
from bench_train_step import flops_per_token, matmul_flops, sync
from transformers import AutoModelForCausalLM

from drpruning.config import PruningConfig, TrainConfig
from drpruning.loss import compile_loss, token_losses
from drpruning.models import load_model, load_model_config
from drpruning.models.shape import derive_config, resolve_target
from drpruning.pruning import Pruner, attach
from drpruning.training.compiling import compile_layers
from drpruning.training.optim import build_optimizers

TARGET = {"num_hidden_layers": 24, "num_attention_heads": 6, "num_key_value_heads": 2, "intermediate_size": 1024}


def make_step(model: torch.nn.Module, ids: torch.Tensor, device: torch.device,
              teacher: torch.nn.Module | None = None, pruner: Pruner | None = None) -> Callable[[], None]:
    """One training step with the trainer's optimisers (fused AdamW over the weights; the masks' own AdamW)."""
    optimizers = build_optimizers(model, pruner, TrainConfig(lr=1e-5)).values()

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            nll, kl = token_losses(model, ids, teacher, 2.0)
        loss = nll.mean() if kl is None else 0.5 * nll.mean() + 0.5 * kl.mean()
        loss.backward()
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)

    return step


@contextlib.contextmanager
def uncompiled(model: torch.nn.Module):
    """The step as `train.compile=false` runs it: no compiled code, and the default attention kernel (a
    compiled CPU model at short sequences runs matmul, softmax, matmul instead: `math_attention_pays`)."""
    chosen = model.config._attn_implementation
    model.set_attn_implementation("sdpa")
    try:
        with torch.compiler.set_stance("force_eager"):
            yield
    finally:
        model.set_attn_implementation(chosen)


def timed(step: Callable[[], None], model: torch.nn.Module, device: torch.device, eager: bool) -> float:
    sync(device)
    start = time.perf_counter()
    with uncompiled(model) if eager else contextlib.nullcontext():
        step()
    sync(device)
    return time.perf_counter() - start


def load(args: argparse.Namespace) -> torch.nn.Module:
    """The model, or with --random-weights its architecture alone (speed does not depend on the weights)."""
    if args.random_weights:
        return AutoModelForCausalLM.from_config(load_model_config(args.model)[0], dtype=torch.float32)
    return load_model(args.model)[0]


def compare(args: argparse.Namespace) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        from drpruning.training.cpu_memory import keep_freed_memory

        keep_freed_memory()
    torch.manual_seed(0)
    source = load(args)
    ids = torch.randint(0, source.config.vocab_size, (args.batch, args.seq), device=device)
    plain = source.to(device).train()
    compile_layers(plain, args.seq)  # as the trainer compiles a trained model

    masked = load(args)
    masked.to(device).train()
    pruner = Pruner(masked.config, PruningConfig(enabled=True, structures=["layer", "head", "intermediate"],
                                                 target=TARGET, init="uniform"), 100, device)
    pruner.seed(0)
    attach(masked, pruner)
    compile_layers(masked, args.seq)

    teacher = load(args)
    teacher.to(device).eval().requires_grad_(False)
    compile_layers(teacher)
    shape = resolve_target(source.config, PruningConfig(enabled=True, target=TARGET))
    compact = AutoModelForCausalLM.from_config(derive_config(source.config, shape), dtype=torch.float32)
    compact.to(device).train()
    compile_layers(compact, args.seq)

    compile_loss(True)  # as train.compile does; the eager steps' stance runs these kernels uncompiled
    steps = {
        "plain": (plain, make_step(plain, ids, device)),
        "pruning (L0 masks)": (masked, make_step(masked, ids, device, pruner=pruner)),
        "one-shot + distillation": (compact, make_step(compact, ids, device, teacher)),
    }
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"model {args.model}, batch {args.batch}x{args.seq}, bf16 autocast, fused AdamW; {args.steps} rounds of "
          f"an eager and a compiled step of each kind (the order alternating), after one compiling step and one "
          f"eager warm-up of each; {where}\n")
    first = {name: timed(step, model, device, eager=False) for name, (model, step) in steps.items()}
    for model, step in steps.values():
        timed(step, model, device, eager=True)
    times: dict[str, dict[str, list[float]]] = {name: {"eager": [], "compiled": []} for name in steps}
    for r in range(args.steps):
        for name, (model, step) in steps.items():
            for mode in ("eager", "compiled") if r % 2 == 0 else ("compiled", "eager"):
                times[name][mode].append(timed(step, model, device, eager=mode == "eager"))
    peak = matmul_flops(torch.bfloat16, device)
    print("| step | compiling step s | eager step s | compiled step s | eager / compiled, median [min, max] of "
          "pairs | compiled MFU |")
    print("|---|---|---|---|---|---|")
    for name, (model, _) in steps.items():
        eager, compiled = (statistics.median(times[name][m]) for m in ("eager", "compiled"))
        ratios = [e / c for e, c in zip(times[name]["eager"], times[name]["compiled"])]
        n = sum(p.numel() for p in model.parameters())
        mfu = flops_per_token(model.config, args.seq, n) * args.batch * args.seq / compiled / peak
        note = " (student only)" if "distill" in name else ""
        print(f"| {name} | {first[name]:.1f} | {eager:.2f} | {compiled:.2f} | **{statistics.median(ratios):.2f}x** "
              f"[{min(ratios):.2f}, {max(ratios):.2f}] | {mfu:.0%}{note} |", flush=True)
    from torch._dynamo.utils import counters

    breaks = sum(counters["graph_break"].values())
    print(f"\ngraph breaks inside the compiled layers: {breaks}; unique graphs: {counters['stats']['unique_graphs']}"
          f" (one per model and grad mode: every layer shares its model's graph)")
    print(f"bf16 matmul 2048^3: {peak / 1e12:.3f} TFLOP/s")


def compare_optimizers(args: argparse.Namespace) -> None:
    """AdamW's default CPU implementation (a loop over tensors) against fused, on the model's parameters with
    random gradients, alternating, median seconds per step."""
    model = load(args)
    params = list(model.parameters())
    for q in params:
        q.grad = torch.randn_like(q) * 1e-3
    optimizers = {"default": torch.optim.AdamW(params, lr=1e-4), "fused": torch.optim.AdamW(params, lr=1e-4,
                                                                                          fused=True)}
    times: dict[str, list[float]] = {name: [] for name in optimizers}
    for r in range(args.steps + 1):
        for name, opt in optimizers.items():
            start = time.perf_counter()
            opt.step()
            if r:  # the first step allocates the state
                times[name].append(time.perf_counter() - start)
    print(f"AdamW step over {args.model}'s {sum(q.numel() for q in params) / 1e6:.1f}M parameters, median of "
          f"{args.steps}: " + ", ".join(f"{n} {statistics.median(t):.3f} s" for n, t in times.items()))
