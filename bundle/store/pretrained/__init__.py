"""Rules that ship inside the package, loaded with `optbundle.load_rule(name)`."""

from __future__ import annotations

import json
from pathlib import Path

from ...files import BundleError
from ...step.rule import LearnedRule

PRETRAINED_DIR = Path(__file__).resolve().parent
ALIASES_NAME = "aliases.json"


def shipped_rule_names() -> list[str]:
    names = sorted(p.name for p in PRETRAINED_DIR.iterdir() if (p / "rule_config.json").is_file())
    aliases = json.loads((PRETRAINED_DIR / ALIASES_NAME).read_text()) if (PRETRAINED_DIR / ALIASES_NAME).exists() else {}
    return sorted(set(names) | set(aliases))


def load_shipped_rule(name: str) -> LearnedRule:
    aliases_path = PRETRAINED_DIR / ALIASES_NAME
    aliases = json.loads(aliases_path.read_text()) if aliases_path.exists() else {}
    target = aliases.get(name, name)
    path = PRETRAINED_DIR / target
    if not (path / "rule_config.json").is_file():
        raise BundleError(f"no shipped rule named {name!r}; shipped rules: {', '.join(shipped_rule_names())}")
    return LearnedRule.from_directory(path)
