"""metrics.jsonl (one JSON object per record), its optional copies (`sinks`) and the progress bar; all only on
rank 0."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from drpruning.training import sinks

if TYPE_CHECKING:
    from drpruning.config import RunConfig


def _clean(value: Any) -> Any:
    """JSON has no NaN: absent values (a domain not in the batch) become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line cut by a kill: everything after it is dropped
    return records


class MetricsLog:
    """Appends records to metrics.jsonl and, with `cfg`, to the sinks its `log` keys enable (TensorBoard, W&B).

    The sinks are checked at construction (a missing package is a ConfigError before any work), opened at the
    first record or at `truncate_after` (then it is known whether the run starts or resumes), and closed after
    the `final` record or by `close()`. TensorBoard is flushed after each record, W&B's file each second."""

    def __init__(self, path: str | Path, enabled: bool = True, cfg: RunConfig | None = None):
        self.path = Path(path)
        self.enabled = enabled
        self.cfg = cfg if enabled else None
        self._sinks: list | None = None  # None: not opened yet
        if self.cfg is not None:
            sinks.check_sinks(self.cfg)

    def _open(self, resume_step: int | None) -> None:
        if self._sinks is None:
            self._sinks = sinks.open_sinks(self.cfg, self.path.parent, resume_step) if self.cfg is not None else []

    def truncate_after(self, step: int) -> None:
        """On resume from checkpoint `step`, drop records written after it (they will be written again)."""
        if not self.enabled:
            return
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)
        self._open(resume_step=step)

    def write(self, kind: str, **record: Any) -> None:
        if not self.enabled:
            return
        cleaned = _clean({"kind": kind, **record})
        with self.path.open("a") as f:
            f.write(json.dumps(cleaned) + "\n")
            f.flush()
        self._open(resume_step=None)
        if self._sinks:
            scalars, texts = sinks.flatten(kind, cleaned)
            for sink in self._sinks:
                sink.write(cleaned.get("step", 0), scalars, texts)
        if kind == "final":
            self.close()

    def close(self) -> None:
        """Close the sinks; later records go to metrics.jsonl only."""
        for sink in self._sinks or []:
            sink.close()
        self._sinks = []


def progress(total: int, initial: int, enabled: bool, desc: str) -> tqdm:
    return tqdm(total=total, initial=initial, disable=not enabled, desc=desc, unit="step", dynamic_ncols=True)
