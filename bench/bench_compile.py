"""Eager against compiled training steps (`train.compile`), side by side in one process: `bench_train_step.py
--compile` runs this.

Three steps, each forward + backward + AdamW under bf16 autocast, with the trainer's loss (`token_losses`):
  plain     the source model (SmolLM2-135M by default);
  pruning   the source with L0 masks attached (the demo's target; one mask sample per micro-batch);
  one-shot  the demo's compact shape (24 layers, 6 / 2 heads, FFN 1024; random weights: speed does not depend on
            them) trained on half cross-entropy, half KL to the frozen source (temperature 2).
Each model's decoder layers are compiled as the trainer compiles them (`compiling.compile_layers`); eager
steps run the same modules under `torch.compiler.set_stance("force_eager")`. The first compiled step (which
compiles) is timed on its own; then eager and compiled steps alternate, so machine noise hits both alike, and
the medians are compared. MFU is model FLOPs/s over the measured bf16 matmul FLOP/s (bench_train_step.py).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from bench_train_step import flops_per_token, matmul_flops, sync
from transformers import AutoModelForCausalLM

from drpruning.config import PruningConfig
from drpruning.loss import token_losses
from drpruning.models import load_model
from drpruning.models.shape import derive_config, resolve_target
from drpruning.pruning import Pruner, attach
from drpruning.training.compiling import compile_layers

TARGET = {"num_hidden_layers": 24, "num_attention_heads": 6, "num_key_value_heads": 2, "intermediate_size": 1024}


def make_step(model: torch.nn.Module, params: list, ids: torch.Tensor, device: torch.device,
              teacher: torch.nn.Module | None = None) -> Callable[[], None]:
    opt = torch.optim.AdamW(params, lr=1e-5)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            nll, kl = token_losses(model, ids, teacher, 2.0)
        loss = nll.mean() if kl is None else 0.5 * nll.mean() + 0.5 * kl.mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def timed(step: Callable[[], None], device: torch.device, eager: bool) -> float:
    sync(device)
    start = time.perf_counter()
    if eager:
        with torch.compiler.set_stance("force_eager"):
            step()
    else:
        step()
    sync(device)
    return time.perf_counter() - start


def measure(step: Callable[[], None], pairs: int, device: torch.device) -> tuple[float, float, float]:
    """(first compiled step's seconds, median eager step, median compiled step)."""
    first = timed(step, device, eager=False)
    timed(step, device, eager=True)  # eager warm-up
    eager, compiled = [], []
    for _ in range(pairs):
        eager.append(timed(step, device, eager=True))
        compiled.append(timed(step, device, eager=False))
    return first, statistics.median(eager), statistics.median(compiled)


def compare(args: argparse.Namespace) -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        from drpruning.training.cpu_memory import keep_freed_memory

        keep_freed_memory()
    torch.manual_seed(0)
    source, _ = load_model(args.model)
    ids = torch.randint(0, source.config.vocab_size, (args.batch, args.seq), device=device)
    plain = source.to(device).train()
    compile_layers(plain)

    masked, _ = load_model(args.model)
    masked.to(device).train()
    pruner = Pruner(masked.config, PruningConfig(enabled=True, structures=["layer", "head", "intermediate"],
                                                 target=TARGET, init="uniform"), 100, device)
    pruner.seed(0)
    attach(masked, pruner)
    compile_layers(masked)

    teacher, _ = load_model(args.model)
    teacher.to(device).eval().requires_grad_(False)
    compile_layers(teacher)
    shape = resolve_target(source.config, PruningConfig(enabled=True, target=TARGET))
    compact = AutoModelForCausalLM.from_config(derive_config(source.config, shape), dtype=torch.float32)
    compact.to(device).train()
    compile_layers(compact)

    steps = {
        "plain": (plain, make_step(plain, list(plain.parameters()), ids, device)),
        "pruning (L0 masks)": (masked, make_step(masked, [*masked.parameters(), *pruner.mask_parameters()], ids,
                                                 device)),
        "one-shot + distillation": (compact, make_step(compact, list(compact.parameters()), ids, device, teacher)),
    }
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"model {args.model}, batch {args.batch}x{args.seq}, bf16 autocast, {args.steps} eager / compiled pairs "
          f"alternating after one compiling step and one eager warm-up; {where}\n")
    peak = matmul_flops(torch.bfloat16, device)
    print("| step | compiling step s | eager step s | compiled step s | compiled / eager speed | compiled MFU |")
    print("|---|---|---|---|---|---|")
    for name, (model, step) in steps.items():
        first, eager, compiled = measure(step, args.steps, device)
        n = sum(p.numel() for p in model.parameters())
        mfu = flops_per_token(model.config, args.seq, n) * args.batch * args.seq / compiled / peak
        note = f"{mfu:.0%}" if name == "plain" else f"{mfu:.0%} (student only)" if "distill" in name else f"{mfu:.0%}"
        print(f"| {name} | {first:.1f} | {eager:.2f} | {compiled:.2f} | {eager / compiled:.2f}x | {note} |",
              flush=True)
    from torch._dynamo.utils import counters

    breaks = sum(counters["graph_break"].values())
    print(f"\ngraph breaks inside the compiled layers: {breaks}; unique graphs: {counters['stats']['unique_graphs']}"
          f" (one per model and grad mode: every layer shares its model's graph)")
    print(f"bf16 matmul 2048^3: {peak / 1e12:.3f} TFLOP/s")
