"""Bootstrap intervals and paired differences from per-block sums.

Method (stated once, used everywhere):

- **Unit.** Blocks of whole windows (:mod:`sae_mlops.core.blocks`), a few hundred per pass. A
  resample draws ``B`` blocks with replacement (scipy.stats.bootstrap draws the block indices); the
  multiplicity ``w_b`` of each block is a weight.
- **Statistic.** Every metric is recomputed from resampled *sums*: ``S*(w) = sum_b w_b S_b`` for every
  sum the metric needs (token counts, sums of L0, of squared errors, of CE, ..., per-feature firing
  counts), then the collectors' own formula (``sparsity_metrics``, ``reconstruction_metrics``,
  ``downstream_metrics``) on ``S*``. A ratio such as loss recovered is a ratio of resampled sums,
  never a mean of per-block ratios.
- **Interval.** Percentile bootstrap, 95 % by default, ``resamples`` (default 2000) with a fixed
  seed, so a given analysis always reports the same interval. Percentile rather than BCa: several
  metrics are degenerate in many resamples (a dead count of 0), where BCa's acceleration is
  undefined. The test suite checks it against ``scipy.stats.bootstrap(method="percentile")``.
- **Paired difference.** When two analyses share the token plan (same layout digest: corpus, tokenizer,
  context size, BOS rule, batch size, budget), the *same* block weights are applied to both and the
  difference ``m_A(w) - m_B(w)`` is resampled: the token-sample noise common to both cancels, which
  makes the interval far tighter than two unpaired intervals. Otherwise each analysis is resampled
  independently (unpaired) and the result says so.
- **p-value.** The bootstrap p-value of "difference = 0" by test inversion of the percentile interval:
  ``p = min(1, 2 min(#{D* <= 0} + 1, #{D* >= 0} + 1) / (R + 1))`` (Davison & Hinkley 1997, §4.4); a
  difference that is exactly 0 in every resample (e.g. CE clean of two SAEs on one plan) has p = 1.

Hand-written (numpy's Generator draws the blocks, ``np.quantile`` takes the percentiles) because no
library computes a bootstrap of ratio-of-sums statistics from per-block sufficient statistics, and
because importing scipy.stats (about 1 s, 5 s on a loaded machine) would cost more than the bootstrap
itself at the end of every analysis.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sae_mlops.core.collectors.downstream import downstream_metrics
from sae_mlops.core.collectors.reconstruction import SUM_NAMES as RECON_SUMS
from sae_mlops.core.collectors.reconstruction import reconstruction_metrics
from sae_mlops.core.collectors.sparsity import sparsity_metrics

FORMAT = "sae_mlops.block_sums"
FILE_STEM = "blocks"  #: <out>/blocks.safetensors + <out>/blocks.json
DEFAULT_RESAMPLES = 2000
DEFAULT_LEVEL = 0.95
DEFAULT_SEED = 0
_BATCH = 100  # resamples per vectorised call (memory: batch x B x B bools for the weights)


@dataclass
class BlockSums:
    """The per-block sums of one analysis (block axis first) and what is needed to recompute its
    metrics: widths, feature-class thresholds, and the plan they belong to (``plan``: corpus
    digest, model, context size, BOS rule, batch size, budget, layout digest)."""

    arrays: dict[str, np.ndarray]
    d_in: int
    d_sae: int
    rare_threshold: float
    dense_threshold: float
    plan: dict[str, Any] = field(default_factory=dict)
    _stacked: Any = field(default=None, init=False, repr=False, compare=False)
    _fire32: Any = field(default=None, init=False, repr=False, compare=False)

    @property
    def n_blocks(self) -> int:
        return int(self.arrays["n_tokens"].shape[0])

    @property
    def has_fire(self) -> bool:
        return self.arrays["fire_count"].shape[0] == self.n_blocks

    @property
    def has_downstream(self) -> bool:
        return bool(self.arrays["n_pred"].sum() > 0)

    def totals(self, w: np.ndarray) -> dict[str, np.ndarray]:
        """Resampled sums ``w @ S`` for weights ``w`` [R, B] (each [R, ...]): one float64 product for
        every sum but the firing counts, one float32 product for those (exact below 2^24 tokens per
        feature; only "0" and the class thresholds are read from them)."""
        if self._stacked is None:
            parts = [(k, a.reshape(a.shape[0], -1).astype(np.float64)) for k, a in self.arrays.items() if k != "fire_count"]
            self._stacked = (np.concatenate([p for _, p in parts], axis=1),
                             [(k, p.shape[1], self.arrays[k].shape[1:]) for k, p in parts])
            self._fire32 = self.arrays["fire_count"].astype(np.float32) if self.has_fire else None
        matrix, layout = self._stacked
        flat = w.astype(np.float64) @ matrix
        out: dict[str, np.ndarray] = {}
        col = 0
        for k, width, shape in layout:
            out[k] = flat[:, col:col + width].reshape((w.shape[0], *shape))
            col += width
        if self._fire32 is not None:
            out["fire_count"] = w.astype(np.float32) @ self._fire32
        return out

    def metrics(self, w: np.ndarray) -> dict[str, np.ndarray]:
        """Every interval metric for block weights ``w`` [R, B] (each [R]); ``w`` of ones: the pass."""
        t = self.totals(w)
        out: dict[str, np.ndarray] = {}
        sp = {"n_tokens": t["n_tokens"], "sum_l0": t["sum_l0"], "sum_l0_sq": t["sum_l0_sq"], "sum_l1": t["sum_l1"],
              "sum_l1_sq": t["sum_l1_sq"],
              "fire_count": t.get("fire_count", np.zeros((w.shape[0], 1)))}
        for k, v in sparsity_metrics(sp, self.d_sae, self.rare_threshold, self.dense_threshold).items():
            if k.startswith("sparsity/") or self.has_fire:
                out[k] = np.asarray(v, dtype=np.float64)
        rs = {k: t[k] for k in RECON_SUMS if k != "n"} | {"n": t["n_tokens"], "sum_x": t["sum_x"]}
        out.update({k: np.asarray(v, dtype=np.float64) for k, v in reconstruction_metrics(rs, self.d_in).items()})
        if self.has_downstream:
            out.update({k: np.asarray(v, dtype=np.float64) for k, v in downstream_metrics(t).items()})
        return out

    def point(self) -> dict[str, float]:
        """The metrics of the whole pass (all weights 1)."""
        return {k: float(v[0]) for k, v in self.metrics(np.ones((1, self.n_blocks))).items()}

    # ---- files -------------------------------------------------------------------------------------
    def save(self, out_dir: Path) -> list[Path]:
        """Write ``blocks.safetensors`` (the arrays) and ``blocks.json`` (widths, thresholds, plan)."""
        import torch
        from safetensors.torch import save_file

        from sae_mlops.files import atomic_write, atomic_write_text

        out_dir = Path(out_dir)
        tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in self.arrays.items()}
        st, js = out_dir / f"{FILE_STEM}.safetensors", out_dir / f"{FILE_STEM}.json"
        atomic_write(st, lambda tmp: save_file(tensors, str(tmp)))
        meta = {"format": FORMAT, "version": 1, "d_in": self.d_in, "d_sae": self.d_sae,
                "rare_threshold": self.rare_threshold, "dense_threshold": self.dense_threshold, "plan": self.plan,
                "blocks": self.n_blocks}
        atomic_write_text(js, json.dumps(meta, indent=1))
        return [st, js]

    @classmethod
    def load(cls, directory: Path) -> BlockSums:
        """Read what :meth:`save` wrote (``ValueError`` naming the file when it is not such a file)."""
        from safetensors.numpy import load_file

        directory = Path(directory)
        js = directory / f"{FILE_STEM}.json"
        try:
            meta = json.loads(js.read_text(encoding="utf-8"))
            if meta.get("format") != FORMAT:
                raise ValueError("not a block-sums file")
            arrays = load_file(str(directory / f"{FILE_STEM}.safetensors"))
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"{js} holds no per-block statistics ({e}); re-run the analysis with this version") from e
        return cls(dict(arrays), int(meta["d_in"]), int(meta["d_sae"]), float(meta["rare_threshold"]),
                   float(meta["dense_threshold"]), dict(meta.get("plan") or {}))

    @classmethod
    def exists(cls, directory: Path) -> bool:
        return (Path(directory) / f"{FILE_STEM}.json").is_file()


def weights_of(idx: np.ndarray, n_blocks: int) -> np.ndarray:
    """Block multiplicities [..., B] of resampled block indices ``idx`` [..., B]."""
    idx = np.asarray(idx).astype(np.int64)
    flat = idx.reshape(-1, idx.shape[-1])
    rows = flat.shape[0]
    offsets = (np.arange(rows) * n_blocks)[:, None]
    w = np.bincount((flat + offsets).ravel(), minlength=rows * n_blocks).reshape(rows, n_blocks)
    return w.reshape((*idx.shape[:-1], n_blocks))


@dataclass
class Interval:
    """A point estimate and its bootstrap interval (``low``/``high``; NaN when undefined)."""

    value: float
    low: float
    high: float

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2.0


def resampled(statistic: Any, n_blocks: tuple[int, ...], resamples: int, seed: int) -> np.ndarray:
    """``statistic(*weights)`` over ``resamples`` bootstrap resamples, [outputs, R]: each resample
    draws ``n`` of ``n`` blocks with replacement, independently for each analysis in ``n_blocks``
    (one entry: paired, both analyses get the same weights), as multiplicities [batch, n]."""
    rng = np.random.default_rng(seed)
    chunks = []
    for start in range(0, resamples, _BATCH):
        size = min(_BATCH, resamples - start)
        ws = [weights_of(rng.integers(0, nb, size=(size, nb)), nb) for nb in n_blocks]
        chunks.append(statistic(*ws))
    return np.concatenate(chunks, axis=1)


def percentile_interval(dist: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    """The percentile interval of each row of ``dist`` [outputs, R]; NaN for a row with a NaN."""
    with np.errstate(invalid="ignore"):
        low, high = np.quantile(dist, [(1 - level) / 2, (1 + level) / 2], axis=1)
    bad = ~np.all(np.isfinite(dist), axis=1)
    low[bad], high[bad] = np.nan, np.nan
    return low, high


def bootstrap_intervals(sums: BlockSums, resamples: int = DEFAULT_RESAMPLES, level: float = DEFAULT_LEVEL,
                        seed: int = DEFAULT_SEED) -> dict[str, Interval]:
    """The percentile-bootstrap interval of every metric of ``sums`` (see the module docstring).
    With a single block no interval exists: low and high are NaN."""
    point = sums.point()
    names = list(point)
    nb = sums.n_blocks
    if nb < 2:
        return {k: Interval(v, float("nan"), float("nan")) for k, v in point.items()}

    def stat(w: np.ndarray) -> np.ndarray:
        m = sums.metrics(w)
        return np.stack([m[k] for k in names])  # [metrics, batch]

    low, high = percentile_interval(resampled(stat, (nb,), resamples, seed), level)
    return {k: Interval(point[k], float(low[i]), float(high[i])) for i, k in enumerate(names)}


@dataclass
class Difference:
    """``A - B`` for one metric: the point difference, its bootstrap interval, the p-value of "no
    difference" and whether the two analyses were paired block by block."""

    metric: str
    a: float
    b: float
    diff: float
    low: float
    high: float
    p_value: float
    paired: bool


def same_plan(a: BlockSums, b: BlockSums) -> bool:
    """True when the two analyses' blocks pair one to one (same token plan and block layout)."""
    keys = ("corpus_digest", "model", "context_size", "prepend_bos", "batch_size", "max_tokens", "layout")
    return a.n_blocks == b.n_blocks and all(a.plan.get(k) == b.plan.get(k) for k in keys) and bool(a.plan.get("layout"))


def bootstrap_p_value(dist: np.ndarray) -> float:
    """Two-sided bootstrap p-value of 0 from the resampled differences (module docstring); NaN when
    a resample is NaN."""
    d = np.asarray(dist, dtype=np.float64)
    if d.size == 0 or not np.all(np.isfinite(d)):
        return float("nan")
    r = d.size
    return float(min(1.0, 2.0 * min(np.sum(d <= 0) + 1, np.sum(d >= 0) + 1) / (r + 1)))


def paired_differences(a: BlockSums, b: BlockSums, resamples: int = 9999, level: float = DEFAULT_LEVEL,
                       seed: int = DEFAULT_SEED, force_unpaired: bool = False) -> list[Difference]:
    """``A - B`` for every metric both have: paired by blocks when :func:`same_plan` (and not
    ``force_unpaired``), else two independent block bootstraps."""
    pa, pb = a.point(), b.point()
    names = [k for k in pa if k in pb]
    paired = same_plan(a, b) and not force_unpaired

    def pick(m: dict[str, np.ndarray]) -> np.ndarray:
        return np.stack([m[k] for k in names])

    if paired:
        dist = resampled(lambda w: pick(a.metrics(w)) - pick(b.metrics(w)), (a.n_blocks,), resamples, seed)
    else:
        dist = resampled(lambda wa, wb: pick(a.metrics(wa)) - pick(b.metrics(wb)), (a.n_blocks, b.n_blocks),
                         resamples, seed)
    low, high = percentile_interval(dist, level)
    out = []
    for i, k in enumerate(names):
        finite = np.all(np.isfinite(dist[i]))
        out.append(Difference(k, pa[k], pb[k], pa[k] - pb[k], float(low[i]), float(high[i]),
                              bootstrap_p_value(dist[i]) if finite else float("nan"), paired))
    return out
