"""Demo corpus: docstrings of the Python standard library, read with `ast` (nothing is imported)."""

from __future__ import annotations

import ast
import json
import logging
import sysconfig
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

#: Directory names under the stdlib that are skipped (tests, GUI code, third-party packages).
SKIP_DIRS = frozenset({"test", "tests", "idlelib", "tkinter", "turtledemo", "site-packages", "__pycache__"})
MIN_DOC_CHARS = 40
MAX_CORPUS_CHARS = 2_000_000

_DocNode = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def stdlib_source_files(root: Path | None = None) -> list[Path]:
    """Sorted stdlib ``.py`` files under `root` (default: this interpreter's stdlib), tests excluded."""
    root = Path(sysconfig.get_paths()["stdlib"]) if root is None else root
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if SKIP_DIRS.intersection(rel.parts[:-1]) or path.name.startswith("test_"):
            continue
        files.append(path)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _docstrings(node: ast.AST) -> Iterator[str]:
    """Docstrings of `node` and the classes/functions inside it, in source order."""
    if isinstance(node, _DocNode):
        doc = ast.get_docstring(node, clean=True)
        if doc:
            yield doc.strip()
    for child in ast.iter_child_nodes(node):
        yield from _docstrings(child)


def build_corpus(
    root: Path | None = None, min_chars: int = MIN_DOC_CHARS, max_chars: int = MAX_CORPUS_CHARS
) -> list[str]:
    """One document per stdlib docstring (module, class, function): stripped, deduplicated, at least
    `min_chars` long, in file then source order, stopping before the total would exceed `max_chars`."""
    docs: list[str] = []
    seen: set[str] = set()
    total = 0
    for path in stdlib_source_files(root):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        except (SyntaxError, UnicodeDecodeError, ValueError) as exc:
            logger.debug("skipping %s: %s", path, exc)
            continue
        for doc in _docstrings(tree):
            if len(doc) < min_chars or doc in seen:
                continue
            if total + len(doc) > max_chars:
                logger.info("corpus: %d documents, %d chars (capped)", len(docs), total)
                return docs
            seen.add(doc)
            docs.append(doc)
            total += len(doc)
    logger.info("corpus: %d documents, %d chars", len(docs), total)
    return docs


def save_corpus(docs: list[str], path: Path) -> None:
    """Write the corpus as a JSON list[str] (the prior tool's dataset format)."""
    path.write_text(json.dumps(docs, ensure_ascii=False), encoding="utf-8")


def load_corpus(path: Path) -> list[str]:
    """Read a JSON list[str] corpus."""
    docs = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(docs, list) or not all(isinstance(d, str) for d in docs):
        raise ValueError(f"{path} is not a JSON list of strings")
    return docs
