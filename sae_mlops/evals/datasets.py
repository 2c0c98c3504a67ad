"""Labelled text datasets for k-sparse probing: the user's files and the demo's built-in tasks.

A dataset is a file with a text column and a label column:

- ``.jsonl`` / ``.ndjson``: one JSON object per line;
- ``.csv``: a header row, then one row per text (read with pandas);
- ``.parquet`` / ``.pq``: two columns.

Labels may be strings or numbers; two distinct labels make a binary task, more make a multi-class task
(probed one class against the rest). Rows with an empty text or a missing label are dropped and counted.
The digest is the sha256 of the file bytes plus the column names (the built-in tasks: of their rows),
so a cache keyed by it follows the data.

``demo`` names the built-in tasks made from the demo corpus (docstrings of the Python standard
library), so that probing runs offline:

- ``demo_doctest`` (binary): the docstring holds a doctest (``>>>``) or not;
- ``demo_returns`` (binary): the docstring starts with "Return" or not;
- ``demo_topic`` (5 classes): the docstring's topic, from keywords (networking, files, text,
  numbers, concurrency); docstrings whose keywords name more than one topic are left out.

Each class is capped at :data:`DEMO_PER_CLASS` docstrings (a seeded sample), the negatives of a binary
task likewise, so the tasks are balanced and small.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
from dataclasses import dataclass
from pathlib import Path

from sae_mlops.errors import InputError

log = logging.getLogger(__name__)

DEMO = "demo"
DEMO_PER_CLASS = 150
FORMATS_HINT = "a JSONL, CSV or Parquet file with a text and a label column"
_TOPICS = {
    "network": r"\b(socket|http|url|server|request|email|smtp|host)\b",
    "files": r"\b(file|files|path|directory|filename)\b",
    "text": r"\b(string|unicode|encode|decode|encoding|character)\b",
    "numbers": r"\b(integer|float|decimal|number|fraction)\b",
    "concurrency": r"\b(thread|lock|process|queue|async|coroutine|task)\b",
}


@dataclass
class LabelledDataset:
    """Texts with one label each. ``classes``: the distinct labels, sorted (as strings)."""

    name: str
    texts: list[str]
    labels: list[str]
    digest: str
    source: str

    @property
    def classes(self) -> list[str]:
        return sorted(set(self.labels))


def parse_dataset_specs(spec: str) -> list[tuple[str, str]]:
    """``"demo"``, ``"PATH"`` or ``"NAME=PATH,NAME2=PATH2"`` -> [(name, path)]; a bare path is named
    after its file stem. Names must be unique and made of letters, digits, ``_`` and ``-``."""
    out: list[tuple[str, str]] = []
    for part in [p.strip() for p in spec.split(",") if p.strip()]:
        if part == DEMO:
            out.append((DEMO, DEMO))
            continue
        name, sep, path = part.partition("=")
        if not sep:
            name, path = Path(part).stem, part
        name = name.strip()
        if not re.fullmatch(r"[A-Za-z0-9_-]+", name):
            raise InputError(f"--datasets: the dataset name {name!r} may hold only letters, digits, _ and -; write NAME=PATH.")
        out.append((name, path.strip()))
    if not out:
        raise InputError("--datasets is empty; give 'demo' or NAME=PATH items separated by commas.")
    names = [n for n, _ in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise InputError(f"--datasets names {', '.join(dup)} more than once; give each dataset its own NAME=PATH.")
    return out


def load_datasets(spec: str, text_column: str = "text", label_column: str = "label") -> list[LabelledDataset]:
    """Every dataset `spec` names (see :func:`parse_dataset_specs`), ``demo`` expanded to the built-in tasks."""
    out: list[LabelledDataset] = []
    for name, path in parse_dataset_specs(spec):
        if path == DEMO:
            out += demo_datasets()
        else:
            out.append(load_dataset(path, name, text_column, label_column))
    return out


def load_dataset(path: str, name: str, text_column: str = "text", label_column: str = "label") -> LabelledDataset:
    """One labelled dataset from a JSONL, CSV or Parquet file (InputError naming the file and the fix)."""
    import pandas as pd

    file = Path(path).expanduser()
    if not file.is_file():
        raise InputError(f"Dataset {name}: {path} is not a file; give {FORMATS_HINT}.")
    ext = file.suffix.lower()
    try:
        if ext in (".jsonl", ".ndjson"):
            frame = pd.read_json(file, lines=True, dtype=False)
        elif ext == ".csv":
            frame = pd.read_csv(file, dtype=str, keep_default_na=False)
        elif ext in (".parquet", ".pq"):
            frame = pd.read_parquet(file)
        else:
            raise InputError(f"Dataset {name}: {path} has the extension {ext or '(none)'}; give {FORMATS_HINT} (.jsonl, .csv, .parquet).")
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 - a parser's error becomes one sentence
        raise InputError(f"Dataset {name}: {path} could not be read ({' '.join(str(e).split())[:200]}); give {FORMATS_HINT}.") from None
    for col, flag in ((text_column, "--text-column"), (label_column, "--label-column")):
        if col not in frame.columns:
            raise InputError(f"Dataset {name}: {path} has no column {col!r} (columns: {', '.join(map(str, frame.columns[:10]))}); pass {flag}.")
    texts, labels, dropped = [], [], 0
    for t, y in zip(frame[text_column].tolist(), frame[label_column].tolist(), strict=True):
        if not isinstance(t, str) or not t.strip() or y is None or (isinstance(y, float) and y != y) or str(y) == "":
            dropped += 1
            continue
        texts.append(t)
        labels.append(str(y))
    if dropped:
        log.warning("dataset %s: %d rows without a text or a label were dropped", name, dropped)
    digest = hashlib.sha256(file.read_bytes() + f"\0{text_column}\0{label_column}".encode()).hexdigest()
    ds = LabelledDataset(name, texts, labels, digest, str(file))
    check_dataset(ds)
    return ds


def check_dataset(ds: LabelledDataset, min_per_class: int = 4) -> None:
    """At least two classes, each with `min_per_class` texts (a stratified split needs them)."""
    counts = {c: ds.labels.count(c) for c in ds.classes}
    if len(counts) < 2:
        raise InputError(f"Dataset {ds.name} has {len(counts)} distinct label(s); a probe needs at least two classes.")
    small = {c: n for c, n in counts.items() if n < min_per_class}
    if small:
        shown = ", ".join(f"{c!r}: {n}" for c, n in list(small.items())[:5])
        raise InputError(f"Dataset {ds.name}: classes with fewer than {min_per_class} texts ({shown}); add texts or drop those classes.")


def _digest_rows(texts: list[str], labels: list[str]) -> str:
    return hashlib.sha256(json.dumps([texts, labels]).encode()).hexdigest()


def demo_datasets(per_class: int = DEMO_PER_CLASS, seed: int = 0) -> list[LabelledDataset]:
    """The built-in tasks made from the demo corpus (see the module docstring)."""
    from sae_mlops.sources.corpus import load_corpus

    texts = load_corpus(DEMO).texts
    rng = random.Random(seed)

    def binary(name: str, positive: list[str], negative: list[str]) -> LabelledDataset:
        pos = rng.sample(positive, min(per_class, len(positive)))
        neg = rng.sample(negative, min(per_class, len(negative)))
        rows = [(t, "yes") for t in pos] + [(t, "no") for t in neg]
        rng.shuffle(rows)
        xs, ys = [t for t, _ in rows], [y for _, y in rows]
        return LabelledDataset(name, xs, ys, _digest_rows(xs, ys), "demo corpus")

    out = [
        binary("demo_doctest", [t for t in texts if ">>>" in t], [t for t in texts if ">>>" not in t]),
        binary(
            "demo_returns",
            [t for t in texts if t.lstrip().lower().startswith("return")],
            [t for t in texts if not t.lstrip().lower().startswith("return")],
        ),
    ]
    by_topic: dict[str, list[str]] = {k: [] for k in _TOPICS}
    for t in texts:
        hits = [k for k, p in _TOPICS.items() if re.search(p, t, re.IGNORECASE)]
        if len(hits) == 1:
            by_topic[hits[0]].append(t)
    rows = [(t, k) for k, ts in by_topic.items() for t in rng.sample(ts, min(per_class, len(ts)))]
    rng.shuffle(rows)
    xs, ys = [t for t, _ in rows], [y for _, y in rows]
    out.append(LabelledDataset("demo_topic", xs, ys, _digest_rows(xs, ys), "demo corpus"))
    return out
