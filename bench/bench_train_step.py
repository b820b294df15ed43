"""Tokens/s of one training step (forward + backward + AdamW) in fp32 and bf16 autocast, beside matmul FLOP/s.

Model FLOPs per step = (6 * N + 6 * L * S * d_attn) * T, where
  N      = parameters doing matmuls per token: all parameters except the input embedding table, plus the
           output projection (vocab * hidden) even when it is tied to the embedding,
  L, S   = layers, sequence length; d_attn = heads * head_dim; T = tokens in the step;
  6*L*S*d_attn = QK^T and AV (2 matmuls * 2 FLOPs * S * d_attn per token per layer, x3 for fwd+bwd),
           counted over the full SxS score matrix although causal attention needs half.
MFU = model FLOPs/s / measured dense matmul FLOP/s of the same dtype on this machine (not the vendor peak).

    .venv/bin/python bench/bench_train_step.py [--model smollm2-135m] [--steps 3] [--batch 4] [--seq 256]
    .venv/bin/python bench/bench_train_step.py --compile [--steps 8]   # eager vs compiled: bench_compile.py
    .venv/bin/python bench/bench_train_step.py --optimizer [--steps 5] # AdamW's default loop vs fused
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch
from transformers import AutoModelForCausalLM

from drpruning.models import load_model, load_model_config


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_flops(dtype: torch.dtype, device: torch.device, n: int = 2048, reps: int = 5) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up: kernel selection, allocation
    sync(device)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - t)


def flops_per_token(config, seq_len: int, n_params: int) -> float:
    # Tied: the one table is used as the output projection (a matmul), its lookup is free, so count it once.
    # Untied: drop the input table; lm_head is already among the parameters.
    n_matmul = n_params if config.tie_word_embeddings else n_params - config.vocab_size * config.hidden_size
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    d_attn = config.num_attention_heads * head_dim
    return 6 * n_matmul + 6 * config.num_hidden_layers * seq_len * d_attn


def time_steps(model, dtype: torch.dtype, batch: int, seq: int, steps: int, device: torch.device) -> float:
    """Seconds per step, averaged over `steps` after one warm-up step."""
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)  # as the trainer
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32
                else contextlib.nullcontext())
    times = []
    for i in range(steps + 1):
        sync(device)
        t = time.perf_counter()
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if i:  # the first step pays for allocation and AdamW state
            times.append(time.perf_counter() - t)
    return sum(times) / len(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m", help="model source (name, folder, .gguf, hub id)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--random-weights", action="store_true",
                    help="build the architecture from its config only (speed does not depend on the weights)")
    ap.add_argument("--default-malloc", action="store_true",
                    help="CPU: keep glibc's default malloc (the trainer stops it returning memory to the OS)")
    ap.add_argument("--compile", action="store_true",
                    help="eager against compiled decoder layers, steps alternating in one process, for a plain "
                         "step, a pruning step (masked model) and a one-shot step with distillation (bf16)")
    ap.add_argument("--optimizer", action="store_true", help="AdamW's default CPU loop against fused")
    args = ap.parse_args()
    if args.optimizer:
        from bench_compile import compare_optimizers

        return compare_optimizers(args)
    if args.compile:
        from bench_compile import compare

        return compare(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not args.default_malloc:
        from drpruning.training.cpu_memory import keep_freed_memory

        keep_freed_memory()  # as the trainer does on a CPU

    if args.random_weights:
        config = load_model_config(args.model)[0]
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    else:
        model, _ = load_model(args.model)
    model.to(device).train()
    n_params = sum(p.numel() for p in model.parameters())
    tokens = args.batch * args.seq
    per_token = flops_per_token(model.config, args.seq, n_params)

    cpu = f"CPU, {torch.get_num_threads()} threads, {'default' if args.default_malloc else 'kept-heap'} malloc"
    where = torch.cuda.get_device_name() if device.type == "cuda" else cpu
    print(f"model {args.model}: {n_params / 1e6:.1f}M parameters, batch {args.batch}x{args.seq} = {tokens} "
          f"tokens/step, {per_token / 1e9:.3f} GFLOP/token, {args.steps} timed steps after 1 warm-up; "
          f"{where}\n")
    print("| precision | matmul 2048³ TFLOP/s | step s | tokens/s | model TFLOP/s | MFU |")
    print("|---|---|---|---|---|---|")
    for name, dtype in (("fp32", torch.float32), ("bf16 autocast", torch.bfloat16)):
        peak = matmul_flops(dtype, device)
        step_s = time_steps(model, dtype, args.batch, args.seq, args.steps, device)
        achieved = per_token * tokens / step_s
        print(f"| {name} | {peak / 1e12:.3f} | {step_s:.2f} | {tokens / step_s:,.0f} | "
              f"{achieved / 1e12:.3f} | {achieved / peak:.0%} |")


if __name__ == "__main__":
    main()
