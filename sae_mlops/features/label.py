"""LLM labels and detection scores for the features of a full analysis, from any OpenAI-compatible
chat endpoint (OpenAI, vLLM, Ollama, llama.cpp server) through the ``openai`` package.

Per feature, two requests (plus retries):

1. **Label.** The prompt (:data:`LABEL_SYSTEM`, :func:`label_prompt`) shows up to ``examples``
   top activating contexts from the feature summaries, the activating token marked
   ``<<like this>>`` with its activation, and the logit-lens top tokens. The answer must be one
   JSON object with the prior tool's fields: ``label``, ``description``, ``category``,
   ``monosemantic`` (bool), ``interpretability`` (integer 1-5), ``knowledge_domain`` and
   ``abstraction_level`` (:class:`FeatureLabel`). A malformed answer is sent back with the
   validation error and asked again, up to ``max_tries`` answers; then the feature is given up
   (listed in ``failures.jsonl``, retried by the next run).
2. **Detection score** (as delphi / SAEBench score labels). The model sees the label and
   description and ``n`` unmarked snippets in a seeded random order: ``n_activating`` *held-out*
   activating contexts (tokens where the feature fired that were not among the prompt's examples,
   drawn uniformly at random from the activation database) and ``n_non`` non-activating ones:
   tokens whose whole snippet window (``context`` tokens either side) holds no activation of the
   feature above tau, drawn uniformly from *every* such token (found exactly, with a sliding-window
   maximum, not by rejection sampling), where tau = 0 (the feature is zero in the whole window) or,
   with ``non_activating_quantile`` q > 0, the q-quantile of the feature's non-zero activations.
   A feature with fewer than ``n_activating`` held-out activating or ``n_non`` non-activating
   snippets is **not scored** (its record says why): a dense feature firing in every window would
   otherwise be scored on activating snippets alone, where balanced accuracy is only recall. It
   answers which snippets make the feature fire. With TP, TN, FP, FN over the snippets:
   ``accuracy = (TP + TN) / n`` and ``balanced accuracy = (TP / (TP + FN) + TN / (TN + FP)) / 2``
   (0.5 is chance). Without an activation database there is no detection score.

Transport: the client's own retries handle 429, 408/409, 5xx, timeouts and dropped connections
with exponential backoff that honours ``Retry-After`` (``http_retries`` attempts); a
requests-per-minute limit spaces request starts at least ``60 / rpm`` seconds apart across the
``concurrency`` worker threads. The API key is read from the environment variable ``api_key_env``
(default ``OPENAI_API_KEY``) and never written anywhere.

Resume: every finished feature is appended as one JSON line to ``labels/labels.jsonl`` under the
analysis directory at once (under a lock, flushed), so an interrupted run keeps what it finished
and the next run skips every feature already there.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import AliasChoices, BaseModel, Field, ValidationError, field_validator

from sae_mlops.errors import InputError

log = logging.getLogger(__name__)

PROMPT_VERSION = "sae-mlops-label-v1"
ABSTRACTION_LEVELS = ("token", "syntax", "semantic", "abstract")

LABEL_SYSTEM = """You are an expert in mechanistic interpretability of language models. You are shown the text
contexts where one feature of a sparse autoencoder (SAE), trained on a language model's internal
activations, fires most strongly. In each context the token where the feature fires is marked
<<like this>>, and the activation value is given first. You may also see the output tokens the
feature's decoder direction promotes (logit lens).

Explain what the feature detects. Answer with ONE JSON object and nothing else, with exactly these fields:
  "label": a short name for the feature (at most 8 words),
  "description": one or two sentences saying what the feature fires on,
  "category": a short category such as lexical, syntactic, semantic, positional, formatting, code, numeric or other,
  "monosemantic": true if the contexts share one clear pattern, false if they mix unrelated patterns,
  "interpretability": an integer from 1 (no visible pattern) to 5 (one clear, specific pattern),
  "knowledge_domain": the subject area the feature belongs to (e.g. general, programming, mathematics, biology),
  "abstraction_level": one of "token" (a specific token or spelling), "syntax" (a grammatical or structural role),
      "semantic" (a meaning or topic) or "abstract" (a high-level concept)."""

DETECTION_SYSTEM = """You are an expert in mechanistic interpretability of language models. You are given the
explanation of one feature of a sparse autoencoder and a numbered list of text snippets. For each
snippet decide whether the feature fires (is active) somewhere in it. Answer with ONE JSON object and
nothing else: {"active": [the numbers of the snippets where the feature fires]}."""


class FeatureLabel(BaseModel):
    """The answer to a label request (validated)."""

    label: str = Field(min_length=1, max_length=120)
    description: str = Field(min_length=1)
    category: str = Field(min_length=1, max_length=60)
    monosemantic: bool
    # the prior labeler's answers call it interpretability_score (and carry other fields: ignored)
    interpretability: int = Field(ge=1, le=5, validation_alias=AliasChoices("interpretability", "interpretability_score"))
    knowledge_domain: str = Field(min_length=1, max_length=80)
    abstraction_level: Literal["token", "syntax", "semantic", "abstract"]

    @field_validator("abstraction_level", mode="before")
    @classmethod
    def _lower(cls, v: Any) -> Any:
        if not isinstance(v, str):
            return v
        v = v.strip().lower()
        return _ABSTRACTION_SYNONYMS.get(v, v)


#: the prior labeler's words for the abstraction levels
_ABSTRACTION_SYNONYMS = {"lexical": "token", "token-level": "token", "low": "token", "syntactic": "syntax",
                         "medium": "semantic", "conceptual": "abstract", "high": "abstract"}


class DetectionAnswer(BaseModel):
    active: list[int]


@dataclass
class LabelOptions:
    """Options of :func:`label_features` (see the module docstring)."""

    model: str = "gpt-4o-mini"
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    concurrency: int = 4
    rpm: float = 60.0
    max_tries: int = 3
    http_retries: int = 5
    timeout: float = 60.0
    examples: int = 15
    n_activating: int = 5
    n_non: int = 5
    context: int = 12
    temperature: float = 0.0
    max_answer_tokens: int = 400
    seed: int = 0
    detection: bool = True
    non_activating_quantile: float = 0.0


@dataclass
class LabelOutcome:
    out_dir: Path
    labels_file: Path
    files: list[Path]
    labelled_now: int
    skipped: int
    failed: list[int]
    metrics: dict[str, float] = field(default_factory=dict)


class RateLimiter:
    """Spaces request starts at least ``60 / rpm`` seconds apart (all threads together)."""

    def __init__(self, rpm: float):
        self.interval = 60.0 / rpm if rpm and rpm > 0 else 0.0
        self.lock = threading.Lock()
        self.next_at = 0.0

    def wait(self) -> None:
        if self.interval <= 0:
            return
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next_at)
            self.next_at = start + self.interval
        if start > now:
            time.sleep(start - now)


def parse_json_object(text: str) -> dict[str, Any]:
    """The JSON object in a model answer (code fences and text around it are tolerated)."""
    t = (text or "").strip()
    fence = re.search(r"```(?:json)?\s*(.*?)```", t, re.S)
    if fence:
        t = fence.group(1).strip()
    start, end = t.find("{"), t.rfind("}")
    if start < 0 or end <= start:
        raise ValueError("the answer holds no JSON object")
    obj = json.loads(t[start : end + 1])
    if not isinstance(obj, dict):
        raise ValueError("the answer is not a JSON object")
    return obj


def _one_line(text: str) -> str:
    """Newlines and tabs written as \\n and \\t, so each example or snippet is one line."""
    return text.replace("\n", "\\n").replace("\t", "\\t")


def label_prompt(feature: int, examples: list[dict[str, Any]], lens_top: list[str]) -> str:
    """The user message of a label request."""
    lines = [f"Feature {feature}. Top activating contexts (activation: context):"]
    for i, e in enumerate(examples, 1):
        ctx = _one_line(str(e.get("context", "")).replace("[[", "<<").replace("]]", ">>"))
        lines.append(f"{i}. {float(e['activation']):.2f}: {ctx}")
    if lens_top:
        lines.append("Output tokens promoted by the feature (logit lens): " + ", ".join(repr(t) for t in lens_top))
    lines.append("Answer with the JSON object only.")
    return "\n".join(lines)


def detection_prompt(rec: dict[str, Any], snippets: list[str]) -> str:
    """The user message of a detection request."""
    lines = [f"Feature explanation: {rec['label']}. {rec['description']}", "Snippets:"]
    lines += [f"{i}. {_one_line(s)}" for i, s in enumerate(snippets, 1)]
    lines.append('Answer with {"active": [...]} only.')
    return "\n".join(lines)


def detection_scores(truth: list[int], answer: list[int]) -> tuple[float, float]:
    """(accuracy, balanced accuracy) of 0/1 ``answer`` against 0/1 ``truth``."""
    t, a = np.asarray(truth, dtype=bool), np.asarray(answer, dtype=bool)
    acc = float((t == a).mean()) if t.size else float("nan")
    tpr = float(a[t].mean()) if t.any() else float("nan")
    tnr = float((~a[~t]).mean()) if (~t).any() else float("nan")
    return acc, float(np.nanmean([tpr, tnr])) if np.isfinite([tpr, tnr]).any() else float("nan")


def read_done(path: Path) -> dict[int, dict[str, Any]]:
    """Features already in ``labels.jsonl`` (a torn last line from a killed process is ignored)."""
    out: dict[int, dict[str, Any]] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
                out[int(rec["feature"])] = rec
            except (ValueError, KeyError, TypeError):
                log.warning("ignoring a damaged line in %s", path)
    return out


class _Labeler:
    def __init__(self, opts: LabelOptions):
        from openai import OpenAI

        key = os.environ.get(opts.api_key_env)
        if not key:
            if not opts.base_url:
                raise InputError(f"no API key: set the environment variable {opts.api_key_env}, or give --base-url for a local server that needs none.")
            key = "not-needed"  # local servers (vLLM, Ollama, llama.cpp) accept any key
        self.client = OpenAI(api_key=key, base_url=opts.base_url, timeout=opts.timeout, max_retries=opts.http_retries)
        self.opts = opts
        self.limiter = RateLimiter(opts.rpm)
        self.usage_lock = threading.Lock()
        self.usage = {"prompt_tokens": 0, "completion_tokens": 0, "requests": 0, "cost": 0.0}

    def ask(self, system: str, user: str, schema: type[BaseModel]) -> tuple[BaseModel, int]:
        """Ask until the answer validates against ``schema`` (at most ``max_tries`` answers);
        returns the answer and the number of answers it took. Raises ValueError when all fail."""
        messages: list[dict[str, str]] = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        error = ""
        for attempt in range(1, self.opts.max_tries + 1):
            self.limiter.wait()
            resp = self.client.chat.completions.create(
                model=self.opts.model, messages=messages,  # type: ignore[arg-type]  # plain dict messages
                temperature=self.opts.temperature, max_tokens=self.opts.max_answer_tokens
            )
            self._count(resp)
            text = resp.choices[0].message.content or ""
            try:
                return schema.model_validate(parse_json_object(text)), attempt
            except (ValueError, ValidationError) as e:
                error = " ".join(str(e).split())[:500]
                log.debug("malformed answer (try %d): %s", attempt, error)
                messages += [
                    {"role": "assistant", "content": text},
                    {"role": "user", "content": f"That answer is not valid: {error}. Reply with the JSON object only, with every required field."},
                ]
        raise ValueError(f"no valid answer after {self.opts.max_tries} tries: {error}")

    def _count(self, resp: Any) -> None:
        u = getattr(resp, "usage", None)
        with self.usage_lock:
            self.usage["requests"] += 1
            if u is not None:
                self.usage["prompt_tokens"] += int(getattr(u, "prompt_tokens", 0) or 0)
                self.usage["completion_tokens"] += int(getattr(u, "completion_tokens", 0) or 0)
                cost = getattr(u, "cost", None)
                if cost is None and getattr(u, "model_extra", None):
                    cost = u.model_extra.get("cost")
                if cost is not None:
                    self.usage["cost"] += float(cost)


def _snippet(db: Any, row: int, width: int) -> str:
    return "".join(text for text, _, _ in db.window(-1, row, width)) if db is not None else ""


def non_activating_rows(db: Any, feature: int, width: int, quantile: float = 0.0) -> np.ndarray:
    """Every token index whose window of ``width`` tokens either side holds no activation of
    ``feature`` above tau (tau = 0, or the ``quantile`` of its non-zero activations when > 0).

    Windows are taken over the token index (across document ends, a superset of what a snippet
    shows), so a token kept here has a snippet with no activation above tau."""
    from scipy.ndimage import maximum_filter1d

    n_tokens = len(db.doc)
    firing = np.asarray(db.rows.get(feature, np.zeros(0, dtype=np.int64)), dtype=np.int64)
    values = np.abs(np.asarray(db.values.get(feature, np.zeros(0)), dtype=np.float64))
    dense = np.zeros(n_tokens, dtype=np.float64)
    dense[firing] = values
    tau = float(np.quantile(values, quantile)) if quantile > 0 and values.size else 0.0
    peak = maximum_filter1d(dense, size=2 * width + 1, mode="constant", cval=0.0)
    return np.flatnonzero(peak <= tau)


def detection_set(db: Any, feature: int, exclude: set[int], n_act: int, n_non: int, width: int, rng: random.Random,
                  quantile: float = 0.0) -> tuple[list[str], list[int], str | None]:
    """Shuffled snippets, their 0/1 truth, and None; or ([], [], reason) when the feature has fewer
    than ``n_act`` held-out activating rows (not in ``exclude``) or fewer than ``n_non`` rows whose
    window holds no activation above tau (:func:`non_activating_rows`)."""
    firing = np.sort(db.rows.get(feature, np.zeros(0, dtype=np.int64)))
    pool = [int(r) for r in firing if int(r) not in exclude]
    if len(pool) < n_act:
        return [], [], f"{len(pool)} held-out activating snippets, fewer than {n_act}"
    act = rng.sample(pool, n_act)
    candidates = non_activating_rows(db, feature, width, quantile) if n_non else np.zeros(0, dtype=np.int64)
    if len(candidates) < n_non:
        where = "zero" if quantile <= 0 else f"at most its {quantile:g}-quantile"
        return [], [], f"{len(candidates)} windows where the feature is {where}, fewer than {n_non} non-activating snippets"
    non = [int(candidates[i]) for i in rng.sample(range(len(candidates)), n_non)]
    items = [(_snippet(db, r, width), 1) for r in act] + [(_snippet(db, r, width), 0) for r in non]
    rng.shuffle(items)
    return [s for s, _ in items], [t for _, t in items], None


def label_features(
    root: Path,
    opts: LabelOptions,
    features: list[int] | None = None,
    top: int = 200,
) -> LabelOutcome:
    """Label the chosen features of the analysis at ``root`` (the ``top`` most frequent that fired,
    plus ``features``), skipping those already in ``<root>/labels/labels.jsonl``."""
    from sae_mlops.outputs.activation_db.reader import find_database
    from sae_mlops.features.dashboard import FeatureTokens, choose_features
    from sae_mlops.interp.data import load_analysis

    data = load_analysis(root)
    chosen = choose_features(data.stats, features, top)
    out_dir = Path(root) / "labels"
    out_dir.mkdir(parents=True, exist_ok=True)
    labels_file = out_dir / "labels.jsonl"
    done = read_done(labels_file)
    todo = [f for f in chosen if f not in done and data.summary(f).get("top_examples")]
    never = [f for f in chosen if not data.summary(f).get("top_examples")]
    if never:
        log.warning("%d chosen features never fired on the analysed tokens and are not labelled: %s", len(never), ", ".join(map(str, never[:10])))
    log.info("%d features chosen, %d already labelled, %d to label", len(chosen), len([f for f in chosen if f in done]), len(todo))
    db = None
    if opts.detection and todo:
        try:
            db = FeatureTokens(find_database(root), todo)
        except InputError as e:
            log.warning("no activation database (%s): labels without detection scores", e)
    lens: dict[int, list[str]] = {}
    if data.logit_lens is not None:
        sub = data.logit_lens[(data.logit_lens["side"] == "top") & data.logit_lens["feature"].isin(todo)].sort_values("rank")
        lens = {int(f): [str(t) for t in g["token"].head(8)] for f, g in sub.groupby("feature")}
    labeler = _Labeler(opts) if todo else None
    write_lock = threading.Lock()
    failed: list[int] = []
    failures_file = out_dir / "failures.jsonl"

    def one(f: int) -> None:
        assert labeler is not None
        exs = data.summary(f)["top_examples"][: opts.examples]
        t0 = time.perf_counter()
        try:
            ans, tries = labeler.ask(LABEL_SYSTEM, label_prompt(f, exs, lens.get(f, [])), FeatureLabel)
            rec: dict[str, Any] = {"feature": f, **ans.model_dump(), "tries": tries}
            if db is not None:
                rng = random.Random(opts.seed * 1_000_003 + f)
                snippets, truth, skipped = detection_set(db, f, {int(e["global_idx"]) for e in exs}, opts.n_activating, opts.n_non,
                                                         opts.context, rng, opts.non_activating_quantile)
                if skipped:
                    rec["detection_skipped"] = skipped
                elif snippets and any(truth):
                    try:
                        det, det_tries = labeler.ask(DETECTION_SYSTEM, detection_prompt(rec, snippets), DetectionAnswer)
                    except Exception as e:  # the label is valid: keep it, without a detection score
                        rec["detection_error"] = " ".join(str(e).split())[:300]
                        log.warning("feature %d: detection request failed (%s); the label is kept without a score",
                                    f, rec["detection_error"][:200])
                    else:
                        picked = {int(i) for i in det.active}  # type: ignore[attr-defined]
                        answer = [1 if i in picked else 0 for i in range(1, len(snippets) + 1)]
                        acc, bal = detection_scores(truth, answer)
                        rec.update(detection_accuracy=acc, detection_balanced_accuracy=bal, detection_truth=truth,
                                   detection_answer=answer, detection_tries=det_tries)
        except Exception as e:  # one feature's failure never stops the others
            with write_lock:
                failed.append(f)
                with open(failures_file, "a", encoding="utf-8") as fh:
                    fh.write(json.dumps({"feature": f, "error": " ".join(str(e).split())[:500], "time": time.time()}) + "\n")
            log.warning("feature %d not labelled: %s", f, " ".join(str(e).split())[:200])
            return
        rec.update(model=opts.model, prompt_version=PROMPT_VERSION, seconds=round(time.perf_counter() - t0, 3))
        with write_lock:
            with open(labels_file, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(rec) + "\n")
                fh.flush()

    from rich.progress import Progress

    if todo:
        with Progress(transient=True) as progress, ThreadPoolExecutor(max_workers=max(1, opts.concurrency)) as pool:
            task = progress.add_task("labelling features", total=len(todo))
            futures = [pool.submit(one, f) for f in todo]
            try:
                for fut in as_completed(futures):
                    fut.result()
                    progress.advance(task)
            except BaseException:
                for fut in futures:
                    fut.cancel()
                raise
    all_done = read_done(labels_file)
    files = write_label_table(all_done, out_dir)
    usage = labeler.usage if labeler else {"prompt_tokens": 0, "completion_tokens": 0, "requests": 0, "cost": 0.0}
    metrics = label_metrics(all_done, usage, len(failed))
    summary = out_dir / "label_summary.json"
    summary.write_text(json.dumps({"options": asdict(opts), "metrics": {k: (v if np.isfinite(v) else None) for k, v in metrics.items()}, "failed": failed, "prompt_version": PROMPT_VERSION}, indent=2))
    # labels.jsonl exists once a feature was labelled (now or earlier); nothing labelled: not logged
    files = ([labels_file] if labels_file.is_file() else []) + [*files, summary] + (
        [failures_file] if failures_file.is_file() else [])
    return LabelOutcome(out_dir, labels_file, files, len(todo) - len(failed), len(chosen) - len(todo), failed, metrics)


def write_label_table(done: dict[int, dict[str, Any]], out_dir: Path) -> list[Path]:
    """``labels.parquet`` and ``labels.md``: one row per labelled feature."""
    import pandas as pd

    cols = ["feature", "label", "description", "category", "monosemantic", "interpretability", "knowledge_domain",
            "abstraction_level", "detection_accuracy", "detection_balanced_accuracy", "model"]
    frame = pd.DataFrame([{c: r.get(c) for c in cols} for r in sorted(done.values(), key=lambda r: int(r["feature"]))], columns=cols)
    pq = out_dir / "labels.parquet"
    frame.to_parquet(pq, index=False)
    md = out_dir / "labels.md"
    lines = ["| feature | label | category | mono | score | detection bal. acc. |", "|---|---|---|---|---|---|"]
    for r in frame.itertuples(index=False):
        bal = "" if r.detection_balanced_accuracy is None or pd.isna(r.detection_balanced_accuracy) else f"{r.detection_balanced_accuracy:.2f}"
        lines.append(f"| {r.feature} | {str(r.label).replace('|', '/')} | {r.category} | {r.monosemantic} | {r.interpretability} | {bal} |")
    md.write_text("\n".join(lines) + "\n")
    return [pq, md]


def label_metrics(done: dict[int, dict[str, Any]], usage: dict[str, float], failed: int) -> dict[str, float]:
    """``label/...`` metrics over every labelled feature (this run's usage for the token counts)."""
    recs = list(done.values())
    scores = [float(r["interpretability"]) for r in recs if r.get("interpretability") is not None]
    acc = [float(r["detection_accuracy"]) for r in recs if r.get("detection_accuracy") is not None]
    bal = [float(r["detection_balanced_accuracy"]) for r in recs if r.get("detection_balanced_accuracy") is not None and np.isfinite(r["detection_balanced_accuracy"])]
    m = {
        "label/features_labelled": float(len(recs)),
        "label/failed": float(failed),
        "label/mean_interpretability": float(np.mean(scores)) if scores else float("nan"),
        "label/share_monosemantic": float(np.mean([bool(r.get("monosemantic")) for r in recs])) if recs else float("nan"),
        "label/mean_detection_accuracy": float(np.mean(acc)) if acc else float("nan"),
        "label/mean_detection_balanced_accuracy": float(np.mean(bal)) if bal else float("nan"),
        "label/features_scored": float(len(bal)),
        "label/features_not_scored": float(sum(1 for r in recs if r.get("detection_skipped"))),
        "label/requests": float(usage["requests"]),
        "label/tokens_prompt": float(usage["prompt_tokens"]),
        "label/tokens_completion": float(usage["completion_tokens"]),
        "label/tokens_total": float(usage["prompt_tokens"] + usage["completion_tokens"]),
    }
    if usage.get("cost"):
        m["label/cost"] = float(usage["cost"])
    return m
