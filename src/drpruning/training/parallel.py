"""Data parallelism for the training loop: DDP, or FSDP2 (`fully_shard` per decoder layer, then the root).

Only the *weights* are wrapped. The Pruner's masks and multipliers stay plain, replicated tensors outside the
wrapper: the loop averages their gradients by hand, so every rank takes the same optimiser step on them
(`check_replicated` verifies it at every checkpoint).

Mixed precision: one process and DDP autocast to bf16 over float32 weights. FSDP instead gathers each unit's
weights in bf16 (`MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=float32)`, as torchtitan does) and runs
without autocast: autocast would gather float32 and then keep a bf16 copy of every gathered weight until the
forward ends. `forward_dtype` is the one switch the callers ask for the autocast dtype of a forward.

The checkpoint files these helpers read and write are described in `drpruning.training.checkpoint`.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as tdist
from torch import nn

from drpruning.models.families import family_of
from drpruning.training import distributed as dist

if TYPE_CHECKING:
    from torch.distributed.fsdp import MixedPrecisionPolicy

log = logging.getLogger(__name__)
DCP_METADATA = ".metadata"  # written by DCP next to the shards; marks an FSDP checkpoint


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a *ForCausalLM: the FSDP wrapping units."""
    try:
        return family_of(model.config).layers(model)
    except TypeError:
        raise TypeError(f"{type(model).__name__} has no decoder `.model.layers` to shard with FSDP; "
                        "use parallel: ddp") from None


GATHERED_DTYPE = "_drpruning_gathered_dtype"  # set by wrap_model on an FSDP root gathered in the compute dtype


def mixed_precision(model: nn.Module, compute_dtype: torch.dtype | None) -> MixedPrecisionPolicy | None:
    """FSDP2's `MixedPrecisionPolicy` for bf16 compute over float32 weights: weights gathered in bf16 (the
    forward runs in bf16 without autocast), gradients reduce-scattered and kept in float32 (no rounding of
    the sum over ranks; the optimiser sees float32 gradients of its float32 shards). None otherwise: float32
    compute, or weights already in the compute dtype."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    weights = next(model.parameters()).dtype
    if compute_dtype is None or compute_dtype == torch.float32 or weights != torch.float32:
        return None
    return MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)


def forward_dtype(model: nn.Module, compute_dtype: torch.dtype | None) -> torch.dtype | None:
    """The autocast dtype for a forward through `model`: None when FSDP already gathers its weights in
    `compute_dtype` (autocast would only add a copy of them), else `compute_dtype`."""
    gathered = getattr(model, GATHERED_DTYPE, None)
    return None if gathered is not None and gathered == compute_dtype else compute_dtype


def wrap_model(model: nn.Module, parallel: str, device: torch.device,
               compute_dtype: torch.dtype | None = None) -> nn.Module:
    """The module to run forward/backward through: a DDP wrapper, or `model` itself sharded in place (FSDP2,
    under `mixed_precision(model, compute_dtype)`; then run its forwards at `forward_dtype`).

    Gradients are averaged over ranks in both cases, which is why the loop scales each rank's loss by the
    world size."""
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # buffers (rotary tables) are identical on every rank and never trained: no per-forward broadcast
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                       broadcast_buffers=False)
    if parallel == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (dist.world(),))
        policy = mixed_precision(model, compute_dtype)
        extra = {} if policy is None else {"mp_policy": policy}
        # One unit per decoder layer keeps only one layer's full weights alive at a time; the root unit holds
        # embeddings, final norm and LM head (tied embeddings stay one parameter there).
        for layer in decoder_layers(model):
            fully_shard(layer, mesh=mesh, **extra)
        fully_shard(model, mesh=mesh, **extra)
        if policy is not None:
            setattr(model, GATHERED_DTYPE, policy.param_dtype)
        return model
    raise ValueError(f"parallel={parallel!r}: use ddp or fsdp")


def enable_activation_checkpointing(model: nn.Module) -> None:
    """`train.activation_checkpointing`: each decoder layer keeps only its input for backward and recomputes
    its forward there (transformers' per-layer checkpointing, non-reentrant `torch.utils.checkpoint`).

    Called on the plain model, before `wrap_model` (a DDP wrapper does not have the method). transformers
    checkpoints the layer's `forward`, inside the module's hooks, so FSDP2's per-layer hooks run once per
    layer and are not replayed by the recompute. Non-reentrant checkpointing lets gradients reach tensors a
    layer reads without taking them as inputs: the pruning masks, sampled once per forward by the decoder's
    pre-hook (outside every layer, so never re-sampled; docs/method.md §2.2) and read from
    `MaskedModel.current` by the recomputed layer, which therefore needs each backward to run before the
    model's next forward (the training loop does). Only active in train mode with gradients enabled
    (transformers checks both): evaluation, calibration and a frozen teacher run as before."""
    # `gradient_checkpointing_enable` is a deprecated alias of this in transformers 5 (FutureWarning)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


class maybe_no_sync:
    """DDP's no_sync for all but the last micro-batch (one gradient all-reduce per step); a no-op otherwise."""

    def __init__(self, model: nn.Module, sync: bool):
        self.ctx = model.no_sync() if (not sync and hasattr(model, "no_sync")) else None

    def __enter__(self):
        return self.ctx.__enter__() if self.ctx is not None else None

    def __exit__(self, *exc):
        return self.ctx.__exit__(*exc) if self.ctx is not None else False


def is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def is_dcp_checkpoint(folder: str | Path) -> bool:
    return (Path(folder) / DCP_METADATA).is_file()


# ------------------------------------------------------------------------------------------- checkpoints
def save_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, folder: str | Path) -> None:
    """Every rank writes its shards of the weights and of their optimiser state into `folder` (collective)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizer)}
    dcp.save(state, checkpoint_id=str(folder))


def load_sharded(model: nn.Module, optimizer: torch.optim.Optimizer | None, folder: str | Path) -> None:
    """Load a DCP checkpoint into `model` (sharded or plain, any world size) and its optimiser, unless None
    (collective when a process group exists; a single process reads every shard)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    # DCP loads in place into tensors of the right (local) shapes: ask the model and optimiser for them first
    state = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optim"] = get_optimizer_state_dict(model, optimizer)
    with warnings.catch_warnings():  # one process reading a sharded checkpoint is intended, not a mistake
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=str(folder), no_dist=not tdist.is_initialized())
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optim"])


def _tied_complete(model: nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors keeps one name of a tied parameter; give every alias the tensor (FSDP's loader wants all)."""
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    out = dict(sd)
    for names in groups.values():
        have = [n for n in names if n in out]
        for n in names:
            if have and n not in out:
                out[n] = out[have[0]]
    return out


def load_full_into_sharded(model: nn.Module, optimizer: torch.optim.Optimizer, weights: dict[str, torch.Tensor],
                           optim_state: dict[str, Any]) -> None:
    """Resume an FSDP run from a one-process / DDP checkpoint: every rank holds the full state and keeps its
    shards. The plain optimiser state is keyed by parameter index, FSDP's full format by name."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True)
    result = set_model_state_dict(model, _tied_complete(model, weights), options=options)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"model weights do not match: missing {result.missing_keys[:3]}, "
                         f"unexpected {result.unexpected_keys[:3]}")
    # the optimiser was built from model.parameters() (deduplicated), in this order, in both formats
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    by_name = {"state": {names[i]: s for i, s in optim_state["state"].items()},
               "param_groups": [{**g, "params": [names[i] for i in g["params"]]}
                                for g in optim_state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, by_name, options=options)


def unsharded_model(model: nn.Module) -> nn.Module | None:
    """The full model as a plain module on rank 0 (None on the others), e.g. for `save_pretrained` or
    `export_model`. Collective: every rank must call it. Weights are gathered to CPU, one copy on rank 0."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not dist.is_main():
        return None
    dtype = next(iter(sd.values())).dtype
    with no_init_weights():  # every weight is overwritten below
        plain = AutoModelForCausalLM.from_config(model.config, dtype=dtype)
    missing, unexpected = plain.load_state_dict(sd, strict=False)
    aliased = set(_tied_complete(plain, sd)) - set(sd)  # tied names whose tensor came under another name
    if set(missing) - aliased or unexpected:
        raise RuntimeError(f"gathered weights do not match the model: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
    if getattr(model.config, "tie_word_embeddings", False):
        plain.tie_weights()
    if getattr(model, "generation_config", None) is not None:
        plain.generation_config = model.generation_config
    return plain.eval()


# ------------------------------------------------------------------------------------------- replicated state
def gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank (small python objects only)."""
    if not tdist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.world()
    tdist.all_gather_object(out, obj)
    return out


@torch.no_grad()
def check_replicated(params: list[torch.Tensor], what: str) -> None:
    """Raise when `params` differ between ranks (they are meant to be replicated): compares with rank 0."""
    if not tdist.is_initialized() or not params:
        return
    flat = torch.cat([p.detach().float().flatten() for p in params])
    ref = flat.clone()
    tdist.broadcast(ref, src=0)
    diff = (flat - ref).abs().max()
    worst = diff.clone()
    tdist.all_reduce(worst, op=tdist.ReduceOp.MAX)
    if float(worst) != 0.0:
        raise RuntimeError(f"{what} differ between ranks (max difference {float(worst):.3g}; rank "
                           f"{dist.rank()}: {float(diff):.3g}): the ranks no longer train the same model")
