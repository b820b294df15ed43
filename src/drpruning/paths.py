"""Where drpruning keeps and finds things on disk: its cache, and the `shared/` data folder of a checkout."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]  # the checkout, when installed in editable mode


def cache_root() -> Path:
    """`$DRPRUNING_CACHE`, else ~/.cache/drpruning (models, embedded corpus, tokenised data)."""
    return Path(os.environ.get("DRPRUNING_CACHE") or Path.home() / ".cache" / "drpruning").expanduser()


def shared_dir() -> Path:
    """`shared/` beside the checkout, else beside the working directory (the project's real test data)."""
    for candidate in (REPO.parent / "shared", Path.cwd().parent / "shared"):
        if candidate.is_dir():
            return candidate
    return Path.cwd().parent / "shared"


def default_task_dir() -> Path:
    """The downstream multiple-choice tasks: shared/eval."""
    return shared_dir() / "eval"


def follow_umask(path: str | Path) -> None:
    """Give `path` (a file, or a folder and everything in it) the permissions the user's umask gives new files.

    safetensors and temporary files are created 0600; on a shared cluster another account's evaluation job
    could then not read an exported model."""
    mask = os.umask(0)
    os.umask(mask)
    path = Path(path)
    items = [path, *path.rglob("*")] if path.is_dir() else [path]
    for p in items:
        if p.is_symlink():
            continue
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)
