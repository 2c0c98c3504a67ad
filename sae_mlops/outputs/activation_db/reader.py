"""Reading the activation database with DuckDB: the questions researchers ask of it.

Views available to :meth:`ActivationDB.sql`: ``tokens``, ``activations``, ``features``, ``vocab``
(see :mod:`sae_mlops.outputs.activation_db.writer` for their columns). Contexts are rebuilt from the token table
by document and position, the activating token marked ``[[like this]]``.

The query surface is read-only and confined to the database directory:

- :meth:`ActivationDB.sql` runs exactly one statement, and only a ``SELECT`` (``WITH ... SELECT``,
  ``FROM t``, ``VALUES``, ``DESCRIBE``/``SHOW``/``SUMMARIZE`` included) as DuckDB's own parser
  classifies it (`duckdb.extract_statements`); several statements, DDL, ``COPY``, ``SET``,
  ``PRAGMA``, ``ATTACH``, ``INSTALL``/``LOAD``, ``EXPLAIN``, ``PIVOT`` raise `InputError`.
- the DuckDB connection is in memory, may open files only under the database directory
  (``allowed_directories``) with external access otherwise off (``enable_external_access=false``:
  no ``read_csv('/etc/passwd')``, no ``COPY ... TO`` elsewhere, no extensions), and its configuration
  is locked (``lock_configuration=true``) so a query cannot switch that back.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from sae_mlops.outputs.activation_db.writer import FORMAT
from sae_mlops.errors import InputError

MARK_OPEN, MARK_CLOSE = "[[", "]]"
VIEWS = ("tokens", "activations", "features", "vocab")
_SQL_HINT = "give one SELECT over the views tokens, activations, features and vocab"


def _is_database(path: Path) -> bool:
    manifest = path / "manifest.json"
    if not manifest.is_file():
        return False
    try:
        return json.loads(manifest.read_text()).get("format") == FORMAT
    except (OSError, ValueError):
        return False


def find_database(path: str | Path) -> Path:
    """A database directory itself, or the newest complete ``activation_db`` (``activation_db_<ts>`` as
    older versions named it) in an analysis
    directory (``<dir>/activation_database/``) or in an ``activation_database`` directory."""
    path = Path(path)
    if _is_database(path):
        return path
    if not path.exists():
        raise InputError(f"'{path}' does not exist; point at a full-analysis output directory or its activation database.")
    pattern = [*path.glob("activation_db*"), *path.glob("activation_database/activation_db*")]
    complete = [p for p in pattern if not p.name.endswith(".partial") and _is_database(p)]
    if complete:
        return max(complete, key=lambda p: (p.stat().st_mtime, p.name))
    if any(p.name.endswith(".partial") for p in pattern):
        raise InputError(f"the activation database under '{path}' is incomplete (an interrupted run); run `sae-mlops full` again.")
    raise InputError(f"no activation database found at '{path}'; run `sae-mlops full` first and point at its output directory.")


class ActivationDB:
    """One activation database, opened read-only on a sandboxed in-memory DuckDB connection."""

    def __init__(self, path: str | Path):
        self.root = find_database(path).resolve()
        self.manifest = json.loads((self.root / "manifest.json").read_text())
        self.con = _sandboxed_connection(self.root)

    def sql(self, query: str, params: list | None = None) -> pd.DataFrame:
        """Rows of one read-only statement (see the module docstring); `InputError` for anything else
        and for a statement that touches a file outside the database directory."""
        import duckdb

        check_read_only(query)
        try:
            return self.con.execute(query, params or []).df()
        except duckdb.PermissionException:
            raise InputError(
                f"the query tries to read or write a file outside the database directory {self.root}; {_SQL_HINT}."
            ) from None

    def _check_feature(self, feature: int) -> None:
        if not 0 <= feature < self.manifest["d_sae"]:
            raise InputError(f"feature {feature} is out of range; this SAE has features 0..{self.manifest['d_sae'] - 1}.")

    def top_activations(self, feature: int, k: int = 25, context: int = 10) -> pd.DataFrame:
        """The k strongest activations of a feature (ties by token order), with a marked context."""
        self._check_feature(feature)
        return self.sql(
            f"""
            WITH top AS (
                SELECT a.token_index, a.value, t.doc_index, t.position, t.token_id
                FROM activations a JOIN tokens t USING (token_index)
                WHERE a.feature = ? ORDER BY a.value DESC, a.token_index LIMIT ?)
            SELECT top.token_index, top.doc_index, top.position, top.token_id, v.token_str AS token, top.value,
                   string_agg(CASE WHEN c.token_index = top.token_index
                                   THEN '{MARK_OPEN}' || cv.token_str || '{MARK_CLOSE}' ELSE cv.token_str END,
                              '' ORDER BY c.position) AS context
            FROM top
            JOIN vocab v ON v.token_id = top.token_id
            JOIN tokens c ON c.doc_index = top.doc_index AND c.position BETWEEN top.position - ? AND top.position + ?
            JOIN vocab cv ON cv.token_id = c.token_id
            GROUP BY ALL ORDER BY top.value DESC, top.token_index
            """,
            [feature, k, context, context],
        )

    def features_on_token(self, token_index: int | None = None, doc: int | None = None, position: int | None = None) -> pd.DataFrame:
        """Features active on one token (by global token index, or by document and position)."""
        if token_index is None:
            if doc is None or position is None:
                raise InputError("name a token by --token INDEX or by --doc D --position P.")
            found = self.sql("SELECT token_index FROM tokens WHERE doc_index = ? AND position = ?", [doc, position])
            if found.empty:
                raise InputError(f"document {doc} has no analysed token at position {position}.")
            token_index = int(found.token_index[0])
        return self.sql(
            "SELECT a.feature, a.value FROM activations a WHERE a.token_index = ? ORDER BY a.value DESC", [token_index]
        )

    def features_in_document(self, doc: int) -> pd.DataFrame:
        """Features that fired in a document: on how many of its tokens, max and mean activation."""
        return self.sql(
            """SELECT a.feature, count(*) AS n_tokens, max(a.value) AS max_value, avg(a.value) AS mean_value
               FROM activations a JOIN tokens t USING (token_index) WHERE t.doc_index = ?
               GROUP BY a.feature ORDER BY n_tokens DESC, max_value DESC""",
            [doc],
        )

    def document_counts(self, feature: int) -> pd.DataFrame:
        """Firing counts of a feature per document."""
        self._check_feature(feature)
        return self.sql(
            """SELECT t.doc_index, count(*) AS n_fired, max(a.value) AS max_value
               FROM activations a JOIN tokens t USING (token_index) WHERE a.feature = ?
               GROUP BY t.doc_index ORDER BY n_fired DESC, t.doc_index""",
            [feature],
        )

    def csr(self) -> sp.csr_matrix:
        """The activations as a CSR matrix [n_tokens, d_sae] (arrays memory-mapped)."""
        c = self.manifest["csr"]
        arrays = [np.load(self.root / c[name], mmap_mode="r") for name in ("data", "indices", "indptr")]
        return sp.csr_matrix(tuple(arrays), shape=tuple(c["shape"]))


def check_read_only(query: str) -> None:
    """`InputError` unless `query` is exactly one SELECT statement, as DuckDB's parser sees it."""
    import duckdb

    try:
        statements = duckdb.extract_statements(query)
    except duckdb.Error as e:
        raise InputError(f"the SQL query does not parse ({' '.join(str(e).split())}); {_SQL_HINT}.") from None
    if not statements:
        raise InputError(f"the SQL query is empty; {_SQL_HINT}.")
    if len(statements) > 1:
        raise InputError(f"the SQL holds {len(statements)} statements; {_SQL_HINT}, without ';' between statements.")
    kind = statements[0].type
    if kind != duckdb.StatementType.SELECT:
        name = getattr(kind, "name", str(kind)).replace("_STATEMENT", "")
        raise InputError(f"only SELECT statements run on the activation database, not {name}; {_SQL_HINT}.")


def _sandboxed_connection(root: Path):
    """An in-memory DuckDB connection with the four views, able to open files only under `root`,
    with external access off and its configuration locked."""
    import duckdb

    con = duckdb.connect()
    con.execute("SET allowed_directories = ?", [[f"{root.as_posix()}/"]])
    con.execute("SET enable_external_access = false")
    r = root.as_posix().replace("'", "''")
    con.execute(f"CREATE VIEW tokens AS SELECT * FROM read_parquet('{r}/tokens/*.parquet')")
    con.execute(f"CREATE VIEW activations AS SELECT * FROM read_parquet('{r}/activations/*.parquet')")
    con.execute(f"CREATE VIEW features AS SELECT * FROM read_parquet('{r}/features.parquet')")
    con.execute(f"CREATE VIEW vocab AS SELECT * FROM read_parquet('{r}/vocab.parquet')")
    con.execute("SET lock_configuration = true")
    return con
