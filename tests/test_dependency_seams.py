"""The dependency seams we rely on exist in the installed versions, and the pins in pyproject.toml are
the versions installed (so the seams were checked against what a user gets)."""

from __future__ import annotations

import re
from importlib.metadata import version
from pathlib import Path

from sae_mlops.seams import SEAMS, Seam, check_seams

ROOT = Path(__file__).resolve().parents[1]


def test_every_seam_holds():
    problems = check_seams()
    assert not problems, "\n".join(problems)


def test_a_moved_seam_is_named_with_its_purpose():
    gone = Seam("SAELens trainer seam", "sae_lens.training.sae_trainer:SAETrainer.no_such_step", "per-step metrics")
    changed = Seam("SAELens runner seam (private)", "sae_lens.llm_sae_training_runner:LanguageModelSAETrainingRunner.run",
                   "mirrored run()", calls=("_no_such_private_call",))
    (a, b) = check_seams((gone, changed))
    assert a.startswith("SAELens trainer seam: sae_lens.training.sae_trainer:SAETrainer.no_such_step is gone")
    assert "used for: per-step metrics" in a
    assert "no longer calls _no_such_private_call" in b


def test_pins_admit_the_installed_minor_versions_only():
    deps = (ROOT / "pyproject.toml").read_text()
    for package in ("sae-lens", "transformer-lens", "mlflow"):
        m = re.search(rf'"{package}>=(\d+)\.(\d+)[^,"]*,<(\d+)\.(\d+)"', deps)
        assert m, f"{package} has no >=X.Y,<X.Y+1 pin in pyproject.toml"
        major, minor = (int(x) for x in version(package).split(".")[:2])
        assert (int(m.group(1)), int(m.group(2))) <= (major, minor) < (int(m.group(3)), int(m.group(4))), package
        assert (int(m.group(3)), int(m.group(4))) == (major, minor + 1), f"{package}: the upper bound is not the next minor"
    assert len({s.target for s in SEAMS}) == len(SEAMS)
