"""`LearnedRule`: the public rule, a `RuleNetwork` (φ + config, `optbundle.step.rule`) that also loads from
bundles and the Hub and publishes itself; and `load_rule`, which finds one by shipped name, path or Hub id."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..files import (
    MANIFEST_NAME, OPTIMIZER_DIR, BundleError, MissingFileError, recover_directory, verified_directory, verify_manifest,
)
from ..step.rule import RULE_CONFIG_NAME, RULE_WEIGHTS_NAME, RuleNetwork
from .hub import RULE_REPO_KIND, is_hub_reference, load_pretrained, push_pretrained, rule_files, save_rule_repo
from .pretrained import shipped_rule_names, shipped_rule_path


class LearnedRule(RuleNetwork):
    """φ (an MLP shared by all coordinates) together with the `RuleConfig` that says how to use it.

    ``layers[i]`` are `nn.Linear` modules with the shapes of `RuleConfig.layer_shapes`. ``provenance`` is a
    JSON-serializable dict describing how the rule was made (kept beside the weights, never interpreted).
    """

    @classmethod
    def from_pretrained(cls, directory: str | Path, **hub_kwargs: Any) -> LearnedRule:
        """Load a rule from a directory holding ``rule_config.json`` + ``rule.safetensors``.

        A directory that is a bundle (has ``optimizer/``) is accepted too: its rule is loaded. A Hub id
        ``"namespace/name"`` (a rule-only repo, or a bundle repo whose rule is wanted) is fetched at one commit and
        verified against its ``bundle.json``; ``hub_kwargs``: ``revision``, ``cache_dir``, ``local_files_only``,
        ``token`` (see `optbundle.store.hub.load_pretrained`).
        """
        return load_pretrained(cls, directory, hub_kwargs, select=rule_files)

    @classmethod
    def _from_local(cls, path: Path) -> LearnedRule:
        """Hook of `optbundle.store.hub.load_pretrained` (``path`` recovered from an interrupted save)."""
        if not path.exists():
            raise MissingFileError(f"{path}: no such rule directory")
        return load_rule_directory(cls, path)

    @classmethod
    def _from_snapshot(cls, snapshot: Any) -> LearnedRule:
        """Hook of `optbundle.store.hub.load_pretrained`: the rule files of a Hub snapshot, verified against its
        manifest."""
        names = rule_files(snapshot.manifest)
        prefix = "" if snapshot.manifest.get("kind") == RULE_REPO_KIND else f"{OPTIMIZER_DIR}/"
        for required in (RULE_CONFIG_NAME, RULE_WEIGHTS_NAME):
            if prefix + required not in names:
                raise MissingFileError(f"{MANIFEST_NAME} lists no {prefix}{required}; the repo holds no rule")
        verify_manifest(snapshot.directory, snapshot.manifest, only=names)
        return cls.from_directory(snapshot.directory / prefix if prefix else snapshot.directory)

    def push_to_hub(
        self, repo_id: str, *, revision: str | None = None, private: bool | None = None,
        commit_message: str | None = None, token: str | bool | None = None, overwrite_card: bool = False,
    ) -> Any:
        """Publish this rule alone as an optimizer-only Hub repo (``rule_config.json``, ``rule.safetensors``,
        ``provenance.json``, ``bundle.json``, ``README.md``) in ONE commit; returns the ``CommitInfo``."""
        return push_pretrained(
            self, repo_id, revision=revision, private=private, commit_message=commit_message, token=token,
            overwrite_card=overwrite_card,
        )

    def _save_repo(self, directory: Path) -> Path:
        """Hook of `optbundle.store.hub.push_pretrained`: the rule-only repo folder (see `save_rule_repo`)."""
        return save_rule_repo(self, directory)


def load_rule_directory(rule_cls: type[LearnedRule], path: Path) -> LearnedRule:
    """The rule of a local folder, verified against its manifest when it has one.

    - a bundle (an ``optimizer/`` folder beside the weights): ``bundle.json`` is required and verified, and the
      default rule under ``optimizer/`` is loaded;
    - a rule repo (``bundle.json`` beside ``rule_config.json``): verified, then loaded;
    - a bare rule folder (``rule.save_pretrained``; no manifest): loaded as is.
    """
    path = Path(path)
    if not path.is_dir():
        raise MissingFileError(f"{path}: not a rule directory")
    is_bundle = (path / OPTIMIZER_DIR).is_dir() and not (path / RULE_CONFIG_NAME).exists()
    if is_bundle or (path / MANIFEST_NAME).exists():
        if not (path / MANIFEST_NAME).exists():
            raise MissingFileError(f"{path / MANIFEST_NAME}: a bundle's rule is loaded only after its manifest is verified")
        verified_directory(path)
    return rule_cls.from_directory(path / OPTIMIZER_DIR if is_bundle else path)


def load_rule(name_or_path: str | Path, **hub_kwargs: Any) -> LearnedRule:
    """Load a rule by shipped name (``"default"``, ``"adam-init"``), from a directory, or from the Hub.

    A directory may hold ``rule_config.json`` + ``rule.safetensors`` or be a whole bundle. A Hub id
    ``"namespace/name"`` (a rule-only repo or a bundle repo) is fetched at one commit and verified;
    ``hub_kwargs``: ``revision``, ``cache_dir``, ``local_files_only``, ``token``.
    """
    if isinstance(name_or_path, str) and name_or_path in shipped_rule_names():
        return LearnedRule.from_directory(shipped_rule_path(name_or_path))
    path = recover_directory(Path(name_or_path))
    if path.exists():
        return LearnedRule.from_pretrained(path)
    if is_hub_reference(name_or_path):
        return LearnedRule.from_pretrained(name_or_path, **hub_kwargs)
    raise BundleError(
        f"{name_or_path!r} is neither a shipped rule ({', '.join(shipped_rule_names())}), a rule directory, nor a "
        "Hub repo id 'namespace/name'"
    )
