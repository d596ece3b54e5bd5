"""Glue between a `Bundle` and `transformers.Trainer`: learning rates, schedules, loss scaling.

What ``lr`` means depends on the rule's format: a format-2 rule (the shipped ``default``) takes ``lr`` as
AdamW's learning rate, so Trainer's ``learning_rate`` and schedule carry over unchanged; a format-1 rule
(``default-v2``, ``adam-init``) takes ``lr`` as a multiplier on its own step (1.0 = as meta-trained), so
Trainer's ``learning_rate`` (5e-5 by default) would stall it and is not used; its schedule still shapes the
multiplier.
"""

from __future__ import annotations

import inspect
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from ..files import CARD_NAME, MANIFEST_NAME, OPTIMIZER_DIR, read_manifest
from ..step.optimizer import LearnedOptimizer
from .card import model_card
from .rule import LearnedRule

logger = logging.getLogger(__name__)

_WARNED: set[str] = set()


def warn_once(message: str, *args: Any) -> None:
    """``logger.warning`` each distinct message once per process."""
    text = message % args if args else message
    if text not in _WARNED:
        _WARNED.add(text)
        logger.warning(text)


def lr_is_learning_rate(rule: LearnedRule) -> bool:
    """True when the rule's ``lr`` is an AdamW-equivalent learning rate (format 2), False for a multiplier."""
    return rule.config.format_version >= 2


def lr_and_weight_decay(
    rule: LearnedRule, lr: float | None, weight_decay: float | None, args: Any = None
) -> tuple[float | None, float]:
    """``(lr, weight_decay)`` with the ones left ``None`` taken from Trainer's ``TrainingArguments`` ``args``.

    ``lr``: ``args.learning_rate`` for a format-2 rule; a format-1 rule's lr is a multiplier, so it stays
    ``None`` (the rule's recommended multiplier). ``weight_decay``: ``args.weight_decay``, 0 without ``args``.
    Shared by `Bundle.optimizer` (``args=``) and `Bundle.optimizer_factory` (the calling Trainer's args).
    """
    if args is not None:
        if lr is None:
            if lr_is_learning_rate(rule):
                lr = float(args.learning_rate)
            else:
                logger.info(
                    "format-1 rule: its lr is a multiplier, so Trainer's learning_rate=%g is not used "
                    "(the rule's recommended multiplier is)",
                    args.learning_rate,
                )
        if weight_decay is None:
            weight_decay = float(args.weight_decay)
    return lr, weight_decay or 0.0


def find_trainer(max_depth: int = 8) -> Any:
    """The `transformers.Trainer` whose method is on the call stack (the one building our optimizer), or None.

    Trainer calls an ``optimizer_cls_and_kwargs`` factory as ``factory()(model, **kwargs)`` without its
    arguments; looking one or two frames up is the only way to read its ``learning_rate`` there.
    """
    from transformers import Trainer  # heavy: loaded on first use

    frame = inspect.currentframe()
    try:
        for _ in range(max_depth):
            frame = frame.f_back if frame is not None else None
            if frame is None:
                return None
            candidate = frame.f_locals.get("self")
            if isinstance(candidate, Trainer):
                return candidate
        return None
    finally:
        del frame


def innermost_model(model: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper (what Trainer inspects for ``accepts_loss_kwargs``)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def keep_loss_scaling(model: nn.Module) -> bool:
    """Set ``accepts_loss_kwargs = False`` on a transformers model whose ``forward`` takes ``**kwargs``.

    transformers 5 then stops passing ``num_items_in_batch`` and scales the loss by 1/accumulation steps (and
    not by the world size under DDP) itself; otherwise models whose loss ignores ``num_items_in_batch``
    (BERT, most classification heads) get gradients ``accumulation_steps``× too large, which a learned rule,
    not being scale-invariant, notices. Returns True when the flag was changed. Must run before
    ``Trainer.__init__`` (it reads the flag there).
    """
    inner = innermost_model(model)
    if getattr(inner, "accepts_loss_kwargs", None) is False:
        return False
    forward = getattr(inner, "forward", None)
    try:
        takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(forward).parameters.values())
    except (TypeError, ValueError):
        takes_kwargs = False
    if not takes_kwargs and not hasattr(inner, "accepts_loss_kwargs"):
        return False
    inner.accepts_loss_kwargs = False
    logger.info(
        "set %s.accepts_loss_kwargs = False so that Trainer scales the loss by 1/gradient_accumulation_steps "
        "(see README, Pitfalls)", type(inner).__name__
    )
    return True


def warmup_steps(num_warmup_steps: int | float, num_training_steps: int | None) -> int:
    """Warmup as a step count: an int as is, a float in [0, 1) as a fraction of ``num_training_steps``."""
    if isinstance(num_warmup_steps, float) and 0 <= num_warmup_steps < 1:
        if num_training_steps is None:
            raise ValueError("a fractional num_warmup_steps needs num_training_steps")
        return int(num_warmup_steps * num_training_steps + 0.5) if num_warmup_steps else 0
    if num_warmup_steps < 0:
        raise ValueError(f"num_warmup_steps must be >= 0, got {num_warmup_steps!r}")
    return int(num_warmup_steps)


def build_schedule(
    optimizer: torch.optim.Optimizer,
    lr_scheduler_type: str,
    *,
    num_training_steps: int | None,
    num_warmup_steps: int | float = 0,
    scheduler_kwargs: dict[str, Any] | None = None,
) -> torch.optim.lr_scheduler.LRScheduler:
    """``transformers.get_scheduler`` with Trainer's names (``linear``, ``cosine``, ``constant_with_warmup``, ...)."""
    from transformers import get_scheduler  # heavy: loaded on first use

    needs_total = lr_scheduler_type not in ("constant", "constant_with_warmup", "inverse_sqrt", "reduce_lr_on_plateau")
    if needs_total and num_training_steps is None:
        raise ValueError(f"lr_scheduler_type={lr_scheduler_type!r} needs num_training_steps")
    return get_scheduler(
        lr_scheduler_type,
        optimizer=optimizer,
        num_warmup_steps=warmup_steps(num_warmup_steps, num_training_steps),
        num_training_steps=num_training_steps,
        scheduler_specific_kwargs=scheduler_kwargs or {},
    )


# ---- bundles from Trainer's saves ---------------------------------------------------------------------------


def unwrap_optimizer(optimizer: Any) -> Any:
    """The optimizer inside accelerate's ``AcceleratedOptimizer`` (and similar wrappers with ``.optimizer``)."""
    inner, depth = optimizer, 0
    while not isinstance(inner, LearnedOptimizer) and hasattr(inner, "optimizer") and depth < 8:
        inner, depth = inner.optimizer, depth + 1
    return inner


def save_bundle_into(bundle: Any, directory: str | Path, **save_kwargs: Any) -> Path:
    """Write ``bundle`` into an existing folder that holds other files too (a Trainer checkpoint or output dir).

    The bundle is first saved whole into a temporary sibling (`Bundle.save_pretrained`), then its files are
    moved in one by one (each an atomic rename), the manifest last: the old ``optimizer/`` folder is replaced,
    the model files are overwritten with the bundle's (same weights), other files (Trainer's ``optimizer.pt``,
    ``trainer_state.json``, ...) are left alone; they are not in the manifest and nothing loads them.
    """
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.bundle-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        bundle.save_pretrained(staging, **save_kwargs)
        manifest = read_manifest(staging)
        (target / MANIFEST_NAME).unlink(missing_ok=True)  # no stale manifest while files change
        if (target / OPTIMIZER_DIR).exists():
            shutil.rmtree(target / OPTIMIZER_DIR)
        for name in [*manifest["files"], CARD_NAME, MANIFEST_NAME]:
            source = staging / name
            if not source.is_file():
                continue
            destination = target / name
            destination.parent.mkdir(parents=True, exist_ok=True)
            os.replace(source, destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


class BundleCallback(TrainerCallback):
    """Make `transformers.Trainer`'s checkpoints, final save and ``push_to_hub`` bundles.

    ``Trainer(model=bundle.model, ..., optimizers=bundle.optimizer(args=args), callbacks=[BundleCallback(bundle)])``:
    every ``save_model`` of the Trainer (each ``checkpoint-N/``, ``trainer.save_model()``, ``trainer.push_to_hub()``)
    also writes the rule, the optimizer's accumulators (``save_state``) and a ``bundle.json`` manifest beside the
    model (or adapter) files, so ``Bundle.from_pretrained`` loads and verifies the folder, and Trainer's
    model card is replaced by optbundle's (the learned rule's name, hash and provenance, plus Trainer's metrics
    as model-index results, ``license``, ``base_model``, datasets). Trainer's own resume keeps working.

    Every training log (``loss``, ``learning_rate``, ...) also gets ``optbundle/skipped`` (tensor-steps skipped for a
    non-finite gradient or update since the last log, warned about once) and ``optbundle/update_rms`` (RMS of the
    parameter update of the logged step), in ``trainer.state.log_history`` and every ``report_to`` integration.

    It hooks the Trainer it is given to at ``on_init_end`` (found on the call stack, as the callback API passes
    no Trainer): ``trainer.save_model``, ``trainer.create_model_card`` and ``trainer.log`` are wrapped on that
    instance only.
    ``card``: extra card fields (``license``, ``datasets``, ``base_model``, ``language``, ``tags``).
    """
    def __init__(
        self,
        bundle: Any,
        *,
        save_state: bool = True,
        state_dtype: torch.dtype = torch.float32,
        max_shard_size: int | str | None = None,
        **card: Any,
    ) -> None:
        self.bundle = bundle
        self.save_kwargs = {"save_state": save_state, "state_dtype": state_dtype, "max_shard_size": max_shard_size}
        self.card = card
        self.trainer: Any = None

    def on_init_end(self, args, state, control, **kwargs):
        trainer = find_trainer()
        if trainer is None:
            warn_once("BundleCallback: no Trainer found on the call stack; call callback.attach(trainer) yourself")
        else:
            self.attach(trainer)
        return control

    def attach(self, trainer: Any) -> None:
        """Wrap ``trainer.save_model`` and ``trainer.create_model_card`` (this instance only)."""
        if self.trainer is trainer:
            return
        self.trainer = trainer
        if trainer.model is not self.bundle.model and innermost_model(trainer.model) is not innermost_model(self.bundle.model):
            raise ValueError("BundleCallback: the Trainer trains another model than the bundle's; pass model=bundle.model")
        original_save = trainer.save_model
        original_card = trainer.create_model_card

        def save_model(output_dir: str | None = None, _internal_call: bool = False) -> None:
            original_save(output_dir, _internal_call=_internal_call)
            if trainer.args.should_save:
                self.save(output_dir or trainer.args.output_dir)

        def create_model_card(**kwargs: Any) -> None:
            if not trainer.is_world_process_zero():
                return
            self.write_card(trainer.args.output_dir, **kwargs)

        original_log = trainer.log

        def log(logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
            if "loss" in logs:
                logs = {**logs, **self.optimizer_logs()}
            original_log(logs, *args, **kwargs)

        create_model_card.__doc__ = original_card.__doc__
        trainer.save_model = save_model
        trainer.create_model_card = create_model_card
        trainer.log = log

    # ---- what the optimizer did, in Trainer's logs ---------------------------------------------------------
    def _learned_optimizer(self) -> Any:
        inner = unwrap_optimizer(self.trainer.optimizer) if self.trainer is not None else None
        return inner if isinstance(inner, LearnedOptimizer) else None

    def _trainable(self) -> list[torch.Tensor]:
        optimizer = self._learned_optimizer()
        return [p for group in optimizer.param_groups for p in group["params"]] if optimizer is not None else []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        # snapshot the parameters before the steps that end in a log, to measure that step's update
        if args.logging_steps and (state.global_step + 1) % max(1, int(args.logging_steps)) == 0:
            self._before = [p.detach().clone() for p in self._trainable()]
        return control

    def on_optimizer_step(self, args, state, control, **kwargs):
        before = getattr(self, "_before", None)
        if before:
            params = self._trainable()
            squares = sum(float(((p.detach().float() - b.float()) ** 2).sum()) for p, b in zip(params, before))
            count = sum(p.numel() for p in params)
            self._update_rms = (squares / max(count, 1)) ** 0.5
        self._before = None
        return control

    def optimizer_logs(self) -> dict[str, float]:
        """``optbundle/update_rms`` (RMS of the last step's parameter update over all trainable parameters) and
        ``optbundle/skipped`` (tensor-steps skipped for a non-finite gradient or update since the last log)."""
        optimizer = self._learned_optimizer()
        if optimizer is None:
            return {}
        skipped = sum(int(optimizer.state[p]["skipped_steps"]) for p in self._trainable() if "skipped_steps" in optimizer.state[p])
        new = skipped - getattr(self, "_skipped_logged", 0)
        self._skipped_logged = skipped
        out = {"optbundle/skipped": float(new)}
        if getattr(self, "_update_rms", None) is not None:
            out["optbundle/update_rms"] = self._update_rms
            self._update_rms = None
        if new:
            warn_once(
                "the learned optimizer skipped %d tensor-step(s) with a non-finite gradient or update (logged as "
                "optbundle/skipped; the parameters and accumulators of those tensors were left unchanged)", new
            )
        return out

    def save(self, directory: str | Path) -> Path:
        """Write the bundle (with the Trainer's optimizer state when ``save_state``) into ``directory``."""
        trainer = self.trainer
        if self.save_kwargs["save_state"] and trainer is not None and trainer.optimizer is not None:
            self.bundle.set_state(trainer.optimizer)
        kwargs = {k: v for k, v in self.save_kwargs.items() if v is not None}
        path = save_bundle_into(self.bundle, directory, **kwargs, card_info=self.card_info())
        logger.info("wrote bundle files into %s", path)
        return path

    def card_info(self, **trainer_card_kwargs: Any) -> dict[str, Any]:
        """What the card says beyond the rule: Trainer's metrics (model-index), license, base model, datasets."""
        info = dict(self.card)
        trainer = self.trainer
        if trainer is None:
            return info
        from transformers.modelcard import TrainingSummary  # heavy: loaded on first use

        try:
            summary = TrainingSummary.from_trainer(trainer, **trainer_card_kwargs)
        except Exception as err:  # Trainer's summary is best-effort; the bundle card does not depend on it
            logger.info("Trainer's training summary unavailable (%s)", err)
            return info
        for key, value in (("license", summary.license), ("base_model", summary.finetuned_from),
                           ("datasets", summary.dataset), ("tasks", summary.tasks),
                           ("model_name", summary.model_name), ("language", summary.language)):
            if value and key not in info:
                info[key] = value
        metrics = dict(summary.eval_results or {})
        if metrics:
            info.setdefault("metrics", metrics)
        info.setdefault("training", {
            "global_step": trainer.state.global_step,
            "learning_rate": trainer.args.learning_rate,
            "lr_scheduler_type": str(getattr(trainer.args.lr_scheduler_type, "value", trainer.args.lr_scheduler_type)),
        })
        return info

    def write_card(self, directory: str | Path, **trainer_card_kwargs: Any) -> Path:
        """Write optbundle's card (with Trainer's metrics) as ``directory/README.md``."""
        path = Path(directory) / CARD_NAME
        path.write_text(model_card(self.bundle, **self.card_info(**trainer_card_kwargs)), encoding="utf-8")
        return path
