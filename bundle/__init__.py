"""optbundle: ship a model together with the learned optimizer that fine-tunes it.

Public API: `RuleConfig`, `LearnedRule`, `LearnedOptimizer`, `Bundle`, `BundleCallback`, `load_rule`, `BundleError`.
"""

from __future__ import annotations

from typing import Any

from .files import VERSION as __version__
from .files import BundleError
from .step.optimizer import LearnedOptimizer
from .step.rule import RuleConfig
from .store.bundle import Bundle
from .store.hub import HubError
from .store.rule import LearnedRule, load_rule


def __getattr__(name: str) -> Any:
    if name == "BundleCallback":  # imported on first use: it needs transformers, which `import optbundle` does not
        from .store.trainer import BundleCallback  # heavy: transformers

        return BundleCallback
    raise AttributeError(f"module 'optbundle' has no attribute {name!r}")


__all__ = ["Bundle", "BundleCallback", "BundleError", "HubError", "LearnedOptimizer", "LearnedRule", "RuleConfig", "load_rule", "__version__"]
