"""Deterministic, vectorized evaluation of a rule (no perturbation) on tasks: loss curves over seeds.

Used to compare starting points and meta-training checkpoints in-distribution. Adam at learning rate ``lr``
is the ``adam_residual`` rule with a zero network and ``step_mult = lr`` (`adam_rule`), so baselines run
through exactly the same vectorized path. Held-out judgement lives in ``benchmarks/heldout.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..step import reference
from ..step.rule import RuleConfig
from ..store.rule import LearnedRule
from . import tasks as T
from . import unroll as U


def adam_rule(lr: float) -> LearnedRule:
    """A rule whose step is exactly Adam's (β1 0.9, β2 0.999, ε 1e-8) at learning rate ``lr``."""
    config = RuleConfig(features=["adam_direction"], hidden_sizes=[], output="adam_residual", step_mult=lr)
    rule = LearnedRule(config)
    with torch.no_grad():
        for p in rule.parameters():
            p.zero_()
    return rule


def loss_curves(
    rule: LearnedRule, task: T.Task | Mapping[str, Any], steps: int, seeds: int = 3, seed: int = 0
) -> torch.Tensor:
    """Training-batch loss at every step for ``seeds`` independent runs: ``(seeds, steps)``.

    Seed ``i`` fixes init and batches, identically for every rule evaluated with the same ``seed``.
    """
    task = T.build_task(task) if isinstance(task, Mapping) else task
    generator = torch.Generator().manual_seed(seed)
    params = task.init_params(generator, seeds)
    config = rule.config
    weights = [(w.detach(), b.detach()) for w, b in rule.weights]
    accumulators = {k: _init(config, v) for k, v in params.items()}
    curve = []
    for _ in range(steps):
        batch = task.sample_batch(generator, seeds)
        losses, params, accumulators = U.inner_step(config, weights, task, params, accumulators, batch)
        curve.append(losses)
    return torch.stack(curve, dim=1)


def _init(config: RuleConfig, value: torch.Tensor) -> dict[str, torch.Tensor]:
    return reference.init_state(config, value.shape[1:], batch_shape=value.shape[:1])
