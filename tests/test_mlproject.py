"""MLproject, python_env.yaml and conda.yaml agree with each other and with entrypoints/quick.py and full.py."""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import yaml
from mlflow.projects import _project_spec

import pytest

from sae_mlops.config import ExecutionOptions, AnalysisConfig
from sae_mlops.analyses.full import FullOptions
from sae_mlops.options import option_specs

ROOT = Path(__file__).resolve().parents[1]


def _entrypoint_module(name: str = "quick"):
    spec = importlib.util.spec_from_file_location(f"entrypoint_{name}", ROOT / "entrypoints" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _mlproject() -> dict:
    return yaml.safe_load((ROOT / "MLproject").read_text())


def test_mlproject_shape():
    mp = _mlproject()
    assert mp["name"] == "sae-mlops"
    assert mp["python_env"] == "python_env.yaml"
    assert {"quick", "full"} <= set(mp["entry_points"])
    params = mp["entry_points"]["quick"]["parameters"]
    assert "default" not in params["sae"]  # the one required parameter
    for name in ("sae", "model", "corpus", "hook", "max_tokens", "context_size", "batch_size", "topk_mode", "threshold", "out"):
        assert name in params
    assert float(params["max_tokens"]["default"]) == 1_000_000
    assert params["model"]["default"] == "" and params["out"]["default"] == ""
    # MLflow itself can load it
    project = _project_spec.load_project(str(ROOT))
    assert project.name == "sae-mlops"
    assert project.get_entry_point("quick").command.startswith("python entrypoints/quick.py")


@pytest.mark.parametrize("entry", ["quick", "full"])
def test_every_parameter_is_passed_and_accepted(entry):
    mp = _mlproject()
    ep = mp["entry_points"][entry]
    command = ep["command"]
    placeholders = re.findall(r"\{(\w+)\}", command)
    assert sorted(placeholders) == sorted(ep["parameters"])  # each parameter used exactly once
    for name in ep["parameters"]:
        assert f"--{name.replace('_', '-')} {{{name}}}" in command

    module = _entrypoint_module(entry)
    parser = module.build_parser()
    accepted = {a.dest for a in parser._actions if a.option_strings} - {"help", "verbose"}
    assert accepted == set(ep["parameters"])

    # The command MLflow would run, with the defaults: argparse accepts it and "" means "not given".
    project = _project_spec.load_project(str(ROOT))
    cmd = project.get_entry_point(entry).compute_command({"sae": "some/sae dir"}, storage_dir=None)
    argv = shlex.split(cmd)
    assert argv[:2] == ["python", f"entrypoints/{entry}.py"]
    args = parser.parse_args(argv[2:])
    assert args.sae == "some/sae dir"
    assert args.model is None and args.hook is None and args.out is None and args.context_size is None
    assert args.max_tokens == 1_000_000 and isinstance(args.max_tokens, int)
    defaults = AnalysisConfig(sae="x")
    assert args.batch_size == defaults.batch_size
    assert args.rare_threshold == defaults.rare_threshold
    assert args.dense_threshold == defaults.dense_threshold
    assert args.text_field == defaults.text_field
    assert args.device == defaults.device and args.dtype == defaults.dtype
    # every accepted option maps to an AnalysisConfig field (or out, or a FullOptions option for full)
    fields = set(AnalysisConfig.__dataclass_fields__)
    full_specs = {s.name: s.field for s in option_specs(FullOptions)} if entry == "full" else {}
    exec_defaults = ExecutionOptions()
    exec_specs = {s.name: s.field for s in option_specs(ExecutionOptions)}
    assert accepted - {"out"} - set(full_specs) - set(exec_specs) <= fields
    for dest, field in exec_specs.items():  # the execution options reach ExecutionOptions with its defaults
        assert getattr(args, dest) == getattr(exec_defaults, field), dest
    # full: its MLproject defaults are FullOptions' defaults, and each reaches a FullOptions field
    full_defaults = FullOptions()
    for dest, field in full_specs.items():
        assert getattr(args, dest) == getattr(full_defaults, field), dest


def test_full_has_every_quick_parameter():
    eps = _mlproject()["entry_points"]
    quick, full = eps["quick"]["parameters"], eps["full"]["parameters"]
    assert {k: v for k, v in full.items() if k in quick} == quick
    assert set(full) - set(quick) == {s.name for s in option_specs(FullOptions)}
    assert {s.field for s in option_specs(FullOptions)} <= set(FullOptions.__dataclass_fields__)


@pytest.mark.parametrize("entry", ["quick", "full"])
def test_entrypoint_parses_given_values(entry):
    parser = _entrypoint_module(entry).build_parser()
    args = parser.parse_args(
        ["--sae", "s", "--max-tokens", "2e4", "--prepend-bos", "false", "--topk-mode", "threshold", "--threshold", "0.25"]
    )
    assert args.max_tokens == 20000 and args.prepend_bos is False
    assert args.topk_mode == "threshold" and args.threshold == 0.25


def test_full_entrypoint_parses_full_values():
    parser = _entrypoint_module("full").build_parser()
    args = parser.parse_args(["--sae", "s", "--examples-per-feature", "5", "--cooccurrence", "pmi", "--dense-limit", "", "--neighbours", "8.0"])
    assert args.examples_per_feature == 5 and args.cooccurrence == "pmi"
    assert args.dense_limit is None and args.neighbours == 8
    with pytest.raises(SystemExit):
        parser.parse_args(["--sae", "s", "--cooccurrence", "cosine"])


def test_environment_files_agree():
    py_env = yaml.safe_load((ROOT / "python_env.yaml").read_text())
    conda = yaml.safe_load((ROOT / "conda.yaml").read_text())
    assert str(py_env["python"]) == "3.11"
    assert "python=3.11" in conda["dependencies"]
    pip_deps = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    # both install the pins exported from uv.lock (test_lock.py checks the export is current), then the package
    assert py_env["dependencies"] == ["-r requirements-lock.txt", "."]  # non-editable: mlflow installs from a copy
    assert pip_deps == ["-r requirements-lock.txt", "-e ."]
    assert re.search(r"^torch==2\.13\.0\+cpu ", (ROOT / "requirements-lock.txt").read_text(), re.M)
    # the package itself does not pin torch
    assert not re.search(r'"torch==', (ROOT / "pyproject.toml").read_text().split("[tool.uv]")[0])


def test_mlflow_reads_the_environment_files():
    from mlflow.utils.environment import _PythonEnv

    py_env = _PythonEnv.from_yaml(str(ROOT / "python_env.yaml"))
    assert py_env.python == "3.11"
    assert "-r requirements-lock.txt" in py_env.dependencies
    conda = _PythonEnv.from_conda_yaml(str(ROOT / "conda.yaml"))
    assert conda.python == "3.11"
