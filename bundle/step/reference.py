"""Torch reference of the learned step: accumulators, features, per-tensor normalization, φ, output.

This is the one copy of the math; its vocabulary (feature table, constants, activations, decays, Adam's
direction) is `vocabulary.py`. `LearnedOptimizer`, the meta-training unroll and the Triton kernels' parity
tests all go through it. Functions are pure (they return new tensors), differentiable, and take
``batch_dims``: a parameter of shape ``S`` may arrive as ``(*B, *S)`` with ``len(B) == batch_dims`` (many
task copies advanced together), every per-tensor reduction then runs over ``S`` only, and φ's weights may
carry the same leading ``B`` (one perturbed φ per copy) or none (shared).

State of one parameter tensor of shape ``S`` (all fp32; ``K`` momenta, ``J`` factored decays):

- ``step``: number of completed steps (int64, shape ``B``);
- ``momentum``: ``(*B, K, *S)``, ``m_k ← β_k m_k + (1−β_k) g``;
- ``second_moment``: ``(*B, *S)``, ``v ← β_v v + (1−β_v) g²``;
- rank ≥ 2: ``row_second_moment`` ``(*B, J, *S[:-1])`` and ``col_second_moment`` ``(*B, J, *S[:-2], S[-1])``,
  EMAs of the column-mean and row-mean of ``g² + factored_eps`` over the last two dims;
- rank < 2: ``full_second_moment`` ``(*B, J, *S)``, the EMA of ``g² + factored_eps`` itself;
- format-2 rules whose features read no factored statistic keep neither (`vocabulary.keeps_factored_state`).

No bias correction except in ``adam_direction`` / the ``adam_residual`` output, which use Adam's.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from .roles import is_orthogonalized, step_multiplier
from .rule import RuleConfig
from .vocabulary import (
    ACTIVATION_FUNCTIONS,
    FACTORED_FEATURES,
    NEWTON_SCHULZ_EPS,
    NORMALIZED_EPS,
    RMS_EPS,
    adam_direction_from_moments,
    bias_corrections,
    decay_view,
    is_factored,
    keeps_factored_state,
)

Weights = Sequence[tuple[torch.Tensor, torch.Tensor]]
#: one parameter tensor's accumulators and step count, as listed above
State = dict[str, torch.Tensor]


# ---- shapes -------------------------------------------------------------------------------------------


def _tensor_dims(x: torch.Tensor, batch_dims: int) -> tuple[int, ...]:
    return tuple(range(batch_dims, x.dim()))


def tensor_mean(x: torch.Tensor, batch_dims: int) -> torch.Tensor:
    """Mean over the tensor's own dims (not the batch dims), keepdim. 0-d tensors are their own mean."""
    dims = _tensor_dims(x, batch_dims)
    return x.mean(dim=dims, keepdim=True) if dims else x


# ---- accumulators -------------------------------------------------------------------------------------


def init_state(
    config: RuleConfig,
    shape: Sequence[int],
    batch_shape: Sequence[int] = (),
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> State:
    """Zero accumulators for a parameter of shape ``shape`` (optionally with leading ``batch_shape``).

    The math runs on fp32 accumulators (`LearnedOptimizer` keeps bf16 ones in memory with ``state_dtype`` and
    widens them for the step); ``dtype`` also lets tests run the math in fp64.
    """
    shape, batch_shape = tuple(shape), tuple(batch_shape)
    k, j = len(config.momentum_decays), len(config.factored_decays)
    f32 = dict(dtype=dtype, device=device)
    state = {
        "step": torch.zeros(batch_shape, dtype=torch.int64, device=device),
        "momentum": torch.zeros((*batch_shape, k, *shape), **f32),
        "second_moment": torch.zeros((*batch_shape, *shape), **f32),
    }
    if config.lr_adaptation != "none":
        state["lr_log_scale"] = torch.zeros(batch_shape, **f32)
    if not keeps_factored_state(config):
        return state
    if is_factored(shape):
        state["row_second_moment"] = torch.zeros((*batch_shape, j, *shape[:-1]), **f32)
        state["col_second_moment"] = torch.zeros((*batch_shape, j, *shape[:-2], shape[-1]), **f32)
    else:
        state["full_second_moment"] = torch.zeros((*batch_shape, j, *shape), **f32)
    return state


def update_accumulators(config: RuleConfig, grad: torch.Tensor, state: State, batch_dims: int = 0) -> State:
    """One EMA step of every accumulator with gradient ``grad`` (fp32); ``step`` is left to the caller."""
    rank = grad.dim() - batch_dims
    g = grad.unsqueeze(batch_dims)  # (*B, 1, *S) broadcasts against the stacked (*B, K, *S)
    beta_m = decay_view(config.momentum_decays, rank, grad)
    new = dict(state)
    # (a·x).add_(b) is a·x + b, with one temporary fewer (momenta of large tensors are large)
    new["momentum"] = (beta_m * state["momentum"]).add_((1 - beta_m) * g)
    beta_v = config.second_moment_decay
    new["second_moment"] = (beta_v * state["second_moment"]).add_((1 - beta_v) * grad * grad)
    if not keeps_factored_state(config):
        return new
    g2 = g * g + config.factored_eps
    if rank >= 2:
        beta_row = decay_view(config.factored_decays, rank - 1, grad)
        new["row_second_moment"] = beta_row * state["row_second_moment"] + (1 - beta_row) * g2.mean(dim=-1)
        new["col_second_moment"] = beta_row * state["col_second_moment"] + (1 - beta_row) * g2.mean(dim=-2)
    else:
        beta_full = decay_view(config.factored_decays, rank, grad)
        new["full_second_moment"] = beta_full * state["full_second_moment"] + (1 - beta_full) * g2
    return new


def factored_statistics(
    config: RuleConfig, state: State, rank: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row/column second moments broadcast to ``(*B, J, *S)`` and Adafactor's row/column factors.

    For rank ≥ 2 (Adafactor): ``v̂_j = row_j ⊗ col_j / mean(row_j)``, ``row_factor_j = rsqrt(row_j / mean(row_j))``
    and ``col_factor_j = rsqrt(col_j)``, so ``g · row_factor_j · col_factor_j = g / √v̂_j``.
    For rank < 2 both row and column statistics are the full accumulator ``f_j``, ``row_factor_j = rsqrt(f_j)``
    and ``col_factor_j = 1``.
    Returns ``(row, col, row_factor, col_factor)`` each broadcastable to ``(*B, J, *S)``.
    """
    if rank >= 2:
        row = state["row_second_moment"].unsqueeze(-1)  # (*B, J, *S[:-1], 1)
        col = state["col_second_moment"].unsqueeze(-2)  # (*B, J, *S[:-2], 1, C)
        row_factor = torch.rsqrt(row / row.mean(dim=-2, keepdim=True))
        col_factor = torch.rsqrt(col)
        return row, col, row_factor, col_factor
    full = state["full_second_moment"]
    return full, full, torch.rsqrt(full), torch.ones_like(full)


def adam_direction(config: RuleConfig, state: State, batch_dims: int = 0) -> torch.Tensor:
    """Adam's update direction ``m̂/(√v̂ + adam_eps)`` from the (already updated) accumulators.

    ``m̂ = m_i/(1 − β_i^t)`` with ``i = adam_momentum_index`` and ``v̂ = v/(1 − β_v^t)``, ``t = state['step']``
    counting the current step (so ``t ≥ 1``).
    """
    rank = state["second_moment"].dim() - batch_dims
    t = state["step"].to(state["second_moment"].dtype).reshape((*state["step"].shape, *([1] * rank)))
    m = state["momentum"].select(batch_dims, config.adam_momentum_index)
    return adam_direction_from_moments(m, state["second_moment"], *bias_corrections(config, t), config.adam_eps)


def newton_schulz(x: torch.Tensor, config: RuleConfig) -> torch.Tensor:
    """Approximate orthogonalization of the last two dims (Muon's quintic Newton–Schulz iteration).

    ``x`` of shape ``(*B, R, C)``; returns a matrix of the same shape whose singular values lie near 1
    (``ns_steps`` iterations of ``X ← aX + (bA + cA²)X``, ``A = XXᵀ``, after scaling X to unit Frobenius norm).
    """
    a, b, c = config.ns_coefficients
    shape = x.shape
    transpose = shape[-2] > shape[-1]
    x = x.reshape(-1, *shape[-2:])  # (B, R, C): batched GEMMs with the scaled adds folded in (`torch.baddbmm`)
    if transpose:
        x = x.mT
    x = x / (torch.linalg.matrix_norm(x, keepdim=True) + NEWTON_SCHULZ_EPS)
    for _ in range(config.ns_steps):
        gram = x @ x.mT
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return (x.mT if transpose else x).reshape(shape)


def orthogonal_direction(
    config: RuleConfig, grad: torch.Tensor, state: State, residual: torch.Tensor, batch_dims: int
) -> torch.Tensor:
    """``matrix_rms · o / RMS(o)``, ``o = NewtonSchulz(m̃/RMS(m̃) + residual)`` over ``fan_out × fan_in``.

    ``m̃ = β m + (1 − β) g`` is the Nesterov look-ahead of momentum ``orthogonal_momentum_index``; ``state``
    holds the accumulators after this step's update.
    """
    index = config.orthogonal_momentum_index
    beta = config.momentum_decays[index]
    lookahead = beta * state["momentum"].select(batch_dims, index) + (1 - beta) * grad
    unit = lookahead * torch.rsqrt(tensor_mean(lookahead * lookahead, batch_dims) + RMS_EPS)
    x = unit + residual
    shape = x.shape
    matrix = x.reshape(*shape[: batch_dims + 1], -1)
    o = newton_schulz(matrix, config).reshape(shape)
    return config.matrix_rms * o * torch.rsqrt(tensor_mean(o * o, batch_dims) + RMS_EPS)


def adapted_lr_log_scale(config: RuleConfig, grad: torch.Tensor, state: State, batch_dims: int = 0) -> torch.Tensor:
    """The tensor's new log lr multiplier (``lr_adaptation: gradient_alignment``), shape ``(*B,)``.

    ``clip(log s + rate · sign(Σ g·m), log lo, log hi)`` with ``m`` the momentum
    ``lr_adaptation_momentum_index`` *before* this step's update (``state`` holds it). A zero momentum (the
    first step) or gradient leaves ``s`` unchanged.
    """
    momentum = state["momentum"].select(batch_dims, config.lr_adaptation_momentum_index)
    if batch_dims == 0:  # one tensor (the optimizer's back ends): a dot product, no temporary
        alignment = torch.dot(grad.reshape(-1).to(momentum.dtype), momentum.reshape(-1))
    else:
        alignment = (grad * momentum).sum(dim=tuple(range(batch_dims, grad.dim()))) if grad.dim() > batch_dims else grad * momentum
    lo, hi = config.lr_adaptation_bounds
    log_scale = state["lr_log_scale"] + config.lr_adaptation_rate * torch.sign(alignment)
    return log_scale.clamp(math.log(lo), math.log(hi))


def time_features(config: RuleConfig, step: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``tanh(t/τ − 1)`` for each τ in ``time_scales``; shape ``(*B, T)``. ``t`` counts completed steps."""
    scales = torch.tensor(config.time_scales, dtype=dtype, device=step.device)
    return torch.tanh(step.to(dtype).unsqueeze(-1) / scales - 1.0)


def _narrow_rows(x: torch.Tensor, dim: int, rows: tuple[int, int]) -> torch.Tensor:
    """``x`` restricted to rows ``[start, stop)`` of ``dim``, unless it broadcasts (size 1) there."""
    return x if x.shape[dim] == 1 else x.narrow(dim, rows[0], rows[1] - rows[0])


def compute_features(
    config: RuleConfig, param: torch.Tensor, grad: torch.Tensor, state: State, batch_dims: int = 0,
    rows: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Unnormalized non-time features, features-first: ``(*B, F, N)`` with ``N = numel(S)``.

    ``state`` holds the accumulators *after* this step's update, and ``state['step']`` counts this step.
    Column order follows ``config.features`` (each group expanded to its width), "time" excluded.
    ``rows = (start, stop)``: only those rows of the tensor's first dim (``N`` = their coordinates); the
    features are elementwise given the (whole-tensor) factored statistics, so blocks concatenate to the whole.
    """
    rank = param.dim() - batch_dims
    factored = None
    if rows is not None:
        if rank >= 2 and any(name in FACTORED_FEATURES for name in config.features):
            # Adafactor's factors read means over the whole tensor: computed before restricting to the rows
            factored = tuple(_narrow_rows(x, batch_dims + 1, rows) for x in factored_statistics(config, state, rank))
        param, grad = _narrow_rows(param, batch_dims, rows), _narrow_rows(grad, batch_dims, rows)
        state = {
            key: _narrow_rows(value, batch_dims + (key != "second_moment"), rows)
            for key, value in state.items()
            if key in ("momentum", "second_moment", "full_second_moment")
        } | {"step": state["step"]}
    batch_shape = param.shape[:batch_dims]
    momentum, v = state["momentum"], state["second_moment"]
    rsqrt_v = torch.rsqrt(v + config.second_moment_eps)
    columns: list[torch.Tensor] = []  # each (*B, w, *S)
    for name in config.features:
        if name == "time":
            continue
        if name in FACTORED_FEATURES and factored is None:
            factored = factored_statistics(config, state, rank)
        if name == "grad":
            feature = grad.unsqueeze(batch_dims)
        elif name == "param":
            feature = param.unsqueeze(batch_dims)
        elif name == "momentum":
            feature = momentum
        elif name == "second_moment":
            feature = v.unsqueeze(batch_dims)
        elif name == "momentum_rsqrt_second_moment":
            feature = momentum * rsqrt_v.unsqueeze(batch_dims)
        elif name == "rsqrt_second_moment":
            feature = rsqrt_v.unsqueeze(batch_dims)
        elif name == "adafactor_grad":
            row, col, row_factor, col_factor = factored
            feature = grad.unsqueeze(batch_dims) * row_factor * col_factor
        elif name == "row_second_moment":
            feature = factored[0]
        elif name == "col_second_moment":
            feature = factored[1]
        elif name == "rsqrt_row_second_moment":
            feature = torch.rsqrt(factored[0] + config.factored_rsqrt_eps)
        elif name == "rsqrt_col_second_moment":
            feature = torch.rsqrt(factored[1] + config.factored_rsqrt_eps)
        elif name == "adafactor_momentum":
            feature = momentum * factored[2] * factored[3]
        elif name == "adam_direction":
            feature = adam_direction(config, state, batch_dims).unsqueeze(batch_dims)
        else:  # pragma: no cover - RuleConfig.validate() rejects unknown names
            raise ValueError(name)
        width = config.feature_width(name)
        columns.append(feature.expand(*batch_shape, width, *param.shape[batch_dims:]))
    stacked = torch.cat(columns, dim=batch_dims)  # (*B, F, *S)
    return stacked.reshape(*batch_shape, stacked.shape[batch_dims], -1)


def feature_normalizers(config: RuleConfig, features: torch.Tensor) -> torch.Tensor:
    """``rsqrt(normalization_eps + mean(x²))`` per feature column, mean over the tensor: ``(*B, F)``."""
    return torch.rsqrt(config.normalization_eps + (features * features).mean(dim=-1))


def apply_network(
    config: RuleConfig,
    weights: Weights,
    features: torch.Tensor,
    normalizers: torch.Tensor,
    time: torch.Tensor | None,
) -> torch.Tensor:
    """φ on normalized features: returns ``(*B, 2, N)`` (direction, log-magnitude).

    Normalization and the time features are per tensor, so they are folded into the first layer:
    ``W₁ (x ⊙ s) + W₁ᵗ τ + b₁ = (W₁ ⊙ s) x + (b₁ + W₁ᵗ τ)``. This is exact math, cheaper than scaling
    ``F × N`` features, and is what the fused kernel does too.
    """
    activation = ACTIVATION_FUNCTIONS[config.activation]
    n_plain = features.shape[-2]
    (w1, b1), rest = weights[0], weights[1:]
    w_plain = w1[..., :n_plain] * normalizers.unsqueeze(-2)  # (*B, H, F)
    bias = b1
    if time is not None and config.num_time_inputs:
        bias = b1 + (w1[..., n_plain:] @ time.unsqueeze(-1)).squeeze(-1)  # (*B, H)
    hidden = w_plain @ features + bias.unsqueeze(-1)
    for w, b in rest:
        hidden = w @ activation(hidden) + b.unsqueeze(-1)
    return hidden


#: features ``(*B, F, ·)`` and φ's hidden layers ``(*B, H, ·)`` of a tensor are computed in blocks of rows of at most
#: about this many elements (fp32: 16 MiB), so that a step needs no ``copies × features × parameters`` tensor
CHUNK_ELEMENTS = 1 << 22


def row_blocks(config: RuleConfig, param: torch.Tensor, batch_dims: int = 0) -> list[tuple[int, int]] | None:
    """``[(start, stop), …]`` over the tensor's first dim such that a block's features and hidden layers hold at
    most `CHUNK_ELEMENTS` elements (at least one row each), or ``None`` when the whole tensor fits in one."""
    shape = param.shape[batch_dims:]
    total = param.numel() * max(config.num_inputs, *config.hidden_sizes, config.num_outputs)
    if not shape or total <= CHUNK_ELEMENTS:
        return None
    per_row = total // shape[0]
    step = max(1, CHUNK_ELEMENTS // per_row)
    return [(start, min(start + step, shape[0])) for start in range(0, shape[0], step)]


def network_output(
    config: RuleConfig,
    weights: Weights,
    param: torch.Tensor,
    grad: torch.Tensor,
    state: State,
    time: torch.Tensor | None,
    batch_dims: int = 0,
) -> torch.Tensor:
    """φ's output ``(*B, 2, N)`` on the normalized features of (``param``, ``grad``, ``state``).

    A tensor whose features would exceed `CHUNK_ELEMENTS` is done in `row_blocks` with two passes: the
    per-feature sums of squares first (the normalizers), then features → φ per block. The same math as one
    pass up to the order of the fp32 sums.
    """
    blocks = row_blocks(config, param, batch_dims)
    if blocks is None:
        features = compute_features(config, param, grad, state, batch_dims)
        return apply_network(config, weights, features, feature_normalizers(config, features), time)
    squares = None
    for rows in blocks:
        features = compute_features(config, param, grad, state, batch_dims, rows)
        block = (features * features).sum(dim=-1)
        squares = block if squares is None else squares + block
    normalizers = torch.rsqrt(config.normalization_eps + squares / math.prod(param.shape[batch_dims:]))
    return torch.cat(
        [
            apply_network(config, weights, compute_features(config, param, grad, state, batch_dims, rows), normalizers, time)
            for rows in blocks
        ],
        dim=-1,
    )


def output_step(
    config: RuleConfig, network_output: torch.Tensor, param: torch.Tensor, state: State, batch_dims: int = 0,
    grad: torch.Tensor | None = None, role: str | None = None,
) -> torch.Tensor:
    """Turn φ's output ``(*B, 2, N)`` into the step ``u`` of the param's shape (before ``lr``).

    ``role`` (format-2 rules) selects the orthogonalized or the elementwise form of ``hybrid_residual`` and the
    role/width multiplier (`roles.step_multiplier`); ``grad`` is needed for the orthogonalized form.
    """
    shape = param.shape
    direction = network_output.select(-2, 0).reshape(shape)
    magnitude = network_output.select(-2, 1).reshape(shape)
    if config.output == "small_fc_lopt":
        step = direction * torch.exp(magnitude * config.exp_mult) * config.step_mult
    elif config.output == "normalized":
        raw = direction * torch.exp(magnitude * config.exp_mult)
        step = raw * torch.rsqrt(tensor_mean(raw * raw, batch_dims) + NORMALIZED_EPS) * config.step_mult
    elif config.output == "adam_residual":  # (step_mult · scale) first: the same product, one temporary fewer
        scale = config.step_mult * torch.exp(config.magnitude_bound * torch.tanh(magnitude))
        step = scale * (adam_direction(config, state, batch_dims) + direction)
    elif config.output == "hybrid_residual":
        tensor_shape = shape[batch_dims:]
        if is_orthogonalized(config, role, tensor_shape):
            scale = torch.exp(config.magnitude_bound * torch.tanh(tensor_mean(magnitude, batch_dims)))
            step = config.step_mult * scale * orthogonal_direction(config, grad, state, direction, batch_dims)
        else:
            scale = config.step_mult * torch.exp(config.magnitude_bound * torch.tanh(magnitude))
            step = scale * (adam_direction(config, state, batch_dims) + direction)
        multiplier = step_multiplier(config, role, tensor_shape)
        if multiplier != 1.0:
            step = step * multiplier
    else:  # pragma: no cover
        raise ValueError(config.output)
    if config.param_scale:
        rms = torch.sqrt(tensor_mean(param * param, batch_dims))
        step = step * torch.clamp(rms, min=config.param_scale_min)
    return step


def learned_update(
    config: RuleConfig,
    weights: Weights,
    param: torch.Tensor,
    grad: torch.Tensor,
    state: State,
    lr: float | torch.Tensor = 1.0,
    weight_decay: float | torch.Tensor = 0.0,
    batch_dims: int = 0,
    role: str | None = None,
) -> tuple[torch.Tensor, State]:
    """One learned step of one parameter tensor (fp32 in, fp32 out).

    ``p' = p · (1 − lr · step_mult · weight_decay) − lr · u(features(p, g, state'), φ)`` where ``state'`` is
    the state after the accumulator update and the time features read the completed-step count before it.
    ``role`` is the tensor's role (`roles.py`; format-2 rules read it). Returns ``(p', state')``; nothing is
    modified in place.
    """
    time_step = state["step"]
    new_state = update_accumulators(config, grad, state, batch_dims)
    new_state["step"] = time_step + 1
    if config.lr_adaptation != "none":
        new_state["lr_log_scale"] = adapted_lr_log_scale(config, grad, state, batch_dims)
        lr = lr * torch.exp(new_state["lr_log_scale"])
    time = time_features(config, time_step, param.dtype) if config.num_time_inputs else None
    output = network_output(config, weights, param, grad, new_state, time, batch_dims)
    step = output_step(config, output, param, new_state, batch_dims, grad=grad, role=role)
    if config.schedule == "inverse_sqrt":  # the rule's own decay: lr · (1 + t/T)^-½, t = completed steps
        lr = lr * torch.rsqrt(1.0 + time_step.to(torch.float32) / config.schedule_steps)
    if isinstance(lr, torch.Tensor):
        lr = lr.reshape((*lr.shape, *([1] * (param.dim() - lr.dim()))))
    new_param = param - lr * step
    if not (isinstance(weight_decay, (int, float)) and weight_decay == 0):
        new_param = new_param - lr * (config.step_mult * weight_decay) * param
    return new_param, new_state
