"""The one document reader, for training domains and `drpruning eval --data` alike.

A source is a directory (read recursively, files in sorted order), a single file, or `hf:NAME[:SPLIT]` (a
Hugging Face dataset, online only). Formats: `.jsonl` and `.json` records with a `text` field, `.parquet`
with a `text` column, and `.txt`, where the whole file is one document (a book or a page; line breaks are
part of its text, and of its bytes for bits per byte). Empty texts are skipped.
"""

from __future__ import annotations

import json
from pathlib import Path

from drpruning.config import ConfigError

SUFFIXES = (".jsonl", ".json", ".txt", ".parquet")


class DataError(ConfigError):
    """Unusable data; the message names the file and the fix."""


def files(path: str | Path) -> list[Path]:
    """The readable files of a directory (recursive, sorted) or of a single file."""
    path = Path(path).expanduser()
    if path.is_file():
        return [path] if path.suffix in SUFFIXES else []
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)


def check_source(source: str | Path, what: str) -> None:
    """Refuse a local source that does not exist or holds no readable file (`what` names it in the message)."""
    if str(source).startswith("hf:"):
        return
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"{what}: {path} does not exist; give a directory of {'/'.join(SUFFIXES)} files "
                        "(records with a 'text' field) or one such file")
    if path.is_file() and path.suffix not in SUFFIXES:
        raise DataError(f"{what}: {path} has unsupported type {path.suffix!r}; give a {'/'.join(SUFFIXES)} file")
    if not files(path):
        raise DataError(f"{what}: directory {path} has no {'/'.join(SUFFIXES)} files; add documents or remove it")


def read_file(path: Path) -> list[str]:
    """The non-empty documents of one file."""
    if path.suffix == ".txt":
        text = path.read_text(encoding="utf-8", errors="replace")
        return [text] if text.strip() else []
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if "text" not in table.column_names:
            raise DataError(f"{path} has no 'text' column (columns: {table.column_names}); "
                            "rename the text column to 'text'")
        return [t for t in table.column("text").to_pylist() if t]
    if path.suffix == ".json":
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); fix the file") from None
        rows = rows if isinstance(rows, list) else [rows]
    else:
        rows = []
        with path.open(encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}:{i} is not valid JSON ({e.msg}); fix or remove the line") from None
    docs = []
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict) or "text" not in row:
            raise DataError(f"{path}: record {i} has no 'text' field; every record needs one "
                            "(e.g. {\"text\": \"...\"})")
        if row["text"]:
            docs.append(str(row["text"]))
    return docs


def read_documents(source: str | Path, max_documents: int | None = None) -> list[str]:
    """Every non-empty document of a source (at most `max_documents`)."""
    source = str(source)
    if source.startswith("hf:"):
        try:
            import datasets
        except ImportError:
            raise DataError(f"{source}: Hugging Face datasets need `pip install datasets` (and a network); "
                            "or download the data and give a local directory") from None
        name, _, split = source[3:].partition(":")
        ds = datasets.load_dataset(name, split=split or "train")
        docs = [str(t) for t in ds["text"] if t]
    else:
        docs = []
        for path in files(source):
            docs.extend(read_file(path))
            if max_documents and len(docs) >= max_documents:
                break
    return docs[:max_documents] if max_documents else docs
