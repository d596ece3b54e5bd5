"""`Bundle`: a model plus the learned rule that trains it (plus, optionally, the optimizer's accumulators).

On disk (format v1) a bundle is a valid Hugging Face model folder with an ``optimizer/`` folder beside the
weights and a ``bundle.json`` manifest that lists every file with its size and sha256::

    config.json, model.safetensors        # transformers' own files (AutoModel*.from_pretrained still works)
    optimizer/rule_config.json            # RuleConfig
    optimizer/rule.safetensors            # φ
    optimizer/provenance.json             # how the rule was made
    optimizer/state.safetensors           # optional: accumulators keyed "<param name>:<state key>"
    optimizer/state.json                  # optional: per-parameter shape, dtype, step, skipped steps
    optimizer/routing.json                # layer-wise bundles: which parameters each extra rule updates
    optimizer/roles.json                  # format-2 rules: the role of every trainable parameter (roles.py)
    optimizer/rules/<name>/...            # layer-wise bundles: the extra rules (same files as a rule)
    bundle.json, README.md

An adapter bundle holds PEFT's ``adapter_config.json`` + ``adapter_model.safetensors`` instead of the model
files (so ``PeftModel.from_pretrained(base, bundle_dir)`` keeps working) and records the base model's
identity in ``bundle.json``.

Layer-wise rules: the default rule stays at ``optimizer/rule_config.json`` + ``rule.safetensors`` so that a
single-rule reader (and `LearnedRule.from_pretrained(bundle_dir)`) sees the rule that updates everything not
routed elsewhere; extra rules sit in ``optimizer/rules/<name>/`` and ``routing.json`` lists
``{"pattern": glob on parameter names, "rule": name}`` entries, first match wins.

Saving builds the whole folder in a temporary sibling and renames it into place; loading verifies the
manifest before reading anything, and reads only JSON and safetensors.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file
from torch import nn

from ..files import (
    MANIFEST_NAME, OPTIMIZER_DIR, STATE_JSON_NAME, STATE_TENSORS_NAME, BundleError, ChecksumError, CorruptFileError,
    FormatVersionError, MissingFileError, ModelLoadError, StateMismatchError, atomic_directory, atomic_write_json,
    check_relative_path, load_safetensors_file, read_json_file, read_manifest, read_safetensors_header,
    save_safetensors_bytes, short_repr, verify_manifest, write_card_and_manifest,
)
from ..step.optimizer import DEFAULT_RULE_NAME, LearnedOptimizer, check_state_layout, constant_schedule
from ..step.roles import assign_roles
from ..step.rule import REGIMES, ROLES
from .assets import resolve_model
from .card import model_card
from .hub import RULE_REPO_KIND, load_pretrained, push_directory, push_pretrained
from .rule import LearnedRule

if TYPE_CHECKING:  # pragma: no cover
    from huggingface_hub import CommitInfo

logger = logging.getLogger(__name__)

STATE_FORMAT_VERSION = 1
ROUTING_FORMAT_VERSION = 1
TORCH_WEIGHTS_NAME = "model.safetensors"
ROUTING_NAME = "routing.json"
ROLES_NAME = "roles.json"
ROLES_FORMAT_VERSION = 1
RULES_DIR = "rules"
#: files a bundle attaches at its top level (`Bundle.attachments`): figures its card shows
ATTACHMENT_SUFFIX = ".png"

#: Limits on what a bundle may ask for, checked before anything is built from it.
MAX_RULES = 64  # rules of a layer-wise bundle
MAX_ROUTES = 1024  # entries of routing.json (each one is matched against every parameter name)
MAX_PATTERN_CHARS = 512  # length of one routing pattern
#: config.json dimensions (any nesting level, e.g. text_config): layer counts, widths/heads, vocabulary and
#: positions. The model is first built on the meta device (no memory) and its tensors compared with the
#: weight files' headers, so these only bound the time spent building it.
MAX_CONFIG_LAYERS = 1024
MAX_CONFIG_WIDTH = 1 << 18
MAX_CONFIG_VOCAB = 1 << 22
CONFIG_LIMITS: dict[str, int] = {
    **dict.fromkeys(
        ("n_layer", "num_hidden_layers", "num_layers", "n_layers", "num_decoder_layers", "num_encoder_layers",
         "decoder_layers", "encoder_layers"),
        MAX_CONFIG_LAYERS,
    ),
    **dict.fromkeys(
        ("n_embd", "hidden_size", "d_model", "intermediate_size", "n_inner", "d_ff", "ffn_dim", "encoder_ffn_dim",
         "decoder_ffn_dim", "dim", "hidden_dim", "head_dim", "embedding_size", "n_head", "num_attention_heads",
         "num_key_value_heads", "encoder_attention_heads", "decoder_attention_heads", "num_labels"),
        MAX_CONFIG_WIDTH,
    ),
    **dict.fromkeys(
        ("vocab_size", "n_positions", "n_ctx", "max_position_embeddings", "type_vocab_size"), MAX_CONFIG_VOCAB
    ),
}

NamedState = dict[str, dict[str, torch.Tensor]]


def _is_transformers_model(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel  # heavy: loaded on first use
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(model, PreTrainedModel)


def _decay_parameter_names(model: nn.Module) -> set[str]:
    """Parameters Trainer applies weight decay to (all but biases, LayerNorm and norm weights)."""
    from transformers import Trainer  # heavy: loaded on first use

    return set(Trainer.get_decay_parameter_names(None, model))


def _is_peft_model(model: nn.Module) -> bool:
    try:
        from peft import PeftModel  # heavy: loaded on first use
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PeftModel)


def detect_regime(model: nn.Module) -> str:
    """"finetune" for a model loaded from pretrained weights (a transformers model with a ``name_or_path``, or a
    PEFT model), else "scratch" (a freshly built module). Picks the rule's recommended lr."""
    base = getattr(model, "base_model", model)
    for candidate in (model, base, getattr(base, "model", None)):
        if candidate is None:
            continue
        if getattr(candidate, "name_or_path", "") or getattr(getattr(candidate, "config", None), "_name_or_path", ""):
            return "finetune"
    if type(model).__name__.startswith("Peft") or any("lora_" in n for n, _ in model.named_parameters()):
        return "finetune"
    return "scratch"


def model_roles(model: nn.Module) -> dict[str, str]:
    """Role of every parameter of ``model`` (`optbundle.step.roles`): names and shapes, plus module types
    (``nn.Embedding`` parameters are embeddings whatever their name)."""
    named = list(model.named_parameters())
    roles = dict(zip((n for n, _ in named), assign_roles([(n, tuple(p.shape)) for n, p in named])))
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Embedding):
            for param_name, _ in module.named_parameters(recurse=False):
                full = f"{module_name}.{param_name}" if module_name else param_name
                if full in roles:
                    roles[full] = "embedding"
    return roles


class Bundle:
    """A model together with its learned rule and (optionally) the rule's accumulator state.

    Args:
        model: a transformers ``PreTrainedModel`` (saved in transformers' own layout) or any ``nn.Module``
            (saved as ``model.safetensors``; loading then needs ``model=`` to load into).
        rule: the `LearnedRule` that fine-tunes it, or ``{name: LearnedRule}`` with a ``"default"`` entry for
            layer-wise rules (then ``routing`` says which parameters the other rules update).
        state: accumulators to ship: a `LearnedOptimizer` (its state is read by parameter name) or a mapping
            ``{param name: {state key: tensor}}``. ``None`` ships none: the optimizer starts fresh.
        tokenizer: optional tokenizer/processor saved beside the model.
        routing: ``[(glob pattern on parameter names, rule name), ...]``, first match wins, unmatched
            parameters use ``"default"``. E.g. ``[("*lora_B*", "lora_b")]``.
    """

    def __init__(
        self,
        model: nn.Module,
        rule: LearnedRule | Mapping[str, LearnedRule],
        state: LearnedOptimizer | Mapping[str, Mapping[str, torch.Tensor]] | None = None,
        tokenizer: Any = None,
        routing: Sequence[tuple[str, str]] | None = None,
        roles: Mapping[str, str] | None = None,
        regime: str | None = None,
    ) -> None:
        if isinstance(rule, LearnedRule):
            rules = {DEFAULT_RULE_NAME: rule}
        elif isinstance(rule, Mapping) and all(isinstance(r, LearnedRule) for r in rule.values()):
            rules = dict(rule)
            if DEFAULT_RULE_NAME not in rules:
                raise ValueError(f"a mapping of rules needs a {DEFAULT_RULE_NAME!r} entry; got {sorted(rules)}")
        else:
            raise TypeError(f"rule must be a LearnedRule or a mapping name -> LearnedRule, got {type(rule).__name__}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.routing = [(str(pattern), str(name)) for pattern, name in (routing or [])]
        if len(self.routing) > MAX_ROUTES or len(rules) > MAX_RULES:
            raise ValueError(f"at most {MAX_ROUTES} routes and {MAX_RULES} rules, got {len(self.routing)} and {len(rules)}")
        for pattern, name in self.routing:
            if name not in rules:
                raise ValueError(f"routing sends {pattern!r} to rule {name!r}, which is not one of {sorted(rules)}")
            if "/" in name or name in ("", ".", ".."):
                raise ValueError(f"rule name {name!r} cannot be used as a folder name")
        self.model = model
        self.rules = rules
        self.tokenizer = tokenizer
        #: parameter name → role, overriding the automatic assignment (`model_roles`); saved in roles.json
        self.roles: dict[str, str] = dict(roles or {})
        names = {n for n, _ in model.named_parameters()}
        for name, role in self.roles.items():
            if name not in names:
                raise ValueError(f"roles: the model has no parameter named {name!r}")
            if role not in ROLES:
                raise ValueError(f"roles: {name!r} has unknown role {role!r}; known roles: {', '.join(ROLES)}")
        if regime is not None and regime not in REGIMES:
            raise ValueError(f"regime must be one of {', '.join(REGIMES)} or None (detect), got {regime!r}")
        #: "scratch" / "finetune", or None to detect it from the model (`detect_regime`); a bundle loaded with
        #: `from_pretrained` holds trained weights, so it is "finetune"
        self.regime = regime
        self.state: NamedState | None = None
        if state is not None:
            self.set_state(state)
        #: figures saved at the bundle's top level (name → PNG bytes), e.g. refinement's before/after plot
        #: that the card links to; read back on load
        self.attachments: dict[str, bytes] = {}

    @property
    def rule(self) -> LearnedRule:
        """The default rule (the only one unless the bundle is layer-wise)."""
        return self.rules[DEFAULT_RULE_NAME]

    def resolved_roles(self, model: nn.Module) -> dict[str, str]:
        """Role of every parameter of ``model``: the automatic assignment (`model_roles`) with ``self.roles`` on top."""
        return {**model_roles(model), **self.roles}

    def rule_name_for(self, parameter_name: str) -> str:
        for pattern, name in self.routing:
            if fnmatch.fnmatchcase(parameter_name, pattern):
                return name
        return DEFAULT_RULE_NAME

    # ---- optimizer -----------------------------------------------------------------------------------
    def optimizer(
        self,
        lr: float | None = None,
        *,
        weight_decay: float | None = None,
        regime: str | None = None,
        args: Any = None,
        lr_scheduler_type: str | None = None,
        num_training_steps: int | None = None,
        num_warmup_steps: int | float = 0,
        scheduler_kwargs: dict[str, Any] | None = None,
        keep_loss_scaling: bool = True,
        state_dtype: torch.dtype = torch.float32,
    ) -> tuple[LearnedOptimizer, torch.optim.lr_scheduler.LRScheduler | None]:
        """``(LearnedOptimizer over the model's trainable parameters, scheduler)`` for ``Trainer(optimizers=...)``.

        Args:
            lr: for format-2 rules (``default``) AdamW's learning rate; for format-1 rules a multiplier on the
                rule's step. ``None``: ``args.learning_rate`` when ``args`` is given (format 2), else the rule's
                ``recommended_lr`` for the regime. An lr more than 30× off the recommended one is warned about.
            weight_decay: decoupled, AdamW's meaning (``args.weight_decay`` when ``args`` is given, else 0);
                like Trainer, not applied to biases and norm weights.
            regime: "scratch" / "finetune" (default: detected from the model, see `detect_regime`).
            args: the Trainer's ``TrainingArguments``: take its ``learning_rate`` (format-2 rules) and
                ``weight_decay``, and return ``(optimizer, None)`` so that Trainer builds its own schedule
                (``lr_scheduler_type``, ``warmup_steps``, ``lr_scheduler_kwargs``) over its step count.
            lr_scheduler_type: build that schedule here instead (Trainer's names: ``"cosine"``, ``"linear"``,
                ``"constant_with_warmup"``, ...; `transformers.get_scheduler`) over ``num_training_steps`` with
                ``num_warmup_steps`` (an int, or a float in [0, 1) as a fraction) and ``scheduler_kwargs``.
            keep_loss_scaling: set ``accepts_loss_kwargs = False`` on the model (see `trainer.keep_loss_scaling`)
                so gradient accumulation does not scale gradients up.
            state_dtype: the accumulators' dtype in memory, ``torch.float32`` or ``torch.bfloat16``
                (`LearnedOptimizer`).

        Without ``args`` or ``lr_scheduler_type`` the scheduler is constant (the rule's lr as given); passing
        ``(optimizer, None)`` yourself lets Trainer apply its schedule (linear decay to 0 by default).
        """
        from .trainer import build_schedule, keep_loss_scaling as _keep_loss_scaling, lr_and_weight_decay  # imports transformers

        lr, decay = lr_and_weight_decay(self.rule, lr, weight_decay, args)
        if keep_loss_scaling:
            _keep_loss_scaling(self.model)
        optimizer = self.build_optimizer(self.model, lr=lr, weight_decay=decay, regime=regime, state_dtype=state_dtype)
        if lr_scheduler_type is not None:
            schedule = build_schedule(
                optimizer, lr_scheduler_type, num_training_steps=num_training_steps,
                num_warmup_steps=num_warmup_steps, scheduler_kwargs=scheduler_kwargs,
            )
            return optimizer, schedule
        if args is not None:
            return optimizer, None
        return optimizer, constant_schedule(optimizer)

    def build_optimizer(
        self,
        model: nn.Module,
        lr: float | None = None,
        weight_decay: float = 0.0,
        regime: str | None = None,
        state_dtype: torch.dtype = torch.float32,
    ) -> LearnedOptimizer:
        """The `LearnedOptimizer` over ``model``'s trainable parameters: one param group per rule (routing) and,
        with weight decay, per decay/no-decay (Trainer's rule: no decay on biases and norm weights)."""
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the model has no trainable parameters (requires_grad=True) to optimize")
        roles = self.resolved_roles(model)
        decayed = _decay_parameter_names(model) if weight_decay else {n for n, _ in named}
        groups: dict[tuple[str, bool], list] = {}
        for name, param in named:
            groups.setdefault((self.rule_name_for(name), name in decayed), []).append((name, param))
        param_groups = [
            {"params": params, "rule": rule_name, "roles": [roles[name] for name, _ in params],
             "weight_decay": float(weight_decay) if decays else 0.0}
            for (rule_name, decays), params in groups.items()
        ]
        optimizer = LearnedOptimizer(
            param_groups, self.rules, lr=lr, weight_decay=weight_decay,
            regime=regime or self.regime or detect_regime(model), state_dtype=state_dtype,
        )
        if self.state:
            restored = optimizer.load_named_state(self.state)
            logger.info("restored optimizer state for %d of %d trainable parameters", len(restored), len(named))
        return optimizer

    def optimizer_factory(
        self, lr: float | None = None, *, weight_decay: float | None = None, regime: str | None = None,
        keep_loss_scaling: bool = True, state_dtype: torch.dtype = torch.float32,
    ) -> tuple[Any, dict[str, Any]]:
        """``(factory, kwargs)`` for ``Trainer(optimizer_cls_and_kwargs=...)``.

        Trainer treats a non-Optimizer class as a factory and calls ``factory()(model, **kwargs)``; this is the
        path that DeepSpeed and FSDP keep (they drop ``optimizers=``). Trainer then builds its own schedule
        (``lr_scheduler_type``, warmup) on the optimizer's lr. ``lr=None`` takes the calling Trainer's
        ``learning_rate`` for format-2 rules (for format-1 rules, whose lr is a multiplier, the rule's
        recommended multiplier); ``weight_decay=None`` takes its ``weight_decay``.
        """
        bundle = self

        class LearnedOptimizerFactory:
            def __call__(self, model: nn.Module, **kwargs: Any) -> LearnedOptimizer:
                from .trainer import find_trainer, keep_loss_scaling as _keep_loss_scaling, lr_and_weight_decay  # imports transformers

                chosen = {"lr": lr, "weight_decay": weight_decay, "regime": regime, "state_dtype": state_dtype, **kwargs}
                trainer = find_trainer()
                chosen["lr"], chosen["weight_decay"] = lr_and_weight_decay(
                    bundle.rule, chosen["lr"], chosen["weight_decay"], trainer.args if trainer is not None else None
                )
                if trainer is not None and keep_loss_scaling and _keep_loss_scaling(model):
                    trainer.model_accepts_loss_kwargs = False  # Trainer read the flag in __init__ already
                return bundle.build_optimizer(model, **chosen)

        return LearnedOptimizerFactory, {}

    def refine(self, train_dataset: Any, eval_dataset: Any = None, *, dataset_name: str | None = None, **config: Any):
        """Meta-refine this bundle's rule on fine-tuning episodes of its model on ``train_dataset``.

        Returns a new `Bundle` (same model and state, refined rule whose provenance names the parent rule's
        hash, the data, the settings and the before/after held-out losses), or ``None`` if ``max_wall_time_s``
        stopped the run (call again to resume from ``out_dir``). ``train_dataset`` / ``eval_dataset``:
        tokenized examples (``input_ids``, optional ``attention_mask``, ``labels`` for classification; none for
        language modelling). ``eval_dataset`` is the meta-objective's held-out data; without it a
        ``meta_fraction`` of ``train_dataset`` is split off. ``config``: the fields of `refine.RefineConfig`
        (``lr``, ``meta_steps``, ``truncation``, ``pairs``, ``trainable``, ``out_dir``, ...).

        ``adapt="scalars"`` (`optbundle.meta.scalars`) searches the rule's step size, per-role multipliers and
        schedule constant instead of φ, each candidate one fine-tuning run of ``horizon`` steps scored on
        ``eval_dataset``, within ``budget`` (``"sweep5"``: the forward-backward passes of a 5-point lr sweep of
        the same length; or a number of passes); provenance records the passes spent.
        """
        from ..meta.refine import refine_bundle  # the meta layer sits above this one; only refine() needs it

        return refine_bundle(self, train_dataset, eval_dataset, dataset_name=dataset_name, **config)

    def set_state(self, state: LearnedOptimizer | Mapping[str, Mapping[str, torch.Tensor]] | Any) -> None:
        """Take the accumulators to ship from an optimizer (by parameter name) or a name → state mapping.

        ``trainer.optimizer`` works as it is: accelerate's ``AcceleratedOptimizer`` wrapper is unwrapped."""
        from .trainer import unwrap_optimizer  # imports transformers, which `import optbundle` does not

        state = unwrap_optimizer(state)
        if isinstance(state, LearnedOptimizer):
            names = state.parameter_names() or {p: n for n, p in self.model.named_parameters()}
            self.state = state.named_state(names)
        else:
            self.state = {name: {k: v.detach().clone() for k, v in entry.items()} for name, entry in state.items()}

    # ---- saving --------------------------------------------------------------------------------------
    @property
    def kind(self) -> str:
        if _is_peft_model(self.model):
            return "peft"
        return "transformers" if _is_transformers_model(self.model) else "torch"

    def save_pretrained(
        self,
        save_directory: str | Path,
        *,
        save_state: bool = True,
        state_dtype: torch.dtype = torch.float32,
        max_shard_size: int | str | None = None,
        is_main_process: bool = True,
        push_to_hub: bool = False,
        card_info: Mapping[str, Any] | None = None,
        **push_kwargs: Any,
    ) -> Path:
        """Write the bundle to ``save_directory`` atomically (old contents replaced only once all is written).

        ``save_state=False`` leaves the accumulators out (they are up to 4× the model's size in fp32);
        ``state_dtype=torch.bfloat16`` stores them at half the size (they are read back into fp32; an optimizer
        with bf16 state, ``optimizer(state_dtype=torch.bfloat16)``, gets bf16 state back exactly either way).
        As with ``PreTrainedModel.save_pretrained``: ``max_shard_size`` (``"5GB"``, bytes) shards the model's
        weights and the accumulators (``optimizer/state-00001-of-0000N.safetensors`` + ``state.safetensors.index.json``,
        all in the manifest); ``is_main_process=False`` writes nothing (call it on every rank); ``push_to_hub=True``
        then pushes the folder (``repo_id`` defaults to the folder's name; other ``push_kwargs`` as for
        `push_to_hub`). ``card_info``: what the card says beyond the rule (see `card.model_card`).
        """
        target = Path(save_directory)
        if state_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"state_dtype must be float32, bfloat16 or float16, got {state_dtype}")
        shard_bytes = _shard_size_bytes(max_shard_size)
        if not is_main_process:
            return target
        with atomic_directory(target) as staging:
            self._write_model(staging, max_shard_size=max_shard_size)
            opt_dir = staging / OPTIMIZER_DIR
            self.rule.save_pretrained(opt_dir)
            for name, rule in self.rules.items():
                if name != DEFAULT_RULE_NAME:
                    rule.save_pretrained(opt_dir / RULES_DIR / name)
            if len(self.rules) > 1 or self.routing:
                atomic_write_json(
                    opt_dir / ROUTING_NAME,
                    {
                        "format_version": ROUTING_FORMAT_VERSION,
                        "rules": sorted(self.rules),
                        "routes": [{"pattern": p, "rule": r} for p, r in self.routing],
                    },
                )
            if any(rule.config.format_version >= 2 for rule in self.rules.values()):
                roles = self.resolved_roles(self.model)
                trainable = [n for n, p in self.model.named_parameters() if p.requires_grad]
                atomic_write_json(
                    opt_dir / ROLES_NAME,
                    {
                        "format_version": ROLES_FORMAT_VERSION,
                        "roles": {n: roles[n] for n in trainable},
                        # the regime the accumulators were built in: a load WITH state continues in it
                        "regime": self.regime or detect_regime(self.model),
                    },
                )
            if save_state and self.state:
                write_named_state(opt_dir, self.state, state_dtype, max_shard_size=shard_bytes)
            for name, data in self.attachments.items():
                if "/" in name or not name.endswith(ATTACHMENT_SUFFIX) or (staging / name).exists():
                    raise ValueError(f"attachments: {name!r} must be a new top-level {ATTACHMENT_SUFFIX} file name")
                (staging / name).write_bytes(data)

            extra = {"model_class": type(self.model).__name__, "rule_hash": self.rule.content_hash()}
            if self.kind == "peft":
                extra["base_model"] = base_model_identity(self.model)
            write_card_and_manifest(staging, model_card(self, **dict(card_info or {})), kind=self.kind, extra=extra)
        if push_to_hub:
            repo_id = push_kwargs.pop("repo_id", None) or target.name
            push_directory(target, repo_id, **push_kwargs)
        return target

    def _write_model(self, directory: Path, max_shard_size: int | str | None = None) -> None:
        kind = self.kind
        if kind in ("transformers", "peft"):
            extra = {"max_shard_size": max_shard_size} if max_shard_size is not None and kind == "transformers" else {}
            self.model.save_pretrained(directory, safe_serialization=True, **extra)
        else:
            tensors = {k: v.detach().contiguous().cpu() for k, v in self.model.state_dict().items()}
            save_file(_dedupe_shared(tensors), str(directory / TORCH_WEIGHTS_NAME), metadata={"format": "pt"})
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(directory)
        for path in directory.rglob("*"):
            if path.is_file() and path.suffix in (".bin", ".pt", ".pth", ".pkl", ".pickle"):
                raise BundleError(f"{path.name}: the model wrote a pickle-based file; bundles hold only safetensors/JSON")

    def push_to_hub(
        self,
        repo_id: str,
        *,
        revision: str | None = None,
        private: bool | None = None,
        commit_message: str | None = None,
        commit_description: str | None = None,
        token: str | bool | None = None,
        create_pr: bool = False,
        tags: Sequence[str] | None = None,
        max_shard_size: int | str | None = None,
        overwrite_card: bool = False,
        save_state: bool = True,
        state_dtype: torch.dtype = torch.float32,
    ) -> CommitInfo:
        """Publish the bundle to the Hub repo ``repo_id`` as ONE commit (created if missing) and return its
        ``huggingface_hub.CommitInfo`` (``.oid`` is the commit sha to pin with ``from_pretrained(revision=)``;
        ``str(info)`` is the commit URL, ``info.pr_url`` the pull request's with ``create_pr=True``).

        The arguments mean what they mean for ``PreTrainedModel.push_to_hub``: ``revision`` is the branch to push
        to (default ``main``), ``create_pr`` opens a pull request instead of committing to it, ``tags`` are added
        to the card's metadata, ``max_shard_size`` shards weights and accumulators. A README.md edited on the
        Hub is kept unless ``overwrite_card=True``. See `optbundle.store.hub.push_directory`.
        """
        card_info = {"tags": list(tags)} if tags else None
        save_kwargs = dict(save_state=save_state, state_dtype=state_dtype, max_shard_size=max_shard_size, card_info=card_info)
        return push_pretrained(
            self, repo_id, save_kwargs, revision=revision, private=private, commit_message=commit_message,
            commit_description=commit_description, token=token, create_pr=create_pr, overwrite_card=overwrite_card,
        )

    def _save_repo(self, directory: Path, **save_kwargs: Any) -> Path:
        """The folder `push_to_hub` pushes (hook of `optbundle.store.hub.push_pretrained`)."""
        return self.save_pretrained(directory, **save_kwargs)

    # ---- loading -------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        model: nn.Module | None = None,
        model_class: Any = None,
        base_model: nn.Module | str | Path | None = None,
        load_state: bool = True,
        revision: str | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
        **model_kwargs: Any,
    ) -> Bundle:
        """Load a bundle directory (or Hub repo ``"namespace/name"``) after verifying every file against ``bundle.json``.

        A Hub id is resolved to one commit (``revision``: branch, tag or sha; default ``main``) and every file is
        fetched at that commit into the Hugging Face cache (``cache_dir``), then loaded like a directory.
        ``local_files_only`` (or ``HF_HUB_OFFLINE=1``) loads what was fetched before without the network.

        ``model``: an existing module to load the weights into (needed for plain-torch bundles).
        ``model_class``: a transformers class to load with (default: the one named in ``config.json``'s
        ``architectures``). ``model_kwargs`` go to its ``from_pretrained`` (e.g. ``dtype``).
        ``base_model``: for adapter bundles, the base model (a module, or a folder/alias to load it from;
        default: the base recorded in the bundle). Its identity is checked against the one recorded.
        """
        hub_kwargs = dict(revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token)
        return load_pretrained(
            cls, path, hub_kwargs, model=model, model_class=model_class, base_model=base_model, load_state=load_state,
            model_kwargs=model_kwargs,
        )

    @classmethod
    def _from_snapshot(cls, snapshot: Any, **load_kwargs: Any) -> Bundle:
        """Load a Hub snapshot's folder (hook of `optbundle.store.hub.load_pretrained`)."""
        if snapshot.manifest.get("kind") == RULE_REPO_KIND:
            raise BundleError(
                "is a rule-only repo (no model); load it with LearnedRule.from_pretrained or optbundle.load_rule"
            )
        try:
            return cls._from_local(snapshot.directory, **load_kwargs)
        except ChecksumError as err:
            repo_id = snapshot.repo_id
            raise ChecksumError(
                f"{err}. A file changed after optbundle wrote {MANIFEST_NAME}: most likely a plain model was pushed "
                "into this bundle repo (model.push_to_hub, or trainer.push_to_hub without optbundle's BundleCallback). "
                f"To recover: load the last bundle commit with Bundle.from_pretrained({repo_id!r}, revision=<sha>), "
                "or rebuild the bundle around the pushed weights and push it again: "
                f"Bundle(AutoModelFor...from_pretrained({repo_id!r}), load_rule({repo_id!r})).push_to_hub({repo_id!r})"
            ) from None

    @classmethod
    def _from_local(
        cls, directory: Path, *, model: nn.Module | None, model_class: Any, base_model: Any, load_state: bool,
        model_kwargs: dict[str, Any],
    ) -> Bundle:
        """Load a local bundle folder after verifying it (hook of `optbundle.store.hub.load_pretrained`)."""
        if not directory.is_dir():
            raise MissingFileError(f"{directory}: not a bundle directory")
        manifest = read_manifest(directory)
        verify_manifest(directory, manifest)
        try:
            return cls._from_verified_directory(
                directory, manifest, model=model, model_class=model_class, base_model=base_model,
                load_state=load_state, model_kwargs=model_kwargs,
            )
        except BundleError:
            raise
        except Exception as err:  # noqa: BLE001 - one error family at the loader boundary
            raise CorruptFileError(
                f"{directory}: cannot be loaded ({type(err).__name__}: {short_repr(str(err), 300)})"
            ) from err

    @classmethod
    def _from_verified_directory(
        cls, directory: Path, manifest: dict[str, Any], *, model: nn.Module | None, model_class: Any,
        base_model: Any, load_state: bool, model_kwargs: dict[str, Any],
    ) -> Bundle:
        rules, routing = read_rules(directory / OPTIMIZER_DIR)
        kind = manifest.get("kind")
        if kind == "peft":
            loaded_model = _load_adapter_model(directory, manifest, base_model, model_class, model_kwargs)
        else:
            loaded_model = _load_model(directory, kind, model, model_class, model_kwargs)
        state = None
        if load_state and (
            (directory / OPTIMIZER_DIR / STATE_TENSORS_NAME).exists() or (directory / OPTIMIZER_DIR / STATE_INDEX_NAME).exists()
        ):
            state = read_named_state(directory / OPTIMIZER_DIR)
        if state is not None:
            check_state_fits(directory / OPTIMIZER_DIR / STATE_TENSORS_NAME, state, loaded_model, rules, routing)
        tokenizer = None
        if (directory / "tokenizer_config.json").exists():
            from transformers import AutoTokenizer  # heavy: loaded on first use

            try:
                tokenizer = AutoTokenizer.from_pretrained(directory)
            except Exception as err:  # noqa: BLE001 - tokenizers raise many types on damaged files
                raise ModelLoadError(
                    f"{directory}: the tokenizer cannot be loaded ({type(err).__name__}: {short_repr(str(err), 300)})"
                ) from err
        roles, trained_regime = read_roles(directory / OPTIMIZER_DIR, loaded_model)
        # loaded weights are trained weights: fine-tuning, unless the shipped accumulators continue a run
        regime = trained_regime if state is not None and trained_regime else "finetune"
        bundle = cls(loaded_model, rules, tokenizer=tokenizer, routing=routing, roles=roles, regime=regime)
        bundle.state = state
        bundle.attachments = {
            name: (directory / name).read_bytes() for name in manifest["files"]
            if "/" not in name and name.endswith(ATTACHMENT_SUFFIX)
        }
        return bundle


def check_state_fits(
    path: Path, state: NamedState, model: nn.Module, rules: dict[str, LearnedRule], routing: list[tuple[str, str]]
) -> None:
    """Every saved accumulator names a parameter of ``model`` and has the layout its rule needs for it."""
    params = dict(model.named_parameters())
    for name, entry in state.items():
        if name not in params:
            raise StateMismatchError(f"{path}: holds state for {short_repr(name)}, which the model does not have")
        rule_name = next((r for pattern, r in routing if fnmatch.fnmatchcase(name, pattern)), DEFAULT_RULE_NAME)
        try:
            check_state_layout(rules[rule_name].config, params[name].shape, entry, f"parameter {name!r}")
        except StateMismatchError as err:
            raise StateMismatchError(f"{path}: {err}") from err


def read_roles(opt_dir: Path, model: nn.Module) -> tuple[dict[str, str], str | None]:
    """``roles.json`` (if present): parameter name → role (checked against the roles and the model's names), and
    the regime the saved accumulators were built in."""
    path = opt_dir / ROLES_NAME
    if not path.exists():
        return {}, None
    info = read_json_file(path)
    if not isinstance(info, dict) or not isinstance(info.get("roles"), dict):
        raise CorruptFileError(f"{path}: expected an object with a 'roles' mapping")
    _check_format_version(info, ROLES_FORMAT_VERSION, path)
    names = {n for n, _ in model.named_parameters()}
    for name, role in info["roles"].items():
        if not isinstance(role, str) or role not in ROLES:
            raise CorruptFileError(f"{path}: parameter {short_repr(name)} has unknown role {short_repr(role)}")
        if name not in names:
            raise CorruptFileError(f"{path}: names parameter {short_repr(name)}, which the bundle's model does not have")
    regime = info.get("regime")
    if regime is not None and (not isinstance(regime, str) or regime not in REGIMES):
        raise CorruptFileError(f"{path}: unknown regime {short_repr(regime)}; known: {', '.join(REGIMES)}")
    return dict(info["roles"]), regime


def _check_format_version(info: dict[str, Any], newest: int, path: Path, *, required: bool = True) -> None:
    """``format_version`` of a bundle JSON file: a positive integer (not a bool) no newer than ``newest``."""
    version = info.get("format_version")
    if version is None and not required:
        return
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CorruptFileError(f"{path}: 'format_version' must be a positive integer, got {short_repr(version)}")
    if version > newest:
        raise FormatVersionError(f"{path}: format_version {version} is newer than the {newest} this optbundle reads")


def read_rules(opt_dir: Path) -> tuple[dict[str, LearnedRule], list[tuple[str, str]]]:
    """The default rule, any extra rules under ``rules/``, and the routing table."""
    rules = {DEFAULT_RULE_NAME: LearnedRule.from_directory(opt_dir)}
    routing_path = opt_dir / ROUTING_NAME
    if not routing_path.exists():
        return rules, []
    info = read_json_file(routing_path)
    if not isinstance(info, dict) or not isinstance(info.get("routes"), list) or not isinstance(info.get("rules"), list):
        raise CorruptFileError(f"{routing_path}: expected an object with 'rules' and 'routes' lists")
    _check_format_version(info, ROUTING_FORMAT_VERSION, routing_path, required=False)
    if len(info["rules"]) > MAX_RULES or len(info["routes"]) > MAX_ROUTES:
        raise CorruptFileError(
            f"{routing_path}: {len(info['rules'])} rules and {len(info['routes'])} routes; at most {MAX_RULES} rules "
            f"and {MAX_ROUTES} routes are allowed"
        )
    for name in info["rules"]:
        if name == DEFAULT_RULE_NAME:
            continue
        if not isinstance(name, str) or "/" in name or "\\" in name or name in ("", ".", "..") or name in rules:
            raise CorruptFileError(f"{routing_path}: bad or repeated rule name {short_repr(name)}")
        rules[name] = LearnedRule.from_directory(opt_dir / RULES_DIR / name)
    routing = []
    for entry in info["routes"]:
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("rule"), str) or entry["rule"] not in rules
            or not isinstance(entry.get("pattern"), str) or len(entry["pattern"]) > MAX_PATTERN_CHARS
        ):
            raise CorruptFileError(
                f"{routing_path}: route {short_repr(entry)} needs a 'pattern' (at most {MAX_PATTERN_CHARS} characters) "
                "and a known 'rule'"
            )
        routing.append((entry["pattern"], entry["rule"]))
    return rules, routing


_IDENTITY_FIELDS = ("model_type", "architectures", "hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size")


def base_model_identity(peft_model: nn.Module) -> dict[str, Any]:
    """What an adapter bundle records about its base model: where it came from and its shape-defining config."""
    base = peft_model.get_base_model()
    config = base.config.to_dict()
    peft_config = peft_model.peft_config[peft_model.active_adapter]
    return {
        "name_or_path": str(peft_config.base_model_name_or_path or config.get("_name_or_path") or ""),
        "class": type(base).__name__,
        "config": {k: config.get(k) for k in _IDENTITY_FIELDS if k in config},
    }


def _load_adapter_model(directory: Path, manifest: dict, base_model: Any, model_class: Any, kwargs: dict) -> nn.Module:
    from peft import PeftModel  # heavy: loaded on first use

    identity = manifest.get("base_model") or {}
    if base_model is None or isinstance(base_model, (str, Path)):
        source = resolve_model(str(base_model)) if base_model is not None else identity.get("name_or_path")
        if not source or not isinstance(source, str):
            raise ModelLoadError(f"{directory}: an adapter bundle needs base_model= (no base model recorded)")
        if model_class is None:
            import transformers  # heavy: loaded on first use

            class_name = identity.get("class") if isinstance(identity, dict) else None
            model_class = getattr(transformers, class_name, None) if isinstance(class_name, str) else None
            if model_class is None:
                raise CorruptFileError(f"{directory / MANIFEST_NAME}: base model class {identity.get('class')!r} unknown; pass model_class=")
        try:
            base_model = model_class.from_pretrained(source, **kwargs)
        except OSError as err:
            raise MissingFileError(
                f"{directory}: cannot load the base model {short_repr(source)} recorded in the bundle "
                f"({short_repr(str(err), 300)}); pass base_model="
            ) from err
    config = base_model.config.to_dict()
    recorded = identity.get("config", {}) if isinstance(identity, dict) else None
    if not isinstance(recorded, dict):
        raise CorruptFileError(f"{directory / MANIFEST_NAME}: 'base_model.config' must be an object")
    for key, value in recorded.items():
        if key == "architectures":  # set only once a model is saved; not part of its shape
            continue
        if config.get(key) != value:
            raise StateMismatchError(
                f"{directory}: base model differs from the one the adapter was trained on: config {key!r} is "
                f"{config.get(key)!r}, the bundle records {value!r}"
            )
    adapter_path = directory / ADAPTER_WEIGHTS_NAME
    header = read_safetensors_header(adapter_path)  # checked before PEFT reads it
    try:
        peft_model = PeftModel.from_pretrained(base_model, directory, is_trainable=True)
    except Exception as err:  # noqa: BLE001 - peft raises many types on damaged adapter files
        raise ModelLoadError(
            f"{directory}: the adapter cannot be loaded ({type(err).__name__}: {short_repr(str(err), 300)})"
        ) from err
    check_adapter_weights(peft_model, header, adapter_path)
    return peft_model


ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"


def check_adapter_weights(peft_model: nn.Module, header: dict[str, dict[str, Any]], path: Path) -> None:
    """Strict adapter weights: the file holds exactly the tensors PEFT saves for this adapter (PEFT itself loads
    with ``strict=False`` and leaves a missing tensor at its initialization), with their shapes, floating."""
    from peft import get_peft_model_state_dict  # heavy: loaded on first use

    expected = get_peft_model_state_dict(peft_model)
    missing = sorted(set(expected) - set(header))
    unexpected = sorted(set(header) - set(expected))
    if missing or unexpected:
        raise ModelLoadError(
            f"{path}: does not fit the adapter in adapter_config.json (missing: {short_repr(missing, 300) if missing else 'none'}, "
            f"unexpected: {short_repr(unexpected, 300) if unexpected else 'none'})"
        )
    for name, tensor in expected.items():
        entry = header[name]
        if list(tensor.shape) != entry["shape"]:
            raise ModelLoadError(f"{path}: tensor {name!r} has shape {entry['shape']}, the adapter expects {list(tensor.shape)}")
        dtype = _SAFETENSORS_TO_TORCH.get(entry["dtype"])
        if tensor.is_floating_point() != bool(dtype is not None and dtype.is_floating_point):
            raise ModelLoadError(f"{path}: tensor {name!r} is stored as {entry['dtype']}, the adapter expects {tensor.dtype}")


def _load_model(directory: Path, kind: str | None, model: nn.Module | None, model_class: Any, kwargs: dict) -> nn.Module:
    if kind == "transformers":
        if model is not None:
            raise ModelLoadError("pass model_class (not model=) to load a transformers bundle")
        return _load_transformers_model(directory, model_class, kwargs)
    if kind == "torch":
        if model is None:
            raise ModelLoadError(f"{directory}: a plain-torch bundle needs model= (a module to load the weights into)")
        path = directory / TORCH_WEIGHTS_NAME
        header = read_safetensors_header(path)
        check_weights_match(
            model, {name: (entry, path) for name, entry in header.items()}, declared_dtype=None,
            error=StateMismatchError, against="the given model",
        )
        tensors = load_safetensors_file(path)
        try:
            model.load_state_dict(tensors, strict=False)
        except RuntimeError as err:  # unreachable after check_weights_match; no foreign error escapes
            raise ModelLoadError(f"{path}: {short_repr(str(err), 300)}") from err
        return model
    raise CorruptFileError(f"{directory / MANIFEST_NAME}: unknown bundle kind {short_repr(kind)}")


def check_config_dimensions(config: Any, path: Path, where: str = "") -> None:
    """Refuse config.json dimensions beyond `CONFIG_LIMITS` (at any nesting level) and non-integer ones."""
    if isinstance(config, dict):
        for key, value in config.items():
            field = f"{where}.{key}" if where else key
            limit = CONFIG_LIMITS.get(key)
            if limit is not None and value is not None:
                if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= limit:
                    raise ModelLoadError(f"{path}: {field!r} must be an integer in [0, {limit}], got {short_repr(value)}")
            check_config_dimensions(value, path, field)
    elif isinstance(config, list):
        for index, value in enumerate(config):
            check_config_dimensions(value, path, f"{where}[{index}]")


_SAFETENSORS_TO_TORCH = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


def check_weights_match(
    model: nn.Module, stored: dict[str, tuple[dict[str, Any], Path]], *, declared_dtype: torch.dtype | None,
    error: type[BundleError] = ModelLoadError, against: str = "the model built from config.json",
) -> None:
    """Strict weights: the stored tensors (name → (safetensors header entry, file)) are exactly the model's
    state dict (tied aliases may be left out), each with the model's shape; floating tensors stored as a
    floating dtype (``declared_dtype`` when config.json declares one), the others as their exact dtype."""
    expected = model.state_dict(keep_vars=True)
    all_params = {n for n, _ in model.named_parameters(remove_duplicate=False)} | {n for n, _ in model.named_buffers(remove_duplicate=False)}
    kept = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    aliases = all_params - kept
    files = sorted({str(path) for _, path in stored.values()}) or ["(no weight file)"]
    where = files[0] if len(files) == 1 else f"{files[0]} (+{len(files) - 1} shards)"
    missing = sorted(set(expected) - set(stored) - aliases)
    unexpected = sorted(set(stored) - set(expected))
    if missing or unexpected:
        raise error(
            f"{where}: does not fit {against} (missing: "
            f"{short_repr(missing, 300) if missing else 'none'}, unexpected: {short_repr(unexpected, 300) if unexpected else 'none'})"
        )
    for name, (entry, path) in stored.items():
        tensor = expected[name]
        if list(tensor.shape) != entry["shape"]:
            raise error(f"{path}: tensor {name!r} has shape {entry['shape']}, {against} expects {list(tensor.shape)}")
        dtype = _SAFETENSORS_TO_TORCH.get(entry["dtype"])
        if tensor.is_floating_point():
            ok = dtype is not None and dtype.is_floating_point and (declared_dtype is None or dtype == declared_dtype)
        else:
            ok = dtype == tensor.dtype
        if not ok:
            wanted = declared_dtype or ("a floating dtype" if tensor.is_floating_point() else tensor.dtype)
            raise error(f"{path}: tensor {name!r} is stored as {entry['dtype']}, {against} expects {wanted}")


def _weight_headers(directory: Path) -> dict[str, tuple[dict[str, Any], Path]]:
    """Tensor name → (header entry, file) over ``model.safetensors`` or the shards of its index."""
    index_path = directory / f"{TORCH_WEIGHTS_NAME}.index.json"
    if index_path.exists():
        index = read_json_file(index_path)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CorruptFileError(f"{index_path}: expected an object with a 'weight_map' of file names")
        names = sorted(set(weight_map.values()))
    else:
        weight_map, names = None, [TORCH_WEIGHTS_NAME]
    stored: dict[str, tuple[dict[str, Any], Path]] = {}
    for name in names:
        check_relative_path(name, source=str(index_path))
        path = directory / name
        for key, entry in read_safetensors_header(path).items():
            if key in stored or (weight_map is not None and weight_map.get(key) != name):
                raise CorruptFileError(f"{path}: tensor {short_repr(key)} is repeated or not where the index puts it")
            stored[key] = (entry, path)
    if weight_map is not None and set(weight_map) != set(stored):
        raise CorruptFileError(f"{index_path}: 'weight_map' names tensors the shards do not hold (or misses some)")
    return stored


def _load_transformers_model(directory: Path, model_class: Any, kwargs: dict) -> nn.Module:
    """A transformers model, loaded strictly: config.json within `CONFIG_LIMITS`, the model built on the meta
    device and its tensors compared with the weight files' headers (`check_weights_match`) before any real
    allocation, then transformers' own ``from_pretrained``."""
    import transformers  # heavy: loaded on first use

    config_path = directory / "config.json"
    raw = read_json_file(config_path)
    if not isinstance(raw, dict):
        raise CorruptFileError(f"{config_path}: expected a JSON object")
    check_config_dimensions(raw, config_path)
    if model_class is None:
        architectures = raw.get("architectures") or []
        name = architectures[0] if isinstance(architectures, list) and architectures else None
        model_class = getattr(transformers, name, None) if isinstance(name, str) else None
        if not (isinstance(model_class, type) and issubclass(model_class, transformers.PreTrainedModel)):
            raise CorruptFileError(
                f"{config_path}: 'architectures' names {short_repr(name)}, which this transformers does not "
                "provide as a model class; pass model_class="
            )
    try:
        config = model_class.config_class.from_pretrained(directory)
    except Exception as err:  # noqa: BLE001 - transformers' config validation raises many types
        raise ModelLoadError(f"{config_path}: invalid config ({type(err).__name__}: {short_repr(str(err), 300)})") from err
    declared = raw.get("dtype", raw.get("torch_dtype"))
    declared_dtype = getattr(torch, declared, None) if isinstance(declared, str) else None
    if declared is not None and not isinstance(declared_dtype, torch.dtype):
        raise ModelLoadError(f"{config_path}: 'dtype' {short_repr(declared)} is not a torch dtype")
    try:
        with torch.device("meta"):
            skeleton = model_class(config)
    except Exception as err:  # noqa: BLE001
        raise ModelLoadError(
            f"{config_path}: the model cannot be built from it ({type(err).__name__}: {short_repr(str(err), 300)})"
        ) from err
    check_weights_match(skeleton, _weight_headers(directory), declared_dtype=declared_dtype)
    del skeleton
    try:
        return model_class.from_pretrained(directory, **kwargs)
    except Exception as err:  # noqa: BLE001
        raise ModelLoadError(
            f"{directory}: transformers cannot load the model ({type(err).__name__}: {short_repr(str(err), 300)})"
        ) from err


def _dedupe_shared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing memory (tied weights): keep the first name of each storage."""
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    out = {}
    for name, tensor in tensors.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in seen:
            continue
        seen[key] = name
        out[name] = tensor.clone() if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size() else tensor
    return out


def _shared_aliases(model: nn.Module) -> set[str]:
    state = model.state_dict()
    kept = set(_dedupe_shared({k: v for k, v in state.items()}))
    return set(state) - kept


# ---- named accumulator state on disk ------------------------------------------------------------------


STATE_INDEX_NAME = "state.safetensors.index.json"


def _shard_size_bytes(max_shard_size: int | str | None) -> int | None:
    """``max_shard_size`` as bytes (``"5GB"``, ``"500MB"``, an int), as transformers parses it."""
    if max_shard_size is None:
        return None
    from transformers.utils.hub import convert_file_size_to_int  # heavy: loaded on first use

    size = convert_file_size_to_int(max_shard_size)
    if not isinstance(size, int) or size <= 0:
        raise ValueError(f"max_shard_size must be a positive size such as '5GB' or a byte count, got {max_shard_size!r}")
    return size


def _state_shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Split ``tensors`` (in key order, one parameter's keys together when they fit) into shards of at most
    ``max_bytes`` each (a single larger tensor gets a shard of its own), as transformers shards weights."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    return shards


def write_named_state(
    directory: Path, state: NamedState, dtype: torch.dtype = torch.float32, max_shard_size: int | None = None
) -> None:
    """``state.safetensors`` (keys ``"<param>:<key>"``) + ``state.json`` (per-parameter summary).

    With ``max_shard_size`` (bytes) and more state than that: ``state-0000i-of-0000N.safetensors`` shards and
    ``state.safetensors.index.json`` (``{"metadata": {"total_size": ...}, "weight_map": {key: shard}}``, the
    layout of transformers' sharded checkpoints).
    """
    tensors: dict[str, torch.Tensor] = {}
    summary: dict[str, Any] = {}
    for name, entry in state.items():
        if ":" in name:
            raise StateMismatchError(f"parameter name {name!r} contains ':', which state keys use as separator")
        for key, value in entry.items():
            value = value.detach().cpu()
            if value.is_floating_point():
                value = value.to(dtype)
            tensors[f"{name}:{key}"] = value.contiguous()
        summary[name] = {
            "shape": list(entry["second_moment"].shape),
            "step": int(entry["step"]),
            "skipped_steps": int(entry.get("skipped_steps", torch.zeros(()))),
            "keys": sorted(entry),
        }
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    if max_shard_size is None or total <= max_shard_size:
        (directory / STATE_TENSORS_NAME).write_bytes(save_safetensors_bytes(tensors, metadata={"format": "pt"}))
    else:
        shards = _state_shards(tensors, max_shard_size)
        weight_map = {}
        for index, shard in enumerate(shards, start=1):
            name = f"state-{index:05d}-of-{len(shards):05d}.safetensors"
            (directory / name).write_bytes(save_safetensors_bytes(shard, metadata={"format": "pt"}))
            weight_map.update({key: name for key in shard})
        atomic_write_json(directory / STATE_INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})
    atomic_write_json(
        directory / STATE_JSON_NAME,
        {"format_version": STATE_FORMAT_VERSION, "stored_dtype": str(dtype).replace("torch.", ""), "params": summary},
    )


def read_named_state(directory: Path) -> NamedState:
    """Read accumulators back as fp32 (int64 counters stay int64), checking them against ``state.json`` (and,
    when sharded, every key against ``state.safetensors.index.json``)."""
    tensors = _read_state_tensors(directory)
    info_path = directory / STATE_JSON_NAME
    info = read_json_file(info_path)
    if not isinstance(info, dict) or not isinstance(info.get("params"), dict):
        raise CorruptFileError(f"{info_path}: expected an object with a 'params' table")
    _check_format_version(info, STATE_FORMAT_VERSION, info_path, required=False)
    state: NamedState = {}
    for key, tensor in tensors.items():
        name, sep, field = key.rpartition(":")
        if not sep:
            raise CorruptFileError(f"{directory / STATE_TENSORS_NAME}: key {short_repr(key)} is not '<param>:<state key>'")
        if (tensor.dtype == torch.int64) != (field in ("step", "skipped_steps")) or not (
            tensor.dtype == torch.int64 or tensor.dtype in (torch.float32, torch.bfloat16, torch.float16)
        ):
            raise CorruptFileError(
                f"{directory / STATE_TENSORS_NAME}: {short_repr(key)} is {tensor.dtype}; counters are int64, "
                "accumulators float32/bfloat16/float16"
            )
        if tensor.is_floating_point():
            if not torch.isfinite(tensor).all():
                raise CorruptFileError(f"{directory / STATE_TENSORS_NAME}: {short_repr(key)} holds NaN or inf")
            tensor = tensor.to(torch.float32)
        state.setdefault(name, {})[field] = tensor
    for name, summary in info["params"].items():
        if name not in state:
            raise CorruptFileError(f"{info_path}: lists parameter {short_repr(name)}, which {STATE_TENSORS_NAME} lacks")
        if not isinstance(summary, dict) or sorted(state[name]) != summary.get("keys"):
            raise CorruptFileError(f"{info_path}: keys of {short_repr(name)} differ from {STATE_TENSORS_NAME}")
    extra = sorted(set(state) - set(info["params"]))
    if extra:
        raise CorruptFileError(f"{info_path}: does not list parameter(s) {short_repr(extra, 200)} found in {STATE_TENSORS_NAME}")
    return state


def _read_state_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """``state.safetensors``, or the shards named by ``state.safetensors.index.json`` (each key where the index says)."""
    index_path = directory / STATE_INDEX_NAME
    if not index_path.exists():
        return load_safetensors_file(directory / STATE_TENSORS_NAME)
    index = read_json_file(index_path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CorruptFileError(f"{index_path}: expected an object with a 'weight_map' of key → shard file")
    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        if "/" in shard or "\\" in shard or not shard.endswith(".safetensors") or shard.startswith("."):
            raise CorruptFileError(f"{index_path}: shard name {shard!r} is not a file beside the index")
        for key, tensor in load_safetensors_file(directory / shard).items():
            if weight_map.get(key) != shard:
                raise CorruptFileError(f"{directory / shard}: holds {key!r}, which the index places elsewhere")
            tensors[key] = tensor
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
        raise CorruptFileError(f"{index_path}: lists {len(missing)} key(s) no shard holds, e.g. {missing[0]!r}")
    return tensors
