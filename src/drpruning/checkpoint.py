"""Atomic checkpoints: write into a temporary folder, record a manifest, rename; keep the last K.

A checkpoint folder `step-N` exists only once complete. On resume the newest one whose manifest matches its
files and that loads is used; a corrupt one is refused with a message and the previous good one is used.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")
MANIFEST = "manifest.json"


class CheckpointError(RuntimeError):
    pass


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

    def _finalise(self, step: int, tmp: Path) -> Path:
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        for name in files:
            with open(tmp / name, "rb") as f:
                os.fsync(f.fileno())
        (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": files}))
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
            except Exception as e:  # noqa: BLE001 - any failure to load means: refuse, fall back
                log.warning("refusing checkpoint %s: %s; trying the previous one", self.path(step), e)
        if steps:
            raise CheckpointError(f"no loadable checkpoint in {self.root} (tried steps {steps}); "
                                  "delete the folder and start again without resume=true")
        return None
