"""Memory per device of one training run: the resident state plus the peak of a step (docs/distributed.md).

Resident all run long: the weights, AdamW's two moments (in the weights' dtype: torch's AdamW keeps them
like the parameter), the pruner, the distillation teacher, FSDP's gathered units or DDP's gradient buckets.
A step adds, at its peak (the end of a micro-batch's forward, the start of its backward): the activations,
the logits, autocast's weight copies, and the gradients when they are alive then, i.e. when a step has
several micro-batches (with one, they appear only as the activations are freed). The optimiser step holds
the gradients and, on GPUs (torch's foreach AdamW), a temporary the size of one moment; the larger phase
counts.

FSDP with bf16 compute over float32 weights gathers the weights in bf16 (`training.parallel.mixed_precision`)
and runs without autocast: no weight copies, and the forward saves what a bf16 model's would (residual stream
and layer inputs in bf16).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from drpruning.loss import CHUNK_ROWS
from drpruning.models.shape import Shape, source_shape
from drpruning.plan import memory as m


@dataclass(frozen=True)
class Setup:
    """What the memory of a run depends on, beside the model config."""

    world: int = 1
    parallel: str = "ddp"  # ddp | fsdp; ignored for one process
    micro_batch: int = 4
    seq_len: int = 256
    micro_steps: int = 1  # micro-batches per optimiser step and rank
    weight_bytes: int = 4  # model.dtype: auto / float32 -> 4, bfloat16 -> 2
    compute_bytes: int = 4  # bf16 autocast -> 2; no autocast -> the weights' bytes
    checkpointing: bool = False
    structures: tuple[str, ...] = ()  # pruning structures; empty: no pruning
    head_mode: str = "kv_group"
    distill: bool = False
    foreach: bool = True  # torch's AdamW on GPUs: one temporary the size of its state (per tensor on CPUs)

    @property
    def fsdp(self) -> bool:
        return self.world > 1 and self.parallel == "fsdp"

    @property
    def mixed_precision(self) -> bool:
        """FSDP's MixedPrecisionPolicy instead of autocast: bf16 compute over float32 weights under FSDP."""
        return self.fsdp and self.compute_bytes < self.weight_bytes

    @property
    def forward_bytes(self) -> int:
        """Bytes per element of the weights a forward reads (and of its residual stream): the gathered bf16
        under the policy, else the weights' own."""
        return self.compute_bytes if self.mixed_precision else self.weight_bytes


@dataclass(frozen=True)
class Item:
    name: str
    bytes: int
    note: str = ""


@dataclass(frozen=True)
class MemoryEstimate:
    resident: tuple[Item, ...]  # held all run long
    step: tuple[Item, ...]  # the peak of a micro-batch (gradients listed even when not alive then)
    peak: int  # bytes per device
    grads_at_peak: bool  # whether the gradients coexist with the activations
    activations_other: int  # the activations with the other train.activation_checkpointing setting

    def get(self, name: str) -> int:
        return next(i.bytes for i in (*self.resident, *self.step) if i.name == name)

    @property
    def training_state(self) -> int:
        """Weights + gradients + AdamW + activations + logits (+ autocast copies): what a process grows by
        from before the model loads (bench/bench_plan.py compares it with the measured peak)."""
        names = ("weights", "gradients", "AdamW state", "activations", "logits", "autocast weight copies")
        return sum(i.bytes for i in (*self.resident, *self.step) if i.name in names)


def masked_linears(structures: tuple[str, ...]) -> tuple[bool, bool]:
    """Whether o_proj / down_proj run through the masks' autograd function (pruning.masked_model.install)."""
    if not structures:
        return False, False
    outputs = "layer" in structures or "hidden" in structures
    return "head" in structures or outputs, "intermediate" in structures or outputs


def activation_bytes(config: Any, shape: Shape, s: Setup, checkpointing: bool) -> int:
    w, c, b, t = s.forward_bytes, s.compute_bytes, s.micro_batch, s.seq_len
    mo, md = masked_linears(s.structures)
    if checkpointing:
        return m.checkpointed_bytes(config, shape, b, t, w, c) + m.recompute_bytes(config, shape, b, t, w, c, mo, md)
    copies = m.weight_copy_bytes(config, shape, c, mo, md) if c != w else 0
    return m.saved_bytes(config, shape, b, t, w, c, mo, md) - copies


def estimate(config: Any, s: Setup, teacher_config: Any | None = None) -> MemoryEstimate:
    """The memory per device of training a model with `config` (the source, when pruning) under `s`."""
    shape = source_shape(config)
    counts = m.parameter_counts(config, shape)
    n, w, c = counts.total, s.weight_bytes, s.compute_bytes
    shard = s.world if s.fsdp else 1
    per = f"sharded over {s.world}" if s.fsdp else ("replicated" if s.world > 1 else "")
    wname = {4: "float32", 2: "bfloat16"}[w]
    resident = [Item("weights", n * w // shard, f"{n / 1e9:.2f}B x {w} B ({wname}) {per}".rstrip()),
                Item("AdamW state", 2 * n * w // shard, f"2 moments x {w} B per parameter {per}".rstrip())]
    if s.structures:
        resident.append(Item("pruner", m.pruner_bytes(shape, s.structures, s.head_mode),
                             "masks, multipliers and their AdamW state, replicated"))
    if s.distill and teacher_config is not None:
        tn = m.parameter_counts(teacher_config, source_shape(teacher_config)).total
        resident.append(Item("teacher", tn * w // shard, f"frozen {tn / 1e9:.2f}B x {w} B {per}".rstrip()))
    if s.fsdp:
        gathered = {4: "float32", 2: "bf16 (MixedPrecisionPolicy)"}[s.forward_bytes]
        resident.append(Item("FSDP gathered units", m.fsdp_unsharded_params(shape, counts) * s.forward_bytes,
                             f"root (embeddings, LM head) + 2 decoder layers, unsharded, {gathered}"))
    elif s.world > 1:
        resident.append(Item("DDP gradient buckets", n * w, "DDP's flat copy of the gradients"))
    grads = Item("gradients", n * w // shard, f"{w} B per parameter {per}".rstrip())
    act = activation_bytes(config, shape, s, s.checkpointing)
    other = activation_bytes(config, shape, s, not s.checkpointing)
    tokens = s.micro_batch * s.seq_len
    how = "layer inputs + one layer recomputed" if s.checkpointing else "all layers"
    step = [grads, Item("activations", act, f"{s.micro_batch} x {s.seq_len} tokens, {how}")]
    mo, md = masked_linears(s.structures)
    if c != s.forward_bytes:  # autocast over float32 weights (one process, DDP); not under FSDP's policy
        step.append(Item("autocast weight copies", m.weight_copy_bytes(config, shape, c, mo, md),
                         "bf16 copy of every linear weight"))
    logits = m.logits_bytes(config.vocab_size, s.micro_batch, s.seq_len, c, CHUNK_ROWS)
    if s.distill:
        logits += tokens * config.vocab_size * c  # the teacher's logits
    step.append(Item("logits", logits, f"[{tokens}, {config.vocab_size}] x {c} B and gradient, "
                                       f"float32 cross-entropy in chunks of {CHUNK_ROWS}"))
    grads_at_peak = s.micro_steps > 1
    forward = sum(i.bytes for i in step[1:]) + (grads.bytes if grads_at_peak else 0)
    optimizer = grads.bytes + (n * w // shard if s.foreach else 0)  # the step: gradients + AdamW's temporary
    peak = sum(i.bytes for i in resident) + max(forward, optimizer)
    return MemoryEstimate(tuple(resident), tuple(step), peak, grads_at_peak, other)


def fixes(config: Any, s: Setup, memory: int, teacher_config: Any | None = None) -> list[str]:
    """Changes of memory knobs only (the optimisation stays the same) that make the run fit `memory`, the
    fewest changes first, each with the largest micro-batch that fits."""
    found = []
    for ckpt in sorted({s.checkpointing, True}):
        for parallel in sorted({s.parallel, "fsdp" if s.world > 1 else s.parallel}):
            for mb in (b for b in range(s.micro_batch, 0, -1) if s.micro_batch % b == 0):
                trial = replace(s, checkpointing=ckpt, parallel=parallel, micro_batch=mb,
                                micro_steps=s.micro_steps * s.micro_batch // mb)
                if estimate(config, trial, teacher_config).peak <= memory:
                    changes = ([] if ckpt == s.checkpointing else ["enable train.activation_checkpointing"]) \
                        + ([] if parallel == s.parallel else ["use parallel=fsdp"]) \
                        + ([] if mb == s.micro_batch else [f"set train.micro_batch_size={mb}"])
                    found.append((len(changes), -mb, " and ".join(changes)))
                    break
    found.sort()
    return [text for _, _, text in found[:3]] or ["shard over more devices (parallel=fsdp and more processes)"]
