"""Cost of domain mixing: one DRO update, one scaling-law fit (64 points), and a whole drpruning mixer update
with every domain fitting (the worst case: 7 and 8 domains), as a share of training wall time.

    .venv/bin/python bench/bench_mixing.py                   # also times a SmolLM2-135M-shaped training step
    .venv/bin/python bench/bench_mixing.py --step-time 0.5   # use a given step time (seconds) instead

The share assumes one mixer update per evaluation, every N steps: update / (N * step + update).
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import replace

import numpy as np

from drpruning.config import MixingConfig
from drpruning.mixing import ScalingLaw, build_mixer, dro_weights


def timed(fn, repeats: int) -> float:
    """Median seconds of `repeats` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def curve(rng: np.random.Generator, n: int, pruning: bool) -> tuple:
    """(tokens, losses, sparsity or None) of a noisy synthetic loss curve."""
    d = np.geomspace(1e6, 4e8, n) * rng.uniform(0.5, 2.0)
    s = 0.6 * np.minimum(1.0, np.linspace(0.05, 1.0, n) / 0.4) if pruning else None
    a, alpha, e = rng.uniform(50, 500), rng.uniform(0.2, 0.4), rng.uniform(1.5, 3.0)
    y = a * d ** -alpha * (1.0 if s is None else (s / 0.6) ** 0.3) + e
    return d, y * (1 + 0.003 * rng.standard_normal(n)), s


def full_mixer(k: int, pruning: bool, total: int = 3200, every: int = 50):
    """A drpruning mixer at 60% of a run, every domain holding 64 points: the next update fits all k laws."""
    rng = np.random.default_rng(k)
    names = [f"d{i}" for i in range(k)]
    mixer = build_mixer(replace(MixingConfig(), method="drpruning"), names, [1 / k] * k, total, pruning,
                        final_sparsity=0.6 if pruning else None)
    curves = [curve(rng, 70, pruning) for _ in range(k)]
    mixer.start([float(c[1][0]) + 0.5 for c in curves])
    for j in range(64):
        step = round(0.1 * total + j * every / 4)
        mixer.update(step, [float(c[1][j]) for c in curves], [int(c[0][j]) for c in curves],
                     float(curves[0][2][j]) if pruning else None)
    step = round(0.6 * total)
    args = ([float(c[1][65]) for c in curves], [int(c[0][65]) for c in curves],
            float(curves[0][2][65]) if pruning else None)
    state = mixer.state_dict()

    def once() -> None:
        mixer.load_state_dict(state)  # the same update every time
        mixer.update(step, *args)

    return once


def model_step_time(repeats: int) -> tuple[float, str]:
    """Seconds per optimiser step of a randomly initialised SmolLM2-135M-shaped Llama, batch 8 x 256 (the
    project's default run), on the GPU when there is one, else the CPU."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
                         tie_word_embeddings=True)
    model = LlamaForCausalLM(config).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, 49152, (8, 256), device=device)

    def step() -> None:
        for chunk in ids.split(4):  # micro-batches of 4, as the default config
            with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
                loss = model(input_ids=chunk, labels=chunk).loss
            loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()

    return timed(step, repeats), device


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--step-time", type=float, default=None,
                    help="seconds per training step (skip measuring one)")
    ap.add_argument("--every", type=int, nargs="+", default=[10, 50], help="steps between evaluations")
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    rows = []
    for k in (7, 8):
        losses, refs = rng.uniform(2, 3, k).tolist(), rng.uniform(1.8, 2.2, k).tolist()
        t = timed(lambda losses=losses, refs=refs, k=k: dro_weights(losses, refs, [1 / k] * k),
                  args.repeats * 10)
        rows.append((f"dro_weights, {k} domains", t))
    for pruning in (False, True):
        d, y, s = curve(rng, 64, pruning)
        t = timed(lambda d=d, y=y, s=s: ScalingLaw.fit(d, y, s), args.repeats)
        rows.append((f"ScalingLaw.fit, 64 points{', with sparsity' if pruning else ''}", t))
    updates = {}
    for k in (7, 8):
        for pruning in (False, True):
            t = timed(full_mixer(k, pruning), max(3, args.repeats // 4))
            label = f"drpruning update, {k} domains x 64 points{', pruning' if pruning else ''}"
            rows.append((label, t))
            updates[(k, pruning)] = t

    step = args.step_time
    source = "given"
    if step is None:
        step, device = model_step_time(2)
        source = f"measured: SmolLM2-135M shape, 8 x 256 tokens, {device}"
    print(f"{'operation':<58} {'time':>10}")
    for label, t in rows:
        print(f"{label:<58} {t * 1e3:>8.2f} ms")
    print(f"\nstep time {step:.3f} s ({source})")
    worst = max(updates.values())
    for n in args.every:
        share = worst / (n * step + worst)
        print(f"eval every {n:>3} steps: worst update {worst * 1e3:.1f} ms = {100 * share:.2f}% of wall time")


if __name__ == "__main__":
    main()
