"""Feature absorption in SAEBench's first-letter form (Chanin et al. 2024, "A is for Absorption";
SAEBench, Karvonen et al. 2025; absorption fraction by D. Till).

Data: the tokenizer's single-token words (a token that decodes, after stripping spaces, to at least
``min_word_length`` ASCII letters), labelled by their first letter; letters with fewer than
``min_words_per_letter`` words are left out. Each word is run as ``[BOS] word`` (no BOS when the model
is not run with one) and the hook activation x at the word's position is kept. Simplification against
SAEBench: no in-context prompt ("{word} has the first letter:"), because the demo model is too small to
follow one; the activation of the word token itself is what the probe reads.

1. **Ground-truth probe.** A multinomial ``LogisticRegression(C=1, max_iter=500)`` on x, standardised
   with the train words' mean mu and std s, predicts the first letter; words are split train/test,
   stratified and seeded. Per letter L: the test F1 of "predicted L", and the probe direction in
   activation space p_L = (coef_L / s) / ||coef_L / s||. **Floor:** a letter is evaluated
   only when its probe F1 >= ``min_probe_f1`` (0.6, SAEBench's ``min_GT_probe_f1``); with fewer than
   ``min_letters`` such letters the eval reports that the activations do not encode first letters and
   gives no absorption figure.
2. **Main and split latents** (SAEBench's k-sparse rule). On the SAE codes f of the train words, the
   latents are ranked by the class-mean difference for "first letter is L" and, for k = 1, 2, ...,
   ``max_k``, a balanced ``LogisticRegression`` on the top k is scored by test F1. k grows while F1
   rises by more than ``f1_jump`` (0.03); the latents of the last k kept are L's main latents, and
   ``split latents`` = their number - 1.
3. **Absorption.** Over the test words of letter L that the probe gets right: with the probe
   projection P = x . p_L and each latent's contribution c_i = f_i (W_dec,i . p_L) (SAEBench uses
   f_i cos(W_dec,i, p_L); equal for unit-norm decoder rows),

   - *full absorption* when every main latent is zero (< 1e-8), P > 0, the latent with the largest c_i
     has cos(W_dec,i, p_L) >= 0.025 and c_i / P >= 0.4;
   - *absorption fraction*: with M = sum of c over main latents and A = the sum of the (at most 3)
     largest positive c_i of other latents whose cosine with p_L is >= 0.1: 0 when M >= P or
     A / P < 0.4; 1 when M <= 0; else min(A, P - M) / (min(A, P - M) + M), clipped to [0, 1].

   ``full_absorption_rate`` and ``absorption_fraction`` of L are their means over those words. The
   SAE's figures are the means over evaluated letters, with a 95 % percentile-bootstrap interval
   over letters (``scipy.stats.bootstrap``, 2000 resamples, seed 0) when at least 3 letters count.

Known weaknesses: absorption needs a model that encodes spelling (large models at middle layers);
the thresholds are SAEBench's and arbitrary; a word absorbed into a latent that the k-sparse rule
counted as a split latent is not counted as absorbed.
"""

from __future__ import annotations

import logging
import string
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pandas as pd

log = logging.getLogger(__name__)

EPS = 1e-8
FULL_COS = 0.025
FRACTION_COS = 0.1
PROJECTION_SHARE = 0.4
MAX_ABSORBERS = 3


@dataclass
class AbsorptionSettings:
    min_probe_f1: float = 0.6
    min_letters: int = 3
    min_words_per_letter: int = 8
    min_word_length: int = 2
    max_k: int = 10
    f1_jump: float = 0.03
    test_fraction: float = 0.3
    seed: int = 0


@dataclass
class AbsorptionResult:
    table: pd.DataFrame  # one row per letter with words
    metrics: dict[str, float]
    encoded: bool  # whether enough letters cleared the probe floor
    message: str
    details: dict[str, Any] = field(default_factory=dict)


def single_token_words(tokenizer: Any, min_length: int = 2) -> tuple[list[int], list[str]]:
    """(token ids, words) of the vocabulary's tokens that are one ASCII word of >= `min_length` letters."""
    ids, words = [], []
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    for i in range(int(len(tokenizer))):
        if i in special:
            continue
        w = tokenizer.decode([i]).strip()
        if len(w) >= min_length and w.isascii() and w.isalpha():
            ids.append(i)
            words.append(w)
    return ids, words


def _f1(y: np.ndarray, pred: np.ndarray) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(y, pred, zero_division=0.0))


def _split_latents(codes_tr: np.ndarray, y_tr: np.ndarray, codes_te: np.ndarray, y_te: np.ndarray, s: AbsorptionSettings) -> tuple[list[int], list[float]]:
    """Main latents of one letter and the F1 of each k tried (SAEBench's F1-jump rule)."""
    from sklearn.linear_model import LogisticRegression

    diff = np.abs(codes_tr[y_tr == 1].mean(0) - codes_tr[y_tr == 0].mean(0))
    order = np.argsort(-diff, kind="stable")
    best, main, f1s = -1.0, [int(order[0])], []
    for k in range(1, min(s.max_k, codes_tr.shape[1]) + 1):
        cols = order[:k]
        clf = LogisticRegression(max_iter=1000, class_weight="balanced").fit(codes_tr[:, cols], y_tr)
        f1 = _f1(y_te, clf.predict(codes_te[:, cols]))
        f1s.append(f1)
        if f1 > best + s.f1_jump:
            best, main = f1, [int(c) for c in cols]
        else:
            break
    return main, f1s


def word_absorption(x: np.ndarray, f: np.ndarray, w_dec: np.ndarray, probe: np.ndarray, main: list[int]) -> tuple[bool, float]:
    """(full absorption, absorption fraction) of one word (module docstring, step 3). `probe` is unit-norm."""
    proj = float(x @ probe)
    dec_proj = w_dec @ probe  # [d_sae]
    cos = dec_proj / np.maximum(np.linalg.norm(w_dec, axis=1), EPS)
    contrib = f * dec_proj
    main_proj = float(contrib[main].sum())
    others = np.ones(len(f), dtype=bool)
    others[main] = False
    cand = contrib[others & (cos >= FRACTION_COS) & (contrib > 0)]
    absorbed = float(np.sort(cand)[::-1][:MAX_ABSORBERS].sum()) if cand.size else 0.0
    if main_proj >= proj or proj <= 0 or absorbed / proj < PROJECTION_SHARE:
        fraction = 0.0
    elif main_proj <= 0:
        fraction = 1.0
    else:
        a = min(absorbed, proj - main_proj)
        fraction = float(np.clip(a / (a + main_proj), 0.0, 1.0))
    top = int(np.argmax(contrib))
    full = bool(np.all(f[main] < EPS) and proj > 0 and cos[top] >= FULL_COS and contrib[top] / proj >= PROJECTION_SHARE)
    return full, fraction


def absorption_eval(
    acts: np.ndarray,
    words: list[str],
    encode: Callable[[np.ndarray], np.ndarray],
    w_dec: np.ndarray,
    settings: AbsorptionSettings | None = None,
) -> AbsorptionResult:
    """The first-letter absorption eval on word activations `acts` [n, d_in] (module docstring).

    encode: hook activations [m, d_in] -> SAE codes [m, d_sae]; w_dec: the decoder [d_sae, d_in]."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    s = settings or AbsorptionSettings()
    letters = np.array([w[0].lower() for w in words])
    counts = pd.Series(letters).value_counts()
    keep_letters = sorted(c for c, n in counts.items() if n >= s.min_words_per_letter and c in string.ascii_lowercase)
    mask = np.isin(letters, keep_letters)
    x, y, kept_words = acts[mask].astype(np.float64), letters[mask], [w for w, m in zip(words, mask, strict=True) if m]
    empty = pd.DataFrame(columns=["letter", "words", "test_words", "probe_f1", "evaluated", "main_latents", "split_latents",
                                  "true_positives", "full_absorption_rate", "absorption_fraction"])
    if len(keep_letters) < 2:
        msg = f"only {len(keep_letters)} letter(s) have {s.min_words_per_letter} single-token words; absorption is not measured"
        return AbsorptionResult(empty, {"absorption/letters_evaluated": 0.0}, False, msg)
    idx = np.arange(len(y))
    tr, te = train_test_split(idx, test_size=s.test_fraction, stratify=y, random_state=s.seed)
    mu, sd = x[tr].mean(0), x[tr].std(0) + 1e-8  # standardised for lbfgs; directions mapped back to x below
    gt = LogisticRegression(C=1.0, max_iter=500).fit((x[tr] - mu) / sd, y[tr])
    pred = gt.predict((x[te] - mu) / sd)
    probe_acc = float((pred == y[te]).mean())
    classes = list(gt.classes_)
    codes = np.asarray(encode(x.astype(np.float32)), dtype=np.float64)
    w = np.asarray(w_dec, dtype=np.float64)
    rows = []
    word_results: list[dict[str, Any]] = []
    for li, letter in enumerate(classes):
        yt, pt = (y[te] == letter), (pred == letter)
        f1 = _f1(yt.astype(int), pt.astype(int))
        row: dict[str, Any] = {"letter": letter, "words": int((y == letter).sum()), "test_words": int(yt.sum()), "probe_f1": f1,
                               "evaluated": f1 >= s.min_probe_f1}
        if row["evaluated"]:
            coef = gt.coef_[li] if len(classes) > 2 else (gt.coef_[0] if li == 1 else -gt.coef_[0])
            coef = coef / sd  # the logit is coef . (x - mu) / sd: its direction in activation space
            probe = coef / np.linalg.norm(coef)
            main, f1s = _split_latents(codes[tr], (y[tr] == letter).astype(int), codes[te], yt.astype(int), s)
            tp = te[yt & pt]
            res = [word_absorption(x[i], codes[i], w, probe, main) for i in tp]
            word_results += [{"word": kept_words[i], "letter": letter, "full_absorption": r[0], "absorption_fraction": r[1]}
                             for i, r in zip(tp, res, strict=True)]
            row.update(main_latents=",".join(map(str, main)), split_latents=len(main) - 1, true_positives=len(tp),
                       full_absorption_rate=float(np.mean([r[0] for r in res])) if res else float("nan"),
                       absorption_fraction=float(np.mean([r[1] for r in res])) if res else float("nan"),
                       sparse_f1=",".join(f"{v:.3f}" for v in f1s))
        rows.append(row)
    table = pd.DataFrame(rows)
    if "true_positives" in table:
        ev = table[table["evaluated"] & (table["true_positives"].fillna(0) > 0)]
    else:
        ev = table.iloc[0:0]
    metrics: dict[str, float] = {"absorption/probe_accuracy": probe_acc, "absorption/letters_evaluated": float(len(ev)),
                                 "absorption/letters_with_words": float(len(classes)), "absorption/words": float(len(y))}
    if len(ev) < s.min_letters:
        msg = (f"the first-letter probe clears F1 {s.min_probe_f1} on {len(ev)} letter(s) (accuracy {probe_acc:.2f} over "
               f"{len(classes)} letters), fewer than {s.min_letters}: these activations do not encode first letters well "
               "enough to measure absorption, so no absorption figure is reported")
        log.warning(msg)
        return AbsorptionResult(table, metrics, False, msg, {"words": kept_words, "word_results": word_results})
    rate = ev["full_absorption_rate"].to_numpy(float)
    frac = ev["absorption_fraction"].to_numpy(float)
    metrics.update({
        "absorption/full_absorption_rate": float(rate.mean()),
        "absorption/absorption_fraction": float(frac.mean()),
        "absorption/split_latents": float(ev["split_latents"].mean()),
    })
    if len(ev) >= 3:
        from scipy.stats import bootstrap

        for name, v in (("full_absorption_rate", rate), ("absorption_fraction", frac)):
            if np.ptp(v) == 0:
                lo = hi = float(v[0])
            else:
                ci = bootstrap((v,), np.mean, n_resamples=2000, confidence_level=0.95, method="percentile",
                               random_state=np.random.default_rng(0)).confidence_interval
                lo, hi = float(ci.low), float(ci.high)
            metrics[f"absorption/{name}_ci_low"], metrics[f"absorption/{name}_ci_high"] = lo, hi
    for r in ev.itertuples(index=False):
        metrics[f"absorption/{r.letter}/full_absorption_rate"] = float(r.full_absorption_rate)
        metrics[f"absorption/{r.letter}/split_latents"] = float(r.split_latents)
    msg = (f"{len(ev)} letters evaluated (probe accuracy {probe_acc:.2f}); full absorption rate "
           f"{metrics['absorption/full_absorption_rate']:.3f}, absorption fraction {metrics['absorption/absorption_fraction']:.3f}, "
           f"split latents {metrics['absorption/split_latents']:.2f} per letter")
    return AbsorptionResult(table, metrics, True, msg, {"words": kept_words, "word_results": word_results})


def word_activations(engine: Any, token_ids: list[int], bos_id: int | None, batch_size: int = 256) -> np.ndarray:
    """Hook activations [n, d_in] of each word token run as ``[BOS] word`` (``word`` alone when `bos_id`
    is None), at the word's position, through `sae_mlops.core.engine.Engine.hook_activations`."""
    import torch

    out = []
    with torch.no_grad():
        for start in range(0, len(token_ids), batch_size):
            ids = torch.tensor(token_ids[start : start + batch_size], dtype=torch.long)[:, None]
            if bos_id is not None:
                ids = torch.cat([torch.full_like(ids, bos_id), ids], dim=1)
            act, _ = engine.hook_activations(ids.to(engine.device))
            out.append(engine.site.view(act)[:, -1].float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)
