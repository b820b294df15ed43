"""One-GPU check (run by bench/gpu_check.sh under torchrun): tokens/s of pruning steps against plain steps
on a random ~1B-parameter Llama in bf16 autocast, peak CUDA memory against the planner, and the activation
formula against what autograd saves on this GPU's attention kernel.

The steps are the training loop's (Trainer.train_step without data loading and mixing): autocast forward,
the one loss, backward, the pruner's penalty, gradient clipping, AdamW on the weights and on the masks.
GPU_CHECK_SHAPE=tiny runs the same code on a tiny shape (on a CPU: gloo, float32) to check it end to end.
"""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as tdist
from transformers import AutoModelForCausalLM, LlamaConfig

from drpruning.config import PruningConfig, TrainConfig
from drpruning.loss import autocast, token_losses
from drpruning.models.shape import source_shape
from drpruning.plan.estimate import Setup, estimate
from drpruning.plan.memory import saved_bytes, saved_storages
from drpruning.pruning import Pruner, attach
from drpruning.training.optim import build_optimizers
from drpruning.training.parallel import enable_activation_checkpointing

SHAPES = {  # ~1.1B parameters (TinyLlama-like), and a tiny one for a CPU dry run
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=5632, vocab_size=32000),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=512),
}
TARGET = {"num_hidden_layers": 12, "hidden_size": 1536, "num_attention_heads": 24, "intermediate_size": 4096}
TINY_TARGET = {"num_hidden_layers": 1, "hidden_size": 48, "num_attention_heads": 2, "intermediate_size": 64}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_model(shape: dict, device: torch.device, seq: int) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(**shape, max_position_embeddings=max(seq, 128), head_dim=shape["hidden_size"]
                         // shape["num_attention_heads"], attn_implementation="sdpa")
    with torch.device(device):  # initialised on the device: seconds, not a minute of CPU random numbers
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.config.use_cache = False
    return model.train()


def measured_saved(model, ids, amp, exclude) -> int:
    with saved_storages([*model.parameters(), *exclude]) as seen, autocast(ids.device, amp):
        model(input_ids=ids)
    return sum(seen.values())


def run(prune: bool, ckpt: bool, shape: dict, target: dict, device: torch.device, amp: torch.dtype,
        micro: int, seq: int, steps: int) -> dict:
    model = make_model(shape, device, seq)
    pruner = None
    t = TrainConfig(lr=1e-5, activation_checkpointing=ckpt)
    if prune:
        pcfg = PruningConfig(enabled=True, target=target, init="uniform")
        pruner = Pruner(model.config, pcfg, 100, device)
        attach(model, pruner)
    if ckpt:
        enable_activation_checkpointing(model)  # as the trainer does
    opts = build_optimizers(model, pruner, t)
    ids = torch.randint(0, shape["vocab_size"], (micro, seq), device=device)
    check = None
    if not ckpt:  # the activation formula on this device's kernels (one small forward)
        small = ids[:1, : min(seq, 256)].clone()  # its own storage: the ids count as 8 B per token
        got = measured_saved(model, small, amp, list(pruner.parameters()) if pruner else [])
        mo_md = (True, True) if prune else (False, False)
        want = saved_bytes(model.config, source_shape(model.config), 1, small.shape[1], 4,
                           amp.itemsize if amp != torch.float32 else 4, *mo_md)
        check = (got, want)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for step in range(steps + 1):  # the first step warms up (kernels, AdamW state)
        sync(device)
        t0 = time.perf_counter()
        with autocast(device, amp):
            nll, _ = token_losses(model, ids)
        nll.mean().backward()
        if pruner is not None:
            pruner.penalty_step(step)
        torch.nn.utils.clip_grad_norm_(opts["weights"].param_groups[0]["params"], 1.0)
        for o in opts.values():
            o.step()
            o.zero_grad(set_to_none=True)
        if pruner is not None:
            pruner.after_step()
        sync(device)
        times.append(time.perf_counter() - t0)
    s = Setup(micro_batch=micro, seq_len=seq, micro_steps=1, weight_bytes=4,
              compute_bytes=2 if amp == torch.bfloat16 else 4, checkpointing=ckpt,
              structures=("layer", "head", "intermediate", "hidden") if prune else (), foreach=device.type == "cuda")
    out = {"tokens_per_s": micro * seq * steps / sum(times[1:]), "planned": estimate(model.config, s).peak,
           "saved_check": check}
    if device.type == "cuda":
        out["peak_allocated"] = torch.cuda.max_memory_allocated(device)
        out["peak_reserved"] = torch.cuda.max_memory_reserved(device)
    del model, opts, pruner
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def main() -> None:
    tiny = os.environ.get("GPU_CHECK_SHAPE", "1b") == "tiny"
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    t0 = time.perf_counter()
    tdist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    tdist.all_reduce(torch.ones(1, device=device))  # the first collective: NCCL's communicator is made here
    print(f"process group ({tdist.get_backend()}) up in {time.perf_counter() - t0:.1f} s", flush=True)
    amp = torch.bfloat16 if cuda else torch.float32
    shape, target = (SHAPES["tiny"], TINY_TARGET) if tiny else (SHAPES["1b"], TARGET)
    micro, seq, steps = (2, 64, 2) if tiny else (4, 2048, int(os.environ.get("GPU_CHECK_STEPS", "5")))
    print(f"device {torch.cuda.get_device_name(device) if cuda else 'cpu'}, compute {amp}, micro-batch "
          f"{micro} x {seq}, {steps} timed steps", flush=True)
    results = {}
    for name, prune, ckpt in (("plain", False, False), ("pruning", True, False), ("pruning+ckpt", True, True)):
        r = results[name] = run(prune, ckpt, shape, target, device, amp, micro, seq, steps)
        line = f"{name:<13} {r['tokens_per_s']:10.0f} tokens/s  planned peak {r['planned'] / 2**30:6.2f} GiB"
        if cuda:
            line += (f"  measured peak allocated {r['peak_allocated'] / 2**30:6.2f} GiB (reserved "
                     f"{r['peak_reserved'] / 2**30:.2f}; planned / allocated {r['planned'] / r['peak_allocated']:.2f})")
        if r["saved_check"]:
            got, want = r["saved_check"]
            line += f"  saved for backward {got} B vs formula {want} B ({got / want:.3f})"
        print(line, flush=True)
    print(f"pruning / plain tokens/s: {results['pruning']['tokens_per_s'] / results['plain']['tokens_per_s']:.2f}; "
          f"with activation checkpointing: "
          f"{results['pruning+ckpt']['tokens_per_s'] / results['plain']['tokens_per_s']:.2f}")
    tdist.destroy_process_group()


if __name__ == "__main__":
    main()
