"""optbundle: ship a model together with the learned optimizer that fine-tunes it.

Public API: `RuleConfig`, `LearnedRule`, `LearnedOptimizer`, `Bundle`, `BundleCallback`, `load_rule`, `BundleError`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__version__ = "0.1.0"

from .store.bundle import Bundle
from .files import BundleError
from .store.hub import HubError
from .step.optimizer import LearnedOptimizer
from .step.rule import LearnedRule, RuleConfig


def load_rule(name_or_path: str | Path, **hub_kwargs: Any) -> LearnedRule:
    """Load a rule by shipped name (``"default"``, ``"adam-init"``), from a directory, or from the Hub.

    A directory may hold ``rule_config.json`` + ``rule.safetensors`` or be a whole bundle. A Hub id
    ``"namespace/name"`` (a rule-only repo or a bundle repo) is fetched at one commit and verified;
    ``hub_kwargs``: ``revision``, ``cache_dir``, ``local_files_only``, ``token``.
    """
    from .store.hub import is_hub_reference
    from .store.pretrained import load_shipped_rule, shipped_rule_names

    if isinstance(name_or_path, str) and name_or_path in shipped_rule_names():
        return load_shipped_rule(name_or_path)
    from .files import recover_directory

    path = recover_directory(Path(name_or_path))
    if path.exists():
        return LearnedRule.from_pretrained(path)
    if is_hub_reference(name_or_path):
        return LearnedRule.from_pretrained(name_or_path, **hub_kwargs)
    raise BundleError(
        f"{name_or_path!r} is neither a shipped rule ({', '.join(shipped_rule_names())}), a rule directory, nor a "
        "Hub repo id 'namespace/name'"
    )


def __getattr__(name: str) -> Any:
    if name == "BundleCallback":  # imported on first use: it needs transformers, which `import optbundle` does not
        from .store.trainer import BundleCallback

        return BundleCallback
    raise AttributeError(f"module 'optbundle' has no attribute {name!r}")


__all__ = ["Bundle", "BundleCallback", "BundleError", "HubError", "LearnedOptimizer", "LearnedRule", "RuleConfig", "load_rule", "__version__"]
