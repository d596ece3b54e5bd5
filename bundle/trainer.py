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
from typing import Any

import torch
from torch import nn

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


def find_trainer(max_depth: int = 8) -> Any:
    """The `transformers.Trainer` whose method is on the call stack (the one building our optimizer), or None.

    Trainer calls an ``optimizer_cls_and_kwargs`` factory as ``factory()(model, **kwargs)`` without its
    arguments; looking one or two frames up is the only way to read its ``learning_rate`` there.
    """
    from transformers import Trainer

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
    from transformers import get_scheduler

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
