"""Options are declared once (sae_mlops.config, sae_mlops.training.config): the Typer commands, the
MLproject entry points (file and parsers) and the options reference of the documentation site
(docs/reference/options.md, generated from them by scripts/gen_reference.py) are checked against those
declarations, so any drift in name, default or type fails here."""

from __future__ import annotations

import importlib.util
import inspect
import shlex
from pathlib import Path

import re

import pytest
import yaml

from sae_mlops.config import (
    AbsorptionOptions,
    AnalysisConfig,
    AutointerpOptions,
    EvalRunOptions,
    EvalsOptions,
    EvalTarget,
    ExecutionOptions,
    FullOptions,
    ProbeOptions,
    RunOptions,
    SynthConfig,
    SynthRunOptions,
)
from sae_mlops.options import OptionSpec, option_specs, plain
from sae_mlops.training.config import TrainConfig, TrainRunOptions

ROOT = Path(__file__).resolve().parents[1]

# entry point / command -> the declaration classes it exposes, in order
DECLARED = {
    "quick": (AnalysisConfig, ExecutionOptions, RunOptions),
    "full": (AnalysisConfig, FullOptions, ExecutionOptions, RunOptions),
    "train": (TrainConfig, TrainRunOptions),
    "probe": (EvalTarget, ProbeOptions, EvalRunOptions),
    "evals": (AnalysisConfig, EvalsOptions, ProbeOptions, AbsorptionOptions, AutointerpOptions, EvalRunOptions),
    "synth": (SynthConfig, SynthRunOptions),
}
#: commands documented in a guide instead of the README (the README keeps to one screen)
GUIDES = {"probe": "docs/guides/evals.md", "evals": "docs/guides/evals.md", "synth": "docs/guides/synth.md"}


def _specs(name: str, *, mlproject: bool) -> list[OptionSpec]:
    out = []
    for cls in DECLARED[name]:
        out += [s for s in option_specs(cls) if not (mlproject and s.extra.get("mlproject") is False)]
    return out


def _entrypoint(name: str):
    spec = importlib.util.spec_from_file_location(f"entrypoint_{name}_drift", ROOT / "entrypoints" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _mlproject_default(spec: OptionSpec):
    """What MLproject must declare for an option: no default when required; "" when None (not given);
    otherwise the declared default (numbers compared as floats, as MLproject passes them)."""
    if spec.required:
        return None
    if spec.default is None:
        return ""
    return spec.default


@pytest.mark.parametrize("entry", sorted(DECLARED))
def test_mlproject_parameters_match_declarations(entry):
    ep = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"][entry]
    params = ep["parameters"]
    specs = _specs(entry, mlproject=True)
    assert sorted(params) == sorted(s.name for s in specs), "MLproject parameters differ from the declared options"
    for s in specs:
        p = params[s.name]
        want = _mlproject_default(s)
        if want is None:
            assert "default" not in p, s.name
            continue
        got = p.get("default")
        if isinstance(want, bool) or isinstance(want, str):
            assert str(got) == str(want), f"{entry}.{s.name}: MLproject default {got!r}, declared {want!r}"
        else:
            assert float(got) == float(want), f"{entry}.{s.name}: MLproject default {got!r}, declared {want!r}"
        numeric = s.kind in (int, float) and not s.optional and not s.choices
        assert p["type"] == ("float" if numeric else "string"), f"{entry}.{s.name}: type {p['type']}"
        assert f"{s.flag} {{{s.name}}}" in ep["command"], f"{entry}: {s.name} is not passed to the script"


@pytest.mark.parametrize("entry", sorted(DECLARED))
def test_entrypoint_parser_is_the_declaration(entry):
    parser = _entrypoint(entry).build_parser()
    accepted = [a.dest for a in parser._actions if a.option_strings and a.dest not in ("help", "verbose")]
    assert sorted(accepted) == sorted(s.name for s in _specs(entry, mlproject=True))
    # the MLproject defaults parse back to the declared defaults
    ep = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"][entry]
    from mlflow.projects import _project_spec

    project = _project_spec.load_project(str(ROOT))
    given = {"sae": "some/sae"} if entry in ("quick", "full", "evals", "probe") else {}
    argv = shlex.split(project.get_entry_point(entry).compute_command(given, storage_dir=None))[2:]
    args = vars(parser.parse_args(argv))
    for s in _specs(entry, mlproject=True):
        if s.required:
            continue
        assert args[s.name] == s.default or (args[s.name] is None and s.default is None), s.name
    assert set(ep["parameters"]) == {s.name for s in _specs(entry, mlproject=True)}


@pytest.mark.parametrize("command", sorted(DECLARED))
def test_typer_command_is_the_declaration(command):
    from sae_mlops.cli import app

    fn = next(c.callback for c in app.registered_commands if (c.name or c.callback.__name__) == command)
    params = inspect.signature(fn).parameters
    specs = _specs(command, mlproject=False)
    assert list(params) == [s.name for s in specs]
    for s in specs:
        info = params[s.name].default
        assert s.flag in info.param_decls[0], s.name
        default = plain(info.default)
        assert default == s.default or (s.required and default is ...), f"{command} {s.flag}: {default!r} != {s.default!r}"
        assert s.help.startswith(info.help) or command in ("quick", "full") and s.name == "out"


def test_every_option_has_a_description_with_its_default():
    for classes in DECLARED.values():
        for cls in classes:
            for s in option_specs(cls, include_internal=True):
                assert len(s.help) > 15, f"{cls.__name__}.{s.field} has no description"
                if not s.required and s.default not in (None, False) and s.kind is not object:
                    assert "default" in s.help, f"{cls.__name__}.{s.field}: the description does not state the default"


def _options_page() -> str:
    return (ROOT / "docs" / "reference" / "options.md").read_text(encoding="utf-8")


def test_the_options_reference_documents_every_option():
    page = _options_page()
    missing = []
    for name, classes in DECLARED.items():
        if name in GUIDES:
            continue
        for cls in classes:
            for s in option_specs(cls):
                rows = [ln for ln in page.splitlines() if ln.startswith(f"| `{s.flag}` |")]  # one per class
                shown = s.help.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")
                if not any(shown in row for row in rows):
                    missing.append(f"{cls.__name__}.{s.field} ({s.flag})")
    assert not missing, f"options missing from docs/reference/options.md (run make docs): {', '.join(sorted(set(missing)))}"


def test_the_options_reference_is_generated_from_the_declarations():
    spec = importlib.util.spec_from_file_location("gen_reference_drift", ROOT / "scripts" / "gen_reference.py")
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    assert _options_page() == gen.render_options(), "docs/reference/options.md is stale: run make docs"


@pytest.mark.parametrize("command", sorted(GUIDES))
def test_guide_documents_every_option(command):
    guide = (ROOT / GUIDES[command]).read_text()
    missing = [s.flag for cls in DECLARED[command] for s in option_specs(cls)
               if f"`{s.flag}`" not in guide and not re.search(rf"`{s.flag}[ =/`]", guide)
               and cls not in (AnalysisConfig,)]  # the analysis options are the README's
    assert not missing, f"options missing from {GUIDES[command]}: {', '.join(sorted(set(missing)))}"


def test_cross_field_checks_and_bounds_are_user_errors():
    from sae_mlops.errors import InputError

    with pytest.raises(InputError, match=r"--max-tokens must be at least 1 \(got 0\)"):
        AnalysisConfig(sae="s", max_tokens=0)
    with pytest.raises(InputError, match="--topk-mode must be one of batch, threshold"):
        AnalysisConfig(sae="s", topk_mode="sometimes")
    with pytest.raises(InputError, match="rare-threshold"):
        AnalysisConfig(sae="s", rare_threshold=0.5, dense_threshold=0.2)
    with pytest.raises(InputError, match="--cooccurrence must be one of correlation, jaccard, pmi"):
        FullOptions(cooccurrence_measure="cosine")
    with pytest.raises(InputError, match="--heatmap-features must be at least 2"):
        FullOptions(heatmap_features=1)
    with pytest.raises(InputError, match="--lr must be greater than 0"):
        TrainConfig(lr=0)
    with pytest.raises(InputError, match="is not an option"):
        FullOptions(bogus=1)  # type: ignore[call-arg]
