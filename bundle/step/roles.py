"""Parameter roles: which part of a model a tensor is, read from its name and shape.

A format-2 rule treats tensors by role (`RuleConfig.orthogonal_roles`, ``role_lr``, width multipliers):

- ``matrix``: hidden weight matrices (rank ≥ 2; conv kernels are viewed as ``out × in·k·k``);
- ``vector``: biases, norm scales, anything of rank < 2;
- ``embedding``: token/position embeddings (names with ``embed``, ``wte``, ``wpe``, ``position``);
- ``head``: the output layer (names with ``lm_head``, ``classifier``, ``head``, ``score``; when no name says
  so and the model has no embedding, the last rank ≥ 2 tensor in registration order, as in a plain MLP);
- ``adapter``: LoRA matrices (names with ``lora_``).

Tensors follow torch's layout: dim 0 is ``fan_out``, the rest is ``fan_in`` (``nn.Linear``, ``nn.Conv*``).
Roles are assigned once, when the optimizer is built, stored in its param groups (``"roles"``), and can be
overridden there. Rules of format 1 ignore them.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from .rule import ROLES, RuleConfig

_EMBEDDING = re.compile(r"(^|[._])(embed\w*|wte|wpe|position\w*|tok_embeddings|word_embeddings)([._]|$)")
_HEAD = re.compile(r"(^|[._])(lm_head|classifier|head|score|output_projection)([._]|$)")
_ADAPTER = re.compile(r"(^|[._])lora_")


def fan_in(shape: Sequence[int]) -> int:
    """Inputs per output unit: ``prod(shape[1:])`` for rank ≥ 2 (torch layout), else 1."""
    return math.prod(shape[1:]) if len(shape) >= 2 else 1


def assign_roles(named_shapes: Sequence[tuple[str | None, Sequence[int]]]) -> list[str]:
    """One role per ``(name, shape)`` in order (see the module docstring). Unnamed tensors: by rank only."""
    roles: list[str] = []
    for name, shape in named_shapes:
        name = (name or "").lower()
        if _ADAPTER.search(name):
            roles.append("adapter")
        elif len(shape) < 2:
            roles.append("vector")
        elif _EMBEDDING.search(name):
            roles.append("embedding")
        elif _HEAD.search(name):
            roles.append("head")
        else:
            roles.append("matrix")
    named = any(name for name, _ in named_shapes)
    if named and "head" not in roles and "embedding" not in roles and "adapter" not in roles:
        matrices = [i for i, role in enumerate(roles) if role == "matrix"]
        if len(matrices) >= 2:  # a plain stack of layers: the last one is the readout
            roles[matrices[-1]] = "head"
    return roles


def check_roles(roles: Sequence[str], count: int, where: str) -> None:
    """Raise ``ValueError`` unless ``roles`` is ``count`` known role names."""
    if not isinstance(roles, (list, tuple)) or len(roles) != count:
        raise ValueError(f"{where}: 'roles' must list one role per parameter ({count}), got {roles!r}")
    for role in roles:
        if role not in ROLES:
            raise ValueError(f"{where}: unknown role {role!r}; known roles: {', '.join(ROLES)}")


def is_orthogonalized(config: RuleConfig, role: str | None, shape: Sequence[int]) -> bool:
    """Whether the rule's step for this tensor goes through Newton–Schulz."""
    return role in config.orthogonal_roles and len(shape) >= 2 and min(shape[0], fan_in(shape)) > 1


def step_multiplier(config: RuleConfig, role: str | None, shape: Sequence[int]) -> float:
    """``role_lr[role]`` × the width multiplier of `RuleConfig.width_scaling` (1 for format-1 rules)."""
    if role is None:
        return 1.0
    multiplier = float(config.role_lr[role])
    if config.width_scaling == "mup":
        if is_orthogonalized(config, role, shape):
            multiplier *= min(1.0, math.sqrt(config.base_fan_in / fan_in(shape)))
        elif role == "head" and len(shape) >= 2:
            multiplier *= min(1.0, config.base_fan_in / fan_in(shape))
    return multiplier


def trained_matrices(roles: Sequence[str | None]) -> int:
    """How many role-"matrix" tensors are among ``roles`` (the count `regime_lr_factor`'s depth scaling reads)."""
    return sum(role == "matrix" for role in roles)


def regime_lr_factor(config: RuleConfig, role: str | None, regime: str, matrices: int = 0) -> float:
    """The factor on ``lr`` for a tensor of ``role`` in ``regime``, when the optimizer trains ``matrices``
    role-"matrix" tensors (`trained_matrices`).

    In the "finetune" regime: with ``finetune_head_lr: scratch``, a head (a new layer on a pretrained body) trains
    at the scratch lr, i.e. ``lr · recommended_lr.scratch / recommended_lr.finetune``; with
    ``finetune_depth_matrices`` B > 0, every pretrained tensor (not an adapter, not such a head) trains at
    ``lr · min(1, B / matrices) ^ finetune_depth_exponent``. 1 otherwise (and always from scratch).
    """
    if regime != "finetune" or role is None:
        return 1.0
    if role == "head" and config.finetune_head_lr == "scratch":
        return float(config.recommended_lr["scratch"]) / float(config.recommended_lr["finetune"])
    base = config.finetune_depth_matrices
    if base and role != "adapter" and matrices > base:
        return (base / matrices) ** float(config.finetune_depth_exponent)
    return 1.0
