"""Imported first by the benchmark scripts that run analyses in their own process, so that they run
as the ``sae-mlops`` command does: numpy's huge-page requests off unless the user set
``NUMPY_MADVISE_HUGEPAGE`` (see ``sae_mlops/cli.py`` for why). Must run before numpy is imported."""

import os

os.environ.setdefault("NUMPY_MADVISE_HUGEPAGE", "0")
