"""Disk a run needs: its prepared token files and its checkpoints (what `drpruning plan` prints)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from drpruning.config import DataConfig
from drpruning.paths import cache_root

TEXT_BYTES_PER_TOKEN = 4  # an estimate for English-like text with a modern BPE vocabulary


@dataclass(frozen=True)
class DataDisk:
    tokens: int  # training + held-out tokens of the domains known
    bytes: int  # of their prepared token files
    estimated: bool  # True when some domain was estimated from its text files' sizes
    unknown: tuple[str, ...]  # domains whose size could not be told (missing folders, hf: datasets)


def token_bytes(vocab_size: int) -> int:
    """Bytes per prepared token: uint16 when every id fits, else uint32."""
    return 2 if vocab_size <= 2**16 else 4


def _prepared_index(name: str, source: str, cfg: DataConfig) -> tuple[dict, Path] | None:
    """The index of `source`'s prepared folder (the source itself, or one in the token cache)."""
    path = Path(source).expanduser()
    if (path / "index.json").is_file():
        return json.loads((path / "index.json").read_text()), path
    root = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else cache_root() / "tokens"
    for index in sorted(root.glob(f"{name}-*/index.json")) if root.is_dir() else []:
        try:
            data = json.loads(index.read_text())
        except (OSError, ValueError):
            continue
        if data.get("source") == source and data.get("seq_len") == cfg.seq_len:
            return data, index.parent
    return None


def _sources(domains: dict[str, str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, source in (domains or {"embedded": "embedded"}).items():
        if str(source) == "embedded":
            from drpruning.data.embedded import materialize_embedded_corpus

            out.update({k: str(v) for k, v in materialize_embedded_corpus().items()})
        else:
            out[name] = str(source)
    return out


def data_disk(cfg: DataConfig, vocab_size: int) -> DataDisk:
    """Prepared domains count exactly (their token files); others from their text files at about
    TEXT_BYTES_PER_TOKEN bytes per token (compressed files count as they are stored: an underestimate)."""
    from drpruning.data.documents import files

    tokens = size = 0
    estimated, unknown = False, []
    for name, source in _sources(cfg.domains).items():
        found = None if source.startswith("hf:") else _prepared_index(name, source, cfg)
        if found is not None:
            index, folder = found
            tokens += sum(int(x) for x in index.get("tokens", {}).values())
            size += sum(p.stat().st_size for p in folder.glob("*.bin"))
            continue
        path = Path(source).expanduser()
        if source.startswith("hf:") or not path.exists():
            unknown.append(name)
            continue
        text = sum(p.stat().st_size for p in files(path))
        n = text // TEXT_BYTES_PER_TOKEN
        tokens, size, estimated = tokens + n, size + n * token_bytes(vocab_size), True
    return DataDisk(tokens, size, estimated, tuple(unknown))


def checkpoint_bytes(train_params: int, weight_bytes: int, pruner_params: int) -> int:
    """One checkpoint (training.checkpoint.checkpoint_bytes from the config): the weights as trained, AdamW's
    two moments, the pruner's masks, multipliers and their optimiser state."""
    return 3 * train_params * weight_bytes + 12 * pruner_params
