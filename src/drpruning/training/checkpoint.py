"""Checkpoints: what a checkpoint holds (this module owns the file format) and how it is written atomically.

Writing: into a temporary folder, then a manifest of file sizes, fsync, rename; the last K are kept. A folder
`step-N` exists only once complete. On resume the newest one whose manifest matches its files and that loads
is used; a corrupt one is refused with a message and the previous good one is used.

Layout of `checkpoints/step-N/` (format 2):
- `model.safetensors`: the full weights (one process or DDP; rank 0 writes), or, under FSDP, every rank's
  shards of the weights and of their optimiser state in `torch.distributed.checkpoint` files
  (`__<rank>_0.distcp` + `.metadata`), which reshard on load to any world size;
- `pruner.safetensors`: masks and multipliers (pruning runs);
- `state.pt` (`torch.load(weights_only=True)`): {"format": 2, "step", "domain_tokens", "optimizers" and
  "schedulers" by name ("weights", "masks"; the weights' optimiser is absent under FSDP, being in the DCP
  shards), "sampler", "mixer", "rng" (this process's global RNGs), "pruner_rng" (one mask-sampling state per
  rank), "health" (the loss-spike average and the count of bad steps in a row; absent in older checkpoints)}.
  Format 1 (drpruning 0.1.0: lists instead of names, the proportions once more) still loads.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from safetensors.torch import load_file, load_model, save_file, save_model

from drpruning.config import ConfigError
from drpruning.paths import follow_umask
from drpruning.training import parallel

log = logging.getLogger(__name__)
T = TypeVar("T")
MANIFEST = "manifest.json"
MODEL, PRUNER, STATE = "model.safetensors", "pruner.safetensors", "state.pt"
FORMAT = 2
OPTIMIZER_NAMES = ("weights", "masks")  # format 1 kept them in a list, in this order


class CheckpointError(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------- contents
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Global RNG states as plain types and tensors (loadable with weights_only=True)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(), "numpy": [keys.tolist(), pos, has_gauss, gauss],
            "python": [version, list(internal), gauss_next]}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state(("MT19937", np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def write_state(folder: Path, model: torch.nn.Module, optimizers: dict[str, torch.optim.Optimizer],
                state: dict[str, Any], pruner: torch.nn.Module | None, main: bool) -> None:
    """Write one checkpoint's files into `folder`. Under FSDP every rank calls it (the shards are collective);
    otherwise the main rank alone. `state` holds the small parts: step, schedulers, sampler, mixer, ..."""
    sharded = parallel.is_fsdp(model)
    if sharded:
        parallel.save_sharded(model, optimizers["weights"], folder)
        if not main:
            return
    else:
        save_model(model, str(folder / MODEL))
    if pruner is not None:
        save_file({k: v.contiguous() for k, v in pruner.state_dict().items()}, str(folder / PRUNER))
    saved = {name: o.state_dict() for name, o in optimizers.items() if not (sharded and name == "weights")}
    torch.save({"format": FORMAT, **state, "optimizers": saved, "rng": rng_state()}, folder / STATE)


def read_state(folder: Path) -> dict[str, Any]:
    """`state.pt` in the current format (format 1 is converted); refuses an unknown format."""
    state = torch.load(folder / STATE, weights_only=True, map_location="cpu")
    version = state.get("format", 1)
    if version == 1:
        state["optimizers"] = {n: o for n, o in zip(OPTIMIZER_NAMES, state["optimizers"]) if o is not None}
        state["schedulers"] = dict(zip(OPTIMIZER_NAMES, state["schedulers"]))
    elif version != FORMAT:
        raise CheckpointFormatError(
            f"{folder} has checkpoint format {version}, but this drpruning reads formats 1 and {FORMAT}: resume "
            "it with the drpruning release that wrote it, or start a new run_dir")
    return state


def read_weights(folder: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                 saved_optimizer: dict | None = None, device: str = "cpu") -> None:
    """Load a checkpoint's weights into `model` (plain, DDP-wrapped or FSDP-sharded, any world size) and,
    when given, the weights' optimiser state."""
    if parallel.is_dcp_checkpoint(folder):  # written under FSDP: DCP reshards to this world size / layout
        parallel.load_sharded(model, optimizer, folder)
    elif parallel.is_fsdp(model):  # a one-process / DDP checkpoint resumed under FSDP
        parallel.load_full_into_sharded(model, optimizer, load_file(str(folder / MODEL)), saved_optimizer)
    else:
        missing, unexpected = load_model(model, str(folder / MODEL), device=device)
        if missing or unexpected:
            raise ValueError(f"model weights do not match: missing {missing[:3]}, unexpected {unexpected[:3]}")
        if optimizer is not None and saved_optimizer is not None:
            optimizer.load_state_dict(saved_optimizer)


def read_pruner(folder: Path, pruner: torch.nn.Module, device: str = "cpu") -> None:
    """Masks and multipliers; a format-1 pruner (no tie keys or protected units) keeps the fresh ones."""
    saved = load_file(str(folder / PRUNER), device=device)
    missing, unexpected = pruner.load_state_dict(saved, strict=False)
    if unexpected or any(not k.startswith(("tie_key_", "protected_")) for k in missing):
        raise ValueError(f"pruner state does not match: missing {missing[:3]}, unexpected {unexpected[:3]}")


def checkpoint_bytes(model: torch.nn.Module, pruner: torch.nn.Module | None) -> int:
    """About what one checkpoint takes on disk: weights, AdamW's two moments, the pruner's state."""
    weights = sum(q.numel() * q.element_size() for q in model.parameters())
    adam = 2 * sum(q.numel() * q.element_size() for q in model.parameters() if q.requires_grad)
    masks = sum(q.numel() * 4 * 3 for q in pruner.parameters()) if pruner is not None else 0
    return weights + adam + masks


def check_room(run_dir: Path, model: torch.nn.Module, pruner: torch.nn.Module | None,
               save_dtype: torch.dtype | None, keep: int) -> None:
    """check_disk_space for this run's checkpoints and its export (in the source's dtype)."""
    export = sum(q.numel() for q in model.parameters()) * (
        torch.finfo(save_dtype).bits // 8 if save_dtype is not None else 4)
    check_disk_space(run_dir, checkpoint_bytes(model, pruner), keep, export)


class CheckpointFormatError(CheckpointError):
    """A checkpoint this release cannot read: resuming falls back to no other checkpoint."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _disk_full(e: BaseException) -> bool:
    # torch.save raises OSError(ENOSPC); safetensors raises its own error with the OS message inside
    return (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left on device" in str(e)


def _free_gb(path: Path) -> float:
    return shutil.disk_usage(path).free / 1e9


def check_disk_space(folder: str | Path, checkpoint_bytes: int, keep: int, export_bytes: int) -> None:
    """Before a run starts: refuse when even one checkpoint plus the exported model cannot fit, and warn
    when the `keep` (+1 while the next is written) checkpoints it will hold may not."""
    folder = Path(folder)
    probe = next(p for p in (folder, *folder.parents) if p.exists())
    free = shutil.disk_usage(probe).free
    need_one, need_all = checkpoint_bytes + export_bytes, (keep + 1) * checkpoint_bytes + export_bytes
    if free < need_one:
        raise CheckpointError(
            f"{probe} has {free / 1e9:.1f} GB free, but one checkpoint of this run takes about "
            f"{checkpoint_bytes / 1e9:.1f} GB and the exported model {export_bytes / 1e9:.1f} GB; "
            "free some space or point run_dir at a larger disk")
    if free < need_all:
        log.warning("%s has %.1f GB free; the %d checkpoints this run keeps (+1 while writing) and the export "
                    "need about %.1f GB: lower train.keep_checkpoints or free some space", probe, free / 1e9,
                    keep, need_all / 1e9)


class Checkpointer:
    def __init__(self, run_dir: str | Path, keep: int = 2):
        self.root = Path(run_dir) / "checkpoints"
        self.keep = keep

    def steps(self) -> list[int]:
        """Steps of the complete-looking checkpoints, newest first."""
        if not self.root.is_dir():
            return []
        found = []
        for p in self.root.iterdir():
            if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit():
                found.append(int(p.name[5:]))
        return sorted(found, reverse=True)

    def path(self, step: int) -> Path:
        return self.root / f"step-{step}"

    def save(self, step: int, write: Callable[[Path], None]) -> Path:
        """`write(folder)` writes the files; then sizes go into the manifest and the folder is renamed."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".tmp-step-{step}-{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        try:
            write(tmp)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)  # a failed write leaves nothing behind, not even its bytes
            if _disk_full(e):
                raise CheckpointError(
                    f"no space left on the disk of {self.root} while writing the checkpoint of step {step}; "
                    f"{_free_gb(self.root):.1f} GB free. Free some space or point run_dir at a larger disk, "
                    "and/or lower train.keep_checkpoints; then resume with resume=true") from e
            raise
        return self._finalise(step, tmp)

    def save_collective(self, step: int, write: Callable[[Path], None], main: bool,
                        barrier: Callable[[], None]) -> Path:
        """`save` for a checkpoint that every rank writes into (FSDP shards): all ranks `write` into one
        temporary folder; after a barrier, the main rank alone writes the manifest and renames it."""
        tmp = self.root / f".tmp-step-{step}-shared"
        if main:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        barrier()
        write(tmp)
        barrier()  # every rank's shards are on disk before the folder is sealed
        if main:
            self._finalise(step, tmp)
        barrier()
        return self.path(step)

    def save_from_ranks(self, step: int, write: Callable[[Path], None], collective: bool, main: bool,
                        barrier: Callable[[], None]) -> None:
        """`save_collective` when every rank writes (FSDP shards), else `save` on the main rank; then a barrier."""
        if collective:
            self.save_collective(step, write, main, barrier)
            return
        if main:
            self.save(step, write)
        barrier()

    def _finalise(self, step: int, tmp: Path) -> Path:
        follow_umask(tmp)
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        for name in files:
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
        (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": files}))
        follow_umask(tmp / MANIFEST)
        _fsync_dir(tmp)
        final = self.path(step)
        if final.exists():  # re-saving the same step (e.g. after resume): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(self.root)
        self._prune()
        return final

    def _prune(self) -> None:
        for step in self.steps()[self.keep:]:
            shutil.rmtree(self.path(step), ignore_errors=True)
        for p in self.root.glob(".tmp-step-*"):
            if not p.name.endswith(f"-{os.getpid()}"):
                shutil.rmtree(p, ignore_errors=True)

    def verify(self, step: int) -> None:
        folder = self.path(step)
        manifest = folder / MANIFEST
        if not manifest.is_file():
            raise CheckpointError(f"{folder} has no {MANIFEST} (incomplete write)")
        try:
            files = json.loads(manifest.read_text())["files"]
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{manifest} is unreadable ({e})") from None
        for name, size in files.items():
            p = folder / name
            if not p.is_file():
                raise CheckpointError(f"{p} is missing")
            if p.stat().st_size != size:
                raise CheckpointError(f"{p} has {p.stat().st_size} bytes, the manifest says {size} (truncated?)")

    def load_latest(self, read: Callable[[Path], T]) -> tuple[int, T] | None:
        """Load the newest good checkpoint with `read(folder)`; None when there is none at all."""
        steps = self.steps()
        for step in steps:
            try:
                self.verify(step)
                return step, read(self.path(step))
            except CheckpointFormatError:
                raise
            except Exception as e:  # noqa: BLE001 - any failure to load means: refuse, fall back
                log.warning("refusing checkpoint %s: %s; trying the previous one", self.path(step), e)
        if steps:
            raise CheckpointError(f"no loadable checkpoint in {self.root} (tried steps {steps}); "
                                  "delete the folder and start again without resume=true")
        return None


def refuse_existing(run_dir: Path) -> None:
    """A run started without resume must not write over another run's checkpoints."""
    if Checkpointer(run_dir).steps():
        raise ConfigError(f"run_dir {run_dir} already holds checkpoints: pass resume=true to continue that run, "
                          "or choose a new run_dir")
