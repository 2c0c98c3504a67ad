"""Corpus loading: every format, empty-text dropping, digests, and each bad input."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sae_mlops.errors import InputError
from sae_mlops.sources.corpus import load_corpus

DOCS = ["First document.", "  ", "Second one\nwith two lines.", "", "Third."]
KEPT = ["First document.", "Second one\nwith two lines.", "Third."]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_json_list(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps(DOCS))
    corpus = load_corpus(str(path))
    assert corpus.texts == KEPT
    assert corpus.n_dropped_empty == 2
    assert corpus.format == "json"
    assert corpus.digest == sha(path)
    assert corpus.path == str(path)


def test_jsonl_with_text_field(tmp_path):
    path = tmp_path / "c.jsonl"
    lines = [json.dumps({"body": d, "id": i}) for i, d in enumerate(DOCS)]
    path.write_text("\n".join(lines[:2]) + "\n\n" + "\n".join(lines[2:]) + "\n")
    corpus = load_corpus(str(path), text_field="body")
    assert corpus.texts == KEPT
    assert corpus.n_dropped_empty == 2
    assert corpus.format == "jsonl"


def test_parquet_with_nulls(tmp_path):
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"text": DOCS + [None], "n": list(range(6))}), path)
    corpus = load_corpus(str(path))
    assert corpus.texts == KEPT
    assert corpus.n_dropped_empty == 3
    assert corpus.format == "parquet"
    assert corpus.digest == sha(path)


def test_plain_text_blank_line_separated(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("First document.\n\n \n\nSecond one\nwith two lines.\n\n\nThird.\n")
    corpus = load_corpus(str(path))
    assert corpus.texts == KEPT
    assert corpus.format == "txt"


def test_unknown_extension_sniffed(tmp_path):
    path = tmp_path / "corpus.data"
    path.write_text(json.dumps(DOCS))
    assert load_corpus(str(path)).format == "json"


def test_demo_corpus(demo_assets):
    corpus = load_corpus("demo")
    assert corpus.format == "demo" and len(corpus.texts) > 10 and corpus.digest


@pytest.mark.parametrize(
    ("name", "content", "fragment"),
    [
        ("dict.json", json.dumps({"texts": ["a"]}), "not a list"),
        ("ints.json", json.dumps(["a", 3]), "element 1"),
        ("bad.json", '["a", ', "not valid JSON"),
        ("empty.json", json.dumps(["", "  \n"]), "no non-empty text"),
        ("nofield.jsonl", json.dumps({"body": "a"}) + "\n", "no 'text' field"),
        ("badline.jsonl", '{"text": "a"}\n{oops\n', "line 2"),
        ("badparquet.parquet", "not parquet at all", "not a readable Parquet"),
        ("blank.txt", "\n\n  \n", "no non-empty text"),
    ],
)
def test_bad_inputs_raise_input_error_naming_the_file(tmp_path, name, content, fragment):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(InputError) as info:
        load_corpus(str(path))
    assert str(path) in str(info.value)
    assert fragment in str(info.value)


def test_missing_parquet_column(tmp_path):
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"body": ["a"]}), path)
    with pytest.raises(InputError, match="no 'text' column .*body"):
        load_corpus(str(path))


def test_missing_file():
    with pytest.raises(InputError, match="nope.json does not exist"):
        load_corpus("/nonexistent/nope.json")
