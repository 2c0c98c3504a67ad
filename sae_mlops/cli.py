"""The ``sae-mlops`` command line (the console script): the Typer application with every command
module registered on it.

The commands live in `sae_mlops.commands` (one module per group, each a thin layer over one library
call); they register themselves on `sae_mlops.commands.app.app` when imported, and never import this
module, so the CLI sits on top of the layers.
"""

from __future__ import annotations

import os

# Before anything imports numpy: numpy asks the kernel for transparent huge pages for every array of
# 4 MiB or more, and where the kernel compacts memory for such requests (THP defrag "madvise", a
# common default) a machine with fragmented memory stalls on the first touch. Measured on this
# project's machine: the first pass over a fresh 64 MiB co-occurrence count matrix took 0.2-0.9 s
# instead of 15 ms. Off for the command and the processes it starts (Ray workers, the service's
# children), unless the user set NUMPY_MADVISE_HUGEPAGE.
os.environ.setdefault("NUMPY_MADVISE_HUGEPAGE", "0")

# in the order `sae-mlops --help` lists them
from sae_mlops.commands import analyse, lineage, match, dashboard, label, notebook, log, serve, evals  # noqa: F401, E402 (registration)
from sae_mlops.commands import synth  # noqa: F401, E402 (registration)
from sae_mlops.commands.app import app  # noqa: E402

__all__ = ["app"]

if __name__ == "__main__":  # pragma: no cover
    app()
