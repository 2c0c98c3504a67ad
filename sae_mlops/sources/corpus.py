"""Read a corpus of documents: JSON list[str], JSONL, Parquet or plain text (or the demo corpus).

Formats, chosen by extension and, for an unknown extension, by content:

- ``.json``: a JSON list of strings (the prior tool's dataset format).
- ``.jsonl`` / ``.ndjson``: one JSON object per line with the text under `text_field`
  (a line may also be a bare JSON string).
- ``.parquet`` / ``.pq``: a string column named `text_field` (null values count as empty).
- ``.txt`` / ``.text`` / ``.md``: documents separated by blank lines.

Empty and whitespace-only texts are dropped and counted. The digest is the sha256 of the file bytes.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from sae_mlops.errors import InputError
from sae_mlops.sources.hashing import sha256_file
from sae_mlops.sources.types import Corpus

logger = logging.getLogger(__name__)

DEMO = "demo"
FORMATS_HINT = "a JSON list of strings, JSONL, Parquet or a .txt file"

_EXTENSIONS = {
    ".json": "json",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".txt": "txt",
    ".text": "txt",
    ".md": "txt",
}
_BLANK_LINES = re.compile(r"\n[ \t\r\f\v]*\n")


def load_corpus(path: str, text_field: str = "text") -> Corpus:
    """Read the documents of `path` (or the demo corpus when `path` is "demo").

    Raises InputError for a missing or unreadable file, a wrong structure, a missing text field or
    column, or a corpus without any non-empty text.
    """
    if path == DEMO:
        return _load_demo_corpus()
    file = Path(path).expanduser()
    if not file.exists():
        raise InputError(f"Corpus file {path} does not exist; give {FORMATS_HINT} (or 'demo').")
    if not file.is_file():
        raise InputError(f"Corpus {path} is not a file; give {FORMATS_HINT}.")
    fmt = detect_format(file)
    readers: dict[str, Callable[[Path, str], list[str | None]]] = {"json": _read_json, "jsonl": _read_jsonl, "parquet": _read_parquet, "txt": _read_txt}
    raw = readers[fmt](file, text_field)
    return _make_corpus(raw, str(file), fmt, sha256_file(file))


def detect_format(file: Path) -> str:
    """ "json", "jsonl", "parquet" or "txt" from the extension, else from the first bytes of the file."""
    fmt = _EXTENSIONS.get(file.suffix.lower())
    if fmt is not None:
        return fmt
    with open(file, "rb") as handle:
        head = handle.read(4096)
    if head.startswith(b"PAR1"):
        return "parquet"
    stripped = head.lstrip()
    if stripped.startswith(b"["):
        return "json"
    if stripped.startswith(b"{"):
        return "jsonl"
    return "txt"


def _make_corpus(raw: Iterable[str | None], path: str, fmt: str, digest: str) -> Corpus:
    """Drop empty / whitespace-only texts (None counts as empty) and build the Corpus."""
    texts: list[str] = []
    dropped = 0
    for text in raw:
        if text is None or not text.strip():
            dropped += 1
        else:
            texts.append(text)
    if not texts:
        raise InputError(f"Corpus {path} holds no non-empty text; give a file with at least one document.")
    if dropped:
        logger.info("corpus %s: dropped %d empty or whitespace-only texts", path, dropped)
    logger.info("corpus %s: %d documents (%s)", path, len(texts), fmt)
    return Corpus(texts=texts, path=path, format=fmt, n_dropped_empty=dropped, digest=digest)


def _read_text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(
            f"Corpus file {file} is not UTF-8 text ({exc.reason} at byte {exc.start}); re-save it as UTF-8."
        ) from None
    except OSError as exc:
        raise InputError(f"Corpus file {file} could not be read ({exc.strerror}); check its permissions.") from None


def _read_json(file: Path, text_field: str) -> list[str | None]:
    content = _read_text(file)
    try:
        data: Any = json.loads(content)
    except json.JSONDecodeError as exc:
        if exc.msg == "Extra data" and content.lstrip().startswith("{"):
            logger.info("corpus %s holds one JSON value per line: reading it as JSONL", file)
            return _parse_jsonl(file, content, text_field)
        raise InputError(
            f"Corpus file {file} is not valid JSON ({exc.msg} at line {exc.lineno}); give a JSON list of strings."
        ) from None
    if not isinstance(data, list):
        raise InputError(
            f"Corpus file {file} holds a JSON {type(data).__name__}, not a list; give a JSON list of strings "
            f"(or JSONL with a '{text_field}' field)."
        )
    for index, item in enumerate(data):
        if not isinstance(item, str):
            raise InputError(
                f"Corpus file {file}: element {index} is a {type(item).__name__}, not a string; give a JSON list "
                f"of strings (or JSONL with a '{text_field}' field)."
            )
    return data


def _read_jsonl(file: Path, text_field: str) -> list[str | None]:
    return _parse_jsonl(file, _read_text(file), text_field)


def _parse_jsonl(file: Path, content: str, text_field: str) -> list[str | None]:
    texts: list[str | None] = []
    for lineno, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(
                f"Corpus file {file}: line {lineno} is not valid JSON ({exc.msg}); fix or remove that line."
            ) from None
        if isinstance(record, str):
            texts.append(record)
            continue
        if not isinstance(record, dict):
            raise InputError(
                f"Corpus file {file}: line {lineno} is a JSON {type(record).__name__}; each line must be an object "
                f"with a '{text_field}' field."
            )
        if text_field not in record:
            keys = ", ".join(sorted(map(str, record))[:8]) or "none"
            raise InputError(
                f"Corpus file {file}: line {lineno} has no '{text_field}' field (fields: {keys}); "
                "choose the text field with --text-field."
            )
        value = record[text_field]
        if value is not None and not isinstance(value, str):
            raise InputError(
                f"Corpus file {file}: line {lineno} field '{text_field}' is a {type(value).__name__}, not a string; "
                "choose the text field with --text-field."
            )
        texts.append(value)
    return texts


def _read_parquet(file: Path, text_field: str) -> list[str | None]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(file)
        schema = parquet.schema_arrow
    except (pa.ArrowException, OSError) as exc:
        raise InputError(
            f"Corpus file {file} is not a readable Parquet file ({exc}); give a valid Parquet file."
        ) from None
    if text_field not in schema.names:
        columns = ", ".join(schema.names[:8]) or "none"
        raise InputError(
            f"Corpus file {file} has no '{text_field}' column (columns: {columns}); choose the text column with --text-field."
        )
    column_type = schema.field(text_field).type
    is_view = getattr(pa.types, "is_string_view", lambda _t: False)
    if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type) or is_view(column_type)):
        raise InputError(
            f"Corpus file {file}: column '{text_field}' has type {column_type}, not string; "
            "choose the text column with --text-field."
        )
    try:
        table = parquet.read(columns=[text_field])
    except (pa.ArrowException, OSError) as exc:
        raise InputError(
            f"Corpus file {file} could not be read as Parquet ({exc}); give a valid Parquet file."
        ) from None
    return table.column(text_field).to_pylist()


def _read_txt(file: Path, text_field: str) -> list[str | None]:
    content = _read_text(file).replace("\r\n", "\n")
    return [block.strip("\n") for block in _BLANK_LINES.split(content)]


def _load_demo_corpus() -> Corpus:
    """The demo corpus shipped with `sae_mlops.demo` (a JSON list of strings)."""
    try:
        from sae_mlops.demo import demo_corpus_path, ensure_demo_assets
    except ImportError as exc:
        raise InputError(
            f"The demo corpus is not available in this installation ({exc}); give a corpus file."
        ) from None
    ensure_demo_assets()  # builds the assets (offline) if a file is missing, as load_demo_model does
    file = Path(demo_corpus_path())
    corpus = load_corpus(str(file))
    corpus.format = DEMO
    return corpus
