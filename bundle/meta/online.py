"""Online refinement of a learned optimizer's rule φ while `transformers.Trainer` fine-tunes with it.

`OnlineRefinementCallback` runs, every ``every`` optimizer steps, one antithetic evolution-strategies (ES)
probe of the rule on the real task, and takes one outer AdamW step on φ:

1. Snapshot the model's trainable parameters and the `LearnedOptimizer`'s per-parameter state.
2. Take ``probe_steps`` batches from the callback's own data iterator (same dataset, collator and batch size
   as the Trainer's, own shuffling seeded from ``seed``; the Trainer's loader is never touched).
3. For each of ``pairs`` draws ``ε ~ N(0, σ² I)`` (masked to the trainable part of φ, see
   `optbundle.meta.unroll.parameter_mask`): write ``θ + ε`` into the rule, run ``probe_steps`` real steps
   (forward, backward, gradient clipping as the Trainer does, `LearnedOptimizer.step`) recording the losses
   ``L_t`` before each step, restore the snapshot; the same with ``θ − ε``; restore again. The meta-loss of a
   run is ``ℓ = mean_t log(clip(L_t / L_0))`` (`optbundle.meta.estimators.normalized_meta_loss`), ``L_0`` the
   first loss of the + run (the loss at the snapshot, so it is the same for every run).
4. ``ĝ = mean_pairs ε (ℓ⁺ − ℓ⁻) / (2σ²)`` (`antithetic_gradient`, with the ``ε`` of `perturbations`), sanitized
   (`sanitize_meta_gradient`), one step of the callback's ``torch.optim.AdamW`` (`outer_step`), and the new ``θ`` is written into the rule (`load_flat_into_rule`); φ's dtype and
   device are kept. Parameters, optimizer state, gradients and module train/eval flags are restored, so
   training continues exactly where it was, only with the updated φ.

The probe runs inside ``torch.random.fork_rng`` (CPU, plus the CUDA devices of the parameters), so dropout in
the probe does not shift the main run's random stream: with ``outer_lr=0`` a run with the callback is
bit-identical to one without it.

Cost per probe: ``2 · pairs · probe_steps`` extra forward/backward passes and optimizer steps (plus loading
``probe_steps`` batches), i.e. a fraction ``≈ 2 · pairs · probe_steps / every`` of the training compute
(0.16 with the defaults), and one extra copy of the trainable parameters and of their optimizer state in
memory while a probe runs. `OnlineRefinementCallback.history` and the Trainer logs record the measured share
of wall time.

Limits: the probe computes ``model(**batch).loss`` in full precision without the Trainer's autocast,
custom ``compute_loss`` or gradient accumulation (one batch per probe step); it assumes parameters that are
not sharded (no FSDP/DeepSpeed ZeRO). The refined φ lives in the optimizer's rule object, not in the Trainer's
checkpoints: save it with ``callback.refined_rule().save_pretrained(...)``.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from transformers import TrainerCallback

from .estimators import (
    MetaLossConfig,
    antithetic_gradient,
    normalized_meta_loss,
    outer_optimizer,
    outer_step,
    perturbations,
    sanitize_meta_gradient,
)
from .unroll import flatten_rule, load_flat_into_rule, parameter_mask
from ..step.optimizer import LearnedOptimizer
from ..store.rule import LearnedRule

logger = logging.getLogger(__name__)

_SEED_STRIDE = 1_000_003  # generator seed = seed * stride + global step


def unwrap_learned_optimizer(optimizer: Any) -> LearnedOptimizer:
    """The `LearnedOptimizer` inside ``optimizer`` (accelerate's ``AcceleratedOptimizer`` wraps it), or a
    `TypeError` saying what was found instead."""
    inner = optimizer
    seen = 0
    while not isinstance(inner, LearnedOptimizer) and hasattr(inner, "optimizer") and seen < 8:
        inner = inner.optimizer
        seen += 1
    if not isinstance(inner, LearnedOptimizer):
        raise TypeError(
            "OnlineRefinementCallback refines the rule of an optbundle LearnedOptimizer, but the Trainer's "
            f"optimizer is {type(optimizer).__name__}"
            + (f" wrapping {type(inner).__name__}" if inner is not optimizer else "")
            + "; pass optimizers=(LearnedOptimizer(...), constant_schedule(...)) to the Trainer"
        )
    return inner


class OnlineRefinementCallback(TrainerCallback):
    """Refine the learned optimizer's rule φ by antithetic ES probes during training (see the module docstring).

    Args:
        every: optimizer steps between probes (a probe runs when ``global_step % every == 0``).
        probe_steps: inner steps of each + / − run of a probe.
        pairs: antithetic pairs per probe.
        sigma: standard deviation of the perturbation of φ.
        outer_lr: AdamW learning rate on φ (``0`` probes without changing φ).
        gradient_clip: element-wise clip of the ES gradient (`sanitize_meta_gradient`).
        trainable: which part of φ is refined (`parameter_mask`: "last_layer", "first_layer", "all" or a
            list of φ tensor names).
        seed: seeds the perturbations (with the global step) and, unless ``data_seed`` is given, the probe's data
            order.
        rule_name: which of ``optimizer.rules`` to refine; default: the rule of the first param group.
        log: also append one entry per probe (and a summary at the end) to ``state.log_history``.
        meta_loss: clipping/transform of the meta-loss (default `MetaLossConfig()`: log of the clipped ratio).
        data_seed: seeds the probe's data order instead of ``seed`` (the same perturbations on other batches:
            how much the meta-gradient depends on the data, `benchmarks/refine.py --probe-noise`).
        train_mode: run the probes in train mode (dropout on), as the Trainer's own steps run; ``False`` keeps the
            mode the model is in at the end of a step (a training loop that steps in eval mode, dropout off,
            probes in eval mode too: `benchmarks/refine.py --online`).
    """

    def __init__(
        self,
        *,
        every: int = 50,
        probe_steps: int = 4,
        pairs: int = 1,
        sigma: float = 0.01,
        outer_lr: float = 1e-3,
        gradient_clip: float = 3.0,
        trainable: str | Sequence[str] = "last_layer",
        seed: int = 0,
        rule_name: str | None = None,
        log: bool = True,
        meta_loss: MetaLossConfig | None = None,
        train_mode: bool = True,
        data_seed: int | None = None,
    ) -> None:
        for name, value in (("every", every), ("probe_steps", probe_steps), ("pairs", pairs)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not sigma > 0:
            raise ValueError(f"sigma must be positive, got {sigma!r}")
        if not outer_lr >= 0:
            raise ValueError(f"outer_lr must be non-negative, got {outer_lr!r}")
        if not gradient_clip > 0:
            raise ValueError(f"gradient_clip must be positive, got {gradient_clip!r}")
        self.every = every
        self.probe_steps = probe_steps
        self.pairs = pairs
        self.sigma = float(sigma)
        self.outer_lr = float(outer_lr)
        self.gradient_clip = float(gradient_clip)
        self.trainable = trainable if isinstance(trainable, str) else list(trainable)
        self.seed = int(seed)
        self.rule_name = rule_name
        self.log = log
        self.meta_loss = meta_loss or MetaLossConfig()
        self.train_mode = bool(train_mode)
        self.data_seed = self.seed if data_seed is None else int(data_seed)

        self.probes = 0
        self.probe_seconds = 0.0
        self.history: list[dict[str, Any]] = []
        self.parent_hash: str | None = None
        self._rule: LearnedRule | None = None
        self._theta: torch.Tensor | None = None  # fp32 master copy of φ (the rule may hold a lower precision)
        self._written: torch.Tensor | None = None  # flatten_rule(rule) right after our last write
        self._mask: torch.Tensor | None = None
        self._adam: torch.optim.AdamW | None = None
        self._loader: torch.utils.data.DataLoader | None = None
        self._batches: Iterator[Any] | None = None
        self._data_generator: torch.Generator | None = None
        self._train_start: float | None = None
        self._last_step = 0

    # ---- Trainer events ------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):
        self._train_start = time.perf_counter()
        if optimizer is not None:
            self._attach(unwrap_learned_optimizer(optimizer))

    def on_step_end(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        if state.global_step <= 0 or state.global_step % self.every != 0:
            return
        if optimizer is None or model is None:
            raise RuntimeError("OnlineRefinementCallback needs the Trainer to pass model and optimizer")
        inner = unwrap_learned_optimizer(optimizer)
        self._attach(inner)
        self._probe(args, state, model, inner, train_dataloader)

    def on_train_end(self, args, state, control, **kwargs):
        fraction = self._probe_fraction()
        message = (
            f"online refinement: {self.probes} probes, {self.probe_seconds:.2f} s "
            f"({100 * fraction:.1f}% of training wall time)"
        )
        logger.info(message)
        if self.log:
            state.log_history.append(
                {
                    "online_refinement_probes": self.probes,
                    "online_refinement_probe_seconds": self.probe_seconds,
                    "online_refinement_probe_fraction": fraction,
                    "step": state.global_step,
                }
            )

    # ---- results -------------------------------------------------------------------------------------
    def refined_rule(self) -> LearnedRule:
        """A copy of the current (refined) rule with its provenance describing this refinement."""
        if self._rule is None:
            raise RuntimeError("no rule attached yet: refined_rule() is available once training has begun")
        rule = copy.deepcopy(self._rule)
        rule.provenance = {
            "method": "online-refinement",
            "parent_rule": self.parent_hash,
            "probes": self.probes,
            "probe_steps": self.probe_steps,
            "pairs": self.pairs,
            "sigma": self.sigma,
            "outer_lr": self.outer_lr,
            "trainable": self.trainable,
            "every": self.every,
            "seed": self.seed,
            "last_step": self._last_step,
        }
        return rule

    # ---- internals -----------------------------------------------------------------------------------
    def _attach(self, optimizer: LearnedOptimizer) -> None:
        name = self.rule_name if self.rule_name is not None else optimizer.param_groups[0]["rule"]
        if name not in optimizer.rules:
            raise ValueError(f"rule_name {name!r} is not one of the optimizer's rules {sorted(optimizer.rules)}")
        rule = optimizer.rules[name]
        if rule is self._rule:
            return
        self._rule = rule
        self.parent_hash = rule.content_hash()
        self._theta = flatten_rule(rule)
        self._written = self._theta.clone()
        self._mask = parameter_mask(rule.config, self.trainable).to(self._theta.device)
        self._adam = outer_optimizer(self._theta, self.outer_lr)

    def _probe_fraction(self) -> float:
        if self._train_start is None:
            return 0.0
        elapsed = time.perf_counter() - self._train_start
        return self.probe_seconds / elapsed if elapsed > 0 else 0.0

    def _next_batches(self, args, train_dataloader, device: torch.device) -> list[Any]:
        if self._loader is None:
            self._loader = self._build_loader(args, train_dataloader)
        batches = []
        for _ in range(self.probe_steps):
            try:
                batch = next(self._batches) if self._batches is not None else None
            except StopIteration:
                batch = None
            if batch is None:
                self._batches = iter(self._loader)
                try:
                    batch = next(self._batches)
                except StopIteration:
                    raise RuntimeError("OnlineRefinementCallback: the training data yields no batch") from None
            batches.append(_to_device(batch, device))
        return batches

    def _build_loader(self, args, train_dataloader) -> Any:
        """A loader of our own over the Trainer's dataset, collator and batch size (iterating the Trainer's
        prepared loader would advance its sampler's shared generator and epoch, changing the main run)."""
        if train_dataloader is None:
            raise RuntimeError("OnlineRefinementCallback needs the Trainer's train_dataloader")
        dataset = getattr(train_dataloader, "dataset", None)
        if dataset is None:  # not a torch DataLoader: iterate it as it is
            return train_dataloader
        batch_size = getattr(train_dataloader, "batch_size", None)
        if batch_size is None:
            batch_size = getattr(getattr(train_dataloader, "batch_sampler", None), "batch_size", None)
        if batch_size is None:
            batch_size = args.per_device_train_batch_size
        iterable = isinstance(dataset, torch.utils.data.IterableDataset)
        self._data_generator = torch.Generator().manual_seed(self.data_seed)
        return torch.utils.data.DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=not iterable,
            generator=None if iterable else self._data_generator,
            collate_fn=getattr(train_dataloader, "collate_fn", None),
            drop_last=bool(getattr(train_dataloader, "drop_last", False)),
            num_workers=0,
        )

    def _probe(self, args, state, model: torch.nn.Module, optimizer: LearnedOptimizer, train_dataloader) -> None:
        start = time.perf_counter()
        rule = self._rule
        current = flatten_rule(rule)
        if not torch.equal(current, self._written):  # φ was changed from outside: continue from it
            self._theta.copy_(current)
        theta, mask = self._theta, self._mask
        params = [p for group in optimizer.param_groups for p in group["params"]]
        device = params[0].device if params else torch.device("cpu")
        cuda_devices = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"})
        modes = {module: module.training for module in model.modules()}
        max_grad_norm = float(getattr(args, "max_grad_norm", 0.0) or 0.0)

        with torch.random.fork_rng(devices=cuda_devices):
            batches = self._next_batches(args, train_dataloader, device)
            snapshot = _Snapshot(optimizer, params)
            generator = torch.Generator().manual_seed(self.seed * _SEED_STRIDE + state.global_step)
            plus_losses, minus_losses = [], []
            initial = None
            try:
                if self.train_mode:
                    model.train()
                epsilons = perturbations(self.pairs, theta, self.sigma, mask, generator)
                for epsilon in epsilons:
                    for sign, meta_losses in ((1.0, plus_losses), (-1.0, minus_losses)):
                        load_flat_into_rule(rule, theta + sign * epsilon)
                        losses = self._run(model, optimizer, params, batches, max_grad_norm)
                        snapshot.restore()
                        if initial is None:
                            initial = losses[0]
                        meta_losses.append(normalized_meta_loss(losses, initial, self.meta_loss).mean())
                plus, minus = torch.stack(plus_losses), torch.stack(minus_losses)
                gradient = antithetic_gradient(epsilons, plus.to(theta.device), minus.to(theta.device), self.sigma)
                gradient = sanitize_meta_gradient(gradient, self.gradient_clip)
                outer_step(self._adam, gradient, mask)
            finally:
                load_flat_into_rule(rule, self._theta)
                self._written = flatten_rule(rule)
                snapshot.restore()
                optimizer.zero_grad(set_to_none=True)
                model.zero_grad(set_to_none=True)
                for module, training in modes.items():
                    module.training = training

        self.probes += 1
        self._last_step = state.global_step
        seconds = time.perf_counter() - start
        self.probe_seconds += seconds
        trained = float(mask.sum())
        entry = {
            "step": state.global_step,
            "meta_loss_plus": float(plus.mean()),
            "meta_loss_minus": float(minus.mean()),
            "gradient_rms": float(((gradient * mask).square().sum() / max(trained, 1.0)).sqrt()),
            "probe_seconds": seconds,
            "probe_fraction": self._probe_fraction(),
        }
        self.history.append(entry)
        logger.info(
            "online refinement probe at step %d: meta-loss +%.4g / -%.4g, |g|rms %.3g, %.2f s (%.1f%% of wall time)",
            entry["step"], entry["meta_loss_plus"], entry["meta_loss_minus"], entry["gradient_rms"], seconds,
            100 * entry["probe_fraction"],
        )
        if self.log:
            state.log_history.append(
                {f"online_refinement_{k}": v for k, v in entry.items() if k != "step"} | {"step": state.global_step}
            )

    def _run(self, model, optimizer: LearnedOptimizer, params, batches, max_grad_norm: float) -> torch.Tensor:
        """``len(batches)`` real training steps from the current state; the losses before each step."""
        losses = []
        optimizer.zero_grad(set_to_none=True)
        for batch in batches:
            with torch.enable_grad():
                loss = model(**batch).loss
                loss.backward()
            losses.append(loss.detach().float().cpu())
            if max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return torch.stack(losses)


class _Snapshot:
    """Copies of parameters and their optimizer state, restorable in place any number of times."""

    def __init__(self, optimizer: LearnedOptimizer, params: list[torch.Tensor]) -> None:
        self.optimizer = optimizer
        self.params = params
        with torch.no_grad():
            self.values = [p.detach().clone() for p in params]
        self.states = {p: _clone_state(optimizer.state[p]) for p in params if p in optimizer.state}

    @torch.no_grad()
    def restore(self) -> None:
        for param, value in zip(self.params, self.values):
            param.copy_(value)
        state = self.optimizer.state
        for param in self.params:
            saved = self.states.get(param)
            if saved is None:
                state.pop(param, None)  # state the probe created for a parameter that had none
                continue
            current = state.get(param)
            if current is not None and _same_layout(current, saved):
                for key, value in saved.items():
                    if isinstance(value, torch.Tensor):
                        current[key].copy_(value)
                    else:
                        current[key] = copy.deepcopy(value)
            else:
                state[param] = _clone_state(saved)


def _clone_state(state: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v.detach().clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v) for k, v in state.items()}


def _same_layout(current: Mapping[str, Any], saved: Mapping[str, Any]) -> bool:
    if set(current) != set(saved):
        return False
    for key, value in saved.items():
        other = current[key]
        if isinstance(value, torch.Tensor) != isinstance(other, torch.Tensor):
            return False
        if isinstance(value, torch.Tensor) and (
            value.shape != other.shape or value.dtype != other.dtype or value.device != other.device
        ):
            return False
    return True


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch
