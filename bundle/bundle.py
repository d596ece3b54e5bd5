"""`Bundle`: a model plus the learned rule that trains it (plus, optionally, the optimizer's accumulators).

On disk (format v1) a bundle is a valid Hugging Face model folder with an ``optimizer/`` folder beside the
weights and a ``bundle.json`` manifest that lists every file with its size and sha256::

    config.json, model.safetensors        # transformers' own files (AutoModel*.from_pretrained still works)
    optimizer/rule_config.json            # RuleConfig
    optimizer/rule.safetensors            # φ
    optimizer/provenance.json             # how the rule was made
    optimizer/state.safetensors           # optional: accumulators keyed "<param name>:<state key>"
    optimizer/state.json                  # optional: per-parameter shape, dtype, step, skipped steps
    bundle.json, README.md

Saving builds the whole folder in a temporary sibling and renames it into place; loading verifies the
manifest before reading anything, and reads only JSON and safetensors.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .format import (
    MANIFEST_NAME,
    OPTIMIZER_DIR,
    STATE_JSON_NAME,
    STATE_TENSORS_NAME,
    BundleError,
    CorruptFileError,
    MissingFileError,
    StateMismatchError,
    atomic_write_json,
    build_manifest,
    commit_directory,
    load_safetensors_file,
    read_json_file,
    read_manifest,
    save_safetensors_bytes,
    staging_directory,
    verify_manifest,
)
from .optimizer import LearnedOptimizer, constant_schedule
from .rule import LearnedRule

logger = logging.getLogger(__name__)

STATE_FORMAT_VERSION = 1
TORCH_WEIGHTS_NAME = "model.safetensors"

NamedState = dict[str, dict[str, torch.Tensor]]


def _is_transformers_model(model: nn.Module) -> bool:
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(model, PreTrainedModel)


def _is_peft_model(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PeftModel)


class Bundle:
    """A model together with its learned rule and (optionally) the rule's accumulator state.

    Args:
        model: a transformers ``PreTrainedModel`` (saved in transformers' own layout) or any ``nn.Module``
            (saved as ``model.safetensors``; loading then needs ``model=`` to load into).
        rule: the `LearnedRule` that fine-tunes it.
        state: accumulators to ship: a `LearnedOptimizer` (its state is read by parameter name) or a mapping
            ``{param name: {state key: tensor}}``. ``None`` ships none: the optimizer starts fresh.
        tokenizer: optional tokenizer/processor saved beside the model.
    """

    def __init__(
        self,
        model: nn.Module,
        rule: LearnedRule,
        state: LearnedOptimizer | Mapping[str, Mapping[str, torch.Tensor]] | None = None,
        tokenizer: Any = None,
    ) -> None:
        if not isinstance(rule, LearnedRule):
            raise TypeError(f"rule must be a LearnedRule, got {type(rule).__name__}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.rule = rule
        self.tokenizer = tokenizer
        self.state: NamedState | None = None
        if state is not None:
            self.set_state(state)

    # ---- optimizer -----------------------------------------------------------------------------------
    def named_trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def optimizer(self, **overrides: Any) -> tuple[LearnedOptimizer, torch.optim.lr_scheduler.LRScheduler]:
        """``(LearnedOptimizer over the model's trainable parameters, constant scheduler)`` for
        ``Trainer(optimizers=...)``. ``overrides`` go to `LearnedOptimizer` (``lr``, ``weight_decay``).

        The scheduler keeps the rule's multiplier constant; passing ``(optimizer, None)`` instead would let
        Trainer decay it linearly to zero, which is not how the rule was meta-trained.
        """
        optimizer = self.build_optimizer(self.model, **overrides)
        return optimizer, constant_schedule(optimizer)

    def build_optimizer(self, model: nn.Module, **overrides: Any) -> LearnedOptimizer:
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the model has no trainable parameters (requires_grad=True) to optimize")
        optimizer = LearnedOptimizer(named, self.rule, **overrides)
        if self.state:
            restored = optimizer.load_named_state(self.state)
            logger.info("restored optimizer state for %d of %d trainable parameters", len(restored), len(named))
        return optimizer

    def optimizer_factory(self, **overrides: Any) -> tuple[Any, dict[str, Any]]:
        """``(factory, kwargs)`` for ``Trainer(optimizer_cls_and_kwargs=...)``.

        Trainer treats a non-Optimizer class as a factory and calls ``factory()(model, **kwargs)``; this is the
        path that DeepSpeed and FSDP keep (they drop ``optimizers=``).
        """
        bundle = self

        class LearnedOptimizerFactory:
            def __call__(self, model: nn.Module, **kwargs: Any) -> LearnedOptimizer:
                return bundle.build_optimizer(model, **{**overrides, **kwargs})

        return LearnedOptimizerFactory, {}

    def set_state(self, state: LearnedOptimizer | Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        """Take the accumulators to ship from an optimizer (by parameter name) or a name → state mapping."""
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
    ) -> Path:
        """Write the bundle to ``save_directory`` atomically (old contents replaced only once all is written).

        ``save_state=False`` leaves the accumulators out (they are up to 4× the model's size in fp32);
        ``state_dtype=torch.bfloat16`` stores them at half the size (they are read back into fp32).
        """
        target = Path(save_directory)
        if state_dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"state_dtype must be float32, bfloat16 or float16, got {state_dtype}")
        staging = staging_directory(target)
        try:
            self._write_model(staging)
            opt_dir = staging / OPTIMIZER_DIR
            self.rule.save_pretrained(opt_dir)
            if save_state and self.state:
                write_named_state(opt_dir, self.state, state_dtype)
            from .card import model_card

            (staging / "README.md").write_text(model_card(self), encoding="utf-8")
            manifest = build_manifest(
                staging,
                kind=self.kind,
                extra={"model_class": type(self.model).__name__, "rule_hash": self.rule.content_hash()},
            )
            atomic_write_json(staging / MANIFEST_NAME, manifest)
            commit_directory(staging, target)
        except BaseException:
            import shutil

            shutil.rmtree(staging, ignore_errors=True)
            raise
        return target

    def _write_model(self, directory: Path) -> None:
        kind = self.kind
        if kind in ("transformers", "peft"):
            self.model.save_pretrained(directory, safe_serialization=True)
        else:
            from safetensors.torch import save_file

            tensors = {k: v.detach().contiguous().cpu() for k, v in self.model.state_dict().items()}
            save_file(_dedupe_shared(tensors), str(directory / TORCH_WEIGHTS_NAME), metadata={"format": "pt"})
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(directory)
        for path in directory.rglob("*"):
            if path.is_file() and path.suffix in (".bin", ".pt", ".pth", ".pkl", ".pickle"):
                raise BundleError(f"{path.name}: the model wrote a pickle-based file; bundles hold only safetensors/JSON")

    # ---- loading -------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        model: nn.Module | None = None,
        model_class: Any = None,
        load_state: bool = True,
        **model_kwargs: Any,
    ) -> Bundle:
        """Load a bundle directory after verifying every file against ``bundle.json``.

        ``model``: an existing module to load the weights into (needed for plain-torch bundles).
        ``model_class``: a transformers class to load with (default: the one named in ``config.json``'s
        ``architectures``). ``model_kwargs`` go to its ``from_pretrained`` (e.g. ``dtype``).
        """
        directory = Path(path)
        if not directory.is_dir():
            raise MissingFileError(f"{directory}: not a bundle directory")
        manifest = read_manifest(directory)
        verify_manifest(directory, manifest)
        rule = LearnedRule.from_directory(directory / OPTIMIZER_DIR)
        kind = manifest.get("kind")
        loaded_model = _load_model(directory, kind, model, model_class, model_kwargs)
        state = None
        if load_state and (directory / OPTIMIZER_DIR / STATE_TENSORS_NAME).exists():
            state = read_named_state(directory / OPTIMIZER_DIR)
        tokenizer = None
        if (directory / "tokenizer_config.json").exists():
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(directory)
        bundle = cls(loaded_model, rule, tokenizer=tokenizer)
        bundle.state = state
        return bundle


def _load_model(directory: Path, kind: str | None, model: nn.Module | None, model_class: Any, kwargs: dict) -> nn.Module:
    if kind == "transformers":
        if model is not None:
            raise ValueError("pass model_class (not model=) to load a transformers bundle")
        if model_class is None:
            import transformers

            config = read_json_file(directory / "config.json")
            architectures = config.get("architectures") or []
            name = architectures[0] if architectures else None
            model_class = getattr(transformers, name, None) if name else None
            if model_class is None:
                raise CorruptFileError(
                    f"{directory / 'config.json'}: 'architectures' names {name!r}, which this transformers does not "
                    "provide; pass model_class="
                )
        return model_class.from_pretrained(directory, **kwargs)
    if kind == "torch":
        if model is None:
            raise ValueError(f"{directory}: a plain-torch bundle needs model= (a module to load the weights into)")
        tensors = load_safetensors_file(directory / TORCH_WEIGHTS_NAME)
        missing, unexpected = model.load_state_dict(tensors, strict=False)
        missing = [m for m in missing if m not in _shared_aliases(model)]
        if missing or unexpected:
            raise StateMismatchError(
                f"{directory / TORCH_WEIGHTS_NAME}: does not fit the given model (missing: {missing}, unexpected: {unexpected})"
            )
        return model
    raise CorruptFileError(f"{directory / MANIFEST_NAME}: unknown bundle kind {kind!r}")


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


def write_named_state(directory: Path, state: NamedState, dtype: torch.dtype = torch.float32) -> None:
    """``state.safetensors`` (keys ``"<param>:<key>"``) + ``state.json`` (per-parameter summary)."""
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
    (directory / STATE_TENSORS_NAME).write_bytes(save_safetensors_bytes(tensors, metadata={"format": "pt"}))
    atomic_write_json(
        directory / STATE_JSON_NAME,
        {"format_version": STATE_FORMAT_VERSION, "stored_dtype": str(dtype).replace("torch.", ""), "params": summary},
    )


def read_named_state(directory: Path) -> NamedState:
    """Read accumulators back as fp32 (int64 counters stay int64), checking them against ``state.json``."""
    tensors = load_safetensors_file(directory / STATE_TENSORS_NAME)
    info_path = directory / STATE_JSON_NAME
    info = read_json_file(info_path)
    if not isinstance(info, dict) or not isinstance(info.get("params"), dict):
        raise CorruptFileError(f"{info_path}: expected an object with a 'params' table")
    state: NamedState = {}
    for key, tensor in tensors.items():
        name, sep, field = key.rpartition(":")
        if not sep:
            raise CorruptFileError(f"{directory / STATE_TENSORS_NAME}: key {key!r} is not '<param>:<state key>'")
        if tensor.is_floating_point():
            if not torch.isfinite(tensor).all():
                raise CorruptFileError(f"{directory / STATE_TENSORS_NAME}: {key!r} holds NaN or inf")
            tensor = tensor.to(torch.float32)
        state.setdefault(name, {})[field] = tensor
    for name, summary in info["params"].items():
        if name not in state:
            raise CorruptFileError(f"{info_path}: lists parameter {name!r}, which {STATE_TENSORS_NAME} lacks")
        if sorted(state[name]) != summary.get("keys"):
            raise CorruptFileError(f"{info_path}: keys of {name!r} differ from {STATE_TENSORS_NAME}")
    extra = sorted(set(state) - set(info["params"]))
    if extra:
        raise CorruptFileError(f"{info_path}: does not list parameter(s) {extra} found in {STATE_TENSORS_NAME}")
    return state
