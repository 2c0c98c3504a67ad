"""Loading a full analysis directory (as written by :func:`sae_mlops.analyses.full.run_full`) into one typed
object for interpretation.

Layout read (file names as written now, ``results/feature_summaries.jsonl``...; directories written
by older versions carry a UTC timestamp, ``feature_summaries_<ts>.jsonl`` with ``<ts>`` =
``YYYYmmdd_HHMMSS``, and are read too: the newest file of each kind is used, so a directory that
holds several analyses reads as its latest):

- ``results/feature_summaries.jsonl`` (required): one line per feature that fired, with its
  top examples (token, token_id, activation, context with the token marked ``[[like this]]``,
  position, text_idx, global_idx);
- ``results/feature_stats.parquet``: firing_count, frequency, mean/max activation for every
  feature (dead ones included);
- ``results/logit_lens.parquet``, ``results/analysis_results.json`` (params, metrics);
- ``matrices/feature_similarity.npy``, ``matrices/feature_cooccurrence.npy`` (dense,
  only when ``d_sae`` was at most the dense limit; memory-mapped here);
- ``matrices/similarity_neighbours.parquet``, ``matrices/cooccurrence_neighbours.parquet``
  (top neighbours per feature; always written).

Pair values for features without a dense matrix come from the neighbour lists: a pair listed in
either direction gets that value, every other pair is unknown (NaN).
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from sae_mlops.errors import InputError

log = logging.getLogger(__name__)

Kind = Literal["cooccurrence", "similarity"]

_TS = re.compile(r"_(\d{8}_\d{6})\.[A-Za-z0-9]+$")

FULL_HINT = "run `sae-mlops full --sae ...` first (the full analysis writes them)"


def find_newest(directory: Path, prefix: str, suffix: str) -> Path | None:
    """The file ``directory/<prefix without its trailing _><suffix>`` (the stable name), or the
    ``directory/<prefix><ts><suffix>`` with the largest timestamp (older layouts); when both exist,
    the one written last. None when there is neither.

    Temporary files (``.name.part``) are never matched: they do not end in ``suffix``.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return None
    found = []
    for p in directory.glob(f"{prefix}*{suffix}"):
        m = _TS.search(p.name)
        if m and p.name == f"{prefix}{m.group(1)}{suffix}" and p.is_file():
            found.append((m.group(1), p))
    newest = max(found)[1] if found else None
    stable = directory / f"{prefix.rstrip('_')}{suffix}"
    if stable.is_file() and (newest is None or stable.stat().st_mtime >= newest.stat().st_mtime):
        return stable
    return newest


@dataclass
class AnalysisData:
    """One full analysis, loaded.

    summaries: the feature-summary lines (dicts), in feature order.
    stats: per-feature table for all ``d_sae`` features (feature, firing_count, frequency,
        mean_activation, max_activation); built from the summaries when the Parquet is absent.
    similarity / cooccurrence: dense ``d_sae x d_sae`` matrices (memory-mapped) or None.
    similarity_neighbours / cooccurrence_neighbours: long tables (feature, rank, neighbour, value).
    decoder: the SAE's decoder rows ``W_dec [d_sae, d_in]`` when loaded (see
        :func:`sae_mlops.interp.decoder.load_decoder`), else None.
    """

    root: Path
    timestamp: str | None
    summaries: list[dict[str, Any]]
    stats: pd.DataFrame
    params: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    logit_lens: pd.DataFrame | None = None
    similarity: np.ndarray | None = None
    cooccurrence: np.ndarray | None = None
    similarity_neighbours: pd.DataFrame | None = None
    cooccurrence_neighbours: pd.DataFrame | None = None
    decoder: np.ndarray | None = None
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def d_sae(self) -> int:
        return int(len(self.stats))

    @property
    def cooccurrence_measure(self) -> str:
        return str(self.params.get("full_cooccurrence_measure", "correlation"))

    def summary(self, feature: int) -> dict[str, Any]:
        """The summary line of ``feature`` (an empty one, no examples, for a feature that never fired)."""
        by_feature = self._by_feature()
        if feature in by_feature:
            return by_feature[feature]
        if not 0 <= feature < self.d_sae:
            raise InputError(f"feature {feature} is out of range; this SAE has features 0..{self.d_sae - 1}.")
        return {"feature": feature, "activation_frequency": 0, "top_examples": []}

    def examples(self, feature: int) -> pd.DataFrame:
        """The top examples of ``feature`` as a table (token, token_id, activation, context, position, ...)."""
        cols = ["token", "token_id", "activation", "context", "position", "text_idx", "global_idx"]
        return pd.DataFrame(self.summary(feature).get("top_examples", []), columns=cols)

    def alive(self) -> np.ndarray:
        """Indices of the features that fired at least once."""
        return np.flatnonzero(self.stats["firing_count"].to_numpy() > 0)

    def pair_values(self, kind: Kind, rows: np.ndarray, cols: np.ndarray | None = None) -> np.ndarray:
        """Pair matrix block ``M[rows][:, cols]`` (cols default: rows) of co-occurrence or similarity.

        Taken from the dense matrix when there is one; for similarity from the decoder when loaded
        (cosine of decoder rows, ``u_i . u_j`` with ``u = W_dec / ||W_dec||``); else from the
        neighbour lists, NaN for pairs not listed.
        """
        rows = np.asarray(rows, dtype=np.int64)
        cols = rows if cols is None else np.asarray(cols, dtype=np.int64)
        dense = self.cooccurrence if kind == "cooccurrence" else self.similarity
        if dense is not None:
            return np.asarray(dense[np.ix_(rows, cols)], dtype=np.float64)
        if kind == "similarity" and self.decoder is not None:
            w = np.asarray(self.decoder, dtype=np.float64)
            u = w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)
            return u[rows] @ u[cols].T
        table = self.cooccurrence_neighbours if kind == "cooccurrence" else self.similarity_neighbours
        out = np.full((len(rows), len(cols)), np.nan)
        if table is None or table.empty:
            return out
        rpos = pd.Series(np.arange(len(rows)), index=rows)
        cpos = pd.Series(np.arange(len(cols)), index=cols)
        rpos = rpos[~rpos.index.duplicated()]
        cpos = cpos[~cpos.index.duplicated()]
        f, n, v = (table[c].to_numpy() for c in ("feature", "neighbour", "value"))
        for a, b in ((f, n), (n, f)):  # both directions: the lists are per feature, the measures symmetric
            keep = np.isin(a, rpos.index) & np.isin(b, cpos.index)
            out[rpos[a[keep]].to_numpy(), cpos[b[keep]].to_numpy()] = v[keep]
        return out

    def _by_feature(self) -> dict[int, dict[str, Any]]:
        cache = self.__dict__.get("_summary_index")
        if cache is None:
            cache = {int(s["feature"]): s for s in self.summaries}
            self.__dict__["_summary_index"] = cache
        return cache


def read_summaries(path: Path) -> list[dict[str, Any]]:
    """The JSONL feature summaries, one dict per line, sorted by feature."""
    out = []
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise InputError(f"'{path}' line {n} is not valid JSON ({e.msg}); the file is damaged, {FULL_HINT} again.") from e
    return sorted(out, key=lambda s: int(s["feature"]))


def _stats_from_summaries(summaries: list[dict[str, Any]], d_sae: int) -> pd.DataFrame:
    frame = pd.DataFrame({"feature": np.arange(d_sae)})
    frame["firing_count"] = 0
    frame["frequency"] = 0.0
    frame["mean_activation"] = 0.0
    frame["max_activation"] = 0.0
    for s in summaries:
        i = int(s["feature"])
        frame.loc[i, "firing_count"] = int(s.get("activation_frequency", 0))
        frame.loc[i, "frequency"] = float(s.get("firing_fraction", np.nan))
        frame.loc[i, "mean_activation"] = float(s.get("mean_activation", np.nan))
        frame.loc[i, "max_activation"] = float(s.get("max_activation", np.nan))
    return frame


def require_full_analysis(path: str | Path) -> Path:
    """The newest feature-summary file under ``path``; InputError naming what to run when there is
    none (a quick analysis, or not an analysis directory at all)."""
    root = Path(path).expanduser()
    if not root.is_dir():
        raise InputError(f"analysis directory '{root}' does not exist; give the output directory of `sae-mlops full`.")
    found = find_newest(root / "results", "feature_summaries_", ".jsonl")
    if found is None:
        quick = find_newest(root / "results", "analysis_results_", ".json")
        what = "a quick analysis" if quick is not None else "not a full analysis directory"
        raise InputError(f"'{root}' has no feature summaries (results/feature_summaries.jsonl): it is {what}; {FULL_HINT}.")
    return found


def load_analysis(path: str | Path) -> AnalysisData:
    """Load the newest full analysis under ``path`` (the directory given to ``run_full`` as out_dir).

    Raises InputError naming what to run when there are no feature summaries (a quick analysis, or
    not an analysis directory at all).
    """
    root = Path(path).expanduser()
    summaries_path = require_full_analysis(root)
    rdir, mdir = root / "results", root / "matrices"
    m = _TS.search(summaries_path.name)
    named_ts = m.group(1) if m else None  # older layouts: the timestamp is in every file name
    files: dict[str, Path] = {"feature_summaries": summaries_path}

    def newest(key: str, directory: Path, prefix: str, suffix: str) -> Path | None:
        p = find_newest(directory, prefix, suffix)
        if p is not None:
            files[key] = p
            if (named_ts or _TS.search(p.name)) and (named_ts is None or named_ts not in p.name):
                log.warning("%s is from another analysis than %s", p.name, summaries_path.name)
        return p

    summaries = read_summaries(summaries_path)
    results_path = newest("analysis_results", rdir, "analysis_results_", ".json")
    params: dict[str, Any] = {}
    metrics: dict[str, Any] = {}
    finished = None
    if results_path is not None:
        doc = json.loads(results_path.read_text(encoding="utf-8"))
        params, metrics = dict(doc.get("params", {})), dict(doc.get("metrics", {}))
        finished = (doc.get("details") or {}).get("finished_at")
    # when the analysis was made: the name's timestamp (older layouts), else the results' finished_at,
    # else the summaries file's modification time (UTC)
    ts = named_ts or finished or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(summaries_path.stat().st_mtime))

    stats_path = newest("feature_stats", rdir, "feature_stats_", ".parquet")
    if stats_path is not None:
        stats = pd.read_parquet(stats_path).sort_values("feature").reset_index(drop=True)
    else:
        d_sae = int(params.get("d_sae") or (max((int(s["feature"]) for s in summaries), default=-1) + 1))
        stats = _stats_from_summaries(summaries, d_sae)

    lens_path = newest("logit_lens", rdir, "logit_lens_", ".parquet")
    sim_path = newest("feature_similarity", mdir, "feature_similarity_", ".npy")
    cooc_path = newest("feature_cooccurrence", mdir, "feature_cooccurrence_", ".npy")
    simn_path = newest("similarity_neighbours", mdir, "similarity_neighbours_", ".parquet")
    coocn_path = newest("cooccurrence_neighbours", mdir, "cooccurrence_neighbours_", ".parquet")
    data = AnalysisData(
        root=root,
        timestamp=ts,
        summaries=summaries,
        stats=stats,
        params=params,
        metrics=metrics,
        logit_lens=pd.read_parquet(lens_path) if lens_path else None,
        similarity=np.load(sim_path, mmap_mode="r") if sim_path else None,
        cooccurrence=np.load(cooc_path, mmap_mode="r") if cooc_path else None,
        similarity_neighbours=pd.read_parquet(simn_path) if simn_path else None,
        cooccurrence_neighbours=pd.read_parquet(coocn_path) if coocn_path else None,
        files=files,
    )
    log.info("loaded analysis %s from %s: %d features, %d with summaries", ts, root, data.d_sae, len(summaries))
    return data


def open_analysis(run_id: str | None = None, analysis_dir: str | Path | None = None, tracking_uri: str | None = None, download_to: str | Path | None = None) -> AnalysisData:
    """Load an analysis from a local directory, or download MLflow run ``run_id``'s artifacts first.

    ``analysis_dir`` wins when both are given (it is taken to hold that run's artifacts already).
    A run's artifacts go to ``download_to`` (default: a new temporary directory).
    """
    if analysis_dir:
        return load_analysis(analysis_dir)
    if not run_id:
        raise InputError("name the analysis: an MLflow run id (run_id / --run-id) or a local analysis directory (analysis_dir / --analysis-dir).")
    from sae_mlops.tracking.artifacts import download_analysis

    dst = Path(download_to) if download_to else Path(tempfile.mkdtemp(prefix=f"sae-mlops-{run_id[:8]}-"))
    return load_analysis(download_analysis(run_id, dst, tracking_uri or None))


OVERVIEW_PARAMS = ("sae", "sae_architecture", "d_in", "d_sae", "hook", "model", "corpus", "tokens_analysed", "full_cooccurrence_measure")
OVERVIEW_METRICS = ("sparsity/l0_mean", "features/dead_count", "features/dense_count", "recon/explained_variance", "downstream/loss_recovered")


def analysis_overview(data: AnalysisData) -> pd.DataFrame:
    """A two-column table (name, value) of the analysis's headline params and metrics."""
    rows = [("directory", str(data.root)), ("timestamp", data.timestamp), ("features with summaries", len(data.summaries))]
    rows += [(k, data.params[k]) for k in OVERVIEW_PARAMS if k in data.params]
    rows += [(k, data.metrics[k]) for k in OVERVIEW_METRICS if k in data.metrics]
    rows.append(("dense matrices", "yes" if data.cooccurrence is not None else "no (neighbour lists only)"))
    return pd.DataFrame(rows, columns=["name", "value"]).astype({"value": str})
