"""Ready-to-run YAML recipes, the loader that finds them, and the one parser of recipes and configs."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

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


def check_known_keys(
    classes: tuple[type, ...], data: Mapping[str, Any], *, source: str, kind: str = "key", error: type[Exception] = ValueError
) -> None:
    """Refuse keys of ``data`` that are no field of the dataclasses ``classes``: ``error("{source}: unknown
    {kind}(s) ...")`` naming them."""
    known = {f.name for cls in classes for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(str(key) for key in set(data) - known)
    if unknown:
        raise error(f"{source}: unknown {kind}(s) {', '.join(unknown)}")


def parse_config(
    classes: tuple[type, ...], data: Mapping[str, Any], *, source: str, kind: str = "key", error: type[Exception] = ValueError
) -> tuple:
    """``data`` parsed by `transformers.HfArgumentParser` into one instance of each dataclass of ``classes``.

    Every key must be a field of one of them (`check_known_keys`) and every field without a default must be
    given; errors are ``ValueError`` (``error`` for unknown keys) naming ``source`` and the key.
    """
    from transformers import HfArgumentParser

    check_known_keys(classes, data, source=source, kind=kind, error=error)
    missing = [
        f.name for cls in classes for f in dataclasses.fields(cls)
        if f.init and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in data
    ]
    if missing:
        raise ValueError(f"{source}: missing required {kind}(s) {', '.join(missing)}")
    try:
        return tuple(HfArgumentParser(classes).parse_dict(dict(data), allow_extra_keys=False))
    except (ValueError, TypeError) as err:
        raise ValueError(f"{source}: {str(err)[:500]}") from err


def parse_recipe(
    path: str | Path, classes: tuple[type, ...], overrides: Mapping[str, Any] | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> tuple[Path, tuple]:
    """Read a YAML recipe (a shipped name or a path), apply ``defaults`` then ``overrides``, and parse it into
    ``classes`` (`parse_config`); errors name the file and the key."""
    import yaml

    path = recipe_path(str(path))
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path}: not a valid YAML recipe ({first[:200]})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a recipe is a YAML mapping of argument names to values")
    data = {**(defaults or {}), **data, **(overrides or {})}
    return path, parse_config(classes, data, source=str(path))
