"""Rules that ship inside the package (one folder each, plus name aliases), loaded with `optbundle.load_rule(name)`."""

from __future__ import annotations

import json
from pathlib import Path

from ...files import BundleError

PRETRAINED_DIR = Path(__file__).resolve().parent
ALIASES_NAME = "aliases.json"


def shipped_rule_names() -> list[str]:
    names = sorted(p.name for p in PRETRAINED_DIR.iterdir() if (p / "rule_config.json").is_file())
    aliases = json.loads((PRETRAINED_DIR / ALIASES_NAME).read_text()) if (PRETRAINED_DIR / ALIASES_NAME).exists() else {}
    return sorted(set(names) | set(aliases))


def shipped_rule_path(name: str) -> Path:
    """The folder of the shipped rule ``name`` (aliases such as ``default`` resolved)."""
    aliases_path = PRETRAINED_DIR / ALIASES_NAME
    aliases = json.loads(aliases_path.read_text()) if aliases_path.exists() else {}
    path = PRETRAINED_DIR / aliases.get(name, name)
    if not (path / "rule_config.json").is_file():
        raise BundleError(f"no shipped rule named {name!r}; shipped rules: {', '.join(shipped_rule_names())}")
    return path
