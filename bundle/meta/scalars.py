"""Scalar refinement: a budgeted, derivative-free search over the few scalars of a rule that matter most on a
new domain, scored by held-out loss after fine-tuning for the user's whole horizon.

    refined = bundle.refine(train_dataset, eval_dataset, adapt="scalars", horizon=60, budget="sweep5")

The question it answers: "I would otherwise sweep AdamW's lr over 5 values on my task; if I spend that compute
refining the bundle's optimizer instead, do I end up better?" So:

- **What adapts**: log-scales of the rule's overall step size (``lr``: both ``recommended_lr`` entries, so
  the regime ratio is kept), of the per-role multipliers (``role_lr.<role>`` for each role the model's
  trainable tensors have, when there are two or more) and of the ``inverse_sqrt`` schedule constant
  (``schedule_steps``). φ is not touched. The result is written into the refined rule's
  ``rule_config.json``, so the refined bundle runs with no arguments.
- **Objective**: one candidate = one fine-tuning run of ``horizon`` steps on the training split, from the
  bundle's weights (restored before every run), scored by the mean loss on the whole held-out split at the
  end. Variance control: every candidate sees the same batches (common random numbers), and ``starts`` > 1
  averages over that many batch orders (each one a full run, paid from the budget).
- **Search** (coordinate search with a parabolic step): the parent first; then, per scalar in turn (``lr``
  first), a step of ×``scalar_step``; if worse, ×1/``scalar_step``; an improving direction is extended once;
  with three points on the line and a convex fit, its minimum is tried. The best candidate seen wins (the
  parent when nothing beat it).
- **Budget** (`resolve_budget`): ``"sweep5"`` = the forward-backward passes of a 5-point lr sweep of the same
  horizon (5 × (``horizon`` training steps + one held-out evaluation)); ``"sweepK"`` likewise; an int is a
  number of passes. A held-out evaluation batch counts as one pass (forward only, so this over-counts). The
  search never starts a run that would exceed the budget; `PassCounter` records what was spent.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..step.rule import ROLES
from ..store.bundle import Bundle
from ..store.rule import LearnedRule

#: the order in which the coordinate search visits the scalars (the step size first: it matters most)
SCALAR_ORDER = ("lr", *(f"role_lr.{role}" for role in ("head", "adapter", "matrix", "vector", "embedding")), "schedule_steps")
#: default held-out evaluation batch (`refine.evaluate_loss`)
EVAL_BATCH_SIZE = 64


# ---- the scalars and how they enter a rule --------------------------------------------------------------


def scalar_names(rule: LearnedRule, roles: Iterable[str]) -> list[str]:
    """The scalars worth adapting for a model whose trainable tensors have ``roles``, in search order:
    ``lr``; ``role_lr.<role>`` for each present role when there are two or more (format-2 rules; with one
    role it would repeat ``lr``); ``schedule_steps`` when the rule decays with ``inverse_sqrt``."""
    present = set(roles)
    names = ["lr"]
    if rule.config.format_version >= 2 and len(present) > 1:
        names += [f"role_lr.{role}" for role in ROLES if role in present]
    if rule.config.schedule == "inverse_sqrt":
        names.append("schedule_steps")
    return sorted(names, key=SCALAR_ORDER.index)


def scaled_rule(rule: LearnedRule, log_scales: Mapping[str, float]) -> LearnedRule:
    """A copy of ``rule`` (same φ, provenance copied) with each named scalar multiplied by ``exp(log_scale)``:
    ``lr`` scales every ``recommended_lr`` entry, ``role_lr.<role>`` one role multiplier, ``schedule_steps``
    the schedule constant."""
    config = copy.deepcopy(rule.config)
    recommended, role_lr, schedule_steps = dict(config.recommended_lr), dict(config.role_lr), config.schedule_steps
    for name, value in log_scales.items():
        factor = math.exp(float(value))
        if name == "lr":
            recommended = {k: v * factor for k, v in recommended.items()}
        elif name.startswith("role_lr.") and name.removeprefix("role_lr.") in ROLES:
            role_lr[name.removeprefix("role_lr.")] *= factor
        elif name == "schedule_steps":
            schedule_steps *= factor
        else:
            known = ", ".join(SCALAR_ORDER)
            raise ValueError(f"scalars: unknown refinement scalar {name!r}; known: {known}")
    config = dataclasses.replace(config, recommended_lr=recommended, role_lr=role_lr, schedule_steps=schedule_steps)
    scaled = LearnedRule(config)
    scaled.load_state_dict(rule.state_dict())
    scaled.provenance = copy.deepcopy(rule.provenance)
    return scaled


# ---- the budget -----------------------------------------------------------------------------------------


def eval_passes(held_out_examples: int, eval_batch_size: int = EVAL_BATCH_SIZE) -> int:
    """Passes one held-out evaluation costs (one per batch)."""
    return max(1, math.ceil(held_out_examples / eval_batch_size))


def resolve_budget(budget: Any, horizon: int, held_out_examples: int) -> tuple[int, str]:
    """``(passes, description)`` of a budget: ``"sweepK"`` (K runs of ``horizon`` steps + one held-out
    evaluation each: what a K-point lr sweep costs), an int (forward-backward passes) or a digit string."""
    per_run = horizon + eval_passes(held_out_examples)
    if isinstance(budget, str) and re.fullmatch(r"\s*\d+\s*", budget):
        budget = int(budget)
    if isinstance(budget, bool) or budget is None:
        raise ValueError(f"budget must be 'sweepK' (e.g. 'sweep5') or a positive number of passes, got {budget!r}")
    if isinstance(budget, int):
        if budget < 1:
            raise ValueError(f"budget must be a positive number of forward-backward passes, got {budget}")
        return budget, f"{budget} passes"
    if isinstance(budget, str):
        match = re.fullmatch(r"\s*sweep(\d+)\s*", budget)
        if match and int(match.group(1)) >= 1:
            runs = int(match.group(1))
            return runs * per_run, f"{budget.strip()}: {runs} runs × ({horizon} steps + {per_run - horizon} held-out eval passes)"
    raise ValueError(f"budget must be 'sweepK' (K ≥ 1, e.g. 'sweep5') or a positive number of passes, got {budget!r}")


@dataclass
class PassCounter:
    """Forward-backward passes spent against ``budget`` (training steps and held-out evaluation batches)."""

    budget: int
    spent: int = 0
    log: list[dict[str, Any]] = field(default_factory=list)

    def affords(self, passes: int) -> bool:
        return self.spent + passes <= self.budget

    def charge(self, passes: int, what: str) -> None:
        if not self.affords(passes):
            raise RuntimeError(f"budget: {what} needs {passes} passes, {self.budget - self.spent} left of {self.budget}")
        self.spent += passes
        self.log.append({"what": what, "passes": passes, "spent": self.spent})


# ---- one candidate = one full-horizon run ---------------------------------------------------------------


class CandidateRunner:
    """Fine-tunes ``bundle.model`` from its current weights with a candidate rule for ``horizon`` steps and
    returns the held-out loss; the trainable weights are put back after every run."""

    def __init__(self, bundle: Any, train: Any, held_out: Any, horizon: int, batch_size: int, seeds: list[int],
                 counter: PassCounter, finetune: Callable[..., dict[str, Any]]) -> None:
        self.bundle, self.train, self.held_out = bundle, train, held_out
        self.horizon, self.batch_size, self.seeds = horizon, batch_size, seeds
        self.counter, self.finetune = counter, finetune
        self.model: nn.Module = bundle.model
        self.initial = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}
        self.run_passes = horizon + eval_passes(len(held_out))

    @property
    def candidate_passes(self) -> int:
        return self.run_passes * len(self.seeds)

    def _restore(self) -> None:
        with torch.no_grad():
            for name, param in self.model.named_parameters():
                if name in self.initial:
                    param.copy_(self.initial[name])
                    param.grad = None

    def __call__(self, rule: LearnedRule, what: str) -> dict[str, Any]:
        """Held-out loss (mean over ``seeds``; ``inf`` if a run diverged) and the training losses of the first seed."""
        self.counter.charge(self.candidate_passes, what)
        b = self.bundle
        candidate = Bundle(self.model, rule, state=b.state, roles=b.roles, regime=b.regime)
        finals, train_losses = [], None
        try:
            for seed in self.seeds:
                self._restore()
                result = self.finetune(self.model, lambda _named: candidate.build_optimizer(self.model), self.train,
                                       self.held_out, self.horizon, seed=seed, batch_size=self.batch_size,
                                       eval_every=self.horizon + 1, eval_start=False)
                finals.append(result["final"] if not result["diverged"] else math.inf)
                train_losses = train_losses or result["train_losses"]
        finally:
            self._restore()
        loss = sum(finals) / len(finals)
        return {"held_out_loss": loss if math.isfinite(loss) else math.inf, "train_losses": train_losses}


# ---- the search -----------------------------------------------------------------------------------------


def coordinate_search(
    evaluate: Callable[[dict[str, float], str], float], names: list[str], affordable: Callable[[], bool],
    step: float,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Minimize ``evaluate(log_scales, label)`` from all-zero log-scales while ``affordable()`` (see the module
    docstring). Returns the best log-scales and the history of every evaluation."""
    h = math.log(step)
    best = {name: 0.0 for name in names}
    history = [{"log_scales": dict(best), "held_out_loss": evaluate(dict(best), "parent")}]
    best_loss = history[0]["held_out_loss"]

    def trial(name: str, value: float) -> float | None:
        nonlocal best, best_loss
        if not affordable():
            return None
        x = {**best, name: value}
        loss = evaluate(x, f"{name}×{math.exp(value):.3g}")
        history.append({"log_scales": dict(x), "held_out_loss": loss})
        if loss < best_loss:
            best, best_loss = x, loss
        return loss

    for name in names:
        center = best[name]
        points = {center: best_loss}
        up = trial(name, center + h)
        if up is None:
            break
        points[center + h] = up
        direction = 1.0
        if best[name] == center:  # the step up did not help: try down
            down = trial(name, center - h)
            if down is None:
                break
            points[center - h] = down
            direction = -1.0
        if best[name] == center + direction * h:  # the step helped: go on once in that direction
            further = trial(name, center + 2 * direction * h)
            if further is None:
                break
            points[center + 2 * direction * h] = further
        vertex = _parabola_vertex(points, best[name], h)
        if vertex is not None and trial(name, vertex) is None:
            break
    return best, history


def _parabola_vertex(points: Mapping[float, float], at: float, h: float) -> float | None:
    """The minimum of the parabola through the best point ``at`` and its two nearest neighbours on the line,
    when it is convex and the minimum is new (≥ h/4 from every tried point) and within ``h`` of them; else None."""
    finite = {t: f for t, f in points.items() if math.isfinite(f)}
    if len(finite) < 3 or at not in finite:
        return None
    others = sorted((t for t in finite if t != at), key=lambda t: abs(t - at))[:2]
    (t0, f0), (t1, f1), (t2, f2) = sorted([(at, finite[at]), *((t, finite[t]) for t in others)])
    denom = (t0 - t1) * (t0 - t2) * (t1 - t2)
    a = (t2 * (f1 - f0) + t1 * (f0 - f2) + t0 * (f2 - f1)) / denom
    b = (t2 * t2 * (f0 - f1) + t1 * t1 * (f2 - f0) + t0 * t0 * (f1 - f2)) / denom
    if a <= 0:
        return None
    vertex = min(max(-b / (2 * a), t0 - h), t2 + h)
    if any(abs(vertex - t) < h / 4 for t in points):
        return None
    return vertex
