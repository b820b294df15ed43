"""The distillation loss alone: cross-entropy + KL to the teacher fused (`loss.nll_and_kl`, one log-softmax
per chunk) against each on its own (`nll_from_logits`, then the KL from two full log-softmaxes, as the loss
was computed before the fused path), forward + backward, side by side in one process.

    .venv/bin/python bench/bench_loss.py [--batch 4] [--seq 256] [--vocab 49152] [--rounds 5] [--dtype bf16]

A third path is the fused loss with train.compile's compiled per-chunk kernels (`loss.compile_loss`).

Logits shaped like the demo's (4 x 256 tokens, SmolLM2's 49152-word vocabulary), random; the two paths
alternate within each round; the figure is each path's median seconds and their ratio. Both paths' losses
and gradients are compared first (they must agree: tests/unit/test_loss.py checks it to tolerance).
Peak memory: each path once more, alone, the process's peak resident set (reset before) above what it held
before, with glibc's default malloc (large tensors are mapped and unmapped, so the peak is what was live).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from rss import MB, peak_rss_bytes, reset_peak_rss, rss_bytes

from drpruning.loss import compile_loss, nll_and_kl, nll_from_logits


def separate(logits: torch.Tensor, targets: torch.Tensor, teacher: torch.Tensor, t: float):
    nll = nll_from_logits(logits, targets)
    n = targets.shape[1]
    s = F.log_softmax(logits[:, :n].float() / t, dim=-1)
    q = F.log_softmax(teacher[:, :n].float() / t, dim=-1)
    kl = F.kl_div(s, q, log_target=True, reduction="none").sum(-1) * t * t
    return nll, kl


def timed(path, logits: torch.Tensor, targets: torch.Tensor, teacher: torch.Tensor, t: float):
    x = logits.detach().requires_grad_(True)
    start = time.perf_counter()
    nll, kl = path(x, targets, teacher, t)
    (0.5 * nll.mean() + 0.5 * kl.mean()).backward()
    return time.perf_counter() - start, nll.detach(), kl.detach(), x.grad


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    args = ap.parse_args()
    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    shape = (args.batch, args.seq, args.vocab)  # next-token logits; targets are the last seq - 1 tokens
    logits, teacher = (torch.randn(shape) * 3).to(dtype), (torch.randn(shape) * 3).to(dtype)
    targets = torch.randint(args.vocab, (args.batch, args.seq - 1))
    def compiled(*a):  # train.compile's kernels (compiled on their first use, in the warm-up round)
        compile_loss(True)
        try:
            return nll_and_kl(*a)
        finally:
            compile_loss(False)

    paths = {"separate": separate, "fused": nll_and_kl, "fused, compiled": compiled}
    seconds: dict[str, list[float]] = {name: [] for name in paths}
    results = {}
    for _ in range(args.rounds + 1):  # the first round warms up and is not counted
        for name, path in paths.items():
            s, nll, kl, grad = timed(path, logits, targets, teacher, args.temperature)
            seconds[name].append(s)
            results[name] = (nll, kl, grad)
    for other in ("fused", "fused, compiled"):
        for a, b in zip(results["separate"], results[other]):
            torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=1e-4)
    med = {name: statistics.median(v[1:]) for name, v in seconds.items()}
    del results
    peak = {}
    for name, path in paths.items():
        base = rss_bytes()
        reset_peak_rss()
        timed(path, logits, targets, teacher, args.temperature)
        peak[name] = (peak_rss_bytes() - base) / MB
    print(f"logits {list(shape)} {args.dtype}, temperature {args.temperature}, median of {args.rounds} rounds, "
          f"{torch.get_num_threads()} threads; each logits tensor {logits.numel() * logits.element_size() / MB:.0f} MB")
    print("| path | forward + backward s | / separate | peak MB above the inputs | / separate |\n|---|---|---|---|---|")
    for name in paths:
        print(f"| {name} | {med[name]:.3f} | {med[name] / med['separate']:.2f} | {peak[name]:.0f} | "
              f"{peak[name] / peak['separate']:.2f} |")


if __name__ == "__main__":
    main()
