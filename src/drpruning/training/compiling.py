"""`train.compile`: `torch.compile` each decoder layer, as torchtitan does, and when `auto` turns it on.

Per layer, not the whole model: every decoder layer runs the same code, so dynamo traces one graph that
serves all of them and compile time is one layer's, not that of the unrolled stack (a one-off trial on
SmolLM2-135M, 2-core CPU: 104 s before the first step for the whole model, 35 s per layer; the speed-ups are
measured in docs/benchmarks.md). The embedding, final norm and LM head stay eager; the loss's per-chunk
math over [rows, vocab] (`drpruning.loss.compile_loss`) is compiled too.
On a CPU at short sequences a trained model's attention runs as matmul, softmax, matmul inside the compiled
layers, faster there than the flash-attention kernel (MATH_ATTENTION_MAX_SEQ).

A masked model compiles the same way: the decoder's pre-hook (outside the compiled layers) samples the
hard-concrete masks and hands each o_proj / down_proj its masks as a module attribute, so no per-layer
constant reaches the graph and the one graph serves every layer (`pruning.masked_model`); `MaskedLinear`'s
custom backward is traced as it is. No graph breaks (dynamo's counter, bench/bench_train_step.py --compile).
"""

from __future__ import annotations

import logging
import shutil

import torch
from torch import nn

from drpruning.config import ConfigError
from drpruning.loss import compile_loss
from drpruning.models.families import family_of

log = logging.getLogger(__name__)

# What `auto` weighs: the compile time it must win back, and the share of a step compiled layers save.
# Measured here (docs/benchmarks.md): 35 s for the first compiled SmolLM2 step, 10 s for the masked one, plus
# a recompile for no-grad evaluation and the teacher; compiled steps 1.25-1.3x faster (0.2 of a step saved).
COMPILE_SECONDS = 60.0
SAVED_FRACTION = 0.2
# model FLOP/s of an eager step, to turn a run's FLOPs into seconds: 2-core bf16 CPU measured (about 0.25
# TFLOP/s); for a GPU a deliberately low 100 TFLOP/s (bf16 H100 runs reach 300-400), so auto errs towards on
RATE = {"cpu": 2.5e11, "cuda": 1e14}
RECOMPILE_LIMIT = 32  # graphs per layer: train, no-grad evaluation, unmasked source, teacher, batch shapes
# On a CPU, PyTorch's flash-attention kernel has a slow backward at short sequences: for 4 x 256 tokens (9 heads
# of 64) its forward + backward took 24 ms a layer against 14 ms for matmul, softmax, matmul compiled by
# inductor, which lost from 512 tokens on (47 against 35 ms). So a compiled model trained on a CPU at up to
# this many tokens a sequence runs HF's `eager` attention (those three ops) inside its compiled layers. The
# teacher keeps the kernel: forward only, it is the faster (3.1 against 3.7 ms).
MATH_ATTENTION_MAX_SEQ = 256


def have_compiler() -> bool:
    """Inductor's CPU code generation needs a C++ compiler."""
    return any(shutil.which(c) for c in ("c++", "g++", "clang++"))


def compile_pays(params: float, tokens_per_step: int, steps: int, device: torch.device,
                 teacher_params: float = 0.0) -> bool:
    """Whether the saved step time, SAVED_FRACTION of the run's estimated eager time (6 N FLOPs a trained
    token, 2 N a teacher token), exceeds COMPILE_SECONDS."""
    flops = (6 * params + 2 * teacher_params) * tokens_per_step * steps
    return SAVED_FRACTION * flops / RATE.get(device.type, RATE["cpu"]) > COMPILE_SECONDS


def use_compile(setting: bool | str, device: torch.device, params: float, tokens_per_step: int, steps: int,
                teacher_params: float = 0.0, world: int = 1) -> bool:
    """The `train.compile` decision; `true` without a C++ compiler on a CPU is a ConfigError. `auto` decides
    for a multi-process run as for one process (per process: its share of the tokens), so it is checked under
    DDP and FSDP2 (tests/integration/test_distributed.py)."""
    check_available(setting, device)
    if setting is True:
        return True
    if setting is False or (device.type == "cpu" and not have_compiler()):
        return False
    return compile_pays(params, tokens_per_step // max(1, world), steps, device, teacher_params)


def check_available(setting: bool | str, device: torch.device) -> None:
    """`train.compile=true` on a CPU without a C++ compiler is a ConfigError (checked before any loading)."""
    if setting is True and device.type == "cpu" and not have_compiler():
        raise ConfigError("train.compile=true needs a C++ compiler on a CPU (torch inductor writes C++): "
                          "install g++ (e.g. apt-get install g++), or set train.compile=false")


def math_attention_pays(device: torch.device, seq_len: int | None) -> bool:
    """Whether a compiled, trained model's attention should be matmul, softmax, matmul (MATH_ATTENTION_MAX_SEQ)."""
    return device.type == "cpu" and seq_len is not None and seq_len <= MATH_ATTENTION_MAX_SEQ


def compile_layers(model: nn.Module, train_seq_len: int | None = None) -> None:
    """Compile every decoder layer of `model` in place (`nn.Module.compile`: state-dict keys, hooks and
    checkpoints unchanged). Call before DDP / FSDP wrap the model, after activation checkpointing. A model
    trained on `train_seq_len`-token sequences gets the faster attention for them (`math_attention_pays`)."""
    device = next(model.parameters()).device
    if math_attention_pays(device, train_seq_len):
        model.set_attn_implementation("eager")  # not saved with the model: an export loads with the default
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    # no KV cache: each layer would see its own cache entry, a per-layer guard that recompiles every layer
    model.config.use_cache = False
    for layer in family_of(model.config).layers(model):
        # static shapes: a teacher and a compact student share the layer code, and dynamo's automatic dynamic
        # shapes would replace both static graphs with one slower, shape-generic graph
        layer.compile(dynamic=False)


def compile_run(setting: bool | str, device: torch.device, batch_size: int, seq_len: int, steps: int,
                model: nn.Module, teacher: nn.Module | None, world: int = 1) -> bool:
    """Compile the trained model's and the teacher's decoder layers, and the loss's per-chunk math, where
    `train.compile` says so; whether it did. The teacher (a one-shot run's uncut source, or any frozen model)
    gets its own no-grad graph."""
    count = [0 if m is None else sum(p.numel() for p in m.parameters()) for m in (model, teacher)]
    on = use_compile(setting, device, count[0], batch_size * seq_len, steps, count[1], world)
    compile_loss(on)  # the loss's per-chunk math too (a process-wide switch: set either way)
    if not on:
        return False
    compile_layers(model, seq_len)
    if teacher is not None:
        compile_layers(teacher)
    log.info("train.compile=%s: decoder layers compiled (the first steps include compiling them)%s", setting,
             "; attention as matmul, softmax, matmul" if math_attention_pays(device, seq_len) else "")
    return True
