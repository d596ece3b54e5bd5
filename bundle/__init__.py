"""optbundle: ship a model together with the learned optimizer that fine-tunes it.

Public API: `RuleConfig`, `LearnedRule`, `LearnedOptimizer`, `Bundle`, `load_rule`, `BundleError`.
"""

from __future__ import annotations

from pathlib import Path

__version__ = "0.1.0"

from .bundle import Bundle
from .format import BundleError
from .optimizer import LearnedOptimizer
from .rule import LearnedRule, RuleConfig


def load_rule(name_or_path: str | Path) -> LearnedRule:
    """Load a rule by shipped name (``"default"``, ``"adam-init"``) or from a directory.

    A directory may hold ``rule_config.json`` + ``rule.safetensors`` or be a whole bundle.
    """
    from .pretrained import load_shipped_rule, shipped_rule_names

    if isinstance(name_or_path, str) and name_or_path in shipped_rule_names():
        return load_shipped_rule(name_or_path)
    path = Path(name_or_path)
    if path.exists():
        return LearnedRule.from_pretrained(path)
    raise BundleError(
        f"{name_or_path!r} is neither a shipped rule ({', '.join(shipped_rule_names())}) nor a rule directory"
    )


__all__ = ["Bundle", "BundleError", "LearnedOptimizer", "LearnedRule", "RuleConfig", "load_rule", "__version__"]
