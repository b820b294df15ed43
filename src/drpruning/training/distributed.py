"""torch.distributed glue: one process per device under torchrun; a single process needs none of it."""

from __future__ import annotations

import datetime
import os
import sys
import time
import traceback
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")
# A rank stuck in a collective (its peer hung, not crashed) raises after this long instead of waiting forever.
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


def run_or_abort(fn: Callable[[], T]) -> T:
    """Run `fn`; under torchrun, an exception on this rank prints a clear message and ends this process at once
    (exit code 1) instead of unwinding into teardown while the other ranks wait in a collective. torchrun sees
    the failed worker, stops the others and names the failed rank in its summary."""
    if not launched():
        return fn()
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - any failure on one rank must end the job
        r, w = rank_from_env(), os.environ.get("WORLD_SIZE", "?")
        traceback.print_exc()
        message = f"drpruning: rank {r} of {w} failed: {type(e).__name__}: {e}"
        secondary = _peer_failure(e)
        if secondary:
            message += "\ndrpruning: (a communication error: usually another rank failed first, see its message)"
        print(f"{message}\ndrpruning: aborting the job (torchrun stops the other ranks)", file=sys.stderr, flush=True)
        if secondary:  # let the rank that failed first be the root cause torchrun reports (earliest error)
            time.sleep(3)
        try:  # torchrun's failure summary shows this error file's message instead of <N/A>
            from torch.distributed.elastic.multiprocessing.errors import get_error_handler

            get_error_handler().record_exception(e)
        except Exception:  # noqa: BLE001, S110 - the message above is already out
            pass
        sys.stdout.flush()
        os._exit(1)  # no destroy_process_group: with a peer mid-collective it could block


def _peer_failure(e: BaseException) -> bool:
    """A collective that failed because a peer went away (not this rank's own fault)."""
    text = str(e)
    return isinstance(e, dist.DistError) or any(
        s in text for s in ("Connection reset by peer", "Connection closed by peer", "NCCL", "gloo/transport"))
