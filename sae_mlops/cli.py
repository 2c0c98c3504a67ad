"""The ``sae-mlops`` command line (the console script): the Typer application with every command
module registered on it.

The commands live in `sae_mlops.commands` (one module per group, each a thin layer over one library
call); they register themselves on `sae_mlops.commands.app.app` when imported, and never import this
module, so the CLI sits on top of the layers.
"""

from __future__ import annotations

# in the order `sae-mlops --help` lists them
from sae_mlops.commands import analyse, lineage, match, dashboard, label, notebook, log, serve, evals  # noqa: F401 (registration)
from sae_mlops.commands import synth  # noqa: F401 (registration)
from sae_mlops.commands.app import app

__all__ = ["app"]

if __name__ == "__main__":  # pragma: no cover
    app()
