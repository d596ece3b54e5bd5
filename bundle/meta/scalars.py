"""Scalar refinement: a budgeted, derivative-free search over the few scalars of a rule that matter most on a
new domain, scored by held-out loss after fine-tuning for the user's whole horizon.

    refined = bundle.refine(train_dataset, eval_dataset, adapt="scalars", horizon=60, budget="sweep5")

The question it answers: "I would otherwise sweep AdamW's lr over 5 values on my task; if I spend that compute
refining the bundle's optimizer instead, do I end up better?" So:

- **What adapts**: log-scales of the rule's overall step size (``lr``: both ``recommended_lr`` entries, so
  the regime ratio is kept), of the per-role multipliers (``role_lr.<role>`` for each role the model's
  trainable tensors have, when there are two or more) and of the ``inverse_sqrt`` schedule constant
  (``schedule_steps``); and one discrete choice, ``adam_form`` (1: the roles the rule orthogonalizes step in
  its Adam form instead, `RuleConfig.orthogonal_roles` emptied), offered when the model trains a tensor of such a
  role (full fine-tuning): pretrained by AdamW, a model may fine-tune better with an Adam-form step than with
  an orthogonalized one (`benchmarks/results/refine.md`). φ is not touched. The result is written into the
  refined rule's ``rule_config.json``, so the refined bundle runs with no arguments.
- **Objective**: one candidate = one fine-tuning run of ``horizon`` steps on the training split, from the
  bundle's weights (restored before every run), scored by the mean loss on the whole held-out split at the
  end. Variance control: every candidate sees the same batches (common random numbers), and ``starts`` > 1
  averages over that many batch orders (each one a full run, paid from the budget).
- **Search** (coordinate search with a parabolic step): the parent first; then, when ``adam_form`` is offered,
  the Adam form at three step sizes (``adam_form_lr`` ×``scalar_step``², ×1, ×1/``scalar_step``²: its scale
  differs from the orthogonalized step's); then, from the best so far, per scalar in turn (``lr``
  first), a step of ×``scalar_step``; if worse, ×1/``scalar_step``; an improving direction is extended once;
  with three points on the line and a convex fit, its minimum is tried. The best candidate seen wins (the
  parent when nothing beat it).
- **Significance gate** (``significance`` = z > 0): a candidate replaces the best so far only when its held-out
  loss is lower by more than z standard errors of the paired difference over `HELD_OUT_CHUNKS` chunks of the
  held-out split (the same examples scored after both runs). With a small held-out split most lower losses are
  noise (`benchmarks/results/refine.md`, "selection noise"); the gate keeps the parent unless the split itself
  says the difference is real. ``0``: any lower loss wins (`RefineConfig` default: 1).
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
SCALAR_ORDER = ("lr", *(f"role_lr.{role}" for role in ("head", "adapter", "matrix", "vector", "embedding")), "schedule_steps",
                "adam_form")
#: the discrete scalar (0: the rule's own form, 1: the orthogonalized roles step in the Adam form); the others
#: are log-scales
FORM_SCALAR = "adam_form"
#: default held-out evaluation batch (`refine.evaluate_loss`)
EVAL_BATCH_SIZE = 64
#: chunks of the held-out split the significance gate pairs two candidates over (one example per chunk when the
#: split is smaller)
HELD_OUT_CHUNKS = 16


# ---- the scalars and how they enter a rule --------------------------------------------------------------


def scalar_names(rule: LearnedRule, roles: Iterable[str]) -> list[str]:
    """The scalars worth adapting for a model whose trainable tensors have ``roles``, in search order:
    ``lr``; ``role_lr.<role>`` for each present role when there are two or more (format-2 rules; with one
    role it would repeat ``lr``); ``schedule_steps`` when the rule decays with ``inverse_sqrt``; ``adam_form``
    when a present role is orthogonalized."""
    present = set(roles)
    names = ["lr"]
    if rule.config.format_version >= 2 and len(present) > 1:
        names += [f"role_lr.{role}" for role in ROLES if role in present]
    if rule.config.schedule == "inverse_sqrt":
        names.append("schedule_steps")
    if present & set(rule.config.orthogonal_roles):
        names.append(FORM_SCALAR)
    return sorted(names, key=SCALAR_ORDER.index)


def factor(name: str, value: float) -> float:
    """What a scalar's search value means to a reader: the multiplier ``exp(value)``, or ``adam_form``'s 0/1."""
    return float(value) if name == FORM_SCALAR else math.exp(value)


def describe(factors: Mapping[str, float]) -> str:
    """The chosen scalars in words: ``lr ×0.5, adam_form`` (what moved from the parent), or ``parent (no change)``."""
    moved = [FORM_SCALAR if name == FORM_SCALAR else f"{name} ×{value:.3g}" for name, value in factors.items()
             if (value != 0 if name == FORM_SCALAR else abs(value - 1) > 1e-9)]
    return ", ".join(moved) or "parent (no change)"


def form_alternatives(names: Iterable[str], lr_scale: float | None, step: float) -> list[dict[str, float]]:
    """The Adam-form candidates the search tries after the parent (module docstring): ``adam_form`` = 1 at lr
    ``lr_scale`` ×1, ×``step``², ×1/``step``²; none when ``adam_form`` is not among ``names`` or ``lr_scale`` is None."""
    if FORM_SCALAR not in names or lr_scale is None:
        return []
    spread = 2 * math.log(step)
    return [{FORM_SCALAR: 1.0, "lr": math.log(lr_scale) + shift} for shift in (0.0, spread, -spread)]


def scaled_rule(rule: LearnedRule, log_scales: Mapping[str, float]) -> LearnedRule:
    """A copy of ``rule`` (same φ, provenance copied) with each named scalar multiplied by ``exp(log_scale)``:
    ``lr`` scales every ``recommended_lr`` entry, ``role_lr.<role>`` one role multiplier, ``schedule_steps``
    the schedule constant; ``adam_form`` = 1 empties ``orthogonal_roles`` (0 keeps them)."""
    config = copy.deepcopy(rule.config)
    recommended, role_lr, schedule_steps = dict(config.recommended_lr), dict(config.role_lr), config.schedule_steps
    orthogonal_roles = list(config.orthogonal_roles)
    for name, value in log_scales.items():
        if name == FORM_SCALAR:
            if value not in (0, 1):
                raise ValueError(f"scalars: {FORM_SCALAR} is 0 (the rule's form) or 1 (the Adam form), got {value!r}")
            orthogonal_roles = [] if value else orthogonal_roles
            continue
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
    config = dataclasses.replace(config, recommended_lr=recommended, role_lr=role_lr, schedule_steps=schedule_steps,
                                 orthogonal_roles=orthogonal_roles)
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
                 counter: PassCounter, finetune: Callable[..., dict[str, Any]], chunks: int = 0) -> None:
        self.bundle, self.train, self.held_out = bundle, train, held_out
        self.horizon, self.batch_size, self.seeds = horizon, batch_size, seeds
        self.counter, self.finetune = counter, finetune
        #: > 0: the final held-out evaluation is also returned per chunk (``finetune(..., chunks=...)``)
        self.chunks = chunks
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
        """Held-out loss (mean over ``seeds``; ``inf`` if a run diverged), the training losses of the first seed
        and, with ``chunks``, the held-out loss per chunk (mean over ``seeds``; None if a run diverged)."""
        self.counter.charge(self.candidate_passes, what)
        b = self.bundle
        candidate = Bundle(self.model, rule, state=b.state, roles=b.roles, regime=b.regime)
        finals, train_losses, per_chunk = [], None, []
        extra = {"chunks": self.chunks} if self.chunks else {}
        try:
            for seed in self.seeds:
                self._restore()
                result = self.finetune(self.model, lambda _named: candidate.build_optimizer(self.model), self.train,
                                       self.held_out, self.horizon, seed=seed, batch_size=self.batch_size,
                                       eval_every=self.horizon + 1, eval_start=False, **extra)
                finals.append(result["final"] if not result["diverged"] else math.inf)
                train_losses = train_losses or result["train_losses"]
                if self.chunks:
                    per_chunk.append(None if result["diverged"] else result["final_chunks"])
        finally:
            self._restore()
        loss = sum(finals) / len(finals)
        chunks = None
        if per_chunk and all(c is not None for c in per_chunk):
            chunks = [sum(values) / len(values) for values in zip(*per_chunk)]
        return {"held_out_loss": loss if math.isfinite(loss) else math.inf, "train_losses": train_losses,
                "held_out_chunks": chunks}


# ---- the search -----------------------------------------------------------------------------------------


def paired_z(best_chunks: list[float] | None, chunks: list[float] | None) -> float:
    """How many standard errors lower ``chunks`` is than ``best_chunks`` on average (paired over the held-out
    chunks): mean(best − candidate) / (SD / √k). ``-inf`` when the candidate has no chunk losses (diverged),
    ``+inf`` when the best has none, or when every chunk moved by the same positive amount."""
    if chunks is None:
        return -math.inf
    if best_chunks is None:
        return math.inf
    diffs = [b - c for b, c in zip(best_chunks, chunks, strict=True)]
    k = len(diffs)
    mean = sum(diffs) / k
    var = sum((d - mean) ** 2 for d in diffs) / max(k - 1, 1)
    if var <= 0.0:
        return math.inf if mean > 0 else (-math.inf if mean < 0 else 0.0)
    return mean / math.sqrt(var / k)


def coordinate_search(
    evaluate: Callable[[dict[str, float], str], Any], names: list[str], affordable: Callable[[], bool],
    step: float, significance: float = 0.0, alternatives: Iterable[Mapping[str, float]] = (),
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Minimize ``evaluate(log_scales, label)`` from all-zero log-scales while ``affordable()`` (see the module
    docstring). ``evaluate`` returns the held-out loss, or ``(loss, per-chunk losses)`` for the significance
    gate (``significance`` > 0: a lower loss replaces the best only if `paired_z` > ``significance``). Returns
    the best log-scales and the history of every evaluation (``z``: the paired z against the best of its time).
    ``alternatives``: whole candidates (e.g. `form_alternatives`) tried after the parent, before the coordinate
    steps; ``adam_form`` is never a coordinate."""
    h = math.log(step)

    def scored(value: Any) -> tuple[float, list[float] | None]:
        return (float(value[0]), value[1]) if isinstance(value, tuple) else (float(value), None)

    best = {name: 0.0 for name in names}
    best_loss, best_chunks = scored(evaluate(dict(best), "parent"))
    history = [{"log_scales": dict(best), "held_out_loss": best_loss}]

    def label(x: Mapping[str, float], keys: Iterable[str]) -> str:
        return " ".join(FORM_SCALAR if k == FORM_SCALAR else f"{k}×{math.exp(x[k]):.3g}" for k in keys)

    def trial(name: str, value: float, whole: Mapping[str, float] | None = None) -> float | None:
        nonlocal best, best_loss, best_chunks
        if not affordable():
            return None
        x = {**best, **whole} if whole is not None else {**best, name: value}
        # every scalar that differs from the parent, by its absolute factor (e.g. "lr×0.25 adam_form")
        loss, chunks = scored(evaluate(x, label(x, [k for k in SCALAR_ORDER if x.get(k)] or [name])))
        entry = {"log_scales": dict(x), "held_out_loss": loss}
        accept = loss < best_loss
        if significance > 0:
            entry["z"] = paired_z(best_chunks, chunks)
            accept = accept and entry["z"] > significance
        history.append(entry)
        if accept:
            best, best_loss, best_chunks = x, loss, chunks
        return loss

    for alternative in alternatives:
        if trial(FORM_SCALAR, 1.0, {**{k: 0.0 for k in names}, **alternative}) is None:
            return best, history
    for name in names:
        if name == FORM_SCALAR:
            continue
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
