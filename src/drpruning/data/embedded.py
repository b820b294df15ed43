"""The embedded default corpus: real text that every Python installation already has, so no download.

Domains (see docs/embedded-corpus.md for counts and sizes):
- `python-source`: the standard library's own .py files, one document per file;
- `docs`: English reference documentation: the language reference topics that `help()` shows
  (`pydoc_data.topics`) and, per stdlib module, its module, class and function docstrings;
- `licenses`: licence texts of the installed distributions (LICENSE*, LICENCE*, COPYING*, NOTICE*) and
  Python's own LICENSE.txt.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import json
import os
import shutil
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path

from drpruning.paths import cache_root, follow_umask

VERSION = 1  # bump when the extraction changes, so caches are rebuilt
DOMAINS = ("python-source", "docs", "licenses")
MAX_DOC_BYTES = 200_000  # larger files are generated tables (e.g. _pydecimal), not typical text
MIN_DOC_CHARS = 200  # shorter pieces are boilerplate, not documents
# Not part of the library proper: tests, third-party packages, build data; pydoc_data is the docs domain.
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__", "pydoc_data",
              "lib-dynload"}
_LICENSE_PREFIXES = ("LICENSE", "LICENCE", "COPYING", "NOTICE")


def _stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _read_text(path: Path) -> str | None:
    """UTF-8 text of a small file, or None for huge, binary or undecodable files."""
    try:
        if path.stat().st_size > MAX_DOC_BYTES:
            return None
        data = path.read_bytes()
    except OSError:
        return None
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _stdlib_sources() -> list[Path]:
    root = _stdlib()
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if set(rel[:-1]) & _SKIP_DIRS or rel[0].startswith("config-"):
            continue
        out.append(path)
    return out


def python_source_documents() -> Iterator[str]:
    for path in _stdlib_sources():
        text = _read_text(path)
        if text:
            yield text


def _docstring_document(module: str, tree: ast.Module) -> str | None:
    """A pydoc-like page: the module docstring, then each public class/function/method docstring."""
    parts = []
    doc = ast.get_docstring(tree)
    if doc:
        parts.append(f"{module}\n\n{doc}")

    def visit(body: list[ast.stmt], prefix: str) -> None:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                if node.name.startswith("_"):
                    continue
                doc = ast.get_docstring(node)
                kind = "class" if isinstance(node, ast.ClassDef) else "def"
                if doc:
                    parts.append(f"{kind} {prefix}{node.name}\n\n{doc}")
                if isinstance(node, ast.ClassDef):
                    visit(node.body, f"{prefix}{node.name}.")

    visit(tree.body, "")
    text = "\n\n".join(parts)
    return text if len(text) >= MIN_DOC_CHARS else None


def docs_documents() -> Iterator[str]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield topics[name]
    root = _stdlib()
    for path in _stdlib_sources():
        text = _read_text(path)
        if not text:
            continue
        try:
            tree = ast.parse(text)
        except (SyntaxError, ValueError):
            continue
        rel = path.relative_to(root).with_suffix("")
        module = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        doc = _docstring_document(module, tree)
        if doc:
            yield doc


def _license_files() -> list[Path]:
    files = {_stdlib() / "LICENSE.txt"}
    for dist in importlib.metadata.distributions():
        for f in dist.files or []:
            if f.name.upper().startswith(_LICENSE_PREFIXES):
                files.add(Path(f.locate()).resolve())
    return sorted(p for p in files if p.is_file())


def license_documents() -> Iterator[str]:
    for path in _license_files():
        text = _read_text(path)
        if text:
            yield text


_SOURCES = {"python-source": python_source_documents, "docs": docs_documents, "licenses": license_documents}


def domain_documents(name: str, max_docs: int | None = None) -> list[str]:
    """Documents of one domain in a fixed order, with identical texts and near-empty ones removed."""
    seen: set[str] = set()
    out = []
    for text in _SOURCES[name]():
        text = text.strip()
        if len(text) < MIN_DOC_CHARS or text in seen:
            continue
        seen.add(text)
        out.append(text)
        if max_docs is not None and len(out) >= max_docs:
            break
    return out


def _environment_key() -> str:
    # The licenses domain depends on what is installed, the others on the Python version: key on both.
    dists = sorted({f"{d.metadata['Name']}=={d.version}" for d in importlib.metadata.distributions()})
    digest = hashlib.sha256("\n".join([sys.version, *dists]).encode()).hexdigest()[:10]
    return f"py{sys.version_info.major}.{sys.version_info.minor}-{digest}"


def default_corpus_dir(max_docs_per_domain: int | None = None) -> Path:
    cap = f"-max{max_docs_per_domain}" if max_docs_per_domain is not None else ""
    return cache_root() / "corpus" / f"embedded-v{VERSION}-{_environment_key()}{cap}"


def materialize_embedded_corpus(out_dir: Path | None = None,
                                max_docs_per_domain: int | None = None) -> dict[str, Path]:
    """Write `<out_dir>/<domain>/documents.jsonl` ({"text": ...} per line) once; return domain -> folder.

    `out_dir` defaults to a folder in the drpruning cache. An existing complete folder is reused as is;
    a new one is written next to its final place and renamed, so readers never see a partial corpus.
    """
    out_dir = Path(out_dir) if out_dir is not None else default_corpus_dir(max_docs_per_domain)
    dirs = {name: out_dir / name for name in DOMAINS}
    if (out_dir / "manifest.json").is_file():
        return dirs
    if out_dir.is_dir() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists, is not empty and holds no embedded corpus (manifest.json): "
                              "pass an empty or new folder")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        manifest = {"version": VERSION, "python": sys.version.split()[0], "domains": {}}
        for name in DOMAINS:
            docs = domain_documents(name, max_docs_per_domain)
            (tmp / name).mkdir()
            with open(tmp / name / "documents.jsonl", "w", encoding="utf-8") as f:
                for text in docs:
                    f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
            manifest["domains"][name] = {"documents": len(docs),
                                         "utf8_bytes": sum(len(t.encode("utf-8")) for t in docs)}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
        follow_umask(tmp)  # mkdtemp made it 0700
        try:
            os.replace(tmp, out_dir)
        except OSError:
            if not (out_dir / "manifest.json").is_file():  # a concurrent writer finished first: use its copy
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dirs
