"""The activation database, written in Parquet shards during the pass (a collector).

Layout (``<root>`` is ``activation_database/activation_db``)::

    tokens/part-NNNNN.parquet       token_index int64, doc_index int64, position int32, token_id int32
    activations/part-NNNNN.parquet  token_index int64, feature int32, value float32   (non-zero only)
    features.parquet                feature, firing_count, frequency, mean_activation, max_activation
    vocab.parquet                   token_id, token_str (decoded once per vocabulary entry)
    csr/{indptr,indices,data}.npy   CSR [n_tokens, d_sae] of the activations, for matrix work
    manifest.json                   written last: counts, d_sae, files; its presence marks completion

Rows cover the analysed tokens only (special tokens excluded). ``token_index`` is the global
stream order used everywhere else (feature summaries, examples). The whole database is built in
``<root>.partial`` and renamed to ``<root>`` once complete, so an interrupted run never leaves a
database that looks finished. Memory: two part buffers (``shard_rows`` rows each): the one being
filled and the one a background thread is writing.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from sae_mlops.core.collectors.base import StepData

FORMAT = "sae-mlops activation database v1"  # the reader checks this in manifest.json

log = logging.getLogger(__name__)

TOKENS_SCHEMA = pa.schema([("token_index", pa.int64()), ("doc_index", pa.int64()), ("position", pa.int32()), ("token_id", pa.int32())])
ACTS_SCHEMA = pa.schema([("token_index", pa.int64()), ("feature", pa.int32()), ("value", pa.float32())])
# Sorted / slowly varying integer columns delta-encoded, floats byte-stream-split, no dictionaries:
# half the write time of Parquet's default dictionary encoding and ~25% smaller activation shards.
_DELTA = "DELTA_BINARY_PACKED"
TOKENS_ENCODING = {"use_dictionary": False, "column_encoding": {"token_index": _DELTA, "doc_index": _DELTA, "position": _DELTA, "token_id": "PLAIN"}}
ACTS_ENCODING = {"use_dictionary": False, "column_encoding": {"token_index": _DELTA, "feature": _DELTA, "value": "BYTE_STREAM_SPLIT"}}


class ActivationPartsWriter:
    """A collector writing the tokens/activations Parquet parts of a token range into ``parts_dir``
    (``tokens/<prefix>NNNNN.parquet``, ``activations/<prefix>NNNNN.parquet``); a shard of a sharded
    pass writes its own parts with prefix ``part-<shard>-`` so that parts sort in stream order.

    A full buffer is written by one background thread while the pass goes on: Parquet's encoding
    and the file write release the GIL, so they overlap the model's next batches (on a CPU, the
    cores torch leaves idle; with a GPU, the time the pass would otherwise wait on the host). At
    most one part is in flight: the next full buffer waits for it, so memory stays two buffers.
    :meth:`flush` writes the rest and waits, so every part is on disk when it returns; an error of
    a background write is raised there or by the next :meth:`update` that fills a buffer."""

    name = "activation_db"

    def __init__(self, parts_dir: Path, d_sae: int, shard_rows: int = 500_000, prefix: str = "part-"):
        self.parts_dir = Path(parts_dir)
        for sub in ("tokens", "activations"):
            if (self.parts_dir / sub).exists():
                shutil.rmtree(self.parts_dir / sub)
            (self.parts_dir / sub).mkdir(parents=True)
        self.d_sae = d_sae
        self.shard_rows = shard_rows
        self.prefix = prefix
        self.n_tokens = 0
        self.nnz = 0
        self.shards = 0
        self._tok: list[pa.RecordBatch] = []
        self._act: list[pa.RecordBatch] = []
        self._buffered = 0
        self._pool: ThreadPoolExecutor | None = None
        self._pending: Future[None] | None = None

    def update(self, step: StepData) -> None:
        batch = step.batch
        analysed = batch.analysed
        n = int(step.f.shape[0])
        token_index = np.arange(step.token_start, step.token_start + n, dtype=np.int64)
        self._tok.append(
            pa.record_batch(
                [
                    token_index,
                    batch.doc_index[:, None].expand_as(analysed)[analysed].numpy(),
                    batch.doc_pos[analysed].numpy().astype(np.int32),
                    batch.tokens[analysed].numpy().astype(np.int32),
                ],
                schema=TOKENS_SCHEMA,
            )
        )
        sp = step.sparse  # row-major: sorted by token, then feature
        values = sp.values.numpy()
        self._act.append(
            pa.record_batch([token_index[sp.rows.numpy()], sp.cols.numpy().astype(np.int32), values], schema=ACTS_SCHEMA)
        )
        self.n_tokens += n
        self.nnz += len(values)
        self._buffered += len(values) + n
        if self._buffered >= self.shard_rows:
            self._write_buffer()

    def flush(self) -> None:
        """Write the buffered rows as one more part (none when the buffer is empty) and wait until
        every part is written; re-raises the error of a failed write."""
        try:
            self._write_buffer()
            self._wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown()
                self._pool = None

    def _write_buffer(self) -> None:
        """Hand the buffered rows to the background thread as the next part, once the part before
        it is written."""
        if not self._tok:
            return
        name = f"{self.prefix}{self.shards:05d}.parquet"
        tokens = pa.Table.from_batches(self._tok, TOKENS_SCHEMA)
        acts = pa.Table.from_batches(self._act, ACTS_SCHEMA)
        self.shards += 1
        self._tok, self._act, self._buffered = [], [], 0
        self._wait()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="activation-db")
        self._pending = self._pool.submit(_write_part, self.parts_dir, name, tokens, acts)

    def _wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def merge(self, other: "ActivationPartsWriter") -> None:
        raise NotImplementedError("activation database parts are combined as files (finalize_database)")

    def compute(self) -> dict[str, Any]:
        return {}


def _write_part(parts_dir: Path, name: str, tokens: pa.Table, acts: pa.Table) -> None:
    pq.write_table(tokens, parts_dir / "tokens" / name, **TOKENS_ENCODING)
    pq.write_table(acts, parts_dir / "activations" / name, **ACTS_ENCODING)


class ActivationDBWriter(ActivationPartsWriter):
    """The whole database of one pass: parts in ``<root>.partial``, then :meth:`finalize`."""

    def __init__(self, root: Path, d_sae: int, shard_rows: int = 500_000):
        self.root = Path(root)
        self.partial = self.root.with_name(self.root.name + ".partial")
        if self.partial.exists():
            shutil.rmtree(self.partial)
        super().__init__(self.partial, d_sae, shard_rows)

    def finalize(self, per_feature: dict[str, list[float]], vocab: list[str]) -> Path:
        """Write the remaining part, then the rest of the database (:func:`finalize_database`)."""
        self.flush()
        return finalize_database(self.root, [self.partial], self.d_sae, per_feature, vocab)

    def abort(self) -> None:
        """Remove the partial database (on error), once a part in flight is written or has failed."""
        try:
            self._wait()
        except Exception as e:  # noqa: BLE001 - the database is being discarded; its write error goes with it
            log.debug("activation database part write failed while aborting: %s", e)
        shutil.rmtree(self.partial, ignore_errors=True)


def finalize_database(root: Path, part_dirs: list[Path], d_sae: int, per_feature: dict[str, list[float]],
                      vocab: list[str]) -> Path:
    """Complete the database at ``root`` from the Parquet parts under ``part_dirs`` (in stream order;
    hard-linked into ``<root>.partial``, copied where links are impossible, so that the parts stay in
    a checkpoint until it is removed and a resumed analysis still finds them): feature table,
    vocabulary, CSR export and manifest; then publish by renaming ``<root>.partial`` to ``<root>``."""
    root = Path(root)
    partial = root.with_name(root.name + ".partial")
    if [Path(p) for p in part_dirs] != [partial]:
        if partial.exists():
            shutil.rmtree(partial)
        for sub in ("tokens", "activations"):
            (partial / sub).mkdir(parents=True)
            for d in part_dirs:
                for f in sorted((Path(d) / sub).glob("*.parquet")):
                    try:
                        os.link(f, partial / sub / f.name)
                    except OSError:
                        shutil.copy2(f, partial / sub / f.name)
    parts = sorted((partial / "activations").glob("*.parquet"))
    n_tokens = sum(pq.read_metadata(partial / "tokens" / f.name).num_rows for f in parts)
    nnz = sum(pq.read_metadata(f).num_rows for f in parts)
    features = pd.DataFrame(per_feature)
    features.insert(0, "feature", np.arange(len(features), dtype=np.int32))
    features.to_parquet(partial / "features.parquet", index=False)
    pd.DataFrame({"token_id": np.arange(len(vocab), dtype=np.int32), "token_str": vocab}).to_parquet(
        partial / "vocab.parquet", index=False
    )
    _write_csr(partial, n_tokens, nnz)
    manifest = {
        "format": FORMAT,
        "n_tokens": n_tokens,
        "nnz": nnz,
        "d_sae": d_sae,
        "shards": len(parts),
        "tables": {"tokens": "tokens/*.parquet", "activations": "activations/*.parquet",
                   "features": "features.parquet", "vocab": "vocab.parquet"},
        "csr": {"indptr": "csr/indptr.npy", "indices": "csr/indices.npy", "data": "csr/data.npy",
                "shape": [n_tokens, d_sae]},
    }
    (partial / "manifest.json").write_text(json.dumps(manifest, indent=2))
    if root.exists():
        shutil.rmtree(root)
    partial.rename(root)
    log.info("activation database: %d tokens, %d activations in %d parts -> %s", n_tokens, nnz, len(parts), root)
    return root


def _write_csr(partial: Path, n_tokens: int, nnz: int) -> None:
    """CSR arrays streamed part by part into .npy files (memory: one part).

    Parts hold contiguous token ranges with rows sorted by token, so ``indices``, ``data`` and
    ``indptr`` are each written front to back with plain file writes (no memory map, whose
    touched pages would count against memory as the corpus grows).
    """
    csr = partial / "csr"
    csr.mkdir()
    files = {
        "indptr": _npy_stream(csr / "indptr.npy", np.int64, n_tokens + 1),
        "indices": _npy_stream(csr / "indices.npy", np.int32, nnz),
        "data": _npy_stream(csr / "data.npy", np.float32, nnz),
    }
    try:
        files["indptr"].write(np.zeros(1, dtype=np.int64).tobytes())
        offset = 0
        for shard in sorted((partial / "activations").glob("*.parquet")):
            tokens = pq.read_table(partial / "tokens" / shard.name, columns=["token_index"]).column(0).to_numpy()
            table = pq.read_table(shard)
            tok = table.column("token_index").to_numpy()
            files["indices"].write(table.column("feature").to_numpy().astype(np.int32).tobytes())
            files["data"].write(table.column("value").to_numpy().astype(np.float32).tobytes())
            t0, t1 = int(tokens[0]), int(tokens[-1]) + 1
            per_token = np.bincount(tok - t0, minlength=t1 - t0)
            files["indptr"].write((offset + np.cumsum(per_token)).astype(np.int64).tobytes())
            offset += len(tok)
    finally:
        for fh in files.values():
            fh.close()


def _npy_stream(path: Path, dtype, length: int):
    """An open file with a .npy header for a 1-D array of ``length``; the caller writes the bytes."""
    fh = open(path, "wb")
    np.lib.format.write_array_header_1_0(
        fh, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": (length,)}
    )
    return fh
