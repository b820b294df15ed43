"""The one document reader, for training domains and `drpruning eval --data` alike.

A source is a directory (read recursively, files in sorted order), a single file, a `datasets` folder written
by `save_to_disk`, or `hf:NAME[:SPLIT]` (a Hugging Face dataset, streamed, online only). Formats: `.jsonl`
(also `.jsonl.gz`, `.jsonl.zst`) and `.json` records with a `text` field, `.parquet` with a `text` column,
and `.txt`, where the whole file is one document (a book or a page; line breaks are part of its text, and of
its bytes for bits per byte). Empty texts are skipped. `iter_documents` streams: memory does not grow with
the corpus (a `.json` array or a `.txt` file is read whole).
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

from drpruning.config import ConfigError

SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json", ".txt", ".parquet")
PARQUET_BATCH = 1024  # rows per parquet read


class DataError(ConfigError):
    """Unusable data; the message names the file and the fix."""


def readable(path: Path) -> bool:
    return path.name.endswith(SUFFIXES)


def is_saved_dataset(path: Path) -> bool:
    """A folder written by `datasets.Dataset.save_to_disk`."""
    return path.is_dir() and (path / "state.json").is_file() and (path / "dataset_info.json").is_file()


def files(path: str | Path) -> list[Path]:
    """The readable files of a directory (recursive, sorted) or of a single file; a saved dataset's arrow
    files (its fingerprint for caching)."""
    path = Path(path).expanduser()
    if path.is_file():
        return [path] if readable(path) else []
    if is_saved_dataset(path):
        return sorted(p for p in path.rglob("*") if p.is_file())
    return sorted(p for p in path.rglob("*") if p.is_file() and readable(p))


def check_source(source: str | Path, what: str) -> None:
    """Refuse a local source that does not exist or holds no readable file (`what` names it in the message)."""
    if str(source).startswith("hf:"):
        return
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError(f"{what}: {path} does not exist; give a directory of {'/'.join(SUFFIXES)} files "
                        "(records with a 'text' field) or one such file")
    if path.is_file() and not readable(path):
        raise DataError(f"{what}: {path} has unsupported type {path.suffix!r}; give a {'/'.join(SUFFIXES)} file")
    if not files(path):
        raise DataError(f"{what}: directory {path} has no {'/'.join(SUFFIXES)} files; add documents or remove it")


def _text(row: object, where: str) -> str:
    if not isinstance(row, dict) or "text" not in row:
        raise DataError(f"{where} has no 'text' field; every record needs one (e.g. {{\"text\": \"...\"}})")
    return str(row["text"]) if row["text"] else ""


def _lines(path: Path) -> Iterator[str]:
    if path.name.endswith((".gz", ".zst")):
        import pyarrow as pa  # reads gzip and zstd streams without another dependency

        codec = "gzip" if path.name.endswith(".gz") else "zstd"
        with pa.CompressedInputStream(pa.OSFile(str(path)), codec) as raw:
            yield from io.TextIOWrapper(io.BufferedReader(raw), encoding="utf-8")
        return
    with path.open(encoding="utf-8") as f:
        yield from f


def iter_file(path: Path) -> Iterator[str]:
    """The non-empty documents of one file, streamed."""
    if path.suffix == ".txt":
        text = path.read_text(encoding="utf-8", errors="replace")
        if text.strip():
            yield text
        return
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        if "text" not in pf.schema_arrow.names:
            raise DataError(f"{path} has no 'text' column (columns: {pf.schema_arrow.names}); "
                            "rename the text column to 'text'")
        for batch in pf.iter_batches(batch_size=PARQUET_BATCH, columns=["text"]):
            yield from (str(t) for t in batch.column(0).to_pylist() if t)
        return
    if path.suffix == ".json":
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); fix the file") from None
        for i, row in enumerate(rows if isinstance(rows, list) else [rows], 1):
            if text := _text(row, f"{path}: record {i}"):
                yield text
        return
    for i, line in enumerate(_lines(path), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{i} is not valid JSON ({e.msg}); fix or remove the line") from None
        if text := _text(row, f"{path}: record {i}"):
            yield text


def _iter_dataset(ds, where: str) -> Iterator[str]:
    if ds.column_names is not None and "text" not in ds.column_names:  # a streamed dataset may not know yet
        raise DataError(f"{where} has no 'text' column (columns: {ds.column_names}); rename it to 'text'")
    for row in ds:
        if row["text"]:
            yield str(row["text"])


def _datasets(where: str):
    try:
        import datasets
    except ImportError:
        raise DataError(f"{where}: reading it needs `pip install datasets`; or export the text to .jsonl "
                        "files and give their directory") from None
    return datasets


def iter_documents(source: str | Path, max_documents: int | None = None) -> Iterator[str]:
    """Every non-empty document of a source in a fixed order (at most `max_documents`), streamed."""
    source = str(source)
    if source.startswith("hf:"):
        name, _, split = source[3:].partition(":")
        stream = _iter_dataset(_datasets(source).load_dataset(name, split=split or "train", streaming=True),
                               source)
    elif is_saved_dataset(Path(source).expanduser()):
        ds = _datasets(source).load_from_disk(str(Path(source).expanduser()))
        if hasattr(ds, "keys"):  # a DatasetDict: its splits in sorted order
            ds = _datasets(source).concatenate_datasets([ds[k] for k in sorted(ds.keys())])
        stream = _iter_dataset(ds, source)
    else:
        stream = (doc for path in files(source) for doc in iter_file(path))
    for i, doc in enumerate(stream):
        if max_documents and i >= max_documents:
            return
        yield doc


def read_documents(source: str | Path, max_documents: int | None = None) -> list[str]:
    """Every non-empty document of a source (at most `max_documents`), as a list (evaluation sets)."""
    return list(iter_documents(source, max_documents))
