"""Static per-feature dashboards of a full analysis: one self-contained HTML page per chosen feature
and an index page. No scripts are needed to read them (MLflow's artifact viewer may sandbox
scripts); the index's sorting and search are a small progressive enhancement.

A feature page holds:

- the firing frequency (``firing_count / analysed tokens``), mean and max activation (over the
  tokens where the feature fired), from ``results/feature_stats.parquet``;
- the label, description and scores when ``label`` has run (``labels/labels.jsonl`` under the
  analysis directory);
- a histogram of the feature's non-zero activations over all analysed tokens (from the activation
  database's CSR; from the top examples alone when there is no database), as inline SVG;
- the top activating examples, each the activating token (boxed) and the tokens around it in its
  document, every token shaded by the feature's activation there (``alpha = value / max over the
  examples``; hover shows the value);
- the logit lens: the top and bottom tokens of ``W_dec[f] @ W_U``;
- the most similar features (decoder cosine) and the most co-occurring ones (the analysis's
  co-occurrence measure) from the neighbour lists, linked when they have a page.

``index.html`` is the table of the chosen features (sortable by frequency, mean activation, score;
searchable by label and token) followed by every feature page as a section shown when its fragment
(``#f<feature>``) is the target. MLflow's artifact viewer shows HTML in a sandboxed iframe from a
``blob:`` URL, where links to other files are blocked but fragment links work: so in MLflow one
``index.html`` browses every page, and the separate ``feature_<n>.html`` files serve a download or
a static file server.

The default set is bounded: the ``top`` most frequent features that fired (default 200) plus the
features asked for, so a d_sae 65k analysis does not write 65k pages.
"""

from __future__ import annotations

import html
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from sae_mlops.errors import InputError

log = logging.getLogger(__name__)

DEFAULT_TOP = 200
LABELS_FILE = Path("labels") / "labels.jsonl"
NEIGHBOURS_SHOWN = 10

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.2em 2em;color:#222;max-width:1100px}
h1{font-size:1.4em;margin-bottom:.2em} h2{font-size:1.1em;margin-top:1.4em;border-bottom:1px solid #ddd}
.meta{color:#555} table{border-collapse:collapse;font-size:.92em} td,th{padding:3px 8px;border-bottom:1px solid #eee;text-align:left}
th{background:#f4f4f4;cursor:pointer;user-select:none} td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
.ex{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.88em;white-space:pre-wrap;line-height:1.7;margin:2px 0;padding:3px 6px;background:#fafafa;border-left:3px solid #ddd}
.tok{border-radius:2px} .hit{outline:2px solid #d9480f;font-weight:bold}
.label{font-size:1.1em;background:#eef6ff;padding:6px 10px;border-radius:4px;display:inline-block}
.cols{display:flex;gap:2em;flex-wrap:wrap} .cols>div{min-width:240px}
section.feature{display:none} section.feature:target,section.feature.on{display:block} body:has(section.feature:target) #index{display:none}
.pos{color:#1864ab} .neg{color:#c92a2a} .muted{color:#888} input[type=search]{width:22em;padding:4px;margin:6px 0}
"""

SORT_JS = """
<script>
(function(){var t=document.getElementById('features');if(!t)return;var b=t.tBodies[0];
document.querySelectorAll('#features th').forEach(function(h,i){h.title='click to sort';h.addEventListener('click',function(){
var rows=Array.prototype.slice.call(b.rows),num=h.classList.contains('num'),d=h.dataset.dir==='desc'?1:-1;h.dataset.dir=d>0?'asc':'desc';
rows.sort(function(x,y){var a=x.cells[i].dataset.v||x.cells[i].textContent,c=y.cells[i].dataset.v||y.cells[i].textContent;
if(num){a=parseFloat(a);c=parseFloat(c);if(isNaN(a))a=-1e300;if(isNaN(c))c=-1e300;}return a<c?-d:a>c?d:0;});
rows.forEach(function(r){b.appendChild(r);});});});
function show(id){document.querySelectorAll('section.feature').forEach(function(s){s.classList.toggle('on',s.id===id);});
var ix=document.getElementById('index');if(ix)ix.style.display=id?'none':'';window.scrollTo(0,0);}
document.addEventListener('click',function(e){var a=e.target.closest('a');if(!a)return;var h=a.getAttribute('href')||'';
if(h==='#'||/^#f[0-9]+$/.test(h)){e.preventDefault();show(h.slice(1));}});
var q=document.getElementById('q');if(q){q.style.display='';q.addEventListener('input',function(){var s=q.value.toLowerCase();
Array.prototype.forEach.call(b.rows,function(r){r.style.display=r.textContent.toLowerCase().indexOf(s)>=0?'':'none';});});}})();
</script>
"""


@dataclass
class DashboardOutcome:
    out_dir: Path
    index: Path
    pages: list[Path]
    seconds_per_page: list[float] = field(default_factory=list)
    seconds_total: float = 0.0
    with_database: bool = False
    labelled: int = 0

    @property
    def files(self) -> list[Path]:
        return [self.index, *self.pages]

    def metrics(self) -> dict[str, float]:
        s = np.asarray(self.seconds_per_page or [0.0])
        return {
            "dashboard/pages": float(len(self.pages)),
            "dashboard/seconds_total": float(self.seconds_total),
            "dashboard/seconds_per_page_mean": float(s.mean()),
            "dashboard/seconds_per_page_max": float(s.max()),
        }


def read_labels(root: Path) -> dict[int, dict[str, Any]]:
    """The labels written by `sae-mlops label` under ``root`` (latest line per feature wins)."""
    from sae_mlops.features.label import read_done

    return read_done(Path(root) / LABELS_FILE)


def choose_features(stats: pd.DataFrame, features: list[int] | None, top: int) -> list[int]:
    """The ``top`` most frequent features that fired (ties by index) plus ``features``, sorted."""
    d_sae = len(stats)
    asked = list(features or [])
    bad = [f for f in asked if not 0 <= f < d_sae]
    if bad:
        raise InputError(f"feature {bad[0]} is out of range; this SAE has features 0..{d_sae - 1}.")
    fired = stats[stats["firing_count"] > 0].sort_values(["firing_count", "feature"], ascending=[False, True])
    chosen = set(fired["feature"].head(max(top, 0)).astype(int).tolist()) | set(asked)
    return sorted(chosen)


def _fmt(v: Any, spec: str = "{:.4g}") -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return html.escape(str(v)) if v is not None else ""
    return "" if not np.isfinite(f) else spec.format(f)


def _svg_histogram(values: np.ndarray, bins: int = 40, width: int = 520, height: int = 150) -> str:
    """An inline SVG histogram of ``values`` (bar heights: counts; x axis: activation)."""
    if values.size == 0:
        return '<p class="muted">no activations</p>'
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        hi = lo + 1e-6
    counts, edges = np.histogram(values, bins=bins, range=(lo, hi))
    top = max(int(counts.max()), 1)
    pad, w = 30, (width - 40) / bins
    bars = []
    for i, c in enumerate(counts):
        h = (height - pad - 10) * c / top
        x = 35 + i * w
        bars.append(f'<rect x="{x:.1f}" y="{height - pad - h:.1f}" width="{max(w - 1, 1):.1f}" height="{h:.1f}" fill="#4c72b0">'
                    f"<title>{edges[i]:.3g} to {edges[i + 1]:.3g}: {int(c)}</title></rect>")
    axis = (f'<line x1="35" y1="{height - pad}" x2="{width - 5}" y2="{height - pad}" stroke="#333"/>'
            f'<text x="35" y="{height - 12}" font-size="10">{lo:.3g}</text>'
            f'<text x="{width - 5}" y="{height - 12}" font-size="10" text-anchor="end">{hi:.3g}</text>'
            f'<text x="{width / 2}" y="{height - 2}" font-size="10" text-anchor="middle">activation ({values.size:,} non-zero tokens)</text>'
            f'<text x="30" y="12" font-size="10" text-anchor="end">{top}</text>')
    return f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" aria-label="activation histogram">{"".join(bars)}{axis}</svg>'


class FeatureTokens:
    """The parts of the activation database the dashboards and labels need: token arrays, the
    vocabulary, and for the chosen features their non-zero values and the token indices they fired on."""

    def __init__(self, root: Path, features: list[int]):
        from sae_mlops.outputs.activation_db.reader import ActivationDB

        db = ActivationDB(root)
        self.csr = db.csr()
        tokens = db.sql("SELECT token_index, doc_index, position, token_id FROM tokens ORDER BY token_index")
        self.doc = tokens["doc_index"].to_numpy()
        self.tok = tokens["token_id"].to_numpy()
        if not np.array_equal(tokens["token_index"].to_numpy(), np.arange(len(tokens))):
            raise InputError(f"the activation database at {db.root} has gaps in its token index; run `sae-mlops full` again.")
        vocab = db.sql("SELECT token_id, token_str FROM vocab")
        self.vocab = dict(zip(vocab["token_id"].astype(int), vocab["token_str"], strict=True))
        self.indptr, self.indices, self.data = self.csr.indptr, self.csr.indices, self.csr.data
        indices = np.asarray(self.csr.indices)
        mask = np.isin(indices, np.asarray(features, dtype=indices.dtype))
        pos = np.flatnonzero(mask)
        feats, vals = indices[pos], np.asarray(self.csr.data)[pos]
        rows = np.searchsorted(np.asarray(self.indptr), pos, side="right") - 1  # token index of each entry
        order = np.argsort(feats, kind="stable")
        feats, vals, rows = feats[order], vals[order], rows[order]
        cuts = np.searchsorted(feats, features)
        ends = np.searchsorted(feats, features, side="right")
        self.values = {f: vals[a:b] for f, a, b in zip(features, cuts, ends, strict=True)}
        self.rows = {f: rows[a:b] for f, a, b in zip(features, cuts, ends, strict=True)}

    def window(self, feature: int, centre: int, width: int) -> list[tuple[str, float, bool]]:
        """(token string, activation of ``feature``, is the centre) for the tokens of the centre's
        document within ``width`` tokens of it."""
        lo, hi = max(centre - width, 0), min(centre + width + 1, len(self.doc))
        rows = np.arange(lo, hi)
        rows = rows[self.doc[rows] == self.doc[centre]]
        if rows.size == 0:
            return []
        r0, r1 = int(rows[0]), int(rows[-1]) + 1
        ptr = np.asarray(self.indptr[r0 : r1 + 1])
        hit = np.flatnonzero(np.asarray(self.indices[ptr[0] : ptr[-1]]) == feature)
        acts = np.zeros(r1 - r0)
        acts[np.searchsorted(ptr, ptr[0] + hit, side="right") - 1] = np.asarray(self.data[ptr[0] + hit])
        return [(str(self.vocab.get(int(self.tok[r]), "?")), float(acts[r - r0]), int(r) == centre) for r in rows]


def _context_from_marked(context: str) -> list[tuple[str, float, bool]]:
    """A context string ``a [[b]] c`` as three pieces, the centre marked, without activations."""
    before, _, rest = context.partition("[[")
    hit, _, after = rest.partition("]]")
    return [(before, 0.0, False), (hit, 1.0, True), (after, 0.0, False)]


def _render_tokens(pieces: list[tuple[str, float, bool]], scale: float) -> str:
    out = []
    for text, v, centre in pieces:
        alpha = 0.0 if scale <= 0 else min(max(v / scale, 0.0), 1.0)
        if v == 0 and not centre:
            out.append(html.escape(text))
            continue
        style = f' style="background:rgba(255,140,0,{alpha:.2f})"' if alpha > 0 else ""
        cls = "tok hit" if centre else "tok"
        out.append(f'<span class="{cls}"{style} title="{v:.3g}">{html.escape(text)}</span>')
    return "".join(out)


def _by_feature(table: pd.DataFrame | None, features: list[int]) -> dict[int, pd.DataFrame] | None:
    if table is None:
        return None
    sub = table[table["feature"].isin(features)]
    return {int(f): g for f, g in sub.groupby("feature")}


def _neighbour_list(tables: dict[int, pd.DataFrame] | None, feature: int, pages: set[int], labels: dict[int, dict]) -> str:
    if tables is None:
        return '<p class="muted">not available</p>'
    table = tables.get(feature)
    if table is None:
        return '<p class="muted">none</p>'
    rows = table[table["neighbour"] != feature].sort_values("rank").head(NEIGHBOURS_SHOWN)
    if rows.empty:
        return '<p class="muted">none</p>'
    items = []
    for n, v in zip(rows["neighbour"].astype(int), rows["value"], strict=True):
        name = f'<a href="feature_{n}.html">{n}</a>' if n in pages else str(n)
        lab = labels.get(n, {}).get("label")
        extra = f' <span class="muted">{html.escape(str(lab))}</span>' if lab else ""
        items.append(f'<tr><td>{name}{extra}</td><td class="num">{_fmt(v, "{:.3f}")}</td></tr>')
    return f'<table><tr><th>feature</th><th class="num">value</th></tr>{"".join(items)}</table>'


def _lens_table(lens: dict[int, pd.DataFrame] | None, feature: int) -> str:
    if lens is None:
        return '<p class="muted">no logit lens for this hook</p>'
    rows = lens.get(feature)
    if rows is None:
        return '<p class="muted">none</p>'
    parts = []
    for side, cls in (("top", "pos"), ("bottom", "neg")):
        sub = rows[rows["side"] == side].sort_values("rank")
        cells = "".join(f'<tr><td class="{cls}">{html.escape(repr(str(t)))}</td><td class="num">{_fmt(v, "{:.3f}")}</td></tr>' for t, v in zip(sub["token"], sub["logit"], strict=True))
        parts.append(f"<div><b>{side}</b><table>{cells}</table></div>")
    return f'<div class="cols">{"".join(parts)}</div>'


def _label_block(rec: dict[str, Any] | None) -> str:
    if not rec or not rec.get("label"):
        return '<p class="muted">no label yet (run <code>sae-mlops label</code>)</p>'
    fields = [("category", "category"), ("monosemantic", "monosemantic"), ("interpretability", "interpretability score (1-5)"),
              ("knowledge_domain", "knowledge domain"), ("abstraction_level", "abstraction level"),
              ("detection_accuracy", "detection accuracy"), ("detection_balanced_accuracy", "detection balanced accuracy")]
    rows = "".join(f"<tr><td>{name}</td><td>{_fmt(rec.get(key)) if isinstance(rec.get(key), float) else html.escape(str(rec.get(key)))}</td></tr>"
                   for key, name in fields if rec.get(key) is not None)
    return (f'<div class="label">{html.escape(str(rec["label"]))}</div><p>{html.escape(str(rec.get("description", "")))}</p>'
            f'<table>{rows}</table><p class="muted">labelled by {html.escape(str(rec.get("model", "")))}</p>')


def _page(title: str, body: str, script: str = "") -> str:
    return f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{CSS}</style></head><body>{body}{script}</body></html>'


def write_dashboards(
    root: Path,
    out_dir: Path | None = None,
    features: list[int] | None = None,
    top: int = DEFAULT_TOP,
    context: int = 12,
    examples: int | None = None,
) -> DashboardOutcome:
    """Write the pages of the chosen features and ``index.html`` under ``out_dir`` (default:
    ``<root>/dashboard``). ``context``: tokens either side of an example; ``examples``: examples
    shown per feature (default: all that the analysis kept)."""
    from sae_mlops.outputs.activation_db.reader import find_database
    from sae_mlops.interp.data import load_analysis

    t_start = time.perf_counter()
    data = load_analysis(root)
    out_dir = Path(out_dir) if out_dir else Path(root) / "dashboard"
    out_dir.mkdir(parents=True, exist_ok=True)
    chosen = choose_features(data.stats, features, top)
    labels = read_labels(Path(root))
    try:
        db: FeatureTokens | None = FeatureTokens(find_database(root), chosen)
    except InputError as e:
        log.warning("no activation database (%s): histograms from the top examples only, contexts unshaded", e)
        db = None
    n_tokens = data.params.get("tokens_analysed")
    # only the chosen features' rows, grouped once (the tables hold d_sae x neighbours rows)
    sim_n, cooc_n, lens = (_by_feature(t, chosen) for t in (data.similarity_neighbours, data.cooccurrence_neighbours, data.logit_lens))
    stats = data.stats.set_index("feature")
    pages_set = set(chosen)
    pages, seconds = [], []
    bodies: dict[int, str] = {}
    title = f"{Path(str(data.params.get('sae', root))).name} ({data.params.get('hook', '')})"
    for f in chosen:
        t0 = time.perf_counter()
        s = data.summary(f)
        row = stats.loc[f]
        exs = s.get("top_examples", [])[: examples or None]
        if db is not None:
            vals = db.values.get(f, np.zeros(0))
            windows = [db.window(f, int(e["global_idx"]), context) for e in exs]
        else:
            vals = np.asarray([e["activation"] for e in exs], dtype=np.float64)
            windows = [_context_from_marked(e.get("context", "")) for e in exs]
        scale = max([float(e["activation"]) for e in exs] or [0.0])
        ex_html = "".join(
            f'<div class="ex"><span class="muted">{_fmt(e["activation"], "{:.3f}")} · doc {e.get("text_idx")} pos {e.get("position")}</span>  {_render_tokens(w, scale)}</div>'
            for e, w in zip(exs, windows, strict=True)
        ) or '<p class="muted">never fired on the analysed tokens</p>'
        freq = _fmt(row.get("frequency"), "{:.3e}")
        body = (
            f'<p><a href="index.html">&larr; all features</a></p><h1>Feature {f}</h1>'
            f'<p class="meta">{html.escape(title)} · fired on {int(row.get("firing_count", 0)):,} of {_fmt(n_tokens, "{:,.0f}")} tokens '
            f'(frequency {freq}) · mean activation {_fmt(row.get("mean_activation"))} · max {_fmt(row.get("max_activation"))}</p>'
            f"<h2>Label</h2>{_label_block(labels.get(f))}"
            f"<h2>Activation histogram</h2>{_svg_histogram(np.asarray(vals, dtype=np.float64))}"
            + ("" if db is not None else '<p class="muted">from the top examples only (no activation database)</p>')
            + f"<h2>Top activating examples</h2>{ex_html}"
            f"<h2>Logit lens</h2>{_lens_table(lens, f)}"
            f'<div class="cols"><div><h2>Most similar (decoder cosine)</h2>{_neighbour_list(sim_n, f, pages_set, labels)}</div>'
            f'<div><h2>Most co-occurring ({html.escape(data.cooccurrence_measure)})</h2>{_neighbour_list(cooc_n, f, pages_set, labels)}</div></div>'
        )
        bodies[f] = body
        path = out_dir / f"feature_{f}.html"
        path.write_text(_page(f"Feature {f}", body), encoding="utf-8")
        pages.append(path)
        seconds.append(time.perf_counter() - t0)
    index = _write_index(out_dir, chosen, data, labels, title, n_tokens, bodies)
    outcome = DashboardOutcome(out_dir, index, pages, seconds, time.perf_counter() - t_start, db is not None, sum(1 for f in chosen if f in labels))
    log.info("wrote %d feature pages in %.1f s (%.3f s per page)", len(pages), outcome.seconds_total, float(np.mean(seconds or [0])))
    return outcome


def _top_tokens(summary: dict[str, Any], n: int = 3) -> str:
    counts: dict[str, int] = {}
    for e in summary.get("top_examples", []):
        counts[e["token"]] = counts.get(e["token"], 0) + 1
    return " ".join(repr(t) for t, _ in sorted(counts.items(), key=lambda kv: -kv[1])[:n])


def _in_page(body: str, pages: set[int]) -> str:
    """A feature page's body as a section of the index: links to other pages become fragment links."""
    body = body.replace('<a href="index.html">&larr; all features</a>', '<a href="#">&larr; all features</a>')
    return re.sub(r'href="feature_(\d+)\.html"', lambda m: f'href="#f{m.group(1)}"' if int(m.group(1)) in pages else m.group(0), body)


def _write_index(out_dir: Path, chosen: list[int], data: Any, labels: dict[int, dict], title: str, n_tokens: Any, bodies: dict[int, str]) -> Path:
    stats = data.stats.set_index("feature")
    rows = []
    for f in sorted(chosen, key=lambda f: (-int(stats.loc[f, "firing_count"]), f)):
        r, rec = stats.loc[f], labels.get(f, {})
        score = rec.get("interpretability")
        det = rec.get("detection_balanced_accuracy")
        rows.append(
            f'<tr><td data-v="{f}" class="num"><a href="#f{f}">{f}</a></td>'
            f'<td>{html.escape(str(rec.get("label", "")))}</td>'
            f'<td class="num" data-v="{_fmt(score, "{:g}") or "nan"}">{_fmt(score, "{:g}")}</td>'
            f'<td class="num" data-v="{_fmt(det, "{:g}") or "nan"}">{_fmt(det, "{:.2f}")}</td>'
            f'<td class="num" data-v="{float(r["frequency"])}">{_fmt(r["frequency"], "{:.3e}")}</td>'
            f'<td class="num" data-v="{float(r["mean_activation"])}">{_fmt(r["mean_activation"], "{:.3f}")}</td>'
            f'<td class="num" data-v="{float(r["max_activation"])}">{_fmt(r["max_activation"], "{:.3f}")}</td>'
            f"<td>{html.escape(_top_tokens(data.summary(f)))}</td></tr>"
        )
    body = (
        f"<h1>Feature dashboards</h1><p class=\"meta\">{html.escape(title)} · {len(chosen)} of {data.d_sae:,} features "
        f"(the most frequent ones and those asked for) · {_fmt(n_tokens, '{:,.0f}')} analysed tokens · analysis {data.timestamp}</p>"
        '<input id="q" type="search" placeholder="search label or token" style="display:none">'
        '<p class="muted">Sorted by frequency. Click a column to sort, type to filter (needs scripts).</p>'
        '<table id="features"><thead><tr><th class="num">feature</th><th>label</th><th class="num">score (1-5)</th>'
        '<th class="num">detection bal. acc.</th><th class="num">frequency</th><th class="num">mean act.</th>'
        '<th class="num">max act.</th><th>top tokens</th></tr></thead><tbody>' + "".join(rows) + "</tbody></table>"
    )
    pages = set(chosen)
    sections = "".join(f'<section class="feature" id="f{f}">{_in_page(bodies[f], pages)}</section>' for f in chosen if f in bodies)
    body = f'<div id="index">{body}</div>{sections}'
    path = out_dir / "index.html"
    path.write_text(_page("Feature dashboards", body, SORT_JS), encoding="utf-8")
    return path
