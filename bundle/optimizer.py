"""`LearnedOptimizer`: a real `torch.optim.Optimizer` that applies a `LearnedRule` to parameters.

One state layout for every back end (this torch path, the Triton kernels): per parameter, fp32
accumulators as described in `features.py`, an int64 ``step`` and an int64 ``skipped_steps`` counter.
State is created lazily at the first step, so FSDP-style parameter swapping after construction is fine.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from . import features as F
from .format import StateMismatchError
from .rule import LearnedRule

logger = logging.getLogger(__name__)

DEFAULT_RULE_NAME = "default"


class LearnedOptimizer(torch.optim.Optimizer):
    """Apply a learned rule to ``params``.

    Args:
        params: parameters, ``(name, parameter)`` pairs, or param-group dicts (as for any torch optimizer).
            A group may name its rule with ``"rule": NAME`` when several rules are given.
        rule: a `LearnedRule`, or a mapping ``{name: LearnedRule}`` for layer-wise rules.
        lr: multiplier on the rule's step (``1.0`` = the rule as meta-trained). LR schedulers scale it.
        weight_decay: decoupled weight decay with AdamW's meaning at learning rate ``rule.config.step_mult``:
            ``p ← p · (1 − lr · step_mult · weight_decay)``.

    A tensor whose gradient (or whose proposed update) is not finite is left untouched for that step, and its
    ``skipped_steps`` counter grows; no NaN/inf reaches parameters or accumulators.
    """

    def __init__(
        self,
        params: Iterable[Any],
        rule: LearnedRule | Mapping[str, LearnedRule],
        lr: float = 1.0,
        weight_decay: float = 0.0,
    ) -> None:
        if isinstance(rule, LearnedRule):
            rules = {DEFAULT_RULE_NAME: rule}
        elif isinstance(rule, Mapping) and rule and all(isinstance(r, LearnedRule) for r in rule.values()):
            rules = dict(rule)
        else:
            raise TypeError(f"rule must be a LearnedRule or a non-empty mapping name -> LearnedRule, got {type(rule).__name__}")
        if not (isinstance(lr, (int, float)) and lr >= 0):
            raise ValueError(f"lr must be a non-negative number, got {lr!r}")
        if not (isinstance(weight_decay, (int, float)) and weight_decay >= 0):
            raise ValueError(f"weight_decay must be a non-negative number, got {weight_decay!r}")
        default_rule = DEFAULT_RULE_NAME if DEFAULT_RULE_NAME in rules else next(iter(rules))
        self.rules: dict[str, LearnedRule] = {name: r.requires_grad_(False) for name, r in rules.items()}
        super().__init__(params, dict(lr=float(lr), weight_decay=float(weight_decay), rule=default_rule))
        for group in self.param_groups:
            if group["rule"] not in self.rules:
                raise ValueError(f"param group asks for rule {group['rule']!r}; known rules: {sorted(self.rules)}")

    # ---- the step -----------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One learned step for every parameter with a gradient. ``closure`` (optional) re-evaluates the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            rule = self.rules[group["rule"]]
            weights = [(w.detach(), b.detach()) for w, b in rule.weights]
            for param in group["params"]:
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise RuntimeError("LearnedOptimizer does not support sparse gradients")
                self._step_param(param, rule, weights, group["lr"], group["weight_decay"])
        return loss

    def _step_param(self, param: torch.Tensor, rule: LearnedRule, weights, lr: float, weight_decay: float) -> None:
        config = rule.config
        state = self.state[param]
        if not state:
            state.update(F.init_state(config, param.shape, device=param.device))
            state["skipped_steps"] = torch.zeros((), dtype=torch.int64, device=param.device)
        weights = [(w.to(param.device), b.to(param.device)) for w, b in weights]
        grad = param.grad.to(torch.float32)
        if not torch.isfinite(grad).all():
            state["skipped_steps"] += 1
            return
        accumulators = {k: v for k, v in state.items() if k != "skipped_steps"}
        new_param, new_state = F.learned_update(
            config, weights, param.to(torch.float32), grad, accumulators, lr=lr, weight_decay=weight_decay
        )
        if not torch.isfinite(new_param).all():
            state["skipped_steps"] += 1
            logger.warning("learned step proposed a non-finite update for a tensor of shape %s; skipped", tuple(param.shape))
            return
        for key, value in new_state.items():
            state[key].copy_(value)
        param.copy_(new_param)

    # ---- state (de)serialization ---------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Like torch's, but keeps accumulators fp32 and counters int64 whatever the parameter dtype.

        ``torch.optim.Optimizer.load_state_dict`` casts floating per-parameter state to the parameter's dtype,
        which would round fp32 accumulators of bf16/fp16 parameters (and even cast integer counters).
        """
        saved_state = state_dict["state"]
        saved_ids = [pid for group in state_dict["param_groups"] for pid in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        if len(saved_ids) != len(params):
            raise StateMismatchError(
                f"optimizer state holds {len(saved_ids)} parameters, this optimizer has {len(params)}"
            )
        super().load_state_dict(state_dict)
        for pid, param in zip(saved_ids, params):
            if pid in saved_state:
                self.state[param] = {
                    key: value.detach().clone().to(device=param.device) if isinstance(value, torch.Tensor) else value
                    for key, value in saved_state[pid].items()
                }

    def parameter_names(self) -> dict[torch.Tensor, str]:
        """Map parameter → name from ``param_names`` stored by torch when named parameters were given."""
        names = {}
        for group in self.param_groups:
            for param, name in zip(group["params"], group.get("param_names", [])):
                names[param] = name
        return names

    def named_state(self, names: Mapping[torch.Tensor, str] | None = None) -> dict[str, dict[str, torch.Tensor]]:
        """Accumulators keyed by parameter name (for bundles). ``names`` defaults to `parameter_names`."""
        names = dict(names) if names is not None else self.parameter_names()
        out: dict[str, dict[str, torch.Tensor]] = {}
        for group in self.param_groups:
            for param in group["params"]:
                state = self.state.get(param)
                if not state:
                    continue
                if param not in names:
                    raise StateMismatchError(
                        "a parameter with optimizer state has no name; build the optimizer from named_parameters() "
                        "or pass names"
                    )
                out[names[param]] = {k: v.detach().clone() for k, v in state.items()}
        return out

    def load_named_state(
        self, named_state: Mapping[str, Mapping[str, torch.Tensor]], names: Mapping[torch.Tensor, str] | None = None
    ) -> list[str]:
        """Restore accumulators by parameter name; parameters without saved state start fresh.

        Returns the names that received state. A saved shape or layout that does not fit the parameter is a
        `StateMismatchError` naming it.
        """
        names = dict(names) if names is not None else self.parameter_names()
        restored = []
        for group in self.param_groups:
            config = self.rules[group["rule"]].config
            for param in group["params"]:
                name = names.get(param)
                if name is None or name not in named_state:
                    continue
                saved = named_state[name]
                expected = F.init_state(config, param.shape, device="meta")
                expected["skipped_steps"] = torch.zeros((), dtype=torch.int64, device="meta")
                if set(saved) != set(expected):
                    raise StateMismatchError(
                        f"optimizer state for parameter {name!r} has keys {sorted(saved)}, the rule expects {sorted(expected)}"
                    )
                for key, ref in expected.items():
                    if tuple(saved[key].shape) != tuple(ref.shape):
                        raise StateMismatchError(
                            f"optimizer state {key!r} for parameter {name!r} has shape {list(saved[key].shape)}, "
                            f"expected {list(ref.shape)} (parameter shape {list(param.shape)})"
                        )
                self.state[param] = {
                    key: saved[key].detach().to(device=param.device, dtype=ref.dtype).clone()
                    for key, ref in expected.items()
                }
                restored.append(name)
        return restored


def constant_schedule(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    """A scheduler that keeps every group's ``lr`` multiplier as it is (Trainer's default would decay it to 0)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _constant_one)


def _constant_one(_: int) -> float:
    return 1.0
