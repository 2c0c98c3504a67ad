"""Interpretation analyses of a full analysis's outputs (the functions behind
``notebooks/interp_analysis.ipynb`` and ``sae-mlops report``).

- :mod:`~sae_mlops.interp.data`: load an analysis directory into :class:`AnalysisData`;
- :mod:`~sae_mlops.interp.features`: feature table, top features, token counts, contexts, positions;
- :mod:`~sae_mlops.interp.density`: the token-density heuristic and its labels;
- :mod:`~sae_mlops.interp.cooccurrence_views`: clustered heatmaps, similarity vs co-occurrence, clusters;
- :mod:`~sae_mlops.interp.clusters`: the cluster deep dive (distributions, norms, PCA, network);
- :mod:`~sae_mlops.interp.position`: position-0 features;
- :mod:`~sae_mlops.interp.decoder`: the SAE's decoder rows, when it still loads (optional);
- :mod:`~sae_mlops.interp.figures`: a matplotlib Figure for each of the above;
- :mod:`~sae_mlops.interp.notebook_report`: execute the notebook (papermill), render HTML, log to MLflow.

Everything here reads files; nothing runs the model, and MLflow is reached only through
:mod:`sae_mlops.tracking`.
"""

from sae_mlops.interp.data import AnalysisData, load_analysis

__all__ = ["AnalysisData", "load_analysis"]
