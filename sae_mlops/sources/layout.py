"""On-disk layouts of an SAE directory, and how to tell them apart (no heavy imports)."""

from __future__ import annotations

from pathlib import Path

LEGACY = "legacy"
SAELENS = "saelens"

#: Files that identify each layout. A directory holding both sets is read as SAELens.
LAYOUT_FILES: dict[str, tuple[str, ...]] = {
    SAELENS: ("cfg.json", "sae_weights.safetensors"),
    LEGACY: ("config.json", "weights.pt"),
}

LAYOUT_HINT = "cfg.json + sae_weights.safetensors (SAELens) or config.json + weights.pt (prior format)"


def detect_layout(directory: Path) -> str | None:
    """The layout whose identifying files are all in `directory`, or None."""
    for layout, names in LAYOUT_FILES.items():
        if all((directory / name).is_file() for name in names):
            return layout
    return None


def partial_layout(directory: Path) -> str | None:
    """The layout whose *config* file is in `directory` (weights possibly missing), or None."""
    if (directory / "cfg.json").is_file():
        return SAELENS
    if (directory / "config.json").is_file() or (directory / "weights.pt").is_file():
        return LEGACY
    return None
