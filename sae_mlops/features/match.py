"""Matching the features of two SAEs: by decoder direction and, on the same tokens, by activation.

Decoder matching. With unit decoder rows ``u_i = W_dec^A[i] / ||W_dec^A[i]||`` and
``v_j = W_dec^B[j] / ||W_dec^B[j]||``, the cosine is ``C[i, j] = u_i . v_j``. For every feature of A
the best match in B is ``argmax_j C[i, j]`` with value ``max_j C[i, j]`` (and the same from B to A);
the *mean max cosine* of a direction is the mean of those maxima over its features. ``C`` is never
held whole: it is computed in row blocks of ``block`` features of A (torch, ``block x d_sae^B``
floats at a time), updating running column maxima for B -> A. The one-to-one assignment
maximising ``sum C[i, a(i)]`` (``scipy.optimize.linear_sum_assignment``) needs the whole matrix, so
it is computed only when ``max(d_sae^A, d_sae^B) <= assignment_limit`` (default 4096: a 4096 x 4096
float64 matrix, 128 MiB); beyond that the best matches are reported alone.

Activation matching (only when both analyses saw the same tokens, see :func:`same_tokens`). With
the activation matrices ``X [n, d^A]`` and ``Y [n, d^B]`` over the same ``n`` tokens (zeros where a
feature did not fire), the Pearson correlation of feature ``i`` of A and ``j`` of B over tokens is

    r[i, j] = (x_i . y_j / n - mean(x_i) mean(y_j)) / (std(x_i) std(y_j)),

population std, float64 sums. ``x_i . y_j`` comes from the sparse product ``X[:, blk]^T Y`` in
column blocks of A, so memory is ``block x d^B`` plus the two sparse matrices. A feature that never
fired (std 0) has no correlation (NaN) and no match.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

log = logging.getLogger(__name__)

ASSIGNMENT_LIMIT = 4096
THRESHOLDS = (0.9, 0.7)
# Params of the results JSON that fix which tokens an analysis saw (with the token table compared too).
TOKEN_PLAN_PARAMS = ("corpus_digest", "model", "context_size", "prepend_bos", "max_tokens", "tokens_analysed", "special_token_ids")


@dataclass
class BestMatches:
    """Best match of every feature on each side: index (-1 when none) and value (NaN when none)."""

    a_index: np.ndarray
    a_value: np.ndarray
    b_index: np.ndarray
    b_value: np.ndarray


@dataclass
class MatchResult:
    """Everything `match` computes (see the module docstring for the definitions)."""

    d_sae_a: int
    d_sae_b: int
    decoder: BestMatches
    assignment: pd.DataFrame | None  # feature_a, feature_b, cosine (one-to-one), or None beyond the limit
    activation: BestMatches | None = None
    same_tokens: bool = False
    same_tokens_reason: str = ""
    alive_a: np.ndarray | None = None
    alive_b: np.ndarray | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def _unit_rows(w: Any, device: str) -> Any:
    import torch

    t = torch.as_tensor(np.asarray(w), dtype=torch.float32, device=device)
    return t / t.norm(dim=1, keepdim=True).clamp_min(1e-12)


def decoder_best_matches(w_a: np.ndarray, w_b: np.ndarray, block: int = 1024, device: str = "cpu") -> BestMatches:
    """Best decoder-cosine matches both ways, computed in row blocks of A (no d^A x d^B array)."""
    import torch

    if w_a.shape[1] != w_b.shape[1]:
        from sae_mlops.errors import InputError

        raise InputError(f"the two SAEs have different input widths (d_in {w_a.shape[1]} and {w_b.shape[1]}); decoder directions of different spaces cannot be matched.")
    ua, ub = _unit_rows(w_a, device), _unit_rows(w_b, device)
    a_val = torch.empty(ua.shape[0], device=device)
    a_idx = torch.empty(ua.shape[0], dtype=torch.long, device=device)
    b_val = torch.full((ub.shape[0],), -float("inf"), device=device)
    b_idx = torch.full((ub.shape[0],), -1, dtype=torch.long, device=device)
    with torch.no_grad():
        for start in range(0, ua.shape[0], block):
            c = ua[start : start + block] @ ub.T  # [blk, d_b]
            v, i = c.max(dim=1)
            a_val[start : start + block], a_idx[start : start + block] = v, i
            cv, ci = c.max(dim=0)
            better = cv > b_val
            b_val = torch.where(better, cv, b_val)
            b_idx = torch.where(better, ci + start, b_idx)
    return BestMatches(a_idx.cpu().numpy(), a_val.cpu().numpy().astype(np.float64), b_idx.cpu().numpy(), b_val.cpu().numpy().astype(np.float64))


def decoder_assignment(w_a: np.ndarray, w_b: np.ndarray, limit: int = ASSIGNMENT_LIMIT, device: str = "cpu") -> pd.DataFrame | None:
    """One-to-one matching maximising the summed cosine (Hungarian method), or None when
    ``max(d^A, d^B) > limit``. With unequal sizes, min(d^A, d^B) pairs."""
    from scipy.optimize import linear_sum_assignment

    if max(w_a.shape[0], w_b.shape[0]) > limit:
        log.info("d_sae %d / %d is above the assignment limit %d: best matches only", w_a.shape[0], w_b.shape[0], limit)
        return None
    c = (_unit_rows(w_a, device) @ _unit_rows(w_b, device).T).double().cpu().numpy()
    rows, cols = linear_sum_assignment(c, maximize=True)
    return pd.DataFrame({"feature_a": rows.astype(np.int64), "feature_b": cols.astype(np.int64), "cosine": c[rows, cols]})


def activation_best_matches(x: sp.spmatrix, y: sp.spmatrix, block: int = 512) -> BestMatches:
    """Best Pearson-correlation matches both ways between the columns of ``x [n, d^A]`` and
    ``y [n, d^B]`` (sparse, same rows = same tokens), in column blocks of A."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"activation matrices cover different token counts ({x.shape[0]} and {y.shape[0]})")
    n = float(x.shape[0])
    xc = sp.csc_matrix(x, dtype=np.float64)
    yr = sp.csr_matrix(y, dtype=np.float64)

    def moments(m: sp.spmatrix) -> tuple[np.ndarray, np.ndarray]:
        mean = np.asarray(m.sum(axis=0)).ravel() / n
        sq = np.asarray(m.multiply(m).sum(axis=0)).ravel() / n
        return mean, np.sqrt(np.maximum(sq - mean**2, 0.0))

    mx, sx = moments(xc)
    my, sy = moments(yr)
    sy_safe = np.where(sy > 0, sy, np.nan)
    d_a, d_b = x.shape[1], y.shape[1]
    a_idx = np.full(d_a, -1, dtype=np.int64)
    a_val = np.full(d_a, np.nan)
    b_idx = np.full(d_b, -1, dtype=np.int64)
    b_val = np.full(d_b, -np.inf)
    for start in range(0, d_a, block):
        stop = min(start + block, d_a)
        prod = (xc[:, start:stop].T @ yr).toarray() / n  # E[x_i y_j], [blk, d_b]
        cov = prod - np.outer(mx[start:stop], my)
        sx_blk = np.where(sx[start:stop] > 0, sx[start:stop], np.nan)
        r = cov / np.outer(sx_blk, sy_safe)
        filled = np.where(np.isnan(r), -np.inf, r)
        best = filled.argmax(axis=1)
        val = filled[np.arange(stop - start), best]
        ok = np.isfinite(val)
        a_idx[start:stop] = np.where(ok, best, -1)
        a_val[start:stop] = np.where(ok, val, np.nan)
        col_best = filled.argmax(axis=0)
        col_val = filled[col_best, np.arange(d_b)]
        better = col_val > b_val
        b_val = np.where(better, col_val, b_val)
        b_idx = np.where(better, col_best + start, b_idx)
    b_val = np.where(np.isfinite(b_val), b_val, np.nan)
    b_idx = np.where(np.isfinite(b_val), b_idx, -1)
    return BestMatches(a_idx, a_val, b_idx, b_val)


def same_tokens(params_a: dict[str, Any], params_b: dict[str, Any], db_a: Path | None, db_b: Path | None) -> tuple[bool, str]:
    """Whether the two analyses saw the same tokens: equal token-plan params (corpus digest, model,
    context size, BOS, budget, analysed tokens, special ids) and, when both activation databases are
    here, equal token tables (token id at every global index). Returns (answer, reason)."""
    diff = [k for k in TOKEN_PLAN_PARAMS if str(params_a.get(k)) != str(params_b.get(k))]
    if diff:
        return False, "different " + ", ".join(f"{k} ({params_a.get(k)} vs {params_b.get(k)})" for k in diff[:3])
    if not params_a.get("corpus_digest"):
        return False, "the analyses record no corpus digest"
    if db_a is None or db_b is None:
        return False, "an activation database is missing"
    import duckdb

    def token_ids(root: Path) -> np.ndarray:
        q = f"SELECT token_id FROM read_parquet('{root.as_posix()}/tokens/*.parquet') ORDER BY token_index"
        return duckdb.connect().execute(q).fetchnumpy()["token_id"]

    ta, tb = token_ids(db_a), token_ids(db_b)
    if ta.shape != tb.shape or not np.array_equal(ta, tb):
        return False, f"the token tables differ ({len(ta)} vs {len(tb)} tokens)"
    return True, f"same corpus digest and plan, {len(ta):,} identical tokens"


RANDOM_SEED = 0
RANDOM_ROWS = 2048


def random_mean_max_cosine(d_in: int, d_a: int, d_b: int, seed: int = RANDOM_SEED, rows: int = RANDOM_ROWS,
                           block: int = 1024, device: str = "cpu") -> tuple[float, float]:
    """What random directions give: the mean max cosine A -> B and B -> A between ``d_a`` and ``d_b``
    independent uniformly random unit vectors in ``d_in`` dims, by simulation (Gaussian vectors
    normalised; ``numpy.random.default_rng(seed)``; fixed seed, so the same sizes give the same
    figure). The mean over A's features is estimated on at most ``rows`` of them (each still matched
    against all ``d_b``), so the cost is at most ``rows x d_b x d_in`` (and the same for B -> A).
    Hand-written: the expected maximum of thousands of dependent cosines has no closed form that
    libraries offer; the simulation's standard error is below 0.005 for the default ``rows``."""
    rng = np.random.default_rng(seed)

    def one_way(n_from: int, n_to: int) -> float:
        a = rng.standard_normal((min(n_from, rows), d_in)).astype(np.float32)
        b = rng.standard_normal((n_to, d_in)).astype(np.float32)
        return float(np.nanmean(decoder_best_matches(a, b, block=block, device=device).a_value))

    return one_way(d_a, d_b), one_way(d_b, d_a)


def summarise(result: MatchResult, thresholds: tuple[float, ...] = THRESHOLDS) -> dict[str, float]:
    """Headline metrics (names ``match/...``): mean max cosine both ways, share of features whose
    best match is at least each threshold, mutual best pairs, assignment mean cosine, and the same
    for activation correlation when computed."""
    m: dict[str, float] = {}
    d = result.decoder
    m["match/d_sae_a"], m["match/d_sae_b"] = float(result.d_sae_a), float(result.d_sae_b)
    m["match/mean_max_cos_a_to_b"] = float(np.nanmean(d.a_value))
    m["match/mean_max_cos_b_to_a"] = float(np.nanmean(d.b_value))
    for t in thresholds:
        m[f"match/share_a_cos_ge_{t}"] = float(np.mean(d.a_value >= t))
        m[f"match/share_b_cos_ge_{t}"] = float(np.mean(d.b_value >= t))
    m["match/mutual_best_pairs"] = float(np.sum(d.b_index[d.a_index] == np.arange(len(d.a_index))))
    if result.assignment is not None:
        m["match/assignment_mean_cos"] = float(result.assignment["cosine"].mean())
        for t in thresholds:
            m[f"match/assignment_share_ge_{t}"] = float(np.mean(result.assignment["cosine"] >= t))
    if result.activation is not None:
        act = result.activation
        m["match/mean_max_corr_a_to_b"] = float(np.nanmean(act.a_value)) if np.isfinite(act.a_value).any() else float("nan")
        m["match/mean_max_corr_b_to_a"] = float(np.nanmean(act.b_value)) if np.isfinite(act.b_value).any() else float("nan")
        for t in thresholds:
            m[f"match/share_a_corr_ge_{t}"] = float(np.mean(np.nan_to_num(act.a_value, nan=-1.0) >= t))
            m[f"match/share_b_corr_ge_{t}"] = float(np.mean(np.nan_to_num(act.b_value, nan=-1.0) >= t))
    return m


def pairs_table(result: MatchResult) -> pd.DataFrame:
    """One row per feature of each side (``side`` = a or b): its best decoder match (``match``,
    ``cosine``), whether that is mutual, its one-to-one partner (``assigned``, ``assigned_cosine``;
    -1 / NaN without assignment), its best activation match (``corr_match``, ``corr``; -1 / NaN when
    not computed) and whether it fired in its analysis (``alive``)."""
    frames = []
    d, act = result.decoder, result.activation
    for side, idx, val, other_idx, n in (
        ("a", d.a_index, d.a_value, d.b_index, result.d_sae_a),
        ("b", d.b_index, d.b_value, d.a_index, result.d_sae_b),
    ):
        f = np.arange(n)
        frame = pd.DataFrame({"side": side, "feature": f, "match": idx, "cosine": val, "mutual": other_idx[idx] == f})
        assigned = np.full(n, -1, dtype=np.int64)
        assigned_cos = np.full(n, np.nan)
        if result.assignment is not None:
            a = result.assignment
            mine, theirs = ("feature_a", "feature_b") if side == "a" else ("feature_b", "feature_a")
            assigned[a[mine].to_numpy()] = a[theirs].to_numpy()
            assigned_cos[a[mine].to_numpy()] = a["cosine"].to_numpy()
        frame["assigned"], frame["assigned_cosine"] = assigned, assigned_cos
        if act is not None:
            frame["corr_match"] = act.a_index if side == "a" else act.b_index
            frame["corr"] = act.a_value if side == "a" else act.b_value
        else:
            frame["corr_match"], frame["corr"] = -1, np.nan
        alive = result.alive_a if side == "a" else result.alive_b
        frame["alive"] = alive if alive is not None else True
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def match_analyses(
    root_a: Path,
    root_b: Path,
    out_dir: Path,
    *,
    block: int = 1024,
    assignment_limit: int = ASSIGNMENT_LIMIT,
    activations: bool = True,
    device: str = "cpu",
    given: tuple[str, str] | None = None,
) -> tuple[MatchResult, list[Path], dict[str, Any]]:
    """Match the SAEs of two full analyses (directories); write the outputs under ``out_dir``.

    The decoders are loaded from the SAE each analysis records (param ``sae``; its content hash
    must still match). Returns the result, the files written and the ``inputs`` description.
    """
    import time

    from sae_mlops.outputs.activation_db.reader import ActivationDB, find_database
    from sae_mlops.errors import InputError
    from sae_mlops.interp.data import load_analysis
    from sae_mlops.interp.decoder import load_decoder
    from sae_mlops.features.match_files import write_match

    data, decoders, dbs, inputs = [], [], [], {}
    for side, root in (("a", root_a), ("b", root_b)):
        d = load_analysis(root)
        w = load_decoder(d, attach=False)
        if w is None:
            raise InputError(
                f"the SAE of analysis '{root}' ({d.params.get('sae')}) could not be loaded with the recorded content hash; "
                "matching needs the decoder, so make that SAE available at the recorded path or URI."
            )
        try:
            db = find_database(root)
        except InputError:
            db = None
        data.append(d)
        decoders.append(w)
        dbs.append(db)
        inputs[side] = {
            "given": (given[0 if side == "a" else 1] if given else str(root)),
            "dir": str(root),
            "sae": d.params.get("sae"),
            "sae_hash": d.params.get("sae_hash"),
            "d_sae": int(w.shape[0]),
            "corpus_digest": d.params.get("corpus_digest"),
            "corpus": d.params.get("corpus"),
        }
    hooks = [d.params.get("hook") for d in data]
    if hooks[0] != hooks[1]:
        log.warning("the two SAEs read different hooks (%s and %s): their decoder directions live in different spaces of the same width", *hooks)
    for side, d in zip(("a", "b"), data, strict=True):
        inputs[side]["hook"] = d.params.get("hook")
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    best = decoder_best_matches(decoders[0], decoders[1], block=block, device=device)
    seconds["decoder_best"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    assignment = decoder_assignment(decoders[0], decoders[1], limit=assignment_limit, device=device)
    seconds["assignment"] = time.perf_counter() - t0
    result = MatchResult(
        d_sae_a=decoders[0].shape[0],
        d_sae_b=decoders[1].shape[0],
        decoder=best,
        assignment=assignment,
        alive_a=data[0].stats["firing_count"].to_numpy() > 0 if len(data[0].stats) == decoders[0].shape[0] else None,
        alive_b=data[1].stats["firing_count"].to_numpy() > 0 if len(data[1].stats) == decoders[1].shape[0] else None,
        seconds=seconds,
    )
    result.same_tokens, result.same_tokens_reason = same_tokens(data[0].params, data[1].params, dbs[0], dbs[1])
    if activations and result.same_tokens:
        t0 = time.perf_counter()
        assert dbs[0] is not None and dbs[1] is not None  # same_tokens() needs both databases
        result.activation = activation_best_matches(ActivationDB(dbs[0]).csr(), ActivationDB(dbs[1]).csr(), block=max(64, block // 2))
        seconds["activation"] = time.perf_counter() - t0
    elif not activations:
        result.same_tokens_reason = "not asked (--no-activations)"
    log.info("activation correlation %s: %s", "computed" if result.activation is not None else "skipped", result.same_tokens_reason)
    result.metrics = summarise(result)
    rand_ab, rand_ba = random_mean_max_cosine(int(decoders[0].shape[1]), result.d_sae_a, result.d_sae_b, device=device)
    result.metrics["match/random_mean_max_cos_a_to_b"] = rand_ab
    result.metrics["match/random_mean_max_cos_b_to_a"] = rand_ba
    files = write_match(result, out_dir, inputs)
    return result, files, inputs


def match_many(
    roots: list[tuple[str, Path]],
    out_dir: Path,
    **kwargs: Any,
) -> tuple[pd.DataFrame, list[Path]]:
    """Match every pair of analyses in ``roots`` (``(name, directory)``); each pair's outputs go to
    ``out_dir/<i>_vs_<j>/``. Returns the mean-max-cosine matrix (row -> column, 1 on the
    diagonal) and every file written, including ``match_matrix.csv`` and ``plots/match_matrix.png``."""
    names = [n for n, _ in roots]
    matrix = pd.DataFrame(np.eye(len(roots)), index=names, columns=names)
    files: list[Path] = []
    for i in range(len(roots)):
        for j in range(i + 1, len(roots)):
            sub = out_dir / f"{i}_vs_{j}"
            result, written, _ = match_analyses(roots[i][1], roots[j][1], sub, given=(names[i], names[j]), **kwargs)
            matrix.iloc[i, j] = result.metrics["match/mean_max_cos_a_to_b"]
            matrix.iloc[j, i] = result.metrics["match/mean_max_cos_b_to_a"]
            files += written
    out_dir.mkdir(parents=True, exist_ok=True)
    csv = out_dir / "match_matrix.csv"
    matrix.to_csv(csv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    (out_dir / "plots").mkdir(exist_ok=True)
    fig, ax = plt.subplots(figsize=(4.5 + 1.0 * len(names), 2.5 + 0.8 * len(names)))
    im = ax.imshow(matrix.to_numpy(), vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    for (r, c), v in np.ndenumerate(matrix.to_numpy()):
        ax.text(c, r, f"{v:.2f}", ha="center", va="center", color="w" if v < 0.6 else "k", fontsize=8)
    ax.set_title("mean max decoder cosine (row -> column)", fontsize=9)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    png = out_dir / "plots" / "match_matrix.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return matrix, [*files, csv, png]
