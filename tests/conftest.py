"""Shared pytest fixtures. Each section belongs to one part of the package; keep them small."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

# The suite runs 3 xdist workers, and the servers and CLI subprocesses they start, on a 2-core
# machine. With torch's default of one OpenMP thread per core, every process's idle OpenMP threads
# spin-wait while other processes need the cores: a sharded demo analysis measured 0.9 s in the pass
# alone but 14-28 s beside two busy processes (1.7 s with OMP_WAIT_POLICY=PASSIVE). One thread per
# process does the same work without the spinning. Set before torch is imported; inherited by the
# xdist workers and every subprocess. A user's own environment value is kept.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import signal  # noqa: E402

# A suite started in the background by a shell without job control (`make test &` in a script, a
# `(nohup ... &)`) inherits SIGINT ignored, and so would every CLI subprocess a test starts: Python
# installs its KeyboardInterrupt handler only where SIGINT is not ignored, so the tests that press
# Ctrl-C (send SIGINT) would see the analysis run to its end. A caught signal is reset to its default
# by exec, so with a handler here each child installs its own. (Inherited ignoring was the cause of
# `test_sigint_during_a_quick_analysis_under_mlflow_run` and `test_interrupted_run_resumes` failing
# with exit 0.)
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

import torch  # noqa: E402 - after the thread settings above

# ---------------------------------------------------------------------------------------------
# sources layer (tests/test_sources_*.py): tiny SAE directories in both formats, an MLflow store
# ---------------------------------------------------------------------------------------------

HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(scope="session")
def make_legacy_sae(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory writing a prior-format SAE directory (config.json, weights.pt, history.json) with
    random weights in a fresh temporary directory; returns its path. `config` entries override
    config.json, `weights` entries override weights.pt."""

    def make(
        name: str = "legacy",
        d_in: int = 8,
        d_sae: int = 16,
        top_k: int | None = None,
        seed: int = 0,
        history: bool = True,
        weights: dict[str, Any] | None = None,
        **config: Any,
    ) -> Path:
        gen = torch.Generator().manual_seed(seed)
        state = {
            "W_enc": torch.randn(d_in, d_sae, generator=gen) * 0.5,
            "b_enc": torch.randn(d_sae, generator=gen) * 0.1,
            "W_dec": torch.randn(d_sae, d_in, generator=gen) * 0.5,
            "b_dec": torch.randn(d_in, generator=gen) * 0.1,
            "ever_fired": torch.rand(d_sae, generator=gen) > 0.3,
        }
        if top_k is not None:
            state["num_batches_not_active"] = torch.zeros(d_sae)
        state.update(weights or {})
        cfg = {
            "d_in": d_in,
            "d_sae": d_sae,
            "l1_coefficient": 0.01,
            "dtype": "float32",
            "device": "cpu",
            "hook_layer": "0",
            "hook_name": "hook_resid_post",
            "hook_spec": HOOK,
            "top_k": top_k,
            "top_k_aux": 4,
            "n_batches_to_dead": 5,
            "aux_penalty": 0.03,
        }
        cfg.update(config)
        path = tmp_path_factory.mktemp("legacy_sae") / name
        path.mkdir(parents=True)
        (path / "config.json").write_text(json.dumps(cfg))
        torch.save(state, path / "weights.pt")
        if history:
            (path / "history.json").write_text(
                json.dumps({"loss": [3.0, 2.0], "sparsity": [40.0, 20.0], "val_loss": [3.1, 2.2]})
            )
        return path

    return make


@pytest.fixture(scope="session")
def make_saelens_sae(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory writing a SAELens directory with `save_model` for architecture "standard", "topk" or
    "jumprelu" (random weights) in a fresh temporary directory; returns its path."""

    def make(
        architecture: str = "standard",
        name: str | None = None,
        d_in: int = 8,
        d_sae: int = 16,
        hook_name: str = HOOK,
        model_name: str | None = "demo",
        seed: int = 0,
        **kwargs: Any,
    ) -> Path:
        import sae_lens
        from sae_lens.saes.sae import SAEMetadata

        classes = {
            "standard": (sae_lens.StandardSAE, sae_lens.StandardSAEConfig),
            "topk": (sae_lens.TopKSAE, sae_lens.TopKSAEConfig),
            "jumprelu": (sae_lens.JumpReLUSAE, sae_lens.JumpReLUSAEConfig),
        }
        sae_cls, cfg_cls = classes[architecture]
        metadata = SAEMetadata(hook_name=hook_name, model_name=model_name, prepend_bos=True, context_size=32)
        sae = sae_cls(cfg_cls(d_in=d_in, d_sae=d_sae, metadata=metadata, **kwargs))
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param in sae.parameters():
                param.copy_(torch.randn(param.shape, generator=gen) * 0.3)
            if architecture == "jumprelu":
                sae.threshold.copy_(torch.rand(d_sae, generator=gen) * 0.3)
        path = tmp_path_factory.mktemp("saelens_sae") / (name or f"saelens_{architecture}")
        sae.save_model(path)
        return path

    return make


@pytest.fixture
def demo_assets() -> None:
    """Skip unless the demo assets are built (never trigger a multi-minute build from a test)."""
    try:
        from sae_mlops.demo.assets import required_files
    except ImportError:
        pytest.skip("sae_mlops.demo is not available")
    if not all(path.is_file() for path in required_files()):
        pytest.skip("demo assets not built (python scripts/build_demo_assets.py)")


@contextmanager
def _mlflow_store_at(root: Path) -> Iterator[str]:
    """A fresh sqlite MLflow store in `root` as the current tracking URI, restored on exit."""
    import mlflow

    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)  # the default artifact root (./mlruns) is resolved against the cwd
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_REGISTRY_URI"):
            mp.delenv(var, raising=False)
        mp.setattr(mlflow.tracking._tracking_service.utils, "_tracking_uri", uri)
        mp.setattr(mlflow.tracking._model_registry.utils, "_registry_uri", None)
        try:
            yield uri
        finally:
            while mlflow.active_run():
                mlflow.end_run()


@pytest.fixture(scope="session")
def mlflow_store_at() -> Callable[[Path], Any]:
    """Context-manager factory for a sqlite MLflow store in a given directory (any fixture scope)."""
    return _mlflow_store_at


@pytest.fixture
def mlflow_store(tmp_path: Path) -> Iterator[str]:
    """A fresh sqlite MLflow store in tmp_path as the current tracking URI (restored afterwards)."""
    with _mlflow_store_at(tmp_path) as uri:
        yield uri


# ---------------------------------------------------------------------------------------------
# running in parallel (pytest-xdist: `make test` runs `pytest -n 3 --dist loadgroup
# --no-loadscope-reorder`; docs/guides/testing.md)
# ---------------------------------------------------------------------------------------------

#: Tests that start a Ray cluster run one after another on one worker: two heads on one machine would
#: compete for Ray's fixed default ports (Ray Client 10001, dashboard agent 52365).
RAY_GROUP = "ray"
_RAY_FIXTURES = {"ray_cluster"}
_RAY_MODULES = {"test_service_ray"}

#: Rough seconds per group or test, measured with `--durations` on a loaded 2-core machine (only the
#: order matters): the longest are handed out first, so that no long test starts last and leaves the
#: other workers idle. Anything not listed counts as 1 s and keeps its collection order.
_COST = {
    "test_scaleout": 1250, RAY_GROUP: 750, "test_integration_full": 450, "test_integration_quick": 450,
    "test_lineage_e2e": 420, "test_service_s3": 250, "test_service_integration": 200, "test_label": 170,
    "test_full_reference": 160, "test_report": 120, "test_cli_full": 80, "test_dashboard": 40, "test_service_job": 40,
    "test_sigint_during_a_quick_analysis_under_mlflow_run": 165, "test_resume_option_continues_a_quick_analysis": 310,
    "test_tracking_server_lost_mid_pass_the_analysis_finishes_and_says_how_to_log": 210,
    "test_match_end_to_end_known_permutation_logged": 52, "test_interrupt_while_writing_says_which_files_are_partial": 50,
    "test_registry_links_both_ways": 39, "test_compare_latest_per_sae_and_formats": 38, "test_demo_end_to_end": 34,
    "test_train_cli_logs_a_training_run": 34, "test_tracking_failure_after_the_analysis_names_the_files_then_log_logs_them": 33,
    "test_quick_run_names_params_description_files": 31, "test_interrupt_during_the_full_pass_leaves_nothing_and_kills_its_run": 28,
    "test_every_plot_returns_a_figure": 28, "test_quick_run_records_and_logs_its_cost": 26,
}

_MODULE_INFO: dict[str, tuple[set[str], dict[str, set[str]]]] = {}


def _module_info(path: Path) -> tuple[set[str], dict[str, set[str]]]:
    """(module-scoped fixture names, {function name: argument names}) of a test module, read from its
    source, so that the xdist controller (which collects nothing) sees what the workers see."""
    import ast

    key = str(path)
    if key not in _MODULE_INFO:
        tree = ast.parse(path.read_text())
        module_scoped: set[str] = set()
        args: dict[str, set[str]] = {}
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args[node.name] = {a.arg for a in node.args.args + node.args.kwonlyargs}
                for dec in node.decorator_list:
                    if isinstance(dec, ast.Call) and any(
                            k.arg == "scope" and isinstance(k.value, ast.Constant) and k.value.value == "module"
                            for k in dec.keywords):
                        module_scoped.add(node.name)
        _MODULE_INFO[key] = (module_scoped, args)
    return _MODULE_INFO[key]


def test_group(nodeid: str, root: Path) -> str | None:
    """The xdist group of a test: the Ray group; else its module's name when it uses (directly or
    through the module's fixtures) a module-scoped fixture of its module, so that the module's tests
    that share the fixture (often a server or an analysis) run on one worker and it is built once;
    else None (any worker)."""
    file, _, rest = nodeid.partition("::")
    module = Path(file).stem
    if module in _RAY_MODULES:
        return RAY_GROUP
    path = root / file
    if not path.is_file() or not path.name.startswith("test_"):
        return None
    module_scoped, args = _module_info(path)
    name = rest.split("::")[-1].split("[")[0]
    seen, todo = set(), set(args.get(name, ()))
    while todo:
        arg = todo.pop()
        if arg not in seen:
            seen.add(arg)
            todo |= args.get(arg, set()) - seen
    if seen & _RAY_FIXTURES:
        return RAY_GROUP
    return module if seen & module_scoped else None


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Longest groups and tests first (see `_COST`); the order within a group is kept."""
    first: dict[str, int] = {}
    keys = []
    for i, item in enumerate(items):
        group = test_group(item.nodeid, config.rootpath)
        name = getattr(item, "originalname", item.name)
        unit = group or item.nodeid
        first.setdefault(unit, i)
        keys.append((-_COST.get(group or name, 1), first[unit], i))
    order = sorted(range(len(items)), key=keys.__getitem__)
    items[:] = [items[i] for i in order]


try:
    from xdist.scheduler import LoadScopeScheduling
except ImportError:  # pragma: no cover - the suite also runs without pytest-xdist
    LoadScopeScheduling = None

if LoadScopeScheduling is not None:

    class _GroupScheduling(LoadScopeScheduling):
        """pytest-xdist's scope scheduling with `test_group` as the scope (a test without a group is
        its own scope). xdist's own `--dist loadgroup` marks do not group with pytest 9.2 (xdist 3.8
        renames ``item._nodeid``, which pytest no longer reads), hence this."""

        def _split_scope(self, nodeid: str) -> str:
            return test_group(nodeid, self.config.rootpath) or nodeid

    def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
        if config.getvalue("dist") in ("loadgroup", "loadscope"):
            return _GroupScheduling(config, log)
        return None
