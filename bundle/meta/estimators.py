"""Meta-gradient estimators over vectorized truncated unrolls, and the meta-loss they differentiate.

Meta-loss of one copy over a truncation of ``K`` inner steps (losses ``L_t`` at the parameters the step
starts from, ``L_0`` the instance's loss at initialization on its first batch; for a task with a held-out
split (``sample_meta_batch``, used by refinement) ``L_t`` is the loss on a held-out batch at the parameters
after step ``t`` and ``L_0`` the held-out loss at the episode's starting point):

    ℓ = mean_t  transform(clip(L_t / L_0, floor, clip_max)),   non-finite L_t ↦ clip_max,

with ``transform`` = log (default: scale-free, rewards relative progress at every stage of training) or
identity. Per-task normalization by ``L_0`` makes task families with different loss scales comparable.

Estimators (``θ`` = flat φ, ``ε ~ N(0, σ² I)`` masked to the trainable part, ``n`` instances):

- antithetic PES (`pes_gradient`): every truncation draws ``ε_i``; the + copy runs ``θ + ε_i``, the − copy
  ``θ − ε_i``; ``ξ_i ← ξ_i + ε_i`` sums the perturbations since the episode began (persistence removes the
  truncation bias); ``ĝ = mean_i ξ_i (ℓ⁺_i − ℓ⁻_i) / (2σ²)``.
- full-episode ES (`es_gradient`): one ``ε_i`` for a whole fresh episode; ``ĝ = mean_i ε_i (ℓ⁺_i − ℓ⁻_i) / (2σ²)``.
- truncated backprop (`tbptt_gradient`): autograd of ``mean_i ℓ_i`` through the truncation with the inner
  gradients detached (first-order, no Hessian terms, Andrychowicz et al. 2016); biased toward short horizons.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..step.rule import RuleConfig
from . import unroll as U


@dataclass
class MetaLossConfig:
    clip_max: float = 1.5
    floor: float = 1e-4
    transform: str = "log"  # "log" or "linear"


def normalized_meta_loss(losses: torch.Tensor, initial_loss: torch.Tensor, cfg: MetaLossConfig) -> torch.Tensor:
    """``transform(clip(L / L_0))`` element-wise with non-finite values mapped to the clip maximum."""
    ratio = losses / initial_loss.clamp_min(1e-12)
    ratio = torch.where(torch.isfinite(ratio), ratio, torch.full_like(ratio, cfg.clip_max))
    ratio = ratio.clamp(cfg.floor, cfg.clip_max)
    return torch.log(ratio) if cfg.transform == "log" else ratio


def _unroll_truncation(
    config: RuleConfig,
    group: U.TaskGroup,
    weights: U.Weights,
    steps: int,
    loss_cfg: MetaLossConfig,
    differentiable: bool = False,
) -> torch.Tensor:
    """Advance ``group`` by ``steps`` inner steps with ``weights``; returns the per-copy meta-loss ``(C,)``."""
    total = 0.0
    held_out = U.has_meta_split(group.task)
    for _ in range(steps):
        batch = group.sample_batch()
        if held_out and group.initial_loss is None:
            group.initial_loss = U.meta_losses(group, group.params)[: group.instances].clone()
        losses, group.params, group.accumulators = U.inner_step(
            config, weights, group.task, group.params, group.accumulators, batch, group.scales or None, differentiable,
            consume=not differentiable,
        )
        if held_out:  # the objective is the loss on held-out data at the parameters after the step
            losses = U.meta_losses(group, group.params, differentiable)
        if group.initial_loss is None:
            group.initial_loss = losses[: group.instances].detach().clone()
        total = total + normalized_meta_loss(losses, group.repeat(group.initial_loss), loss_cfg)
        group.episode_step += 1
    return total / max(steps, 1)


@dataclass
class EstimateInfo:
    meta_loss: float  # mean over copies of the truncation meta-loss
    steps: int  # inner steps taken by each copy
    copies: int
    episode_done: bool


def perturbations(
    count: int, theta: torch.Tensor, sigma: float, mask: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """``count`` draws ``ε_i ~ N(0, σ² I)`` masked to the trainable part of ``θ``, as rows ``(count, θ.numel())``."""
    return torch.randn(count, theta.numel(), generator=generator).to(theta.device) * sigma * mask


def antithetic_gradient(
    directions: torch.Tensor, plus: torch.Tensor, minus: torch.Tensor, sigma: float
) -> torch.Tensor:
    """``mean_i d_i (ℓ⁺_i − ℓ⁻_i) / (2σ²)`` for rows ``d_i`` (``ε_i`` for ES, ``ξ_i`` for PES)."""
    return (directions * (plus - minus).unsqueeze(1)).mean(0) / (2 * sigma**2)


def pes_gradient(
    config: RuleConfig,
    theta: torch.Tensor,
    group: U.TaskGroup,
    sigma: float,
    truncation: int,
    mask: torch.Tensor,
    loss_cfg: MetaLossConfig,
) -> tuple[torch.Tensor, EstimateInfo]:
    """Antithetic PES estimate of ``∂ℓ/∂θ`` from one truncation of ``group`` (which must have 2 copies/instance)."""
    if group.copies_per_instance != 2:
        raise ValueError("antithetic PES needs copies_per_instance == 2")
    n = group.instances
    epsilon = perturbations(n, theta, sigma, mask, group.generator)
    group.perturbation_sum = group.perturbation_sum + epsilon
    weights = U.unflatten_weights(config, theta + torch.cat([epsilon, -epsilon]))
    steps = min(truncation, group.episode_length - group.episode_step)
    meta_loss = _unroll_truncation(config, group, weights, steps, loss_cfg)
    gradient = antithetic_gradient(group.perturbation_sum, meta_loss[:n], meta_loss[n:], sigma)
    done = group.episode_step >= group.episode_length or group.has_diverged()
    return gradient, EstimateInfo(float(meta_loss.mean()), steps, group.copies, done)


def es_gradient(
    config: RuleConfig,
    theta: torch.Tensor,
    group: U.TaskGroup,
    sigma: float,
    mask: torch.Tensor,
    loss_cfg: MetaLossConfig,
    reset: Callable[[], None],
) -> tuple[torch.Tensor, EstimateInfo]:
    """Antithetic full-episode ES: ``reset()`` starts a fresh episode, which is unrolled to its end."""
    if group.copies_per_instance != 2:
        raise ValueError("antithetic ES needs copies_per_instance == 2")
    reset()
    n = group.instances
    epsilon = perturbations(n, theta, sigma, mask, group.generator)
    weights = U.unflatten_weights(config, theta + torch.cat([epsilon, -epsilon]))
    steps = group.episode_length
    meta_loss = _unroll_truncation(config, group, weights, steps, loss_cfg)
    gradient = antithetic_gradient(epsilon, meta_loss[:n], meta_loss[n:], sigma)
    return gradient, EstimateInfo(float(meta_loss.mean()), steps, group.copies, True)


def tbptt_gradient(
    config: RuleConfig,
    theta: torch.Tensor,
    group: U.TaskGroup,
    truncation: int,
    mask: torch.Tensor,
    loss_cfg: MetaLossConfig,
) -> tuple[torch.Tensor, EstimateInfo]:
    """First-order truncated backprop: gradient of the mean meta-loss of one truncation w.r.t. ``θ``."""
    leaf = theta.detach().clone().requires_grad_()
    weights = U.unflatten_weights(config, leaf)
    steps = min(truncation, group.episode_length - group.episode_step)
    meta_loss = _unroll_truncation(config, group, weights, steps, loss_cfg, differentiable=True)
    objective = meta_loss.mean()
    if objective.requires_grad:
        (gradient,) = torch.autograd.grad(objective, leaf, allow_unused=True)
        gradient = torch.zeros_like(leaf) if gradient is None else gradient
    else:
        gradient = torch.zeros_like(leaf)
    group.params = {k: v.detach() for k, v in group.params.items()}
    done = group.episode_step >= group.episode_length or group.has_diverged()
    return gradient.detach() * mask, EstimateInfo(float(objective.detach()), steps, group.copies, done)


def sanitize_meta_gradient(gradient: torch.Tensor, clip: float) -> torch.Tensor:
    """NaN → 0, then element-wise clipping to ``[-clip, clip]`` (±inf become ±clip)."""
    gradient = torch.nan_to_num(gradient, nan=0.0, posinf=math.inf, neginf=-math.inf)
    return gradient.clamp(-clip, clip)


def outer_optimizer(
    theta: torch.Tensor, lr: float, betas: tuple[float, float] = (0.9, 0.999), weight_decay: float = 0.0
) -> torch.optim.AdamW:
    """`torch.optim.AdamW` over the one flat ``θ`` (a leaf tensor, updated in place by `outer_step`)."""
    return torch.optim.AdamW([theta], lr=lr, betas=tuple(betas), eps=1e-8, weight_decay=weight_decay, foreach=False)


def outer_step(optimizer: torch.optim.AdamW, gradient: torch.Tensor, mask: torch.Tensor) -> None:
    """One step of the outer optimizer with ``gradient``; the entries of ``θ`` outside ``mask`` keep their value
    (weight decay included)."""
    (theta,) = optimizer.param_groups[0]["params"]
    frozen = theta.detach().clone()
    theta.grad = gradient * mask
    optimizer.step()
    theta.grad = None
    with torch.no_grad():
        theta.copy_(torch.where(mask > 0, theta, frozen))
