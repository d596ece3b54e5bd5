"""Ready-to-run YAML recipes and the loader that finds them."""

from __future__ import annotations

from pathlib import Path

RECIPES_DIR = Path(__file__).resolve().parent


def recipe_path(name: str) -> Path:
    """Path of a shipped recipe by file name (with or without ``.yaml``), or of a file given by path."""
    candidate = Path(name)
    if candidate.is_file():
        return candidate
    stem = name if name.endswith(".yaml") else f"{name}.yaml"
    path = RECIPES_DIR / stem
    if not path.is_file():
        shipped = sorted(p.name for p in RECIPES_DIR.glob("*.yaml"))
        raise FileNotFoundError(f"no recipe {name!r}; shipped recipes: {', '.join(shipped) or 'none'}")
    return path
