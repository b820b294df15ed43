"""torch.distributed glue: one process per device under torchrun; a single process needs none of it."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

TIMEOUT = datetime.timedelta(minutes=int(os.environ.get("DRPRUNING_DIST_TIMEOUT_MIN", "10")))


def launched() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init() -> torch.device:
    """Start the process group (NCCL on GPUs, gloo on CPUs) and return this rank's device."""
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if launched() and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=TIMEOUT, device_id=device if device.type == "cuda" else None)
    return device


def close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_floats(values: list[float]) -> list[float]:
    """Rank 0's values on every rank (mixing decisions are computed once and shared)."""
    if not dist.is_initialized():
        return list(values)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else "cpu"
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.broadcast(t, src=0)
    return t.cpu().tolist()


def rank_from_env() -> int:
    """This process's rank before the process group exists (for logging set-up)."""
    return int(os.environ.get("RANK", "0"))
