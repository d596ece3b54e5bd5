"""Vectorized truncated unrolls: many task copies advance together through `reference.learned_update`.

φ is handled as one flat vector ``θ`` (`flatten_rule` / `unflatten_weights`); a batch of perturbed copies
``θ + ε_c`` unflattens to weights with a leading copy dim, which `reference.learned_update` accepts with
``batch_dims=1`` (one perturbed φ per copy). Parameters of every copy are stacked ``(C, *S)``, the loss is one
batched forward (`tasks.py`), and each parameter tensor is updated for all copies by one call of the step
math, so the Python work per inner step does not grow with the number of copies.

A `TaskGroup` is the unit of vectorization: one sampled task spec (architecture + dataset), ``n`` instances
(own init, own data, own reparametrization scales), each with ``copies_per_instance`` copies (2 for the
antithetic ± pair of ES/PES, which therefore share init, data and every random number; 1 for TBPTT).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..step import reference
from ..step.roles import assign_roles, regime_lr_factor, trained_matrices
from ..step.rule import RuleConfig
from ..store.rule import LearnedRule
from . import tasks as T

Weights = list[tuple[torch.Tensor, torch.Tensor]]


# ---- φ as a flat vector ------------------------------------------------------------------------------


def rule_parameter_names(config: RuleConfig) -> list[str]:
    """Names of φ's tensors in flat order (as in ``LearnedRule.state_dict()``)."""
    return [f"layers.{i}.{kind}" for i in range(len(config.layer_shapes())) for kind in ("weight", "bias")]


def rule_parameter_shapes(config: RuleConfig) -> list[tuple[int, ...]]:
    shapes: list[tuple[int, ...]] = []
    for out_features, in_features in config.layer_shapes():
        shapes += [(out_features, in_features), (out_features,)]
    return shapes


def num_rule_parameters(config: RuleConfig) -> int:
    return sum(math.prod(s) for s in rule_parameter_shapes(config))


def flatten_rule(rule: LearnedRule) -> torch.Tensor:
    """φ as one fp32 vector ``θ`` in `rule_parameter_names` order."""
    state = rule.state_dict()
    return torch.cat([state[name].detach().reshape(-1).to(torch.float32) for name in rule_parameter_names(rule.config)])


def unflatten_weights(config: RuleConfig, flat: torch.Tensor) -> Weights:
    """``θ`` of shape ``(*B, P)`` → ``[(W, b), …]`` with leading ``B`` (differentiable views)."""
    batch = flat.shape[:-1]
    weights, offset = [], 0
    pieces = []
    for shape in rule_parameter_shapes(config):
        size = math.prod(shape)
        pieces.append(flat[..., offset : offset + size].reshape(*batch, *shape))
        offset += size
    for i in range(0, len(pieces), 2):
        weights.append((pieces[i], pieces[i + 1]))
    return weights


def load_flat_into_rule(rule: LearnedRule, flat: torch.Tensor) -> LearnedRule:
    """Write ``θ`` into ``rule``'s parameters (in place) and return it."""
    with torch.no_grad():
        for (w, b), (layer) in zip(unflatten_weights(rule.config, flat), rule.layers):
            layer.weight.copy_(w)
            layer.bias.copy_(b)
    return rule


def parameter_mask(config: RuleConfig, trainable: str | Sequence[str] = "all") -> torch.Tensor:
    """0/1 vector over ``θ`` selecting the parts of φ that train.

    ``trainable``: "all"; "last_layer" (the output layer's weight and bias); "first_layer"; "output_scale"
    (only the log-magnitude output: row 1 of the output layer and its bias, so the refined rule keeps its
    direction and learns how far to step); or a list of φ tensor names from `rule_parameter_names` (e.g.
    ``["layers.1.bias"]``).
    """
    names = rule_parameter_names(config)
    if trainable == "output_scale":  # only the log-magnitude output (row 1 of the last layer): one scale per feature
        mask = torch.zeros(num_rule_parameters(config))
        out_features, in_features = config.layer_shapes()[-1]
        start = num_rule_parameters(config) - out_features * in_features - out_features
        mask[start + in_features : start + 2 * in_features] = 1.0  # weight row 1
        mask[-out_features + 1] = 1.0  # bias[1]
        return mask
    if trainable == "all":
        selected = set(names)
    elif trainable == "last_layer":
        selected = set(names[-2:])
    elif trainable == "first_layer":
        selected = set(names[:2])
    else:
        selected = set(trainable)
        unknown = selected - set(names)
        if unknown:
            raise ValueError(f"unknown φ tensor(s) {sorted(unknown)}; known: {names}")
    pieces = [
        torch.full((math.prod(shape),), 1.0 if name in selected else 0.0)
        for name, shape in zip(names, rule_parameter_shapes(config))
    ]
    return torch.cat(pieces)


# ---- one vectorized inner step -----------------------------------------------------------------------


def task_roles(task: T.Task, params: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Role of each stacked parameter (`optbundle.step.roles`): the task's own ``roles`` mapping when it names
    every parameter (a refined bundle's roles, as its optimizer assigns them), else from names and per-copy
    shapes; cached on the task."""
    roles = getattr(task, "_optbundle_roles", None)
    if roles is None or set(roles) != set(params):
        names = list(params)
        given = getattr(task, "roles", None) or {}
        if all(k in given for k in names):
            roles = {k: given[k] for k in names}
        else:
            roles = dict(zip(names, assign_roles([(k, tuple(params[k].shape[1:])) for k in names])))
        try:
            task._optbundle_roles = roles
        except AttributeError:  # pragma: no cover - a task object that refuses attributes
            pass
    return roles


def task_lr(config: RuleConfig, task: T.Task) -> float:
    """The rule's recommended lr for the task's regime (``task.regime``, "scratch" when it has none): what the
    optimizer runs at when the user gives no lr."""
    return float(config.recommended_lr[getattr(task, "regime", "scratch")])


def inner_step(
    config: RuleConfig,
    weights: Weights,
    task: T.Task,
    params: dict[str, torch.Tensor],
    accumulators: dict[str, dict[str, torch.Tensor]],
    batch: T.Batch,
    scales: Mapping[str, torch.Tensor] | None = None,
    differentiable: bool = False,
    consume: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]]]:
    """Loss, gradient and one learned step for every copy: returns ``(losses (C,), params', accumulators')``.

    The loss is evaluated at ``params`` (the trained variables θ; with ``scales`` the model sees ``θ·s``).
    Gradients are always detached before they reach the rule (first-order: no Hessian terms). With
    ``differentiable`` the returned losses and new parameters keep the graph to ``weights`` (TBPTT);
    otherwise everything is computed without a meta-graph. With ``consume`` (no meta-graph only) each entry
    of ``params`` and ``accumulators`` is removed from those dicts, and its gradient dropped, once its new
    value exists: old and new copies of the whole model never coexist (the caller replaces both dicts).
    """
    if consume and differentiable:
        raise ValueError("inner_step: consume needs differentiable=False (TBPTT keeps the old parameters)")
    names = list(params)
    roles = task_roles(task, params)
    with torch.enable_grad():
        if differentiable:
            leaves = [params[k] if params[k].requires_grad else params[k].detach().requires_grad_() for k in names]
        else:
            leaves = [params[k].detach().requires_grad_() for k in names]
        variables = dict(zip(names, leaves))
        model_params = T.reparametrize(variables, scales, inverse=False) if scales is not None else variables
        losses = task.loss(model_params, batch)
        grads = list(torch.autograd.grad(losses.sum(), leaves, retain_graph=differentiable))
    if not differentiable:  # nothing may keep the old parameters alive but ``params`` itself
        losses = losses.detach()
        leaves = [leaf.detach() for leaf in leaves]
        del variables, model_params
    new_params, new_accumulators = {}, {}
    lr = task_lr(config, task)
    regime, matrices = getattr(task, "regime", "scratch"), trained_matrices(list(roles.values()))
    context = torch.enable_grad() if differentiable else torch.no_grad()
    with context:
        for i, name in enumerate(names):
            new_params[name], new_accumulators[name] = reference.learned_update(
                config, weights, leaves[i], grads[i].detach(), accumulators[name], batch_dims=1, role=roles[name],
                lr=lr * regime_lr_factor(config, roles[name], regime, matrices),
            )
            if consume:
                leaves[i] = grads[i] = None
                del params[name], accumulators[name]
    return losses, new_params, new_accumulators


def has_meta_split(task: Any) -> bool:
    """Whether the task's meta-objective is a held-out split (it has ``sample_meta_batch``)."""
    return callable(getattr(task, "sample_meta_batch", None))


def meta_losses(group: TaskGroup, params: Mapping[str, torch.Tensor], differentiable: bool = False) -> torch.Tensor:
    """Every copy's loss on a fresh held-out batch at ``params`` (shared by the ± copies of an instance)."""
    batch = group.sample_meta_batch()
    context = torch.enable_grad() if differentiable else torch.no_grad()
    with context:
        model_params = T.reparametrize(params, group.scales, inverse=False) if group.scales else params
        losses = group.task.loss(model_params, batch)
    return losses if differentiable else losses.detach()


# ---- a group of task instances -----------------------------------------------------------------------


@dataclass
class TaskGroup:
    """Inner state of one vectorized group (see the module docstring). Everything needed to resume is here:
    the task spec, stacked parameters and accumulators, reparametrization scales, the per-instance initial
    loss (meta-loss normalizer), the PES perturbation sum, episode position/length and the group's RNG."""

    index: int
    generator: torch.Generator
    instances: int
    copies_per_instance: int
    spec: dict[str, Any] = field(default_factory=dict)
    task: Any = None
    params: dict[str, torch.Tensor] = field(default_factory=dict)
    accumulators: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    scales: dict[str, torch.Tensor] = field(default_factory=dict)
    initial_loss: torch.Tensor | None = None
    perturbation_sum: torch.Tensor | None = None
    episode_step: int = 0
    episode_length: int = 0
    episodes: int = 0

    @property
    def copies(self) -> int:
        return self.instances * self.copies_per_instance

    def repeat(self, tensor: torch.Tensor) -> torch.Tensor:
        """Rows of ``n`` instances → rows of all copies: ``[inst 0..n-1] * copies_per_instance``."""
        return torch.cat([tensor] * self.copies_per_instance) if self.copies_per_instance > 1 else tensor

    def sample_batch(self) -> T.Batch:
        return tuple(self.repeat(b) for b in self.task.sample_batch(self.generator, self.instances))

    def sample_meta_batch(self) -> T.Batch:
        """Held-out batches (tasks with ``sample_meta_batch``), one per instance, repeated over its copies."""
        return tuple(self.repeat(b) for b in self.task.sample_meta_batch(self.generator, self.instances))

    def has_diverged(self) -> bool:
        return any(not torch.isfinite(p).all() for p in self.params.values())


def sample_episode_length(generator: torch.Generator, low: int, high: int) -> int:
    """Episode length log-uniform in [low, high]."""
    u = float(torch.rand((), generator=generator))
    return int(round(math.exp(math.log(low) + u * (math.log(high) - math.log(low)))))


def reset_group(
    group: TaskGroup,
    config: RuleConfig,
    num_phi: int,
    task_distribution: Sequence[Mapping[str, Any]] | None,
    episode_range: tuple[int, int],
    reparam_range: tuple[float, float] | None,
    fixed_task: T.Task | None = None,
    random_offset: bool = False,
    restart_prob: float = 0.0,
) -> None:
    """Start a new episode: a fresh task spec (unless ``fixed_task``), fresh inits, scales and accumulators.

    With ``random_offset`` (the first episode of a run) the episode is cut to a uniformly random part of its
    length, so that groups reach their episode ends at staggered meta-steps. With ``restart_prob`` (fixed
    tasks only) the new episode, with that probability, starts where the last one ended (each instance from
    its + copy's parameters and accumulators, when finite) instead of from the task's initial point: episodes
    then begin at random points along a training trajectory. A task with ``initial_accumulators(n)`` (e.g.
    a bundle's shipped optimizer state) starts its accumulators there instead of at zero.
    """
    generator = group.generator
    if fixed_task is not None and restart_prob > 0 and group.params and not group.has_diverged():
        if float(torch.rand((), generator=generator)) < restart_prob:
            n = group.instances
            length = sample_episode_length(generator, *episode_range)
            group.episode_length, group.episode_step = length, 0
            group.params = {k: group.repeat(v[:n]) for k, v in group.params.items()}
            group.accumulators = {
                k: {key: group.repeat(value[:n]) for key, value in state.items()} for k, state in group.accumulators.items()
            }
            group.initial_loss = None
            group.perturbation_sum = torch.zeros(n, num_phi)
            group.episodes += 1
            return
    if fixed_task is not None:
        group.task = fixed_task
    else:
        group.spec = T.sample_task_spec(task_distribution, generator)
        group.task = T.build_task(group.spec)
    group.spec = dict(group.task.spec)
    length = sample_episode_length(generator, *episode_range)
    if random_offset:
        length = int(torch.randint(1, length + 1, (), generator=generator))
    group.episode_length, group.episode_step = length, 0
    weights = group.task.init_params(generator, group.instances)
    if reparam_range is not None and reparam_range[0] != reparam_range[1]:
        scales = T.sample_reparam_scales(weights, generator, *reparam_range)
        weights = T.reparametrize(weights, scales, inverse=True)
        group.scales = {k: group.repeat(v) for k, v in scales.items()}
    else:
        group.scales = {}
    group.params = {k: group.repeat(v) for k, v in weights.items()}
    initial_accumulators = getattr(group.task, "initial_accumulators", None)
    shipped = initial_accumulators(config) if callable(initial_accumulators) else {}
    group.accumulators = {
        k: (
            {key: group.repeat(value.unsqueeze(0).expand(group.instances, *value.shape).clone()) for key, value in shipped[k].items()}
            if k in shipped
            else reference.init_state(config, v.shape[1:], batch_shape=(group.copies,))
        )
        for k, v in group.params.items()
    }
    group.initial_loss = None
    group.perturbation_sum = torch.zeros(group.instances, num_phi)
    group.episodes += 1


def group_tensors(group: TaskGroup) -> dict[str, torch.Tensor]:
    """The group's resumable tensors, flat-keyed (for safetensors)."""
    out = {f"params/{k}": v.detach().contiguous() for k, v in group.params.items()}
    for name, state in group.accumulators.items():
        for key, value in state.items():
            out[f"accumulators/{name}/{key}"] = value.detach().contiguous()
    out.update({f"scales/{k}": v.contiguous() for k, v in group.scales.items()})
    if group.initial_loss is not None:
        out["initial_loss"] = group.initial_loss.contiguous()
    if group.perturbation_sum is not None:
        out["perturbation_sum"] = group.perturbation_sum.contiguous()
    out["generator"] = group.generator.get_state()
    return out


def group_metadata(group: TaskGroup) -> dict[str, Any]:
    return {
        "index": group.index,
        "spec": group.spec,
        "episode_step": group.episode_step,
        "episode_length": group.episode_length,
        "episodes": group.episodes,
        "instances": group.instances,
        "copies_per_instance": group.copies_per_instance,
    }


def restore_group(
    meta: Mapping[str, Any], tensors: Mapping[str, torch.Tensor], fixed_task: T.Task | None = None
) -> TaskGroup:
    """Inverse of `group_tensors` + `group_metadata`."""
    generator = torch.Generator()
    generator.set_state(tensors["generator"].clone())
    group = TaskGroup(
        index=meta["index"],
        generator=generator,
        instances=meta["instances"],
        copies_per_instance=meta["copies_per_instance"],
        spec=dict(meta["spec"]),
        episode_step=meta["episode_step"],
        episode_length=meta["episode_length"],
        episodes=meta["episodes"],
    )
    group.task = fixed_task if fixed_task is not None else T.build_task(group.spec)
    for key, value in tensors.items():
        parts = key.split("/")
        if parts[0] == "params":
            group.params[parts[1]] = value.clone()
        elif parts[0] == "accumulators":
            group.accumulators.setdefault(parts[1], {})[parts[2]] = value.clone()
        elif parts[0] == "scales":
            group.scales[parts[1]] = value.clone()
    # keep parameter order as the task defines it (safetensors sorts keys)
    order = list(group.task.init_params(torch.Generator().manual_seed(0), 1))
    group.params = {k: group.params[k] for k in order}
    group.accumulators = {k: group.accumulators[k] for k in order}
    if group.scales:
        group.scales = {k: group.scales[k] for k in order}
    group.initial_loss = tensors["initial_loss"].clone() if "initial_loss" in tensors else None
    group.perturbation_sum = tensors["perturbation_sum"].clone() if "perturbation_sum" in tensors else None
    return group
