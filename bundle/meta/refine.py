"""Meta-refinement: continue meta-training a bundle's rule on fine-tuning episodes of its own model and data.

    refined = bundle.refine(train_dataset, eval_dataset, lr=0.025, meta_steps=40, trainable="last_layer")
    refined.save_pretrained("my-refined-bundle")

or ``optbundle refine recipes/refine-minilm-vader.yaml``. The engine is `optbundle.meta` unchanged: the task
is a `TransformersTask` (a `meta.tasks.ModuleTask` over the bundle's model), so the unrolls are the same
vectorized ``torch.func.functional_call`` + ``vmap`` copies, the estimator is the same antithetic PES (or ES /
TBPTT), the same mask, checkpoints and resume. What refinement adds:

- episodes start from the bundle's weights (and its shipped accumulators, when it has them); batches are
  drawn from the user's data (each instance its own order); with ``restart_prob`` a new episode continues
  from where the last one ended, so episodes also start at random points along a fine-tuning trajectory;
- the meta-objective is the loss on held-out data (``eval_dataset``, or a ``meta_fraction`` split of the
  training data) after every inner step, normalized by its value at the episode's start and clipped;
- the user's learning-rate multiplier is folded into the rule (``step_mult × lr``), so the refined rule runs
  at ``lr=1`` and its step size is part of what refinement can change;
- ``trainable`` masks φ ("last_layer" by default; "output_scale" adapts only the step magnitude, for tiny
  datasets); cost control for big models: LoRA (only parameters with ``requires_grad`` are unrolled), short
  truncations, few antithetic pairs;
- a before/after measurement (`finetune_curve`: the same batches, steps and seed, parent rule vs refined
  rule, held-out loss), a PNG of the meta-loss and of both curves, and provenance that links to the parent.

The model runs in eval mode during refinement (dropout off: ± copies must see the same function).

``adapt="scalars"`` replaces the PES loop by the budgeted search of `optbundle.meta.scalars` (step size,
per-role multipliers, schedule constant; full-horizon runs scored on held-out data; ``budget="sweep5"``):
`refine_scalars`.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..recipes import parse_config
from ..step import reference
from . import tasks as T
from ..step.optimizer import LearnedOptimizer
from ..store.bundle import Bundle, detect_regime
from ..store.rule import LearnedRule
from . import scalars
from .trainer import ESTIMATORS, EstimatorConfig, MetaTrainConfig, MetaTrainer

logger = logging.getLogger(__name__)

#: what `RefineConfig.adapt` may name
ADAPT_CHOICES = ("phi", "scalars")
#: the before/after plot of scalar refinement, in out_dir and attached to the refined bundle (its card shows it)
REFINEMENT_PLOT = "refinement.png"


@dataclass
class RefineConfig(EstimatorConfig):
    """Settings of one refinement run (every field is a keyword of `Bundle.refine` and a recipe key; the
    estimator's fields come from `EstimatorConfig`, shared with `MetaTrainConfig`)."""

    #: lr multiplier the rule is refined (and shipped) at; folded into the refined rule's step_mult
    lr: float = 1.0
    meta_steps: int = 40
    #: inner steps per truncation (short: cost control for big models)
    truncation: int = 8
    #: fine-tuning episode length range [lo, hi] (log-uniform)
    episode_length: list[int] = field(default_factory=lambda: [16, 64])
    #: antithetic pairs per group (each pair = 2 model copies unrolled together)
    pairs: int = 2
    task_groups: int = 1
    outer_lr: float = 3e-3
    #: part of φ that adapts: all | last_layer | first_layer | output_scale
    trainable: str = "last_layer"
    #: probability that an episode continues from where the previous one ended
    restart_prob: float = 0.5
    batch_size: int = 16
    meta_batch_size: int = 32
    #: held-out fraction of the training data for the meta-objective when no eval_dataset is given
    meta_fraction: float = 0.25
    #: longest sequence kept (tokens); longer examples are truncated
    max_tokens: int = 128
    seed: int = 0
    #: steps of the before/after fine-tuning comparison (0: skip it)
    compare_steps: int = 40
    out_dir: str = "outputs/refine"
    checkpoint_every: int = 5
    max_wall_time_s: float | None = None
    threads: int | None = None
    progress: bool = True
    name: str = "refine"
    #: what refinement adapts: "phi" (PES on the masked part of φ, `trainable`) or "scalars" (a budgeted
    #: search over the rule's step-size, per-role and schedule scalars on full-horizon runs, `meta.scalars`)
    adapt: str = "phi"
    #: compute budget: "sweepK" (what a K-point lr sweep of `horizon` steps costs, e.g. "sweep5") or a number
    #: of forward-backward passes; None: "sweep5" for adapt=scalars, no cap for adapt=phi (its meta_steps)
    budget: str | None = None
    #: fine-tuning steps the user trains for: the length of every scalar-refinement run (None: compare_steps)
    horizon: int | None = None
    #: factor of one step of the scalar search (log-spaced: ×step and ×1/step)
    scalar_step: float = 2.0
    #: batch orders each scalar candidate is averaged over (each a full run, paid from the budget)
    starts: int = 1
    #: the scalars to adapt (None: all that apply, `meta.scalars.scalar_names`)
    scalars: list[str] | None = None
    #: significance gate of the scalar search: a candidate replaces the best only when its held-out loss is lower
    #: by more than this many standard errors (paired over held-out chunks); 0: any lower loss wins. 1: on the
    #: four benchmark domains its refined rule was as good or better on the mean than without it (refine.md)
    significance: float = 1.0
    #: lr multiplier around which the search tries the Adam form of the orthogonalized roles (×scalar_step², ×1,
    #: ×1/scalar_step²) when the model trains such a tensor (`meta.scalars`); None: never. 1/8: on the dev
    #: domain (MiniLM full fine-tuning, NYT, 20 steps) the Adam form was best at ×1/16 – ×1/8 (refine.md)
    adam_form_lr: float | None = 0.125

    def __post_init__(self) -> None:
        problems = []
        if self.adapt not in ADAPT_CHOICES:
            problems.append(f"adapt must be one of {', '.join(ADAPT_CHOICES)}, got {self.adapt!r}")
        if self.horizon is not None and not (isinstance(self.horizon, int) and not isinstance(self.horizon, bool) and self.horizon >= 1):
            problems.append(f"horizon must be a positive integer (fine-tuning steps) or None, got {self.horizon!r}")
        if not (isinstance(self.scalar_step, (int, float)) and self.scalar_step > 1):
            problems.append(f"scalar_step must be > 1, got {self.scalar_step!r}")
        if not (isinstance(self.starts, int) and self.starts >= 1):
            problems.append(f"starts must be a positive integer, got {self.starts!r}")
        if self.adam_form_lr is not None and (isinstance(self.adam_form_lr, bool) or not (
                isinstance(self.adam_form_lr, (int, float)) and 0 < self.adam_form_lr < math.inf)):
            problems.append(f"adam_form_lr must be a positive lr multiplier or None, got {self.adam_form_lr!r}")
        if isinstance(self.significance, bool) or not (isinstance(self.significance, (int, float))
                                                       and 0 <= self.significance < math.inf):
            problems.append(f"significance must be a number ≥ 0 (standard errors; 0: no gate), got {self.significance!r}")
        if self.budget is not None:
            try:
                scalars.resolve_budget(self.budget, 1, 1)
            except ValueError as err:
                problems.append(str(err))
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            problems.append(f"lr must be > 0, got {self.lr!r}")
        if self.estimator not in ESTIMATORS:
            problems.append(f"estimator must be pes, es or tbptt, got {self.estimator!r}")
        if len(self.episode_length) != 2 or not 1 <= self.episode_length[0] <= self.episode_length[1]:
            problems.append(f"episode_length must be [lo, hi] with 1 <= lo <= hi, got {self.episode_length!r}")
        if not 0.0 < self.meta_fraction < 1.0:
            problems.append(f"meta_fraction must be in (0, 1), got {self.meta_fraction!r}")
        if not 0.0 <= self.restart_prob <= 1.0:
            problems.append(f"restart_prob must be in [0, 1], got {self.restart_prob!r}")
        for name in ("meta_steps", "truncation", "pairs", "task_groups", "batch_size", "meta_batch_size", "max_tokens"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 1):
                problems.append(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if problems:
            raise ValueError("refinement config: " + "; ".join(problems))
        self.episode_length = [int(x) for x in self.episode_length]

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> RefineConfig:
        (config,) = parse_config((cls,), kwargs, source="Bundle.refine", kind="refinement option", error=TypeError)
        return config


# ---- data -----------------------------------------------------------------------------------------------


@dataclass
class TokenData:
    """Tokenized examples as padded tensors: ``input_ids``/``attention_mask`` ``(N, L)``, ``labels`` ``(N,)``
    (sequence classification) or ``(N, L)`` (language modelling, -100 on padding)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def causal_lm(self) -> bool:
        return self.labels.dim() == 2

    def subset(self, index: torch.Tensor) -> TokenData:
        return TokenData(self.input_ids[index], self.attention_mask[index], self.labels[index])

    def gather(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rows ``index`` (any shape), trimmed to the longest non-padding length among them."""
        mask = self.attention_mask[index]
        length = max(int(mask.sum(-1).max()), 1)
        labels = self.labels[index]
        if self.causal_lm:
            labels = labels[..., :length]
        return self.input_ids[index][..., :length], mask[..., :length], labels


#: at most this many examples are read from an `IterableDataset` (a stream has no length)
ITERABLE_LIMIT = 4096

#: split names taken as the held-out data of a `DatasetDict`, in order of preference
EVAL_SPLITS = ("validation", "eval", "test")


def split_dataset_dict(dataset: Any, eval_dataset: Any = None, what: str = "train_dataset") -> tuple[Any, Any]:
    """``(train, eval)`` from a `datasets.DatasetDict` (or any mapping of named splits): its ``"train"`` split,
    and, unless ``eval_dataset`` is given, its first split named in `EVAL_SPLITS`. Other inputs pass through."""
    if not isinstance(dataset, Mapping) or "input_ids" in dataset:
        return dataset, eval_dataset
    splits = list(dataset)
    if "train" not in dataset:
        raise ValueError(f"{what}: a DatasetDict needs a 'train' split; it has {splits}")
    if eval_dataset is None:
        eval_dataset = next((dataset[name] for name in EVAL_SPLITS if name in dataset), None)
    return dataset["train"], eval_dataset


def _rows(dataset: Any, what: str, limit: int) -> list[Any]:
    """The examples of a sized dataset, or the first ``limit`` of an iterable one (`datasets.IterableDataset`)."""
    try:
        size = len(dataset)
    except TypeError:
        size = None
    if size is not None:
        return [dataset[i] for i in range(size)]
    if not hasattr(dataset, "__iter__") or isinstance(dataset, (str, bytes, Mapping)):
        raise TypeError(f"{what}: expected a dataset of tokenized examples, got {type(dataset).__name__}")
    rows = list(itertools.islice(iter(dataset), limit))
    logger.info("%s: read %d examples from an iterable dataset (at most %d)", what, len(rows), limit)
    return rows


def token_data(
    dataset: Any, pad_token_id: int, max_length: int, what: str = "dataset", limit: int = ITERABLE_LIMIT
) -> TokenData:
    """`TokenData` from a tokenized dataset: a `datasets.Dataset`, an `IterableDataset` (its first ``limit``
    examples), a list of dicts, or anything indexable yielding dicts with ``input_ids`` (and optionally
    ``attention_mask`` and ``labels``). ``labels`` may be one class per example (sequence classification) or one
    token id per position (causal LM, as `DataCollatorForLanguageModeling` makes them, -100 = ignored);
    without ``labels`` the examples are language modelling: labels = input_ids."""
    rows = _rows(dataset, what, limit)
    size = len(rows)
    if size == 0:
        raise ValueError(f"{what} is empty")
    if not all(isinstance(r, Mapping) and "input_ids" in r for r in rows):
        raise ValueError(f"{what}: every example must be a mapping with 'input_ids' (tokenize it first)")
    ids = [list(r["input_ids"])[:max_length] for r in rows]
    if any(len(x) == 0 for x in ids):
        raise ValueError(f"{what}: an example has no tokens")
    masks = [list(r["attention_mask"])[:max_length] if "attention_mask" in r else [1] * len(x) for r, x in zip(rows, ids)]
    length = max(len(x) for x in ids)
    input_ids = torch.full((size, length), pad_token_id, dtype=torch.long)
    attention = torch.zeros((size, length), dtype=torch.long)
    for i, (x, m) in enumerate(zip(ids, masks)):
        input_ids[i, : len(x)] = torch.tensor(x)
        attention[i, : len(m)] = torch.tensor(m)
    has_labels = "labels" in rows[0] or "label" in rows[0]
    if not has_labels:
        return TokenData(input_ids, attention, input_ids.masked_fill(attention == 0, -100))
    key = "labels" if "labels" in rows[0] else "label"
    values = [r[key] for r in rows]
    per_token = [isinstance(v, (list, tuple)) or (isinstance(v, torch.Tensor) and v.dim() == 1) for v in values]
    if all(per_token):  # causal-LM labels: one per position, aligned with input_ids
        labels = torch.full((size, length), -100, dtype=torch.long)
        for i, (v, x) in enumerate(zip(values, ids)):
            v = list(v)[: len(x)]
            if len(v) != len(x):
                raise ValueError(f"{what}: example {i} has {len(v)} '{key}' for {len(x)} tokens")
            labels[i, : len(v)] = torch.tensor(v, dtype=torch.long)
        return TokenData(input_ids, attention, labels.masked_fill(attention == 0, -100))
    if any(per_token):
        raise ValueError(f"{what}: '{key}' mixes one class per example with one label per token")
    labels = torch.tensor(values)
    if labels.dim() != 1:
        raise ValueError(f"{what}: '{key}' must be one class per example or one label per token")
    return TokenData(input_ids, attention, labels)


def additive_mask(attention_mask: torch.Tensor, causal: bool) -> torch.Tensor:
    """A 2-D padding mask ``(..., L)`` as transformers' prepared 4-D additive mask ``(..., 1, L, L)``.

    transformers returns a 4-D mask as-is, which avoids its data-dependent shortcuts (they cannot run
    under ``vmap``); the math is the same as with the 2-D mask.
    """
    length = attention_mask.shape[-1]
    allowed = attention_mask[..., None, :].bool().expand(*attention_mask.shape[:-1], length, length)
    if causal:
        allowed = allowed & torch.ones(length, length, dtype=torch.bool, device=attention_mask.device).tril()
    zeros = torch.zeros(allowed.shape, device=attention_mask.device)
    return zeros.masked_fill(~allowed, torch.finfo(torch.float32).min).unsqueeze(-3)


class TransformersTask(T.ModuleTask):
    """Fine-tuning a transformers model (full or PEFT) on tokenized data, as a meta-training task.

    Inner batches come from ``train``, held-out batches for the meta-objective from ``held_out``. Every
    instance draws its own examples (data order differs per instance; ± copies share them).
    ``initial_state`` (a bundle's named accumulators) seeds the accumulators of every episode. ``regime``
    picks the rule's recommended lr in the unroll (`meta.unroll.task_lr`) and ``roles`` (parameter name → role)
    the per-role multipliers: pass the bundle's, so that the unroll steps exactly as the bundle's optimizer does.
    """

    def __init__(
        self,
        model: nn.Module,
        train: TokenData,
        held_out: TokenData,
        batch_size: int,
        meta_batch_size: int,
        initial_state: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
        name: str = "transformers",
        regime: str = "finetune",
        roles: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(model, self._draw_train, self._loss_from_output, name=name)
        self.regime = regime
        self.roles = dict(roles or {})
        self.train, self.held_out = train, held_out
        self.batch_size, self.meta_batch_size = batch_size, meta_batch_size
        self.initial_state = dict(initial_state or {})
        self.causal = train.causal_lm

    @property
    def spec(self) -> dict[str, Any]:
        return {"family": "transformers", "name": self.name, "train_examples": len(self.train),
                "held_out_examples": len(self.held_out), "batch_size": self.batch_size}

    def _draw_train(self, generator: torch.Generator, n: int) -> T.Batch:
        return self.train.gather(torch.randint(0, len(self.train), (n, self.batch_size), generator=generator))

    def sample_meta_batch(self, generator: torch.Generator, n: int) -> T.Batch:
        """One held-out batch for all ``n`` instances (the objective compares instances on the same data)."""
        index = torch.randint(0, len(self.held_out), (self.meta_batch_size,), generator=generator)
        return tuple(t.unsqueeze(0).expand(n, *t.shape) for t in self.held_out.gather(index))

    @staticmethod
    def _loss_from_output(output: Any, _targets: Any) -> torch.Tensor:
        return output.loss

    def loss(self, params: Mapping[str, torch.Tensor], batch: T.Batch) -> torch.Tensor:
        input_ids, attention_mask, labels = batch
        fixed = {**self.frozen, **self.buffers}
        causal = self.causal

        def one_copy(copy_params: dict[str, torch.Tensor], ids: torch.Tensor, mask: torch.Tensor, y: torch.Tensor):
            kwargs = {"input_ids": ids, "attention_mask": additive_mask(mask, causal), "labels": y}
            return torch.func.functional_call(self.module, {**fixed, **copy_params}, args=(), kwargs=kwargs).loss

        return torch.func.vmap(one_copy)(dict(params), input_ids, attention_mask, labels)

    def initial_accumulators(self, config: Any) -> dict[str, dict[str, torch.Tensor]]:
        """The bundle's shipped accumulators, for the parameters whose state matches the rule's layout."""
        out = {}
        for name, value in self.initial.items():
            shipped = self.initial_state.get(name)
            if not shipped:
                continue
            expected = reference.init_state(config, value.shape)
            if all(k in shipped and tuple(shipped[k].shape) == tuple(v.shape) for k, v in expected.items()):
                out[name] = {k: shipped[k].to(v.dtype) for k, v in expected.items()}
        return out


# ---- before/after fine-tuning ----------------------------------------------------------------------------


def evaluate_loss(model: nn.Module, data: TokenData, batch_size: int = scalars.EVAL_BATCH_SIZE) -> float:
    """Mean loss of ``model`` over ``data`` (eval mode, no grad), weighted by examples."""
    return evaluate_chunks(model, data, 1, batch_size)[0] if len(data) else 0.0


def evaluate_chunks(model: nn.Module, data: TokenData, chunks: int,
                    batch_size: int = scalars.EVAL_BATCH_SIZE) -> tuple[float, list[float]]:
    """``(mean loss, per-chunk mean losses)`` of ``model`` over ``data`` cut into ``min(chunks, len(data))``
    contiguous chunks of (nearly) equal size, each scored in batches of at most ``batch_size``; the mean is
    weighted by examples (`evaluate_loss` is its one-chunk mean)."""
    parts = torch.tensor_split(torch.arange(len(data)), min(chunks, len(data)))
    losses, total = [], 0.0
    with torch.no_grad():
        for part in parts:
            chunk_total = 0.0
            for index in part.split(batch_size):
                ids, mask, labels = data.gather(index)
                chunk_total += float(model(input_ids=ids, attention_mask=mask, labels=labels).loss) * ids.shape[0]
            losses.append(chunk_total / len(part))
            total += chunk_total
    return total / max(len(data), 1), losses


def batch_order(size: int, steps: int, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """The example indices of each of ``steps`` batches of `finetune_curve`: drawn with replacement from
    ``range(size)`` by a generator seeded with ``seed``, so every optimizer (and a `transformers.Trainer` fed
    this order) sees the same batches for the same seed."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        yield torch.randint(0, size, (batch_size,), generator=generator)


def finetune_curve(
    model: nn.Module,
    make_optimizer: Callable[[list[tuple[str, nn.Parameter]]], torch.optim.Optimizer],
    train: TokenData,
    held_out: TokenData,
    steps: int,
    seed: int,
    batch_size: int,
    eval_every: int = 10,
    progress: bool = False,
    desc: str = "fine-tuning",
    eval_start: bool = True,
    chunks: int = 0,
) -> dict[str, Any]:
    """Fine-tune ``model`` in place for ``steps`` steps on batches drawn with ``seed`` (identical for every
    optimizer given the same seed) and return the held-out loss curve ``[(step, loss), ...]`` and wall time.

    The model runs in eval mode (dropout off), the setting refinement optimizes for; ``make_optimizer``
    receives the named trainable parameters. ``progress``: a tqdm bar over the steps, labelled ``desc``.
    ``eval_start=False`` skips the evaluation before the first step. ``passes``: the forward-backward passes
    spent (one per step, one per held-out evaluation batch of `evaluate_loss`). ``chunks`` > 0: the last
    evaluation is `evaluate_chunks` (the same examples, counted the same), its per-chunk losses in ``final_chunks``.
    """
    from tqdm.auto import tqdm  # loaded on first use

    model.eval()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    optimizer = make_optimizer(named)
    curve = [(0, evaluate_loss(model, held_out))] if eval_start else []
    train_losses, final_chunks = [], None
    start = time.perf_counter()
    bar = tqdm(total=steps, desc=desc, unit="step", disable=not progress, mininterval=1.0)
    for step, index in enumerate(batch_order(len(train), steps, batch_size, seed), start=1):
        ids, mask, labels = train.gather(index)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        train_losses.append(float(loss.detach()))
        if step % eval_every == 0 or step == steps:
            if chunks and step == steps:
                final, final_chunks = evaluate_chunks(model, held_out, chunks)
            else:
                final = evaluate_loss(model, held_out)
            curve.append((step, final))
            bar.set_postfix(held_out_loss=f"{final:.4f}")
        bar.update(1)
    bar.close()
    finite = all(math.isfinite(v) for _, v in curve)
    finite = finite and all(math.isfinite(v) for v in train_losses)
    passes = steps + len(curve) * scalars.eval_passes(len(held_out))
    result = {"curve": curve, "final": curve[-1][1], "train_losses": train_losses, "diverged": not finite,
              "wall_s": time.perf_counter() - start, "passes": passes}
    if chunks:
        result["final_chunks"] = final_chunks
    return result


def learned_optimizer_factory(
    rule: LearnedRule, state: Mapping[str, Any] | None = None, lr: float | None = None, regime: str = "finetune",
    roles: Mapping[str, str] | None = None,
):
    """A `finetune_curve` optimizer factory for a rule (starting from a bundle's named accumulators).

    ``lr=None`` runs the rule at its ``recommended_lr[regime]``, as `Bundle.optimizer()` and the refinement
    unroll (`meta.unroll.task_lr`) do: for a format-2 rule ``lr`` is AdamW's learning rate, so a fixed 1.0 would
    step it ~200× too far; for format-1 rules it is 1. ``regime``: "finetune" (refinement starts from a
    pretrained bundle) or "scratch". ``roles``: parameter name → role (a bundle's `resolved_roles`); None
    assigns them from names and shapes."""
    def make(named: list[tuple[str, nn.Parameter]]) -> torch.optim.Optimizer:
        params: Any = named
        if roles is not None:
            params = [{"params": list(named), "roles": [roles[n] for n, _ in named]}]
        optimizer = LearnedOptimizer(params, rule, lr=lr, regime=regime)
        if state:
            optimizer.load_named_state(state)
        return optimizer

    return make


def adamw_factory(lr: float, weight_decay: float = 0.0):
    def make(named: list[tuple[str, nn.Parameter]]) -> torch.optim.Optimizer:
        return torch.optim.AdamW([p for _, p in named], lr=lr, weight_decay=weight_decay)

    return make


# ---- the refinement run ---------------------------------------------------------------------------------


def with_lr_folded(rule: LearnedRule, lr: float) -> LearnedRule:
    """A copy of ``rule`` whose ``step_mult`` includes the multiplier ``lr`` (same φ weights)."""
    folded = LearnedRule(dataclasses.replace(rule.config, step_mult=rule.config.step_mult * lr))
    folded.load_state_dict(rule.state_dict())
    folded.provenance = dict(rule.provenance)
    return folded


def phi_budget(cfg: RefineConfig, held_out_examples: int) -> dict[str, Any] | None:
    """For ``adapt="phi"`` with a ``budget``: the meta-steps it affords (each meta-step unrolls
    ``task_groups × pairs × 2`` copies for ``truncation`` inner steps, each a training pass plus a held-out pass of
    the meta-objective); ``None`` without a budget. The before/after comparison is a report, not counted."""
    if cfg.budget is None:
        return None
    horizon = cfg.horizon or cfg.compare_steps or 1
    passes, what = scalars.resolve_budget(cfg.budget, horizon, held_out_examples)
    per_meta_step = cfg.task_groups * cfg.pairs * 2 * cfg.truncation * 2
    meta_steps = min(cfg.meta_steps, passes // per_meta_step)
    if meta_steps < 1:
        raise ValueError(f"budget {cfg.budget!r} ({passes} passes) does not pay for one PES meta-step ({per_meta_step} passes)")
    return {"budget": cfg.budget, "description": what, "passes": passes, "meta_steps": meta_steps,
            "spent": meta_steps * per_meta_step, "passes_per_meta_step": per_meta_step}


def _meta_config(cfg: RefineConfig, parent_hash: str, meta_steps: int | None = None):
    shared = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(EstimatorConfig)}
    return MetaTrainConfig(
        **shared, name=cfg.name, seed=cfg.seed, init=f"bundle-rule:{parent_hash}", truncation=cfg.truncation,
        episode_length=tuple(cfg.episode_length), task_groups=cfg.task_groups, instances_per_group=cfg.pairs,
        tasks=[], reparam_range=None, meta_loss={}, outer_lr=cfg.outer_lr, trainable=cfg.trainable,
        restart_prob=cfg.restart_prob, meta_steps=meta_steps or cfg.meta_steps, checkpoint_every=cfg.checkpoint_every,
        out_dir=cfg.out_dir, threads=cfg.threads, max_wall_time_s=cfg.max_wall_time_s, progress=cfg.progress,
    )


def refine_bundle(
    bundle: Any,
    train_dataset: Any,
    eval_dataset: Any = None,
    dataset_name: str | None = None,
    **options: Any,
):
    """`Bundle.refine` (see there). Returns the refined `Bundle`, or ``None`` when ``max_wall_time_s`` stopped
    the run early (call again with the same arguments to resume from ``out_dir``)."""
    cfg = RefineConfig.from_kwargs(**options)
    if len(bundle.rules) > 1:
        raise ValueError(
            f"refine works on single-rule bundles; this one is layer-wise with rules {sorted(bundle.rules)}"
        )
    model = bundle.model
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the bundle's model has no trainable parameters (requires_grad) to fine-tune")
    pad = _pad_token_id(bundle, model)
    train_dataset, eval_dataset = split_dataset_dict(train_dataset, eval_dataset)
    train = token_data(train_dataset, pad, cfg.max_tokens, "train_dataset")
    split = "eval_dataset"
    if eval_dataset is not None:
        held_out = token_data(eval_dataset, pad, cfg.max_tokens, "eval_dataset")
        if held_out.causal_lm != train.causal_lm:
            raise ValueError("train_dataset and eval_dataset must both have class labels or both be language modelling")
    else:
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed))
        cut = int(round(len(train) * cfg.meta_fraction))
        if cut < 1 or cut >= len(train):
            raise ValueError(f"train_dataset has {len(train)} examples: too few to split off meta_fraction={cfg.meta_fraction}")
        held_out, train = train.subset(order[:cut]), train.subset(order[cut:])
        split = f"meta_fraction={cfg.meta_fraction} of train_dataset (seed {cfg.seed})"
    data = {"name": dataset_name or "user-data", "train_examples": len(train), "held_out_examples": len(held_out),
            "held_out_split": split, "task": "causal-lm" if train.causal_lm else "sequence-classification"}
    if cfg.adapt == "scalars":
        return refine_scalars(bundle, train, held_out, data, cfg)
    parent = bundle.rule
    parent_hash = parent.content_hash()
    start_rule = with_lr_folded(parent, cfg.lr)
    out_dir = Path(cfg.out_dir)
    budget = phi_budget(cfg, len(held_out))
    regime = bundle.regime or detect_regime(model)  # the unroll and the before/after run as bundle.optimizer() would
    roles = bundle.resolved_roles(model)
    was_training = model.training
    model.eval()
    try:
        task = TransformersTask(model, train, held_out, cfg.batch_size, cfg.meta_batch_size,
                                initial_state=bundle.state, name=dataset_name or "user-data", regime=regime, roles=roles)
        meta_config = _meta_config(cfg, parent_hash, budget and budget["meta_steps"])
        trainer = MetaTrainer(meta_config, task=task, out_dir=out_dir, initial=start_rule)
        refined = trainer.train()
        if refined is None:
            logger.info("refinement stopped at meta-step %d (max_wall_time_s); call again to resume", trainer.meta_step)
            return None
        comparison = None
        if cfg.compare_steps > 0:
            comparison = compare_rules(model, start_rule, refined, bundle.state, train, held_out, cfg, regime, roles)
            plot_refinement(trainer, comparison, out_dir / "refinement.png")
    finally:
        model.train(was_training)
    provenance = dict(refined.provenance)
    provenance.update({
        "method": "meta-refinement",
        "parent_rule": parent_hash,
        "parent_provenance": {k: parent.provenance.get(k) for k in ("method", "recipe", "meta_trained") if k in parent.provenance},
        "lr_folded": cfg.lr,
        "data": data,
        "refine_config": dataclasses.asdict(cfg),
        "before_after": comparison and {k: v for k, v in comparison.items() if k != "curves"},
    })
    if budget is not None:
        provenance["budget"] = budget
    provenance.pop("recipe_command", None)
    refined.provenance = provenance
    result = Bundle(model, refined, state=bundle.state, tokenizer=bundle.tokenizer, routing=bundle.routing)
    (out_dir / "refinement.json").write_text(json.dumps(provenance, indent=1, default=str))
    return result


def refine_scalars(bundle: Any, train: TokenData, held_out: TokenData, data: dict[str, Any], cfg: RefineConfig):
    """``adapt="scalars"``: the budgeted search of `meta.scalars` over full-horizon runs; returns the refined
    `Bundle` (its rule = the parent's φ with the best scalars in its config; the before/after plot attached)."""
    horizon = cfg.horizon or cfg.compare_steps
    if horizon < 1:
        raise ValueError("adapt='scalars' needs horizon (the fine-tuning steps to refine for) or compare_steps > 0")
    passes, what = scalars.resolve_budget(cfg.budget or "sweep5", horizon, len(held_out))
    counter = scalars.PassCounter(passes)
    parent = bundle.rule
    model = bundle.model
    roles = bundle.resolved_roles(model)
    present = [roles[n] for n, p in model.named_parameters() if p.requires_grad]
    names = list(cfg.scalars) if cfg.scalars is not None else scalars.scalar_names(parent, present)
    scalars.scaled_rule(parent, {name: 0.0 for name in names})  # unknown names fail here, before any run
    runner = scalars.CandidateRunner(bundle, train, held_out, horizon, cfg.batch_size,
                                     [cfg.seed + i for i in range(cfg.starts)], counter, finetune_curve,
                                     chunks=scalars.HELD_OUT_CHUNKS if cfg.significance > 0 else 0)
    if not counter.affords(runner.candidate_passes):
        raise ValueError(f"budget {cfg.budget or 'sweep5'!r} ({passes} passes) does not pay for one run "
                         f"({runner.candidate_passes} passes: {horizon} steps + held-out evaluation, × starts={cfg.starts})")
    runs: list[dict[str, Any]] = []

    def evaluate(log_scales: dict[str, float], label: str) -> float | tuple[float, list[float] | None]:
        result = runner(scalars.scaled_rule(parent, log_scales), label)
        runs.append({"label": label, **result})
        logger.info("scalar refinement: %s -> held-out loss %.4f (%d/%d passes)", label, result["held_out_loss"],
                    counter.spent, counter.budget)
        if cfg.significance > 0:
            return result["held_out_loss"], result["held_out_chunks"]
        return result["held_out_loss"]

    was_training, threads = model.training, torch.get_num_threads()
    model.eval()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    start = time.perf_counter()
    try:
        best, history = scalars.coordinate_search(
            evaluate, names, lambda: counter.affords(runner.candidate_passes), cfg.scalar_step, cfg.significance,
            scalars.form_alternatives(names, cfg.adam_form_lr, cfg.scalar_step),
        )
    finally:
        model.train(was_training)
        torch.set_num_threads(threads)
    refined = scalars.scaled_rule(parent, best)
    chosen = next(i for i, h in enumerate(history) if h["log_scales"] == best)  # the gate may keep a higher loss
    before, after = history[0]["held_out_loss"], history[chosen]["held_out_loss"]
    factors = {name: scalars.factor(name, value) for name, value in best.items()}
    comparison = {"steps": horizon, "seed": cfg.seed, "starts": cfg.starts, "held_out_loss_parent": before,
                  "held_out_loss_refined": after, "ratio": after / before if before else float("nan")}
    changed = {name: factor for name, factor in factors.items() if best[name]}
    provenance = {  # fresh: the parent's meta-training settings stay in parent_provenance / the parent's files
        "meta_trained": parent.provenance.get("meta_trained", False),
        "method": "scalar-refinement",
        "parent_rule": parent.content_hash(),
        "parent_provenance": {k: parent.provenance.get(k) for k in ("method", "recipe", "meta_trained") if k in parent.provenance},
        "data": data,
        "refine_config": dataclasses.asdict(cfg),
        "scalars": factors,
        "budget": {"budget": cfg.budget or "sweep5", "description": what, "passes": counter.budget,
                   "spent": counter.spent, "runs": len(history), "passes_per_run": runner.candidate_passes},
        "search": [{"label": r["label"], "held_out_loss": h["held_out_loss"],
                    "scales": {k: scalars.factor(k, v) for k, v in h["log_scales"].items() if v},
                    **({"z": h["z"]} if "z" in h else {})} for r, h in zip(runs, history)],
        "before_after": comparison,
        "wall_time_s": time.perf_counter() - start,
        "results": {"parent rule": {"held_out_loss": before, "passes": runner.candidate_passes},
                    "refined rule": {"held_out_loss": after, "passes": counter.spent, **changed}},
        "plots": {"before / after refinement": REFINEMENT_PLOT},
    }
    refined.provenance = provenance
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    png = plot_scalar_refinement(runs, chosen, comparison, out_dir / REFINEMENT_PLOT)
    result = Bundle(model, refined, state=bundle.state, tokenizer=bundle.tokenizer, routing=bundle.routing,
                    roles=bundle.roles, regime=bundle.regime)
    result.attachments[REFINEMENT_PLOT] = png
    (out_dir / "refinement.json").write_text(json.dumps(provenance, indent=1, default=str))
    return result


def plot_scalar_refinement(runs: list[dict[str, Any]], chosen: int, comparison: dict[str, Any], path: Path) -> bytes:
    """Two panels: held-out loss of every candidate of the search (parent first, the chosen one marked), and
    the training loss of the parent vs the refined rule (same batches). Saved to ``path``; returns the PNG bytes."""
    import matplotlib  # heavy: only for the plot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy: only for the plot

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    losses = [r["held_out_loss"] if math.isfinite(r["held_out_loss"]) else float("nan") for r in runs]
    left.plot(range(len(runs)), losses, "o-", ms=4)
    left.plot([0], [losses[0]], "s", color="tab:gray", ms=8, label="parent")
    left.plot([chosen], [losses[chosen]], "*", color="tab:red", ms=14, label="chosen")
    left.set_xticks(range(len(runs)), [r["label"] for r in runs], rotation=30, ha="right", fontsize=7)
    left.set_ylabel(f"held-out loss after {comparison['steps']} steps")
    left.set_title("scalar search (each point: one full run)")
    left.legend()
    for label, index in (("parent rule", 0), ("refined rule", chosen)):
        values = runs[index]["train_losses"] or []
        window = max(1, len(values) // 10)
        smooth = [sum(values[max(0, i - window + 1): i + 1]) / len(values[max(0, i - window + 1): i + 1]) for i in range(len(values))]
        right.plot(range(1, len(values) + 1), smooth, label=f"{label}: held-out {runs[index]['held_out_loss']:.4f}")
    _save_before_after(fig, right, "training loss (moving average)", comparison["seed"], path)
    return path.read_bytes()


def compare_rules(model: nn.Module, parent: LearnedRule, refined: LearnedRule, state: Any, train: TokenData,
                  held_out: TokenData, cfg: RefineConfig, regime: str = "finetune",
                  roles: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Fine-tune copies of ``model`` with the parent and the refined rule (same batches, steps, seed), each at
    its recommended lr for ``regime`` with ``roles`` (the bundle's)."""
    results = {}
    for label, rule in (("parent", parent), ("refined", refined)):
        copy_ = copy.deepcopy(model)
        results[label] = finetune_curve(copy_, learned_optimizer_factory(rule, state, regime=regime, roles=roles),
                                        train, held_out, cfg.compare_steps, seed=cfg.seed + 1, batch_size=cfg.batch_size,
                                        eval_every=max(1, cfg.compare_steps // 8), progress=cfg.progress,
                                        desc=f"before/after: {label} rule")
        del copy_
    before, after = results["parent"]["final"], results["refined"]["final"]
    return {
        "steps": cfg.compare_steps, "seed": cfg.seed + 1, "held_out_loss_parent": before,
        "held_out_loss_refined": after, "ratio": after / before if before else float("nan"),
        "curves": {k: v["curve"] for k, v in results.items()},
    }


def plot_refinement(trainer: Any, comparison: dict[str, Any], path: Path) -> None:
    """Two panels: the meta-loss per meta-step, and held-out loss while fine-tuning with parent vs refined."""
    import matplotlib  # heavy: only for the plot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy: only for the plot

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    history = trainer.history
    left.plot([r["meta_step"] for r in history], [r["meta_loss"] for r in history], lw=1)
    left.set_xlabel("meta-step")
    left.set_ylabel("meta-loss (log held-out loss ratio)")
    left.set_title("refinement")
    for label, curve in comparison["curves"].items():
        steps, losses = zip(*curve)
        right.plot(steps, losses, marker="o", ms=3, label=f"{label} rule")
    _save_before_after(fig, right, "held-out loss", comparison["seed"], path)


def _save_before_after(fig: Any, right: Any, ylabel: str, seed: int, path: Path) -> None:
    """Label the before/after panel ``right`` and save ``fig`` to ``path``."""
    import matplotlib.pyplot as plt  # heavy: only for the plot

    right.set_xlabel("fine-tuning step")
    right.set_ylabel(ylabel)
    right.set_title(f"before / after (seed {seed})")
    right.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pad_token_id(bundle: Any, model: nn.Module) -> int:
    tokenizer = getattr(bundle, "tokenizer", None)
    for candidate in (getattr(tokenizer, "pad_token_id", None), getattr(getattr(model, "config", None), "pad_token_id", None)):
        if candidate is not None:
            return int(candidate)
    return 0
