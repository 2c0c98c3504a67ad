"""MLproject entry point ``full``: parse the -P parameters and make one library call.

``mlflow run . -e full -P sae=PATH_OR_URI [-P model=demo ...]`` takes every parameter of ``quick``
plus the full-analysis ones, runs `sae_mlops.pipeline.run_full_and_log` inside the MLflow run that
``mlflow run`` created, and logs every output file as an artifact. An empty string means "not given"
(the library default applies). A user mistake exits with code 2 and one sentence on stderr.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if str(Path(__file__).resolve().parent) not in sys.path:  # also when loaded by file path
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402
from _common import choice, opt, whole  # noqa: E402

# argparse dest -> FullOptions field
FULL_FIELDS = {
    "examples_per_feature": "examples_per_feature",
    "context_window": "context_window",
    "cooccurrence": "cooccurrence_measure",
    "dense_limit": "dense_limit",
    "neighbours": "neighbours",
    "logit_lens_tokens": "logit_lens_tokens",
    "heatmap_features": "heatmap_features",
}


def build_parser() -> argparse.ArgumentParser:
    p = _common.analysis_parser("full", "Full SAE analysis tracked in MLflow (the MLproject 'full' entry point).")
    p.add_argument("--examples-per-feature", type=opt(whole), default=None, help="top examples kept per feature (empty: 25)")
    p.add_argument("--context-window", type=opt(whole), default=None, help="tokens either side of an example (empty: 10)")
    p.add_argument("--cooccurrence", type=opt(choice("correlation", "jaccard", "pmi")), default=None, help="co-occurrence measure (empty: correlation)")
    p.add_argument("--dense-limit", type=opt(whole), default=None, help="largest d_sae with dense .npy matrices (empty: 4096)")
    p.add_argument("--neighbours", type=opt(whole), default=None, help="neighbours per feature in the neighbour lists (empty: 32)")
    p.add_argument("--logit-lens-tokens", type=opt(whole), default=None, help="top and bottom logit-lens tokens per feature (empty: 10)")
    p.add_argument("--heatmap-features", type=opt(whole), default=None, help="features in the clustered heatmaps (empty: 200)")
    return p


def _call(cfg, args: argparse.Namespace) -> None:
    from sae_mlops.full import FullOptions
    from sae_mlops.pipeline import run_full_and_log

    opts = FullOptions(**{FULL_FIELDS[k]: v for k, v in _common.given(args, FULL_FIELDS).items()})
    run_full_and_log(cfg, args.out, opts=opts, track=True)


def main(argv: list[str] | None = None) -> int:
    return _common.run(build_parser().parse_args(argv), _call)


if __name__ == "__main__":
    sys.exit(main())
