"""Fused CPU back end of the learned step: `reference.learned_update`'s math as `torch.compile`d calls.

For format-2 rules whose features are elementwise (grad, param, momenta, second moment, their ratios, Adam's
direction, time; no factored statistics) and whose output is ``hybrid_residual`` or ``adam_residual``, which
includes the shipped default. One kernel steps ``B`` tensors of ``n`` elements each, as rows of ``(B, n)``
arguments (rows never mix: per-row normalizers, lr, role and width multipliers, proof); shapes are dynamic, so
a few compiles per rule, step form and parameter dtype (``B = 1`` and ``B ≥ 2``; dynamo specializes size 1)
serve every size. Tensors are grouped by form, shape (matrices) or size (elementwise form) and dtype; a group's
tensors below `STACK_BELOW` elements are stacked into one call (their rows copied in and back: cheaper than a
call's fixed cost), larger ones get one call each on views of their own storage. Each call is one C++ loop nest:

1. **reduce** (writes nothing): the new momenta and second moment, every feature's Σx², the look-ahead's Σx²
   (orthogonalized tensors), the gradient–momentum alignment Σg·m (rules with ``lr_adaptation``: the new lr
   multiplier), φ's first layer with the normalizers and the time features folded in, and a
   **finiteness proof**: ``|x| ≤ √Σx²`` per feature pushed through ``|W|`` bounds the step and the new parameter.
2. **apply**: per element again, features → φ (unrolled: a few dozen multiply-adds per element) → output
   form; writes accumulators, step count and parameter in place, each write keeping the old value unless the
   proof holds. No feature column is written to memory. For orthogonalized matrices it writes the
   Newton–Schulz input ``unit(look-ahead) + direction`` instead and returns φ's mean magnitude; same-shaped
   matrices are then orthogonalized together (one batched `reference.newton_schulz`) and the parameters updated.

A tensor the proof does not cover (non-finite or huge gradient or parameter, a step that could overflow) is
left untouched (a stacked one: its row is not copied back) and handed back, as are tensors it does not take
(< 2 elements, non-contiguous, not CPU); the caller steps those with the reference back end, which skips and
counts non-finite ones exactly as before. When compilation fails the reason is logged once and every tensor is
handed back. Inductor caches compiled code on disk (``TORCHINDUCTOR_CACHE_DIR``, default under the temp dir),
so later processes skip most of the compile.

The C++ is compiled with multiply-adds contracted to FMA instructions and the rule's constants inlined (dynamo
would otherwise pass each Python float as a tensor argument); Adam's bias corrections come in as per-tensor
reciprocals. Results agree with `reference.learned_update` to fp32 rounding (sums and φ's first layer are
regrouped, multiply-adds fused, bias corrections multiplied by their reciprocals): tests/step/test_fused_step.py.
"""

from __future__ import annotations

import logging
import math
import time
import types
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from . import reference
from .roles import is_orthogonalized, regime_lr_factor, step_multiplier
from .rule import RuleConfig
from .vocabulary import ACTIVATION_FUNCTIONS, RMS_EPS, bias_corrections

logger = logging.getLogger(__name__)

#: Elementwise features this path computes (anything else: `unsupported_reason`).
_FEATURES = frozenset({
    "grad", "param", "momentum", "second_moment", "momentum_rsqrt_second_moment", "rsqrt_second_moment",
    "adam_direction", "time",
})
#: On CPU the fused path is the default for tensors of at least this many elements (smaller ones: the
#: reference, whose cost per tensor is below a compile); ``OPTBUNDLE_BACKEND=fused`` takes every tensor.
DEFAULT_MIN_NUMEL = 1 << 14
#: Tensors of a group (same form, shape or size, dtype) below this many elements are stacked and stepped by one
#: call (copying them costs less than a call's fixed overhead, ≈ 0.1 ms); larger ones get a call each, on views.
STACK_BELOW = 1 << 14
#: Whether kernels go through `torch.compile` (tests set False to check the same math eagerly).
COMPILE = True
_PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
#: Wall time spent in Newton–Schulz so far (benchmarks read the share of it in a step).
NEWTON_SCHULZ_SECONDS = [0.0]
_FAILED: list[str] = []  # the compile error, once one happened: every later call hands tensors back


def unsupported_reason(config: RuleConfig) -> str | None:
    """``None`` if this path can step tensors of ``config``'s rule, else why not."""
    if config.format_version < 2:
        return "format-1 rule (factored state)"
    extra = [name for name in config.features if name not in _FEATURES]
    if extra:
        return f"features {extra}"
    if config.output not in ("hybrid_residual", "adam_residual"):
        return f"output {config.output!r}"
    if config.param_scale:
        return "param_scale"
    if _FAILED:
        return f"compilation failed ({_FAILED[0]})"
    return None


def tensor_unsupported_reason(param: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor]) -> str | None:
    """``None`` if this path can step this tensor, else why not (the caller uses the reference)."""
    if param.device.type != "cpu":
        return f"{param.device.type} tensor"
    if param.dtype not in _PARAM_DTYPES:
        return f"parameter dtype {param.dtype}"
    if param.numel() < 2:
        return "fewer than 2 elements"
    if not (param.is_contiguous() and grad.is_contiguous() and all(v.is_contiguous() for v in state.values())):
        return "non-contiguous parameter, gradient or state"
    if any(v.dtype != torch.float32 for k, v in state.items() if k not in ("step", "skipped_steps")):
        return "accumulators not fp32"
    return None


# ---- the per-element math (traced by torch.compile; plain torch ops, so it also runs eagerly) ----------


@dataclass(frozen=True)
class _Spec:
    """What the kernels specialize on: the rule's structure and constants."""

    config: RuleConfig
    orthogonal: bool


def _accumulators(c: RuleConfig, g: torch.Tensor, m: Sequence[torch.Tensor], v: torch.Tensor):
    momenta = [d * m_k + (1 - d) * g for m_k, d in zip(m, c.momentum_decays)]
    v_new = c.second_moment_decay * v + (1 - c.second_moment_decay) * g * g
    return momenta, v_new


def _features(c: RuleConfig, p32, g, momenta, v_new, rbc1, rbc2):
    """Non-time feature columns (each ``(B, n)``) in φ's input order; ``rbc1``, ``rbc2``: the reciprocals of
    Adam's bias corrections (``(B, 1)``)."""
    columns = []
    rsqrt_v = torch.rsqrt(v_new + c.second_moment_eps)
    for name in c.features:
        if name == "grad":
            columns.append(g)
        elif name == "param":
            columns.append(p32)
        elif name == "momentum":
            columns += momenta
        elif name == "second_moment":
            columns.append(v_new)
        elif name == "momentum_rsqrt_second_moment":
            columns += [m_k * rsqrt_v for m_k in momenta]
        elif name == "rsqrt_second_moment":
            columns.append(rsqrt_v)
        elif name == "adam_direction":
            columns.append(_adam(c, momenta, v_new, rbc1, rbc2))
    return columns


def _adam(c: RuleConfig, momenta, v_new, rbc1, rbc2):
    """`vocabulary.adam_direction_from_moments` with the bias corrections' reciprocals (per row, computed once
    by the caller): two multiplies per element where the reference divides (a rounding apart)."""
    return momenta[c.adam_momentum_index] * rbc1 / (torch.sqrt(v_new * rbc2) + c.adam_eps)


def _lookahead(c: RuleConfig, momenta, g):
    index = c.orthogonal_momentum_index
    return c.momentum_decays[index] * momenta[index] + (1 - c.momentum_decays[index]) * g


def _phi(c: RuleConfig, columns, w, b, rest):
    """φ unrolled over its (few) units: each hidden/output unit is a weighted sum of ``(B, n)`` columns; the first
    layer ``w`` (``(B, H, F)``), ``b`` (``(B, H)``) has one row per tensor (its normalizers are folded in)."""
    activation = ACTIVATION_FUNCTIONS[c.activation]
    hidden = [_dot([w[:, h, f, None] for f in range(len(columns))], columns) + b[:, h, None] for h in range(w.shape[1])]
    for w_l, b_l in rest:
        hidden = [activation(x) for x in hidden]
        hidden = [_dot([w_l[o, i] for i in range(len(hidden))], hidden) + b_l[o] for o in range(w_l.shape[0])]
    return hidden[0], hidden[1]


def _dot(weights, columns):
    """``Σ w·x`` starting from the first term (`sum` would start from 0: one more add per element and unit)."""
    total = weights[0] * columns[0]
    for w, x in zip(weights[1:], columns[1:]):
        total = total + w * x
    return total


#: Scalars of a tensor's step in the plan pass 1 returns, after the F per-feature sums of squares (then φ's
#: first layer with the normalizers and the time features folded in: H × F weights, H biases).
_OK, _LR, _UNIT, _LOG_SCALE, _SCALARS = range(5)
#: Columns of the ``hyper`` argument, one row per tensor: lr × role factor, weight decay, step multiplier, and
#: the reciprocals of Adam's bias corrections (computed by the caller for all tensors at once: a power inside
#: the kernel is evaluated again for every vector of elements, as the compiler cannot hoist it).
_HYPER_LR, _HYPER_DECAY, _HYPER_MULT, _HYPER_RBC1, _HYPER_RBC2 = range(5)


def _reduce(spec: _Spec, p, g, v, step, log_scale, hyper, *rest):
    """Pass 1 (writes nothing): the plan of each row's step, ``[Σx² per feature, proof (1 = the step is surely
    finite), lr (with the schedule and the adapted multiplier), 1/RMS(look-ahead), new log lr multiplier,
    folded first layer]`` (one row of the ``(B, P)`` result per tensor).

    Every tensor argument has one row per parameter tensor: ``p``, ``g``, ``v`` and the K momenta in ``rest``
    are ``(B, n)``, ``step`` and ``log_scale`` (the lr multiplier's log, rules with ``lr_adaptation``; else
    unused) are ``(B,)``, ``hyper`` is ``(B, 5)`` (``_HYPER_*``); after the momenta, ``rest`` holds φ's weights
    and biases. Rows never mix."""
    c = spec.config
    m, weights = _split(c, rest)
    p32, g = p.to(torch.float32), g.to(torch.float32)
    t0 = step.to(torch.float32)
    lr = hyper[:, _HYPER_LR]
    if c.lr_adaptation != "none":  # `reference.adapted_lr_log_scale`: Σ g·m (m before this step) in this pass
        lo, hi = c.lr_adaptation_bounds
        alignment = (g * m[c.lr_adaptation_momentum_index]).sum(-1)
        log_scale = (log_scale + c.lr_adaptation_rate * torch.sign(alignment)).clamp(math.log(lo), math.log(hi))
        lr = lr * torch.exp(log_scale)
    if c.schedule == "inverse_sqrt":
        lr = lr * torch.rsqrt(1.0 + t0 / c.schedule_steps)
    rbc1, rbc2 = hyper[:, _HYPER_RBC1, None], hyper[:, _HYPER_RBC2, None]
    momenta, v_new = _accumulators(c, g, m, v)
    columns = _features(c, p32, g, momenta, v_new, rbc1, rbc2)
    sums = torch.stack([(x * x).sum(-1) for x in columns], dim=-1)  # (B, F)
    maxima = torch.sqrt(sums)  # max|x| ≤ √Σx²: a looser bound than max|x| but free
    numel = p.shape[-1]
    lookahead = _lookahead(c, momenta, g)
    unit = torch.rsqrt((lookahead * lookahead).sum(-1) / numel + RMS_EPS)
    # φ's first layer with the normalizers and the time features folded in (as `features.apply_network`)
    w1, b1 = weights[0]
    n_plain = len(columns)
    w = w1[:, :n_plain] * torch.rsqrt(c.normalization_eps + sums / numel)[:, None, :]  # (B, H, F)
    if c.num_time_inputs:
        times = torch.tanh(t0[:, None] / torch.tensor(c.time_scales, dtype=torch.float32) - 1.0)
        b1 = b1 + times @ w1[:, n_plain:].T  # (B, H)
    else:
        b1 = b1.expand(p.shape[0], -1)
    # the proof: |hidden| ≤ |W|·max|x| + |b| layer by layer (|act(x)| ≤ |x| for every activation offered)
    bound = (w.abs() * maxima[:, None, :]).sum(-1) + b1.abs()
    for w_l, b_l in weights[1:]:
        bound = bound @ w_l.abs().T + b_l.abs()
    scale = math.exp(c.magnitude_bound) * c.step_mult * hyper[:, _HYPER_MULT]
    if spec.orthogonal:
        step_max = scale * c.matrix_rms * math.sqrt(numel)
    else:
        adam = _adam(c, momenta, v_new, rbc1, rbc2)
        step_max = scale * (torch.sqrt((adam * adam).sum(-1)) + bound[:, 0])
    new_max = p32.abs().amax(-1) * (1 + lr * c.step_mult * hyper[:, _HYPER_DECAY]) + lr * step_max  # (fp16: √Σp² too loose)
    limit = 0.25 * torch.finfo(p.dtype if p.dtype != torch.float64 else torch.float32).max
    ok = (new_max < limit) & ((g * g).sum(-1) < limit) & (bound.amax(-1) < 1e30) & torch.isfinite(sums).all(-1)
    scalars = torch.stack([ok.to(torch.float32), lr, unit, log_scale.to(torch.float32)], dim=-1)
    return torch.cat([sums, scalars, w.flatten(1), b1], dim=-1)


def _split(c: RuleConfig, rest):
    k = len(c.momentum_decays)
    flat = rest[k:]
    return rest[:k], list(zip(flat[0::2], flat[1::2]))


def _write_param(p, p32, new32):
    if p.dtype == torch.float64:  # add the fp32 change: a float64 parameter is not rounded to fp32
        p.add_(new32.to(torch.float64) - p32.to(torch.float64))
    else:
        p.copy_(new32.to(p.dtype))


def _step(spec: _Spec, p, g, v, step, log_scale, hyper, out, *rest):
    """Both passes in one compiled call (inductor emits the reduction loop, then the apply loop), for ``B`` rows
    (tensors) at once. Every write keeps the old value unless the row's proof holds, so an unproved tensor is
    left exactly as it was. Returns ``(B, 3)``: ``[proof, mean φ magnitude, lr of this step]`` per row."""
    plan = _reduce(spec, p, g, v, step, log_scale, hyper, *rest)
    n_plain = spec.config.num_inputs - spec.config.num_time_inputs
    ok = plan[:, n_plain + _OK: n_plain + _OK + 1] > 0
    return torch.cat([plan[:, n_plain + _OK: n_plain + _OK + 1],
                      _apply(spec, p, g, v, step, log_scale, hyper, plan, out, ok, *rest)], dim=-1)


def _apply(spec: _Spec, p, g, v, step, log_scale, hyper, plan, out, ok, *rest):
    """Pass 2: writes momenta, second moment, step, the lr multiplier's log (rules with ``lr_adaptation``) and
    the parameter (elementwise form) or the Newton–Schulz input ``out`` (orthogonalized form), each only in rows
    where ``ok`` (``(B, 1)``). Returns ``(B, 2)``: ``[mean φ magnitude, lr of this step]`` per row."""
    c = spec.config
    m, weights = _split(c, rest)
    p32, g = p.to(torch.float32), g.to(torch.float32)
    n_plain = c.num_inputs - c.num_time_inputs
    scalars = plan[:, n_plain: n_plain + _SCALARS]
    lr = scalars[:, _LR, None]
    rbc1, rbc2 = hyper[:, _HYPER_RBC1, None], hyper[:, _HYPER_RBC2, None]
    hidden = weights[0][0].shape[0]
    w = plan[:, n_plain + _SCALARS: n_plain + _SCALARS + hidden * n_plain].reshape(-1, hidden, n_plain)
    b = plan[:, n_plain + _SCALARS + hidden * n_plain:]
    momenta, v_new = _accumulators(c, g, m, v)
    columns = _features(c, p32, g, momenta, v_new, rbc1, rbc2)
    direction, magnitude = _phi(c, columns, w, b, weights[1:])
    if spec.orthogonal:
        out.copy_(torch.where(ok, _lookahead(c, momenta, g) * scalars[:, _UNIT, None] + direction, 0.0))
        mean_magnitude = magnitude.sum(-1) / p.shape[-1]
    else:
        scale = torch.exp(c.magnitude_bound * torch.tanh(magnitude))
        multiplier = hyper[:, _HYPER_MULT: _HYPER_MULT + 1]
        u = c.step_mult * scale * (_adam(c, momenta, v_new, rbc1, rbc2) + direction) * multiplier
        new32 = p32 - lr * u - lr * (c.step_mult * hyper[:, _HYPER_DECAY: _HYPER_DECAY + 1]) * p32
        _write_param(p, p32, torch.where(ok, new32, p32))
        mean_magnitude = lr.new_zeros(lr.shape[0])
    for m_k, new in zip(m, momenta):  # one (B, n) tensor per momentum: written in place, no staging copy
        m_k.copy_(torch.where(ok, new, m_k))
    v.copy_(torch.where(ok, v_new, v))
    step.add_(ok[:, 0].to(step.dtype))
    if c.lr_adaptation != "none":
        log_scale.copy_(torch.where(ok[:, 0], scalars[:, _LOG_SCALE], log_scale))
    return torch.stack([mean_magnitude, lr[:, 0]], dim=-1)


# ---- compiled kernels ---------------------------------------------------------------------------------

_KERNELS: dict = {}  # by (pass, rule config JSON, form, compiled)
_BY_ID: dict = {}  # the same by the config's identity (its JSON costs more than a small tensor's step)
#: Keep per-element intermediates (new momenta, features, φ's units) in registers: inductor would otherwise
#: write a value read by several ops to memory and split the pass into several loops.
#: ``ffp-contract=fast`` lets the C++ compiler fuse each multiply-add (φ is mostly multiply-adds) into one FMA
#: instruction, as the reference's matrix products do (inductor's default, ``off``, keeps them separate).
_INDUCTOR = {"realize_reads_threshold": 1000, "realize_opcount_threshold": 10000, "max_fusion_size": 1000,
             "cpp.max_horizontal_fusion_size": 1000, "cpp.enable_floating_point_contract_flag": "fast"}
_UNUSED = torch.empty(1)  # the ``out`` argument of the elementwise form


def _kernel(name: str, spec: _Spec):
    fast_key = (name, id(spec.config), spec.orthogonal, COMPILE)
    hit = _BY_ID.get(fast_key)
    if hit is not None and hit[0] is spec.config:
        return hit[1]
    key = (name, spec.config.to_json(), spec.orthogonal, COMPILE)
    if key not in _KERNELS:
        fn = {"step": _step}[name]

        def kernel(*args):
            return fn(spec, *args)

        # a code object of its own per kernel: dynamo caches (and counts recompiles) per code object
        kernel = types.FunctionType(kernel.__code__.replace(), kernel.__globals__, f"{name}_{len(_KERNELS)}",
                                    None, kernel.__closure__)
        if COMPILE:
            # the rule's constants (decays, eps, …) as constants of the C++ code: by default dynamo makes every
            # Python float it reads a graph input, boxed as a tensor on each call and loaded in the loop
            kernel = torch._dynamo.config.patch(specialize_float=True)(
                torch.compile(kernel, dynamic=True, fullgraph=True, options=_INDUCTOR))
        _KERNELS[key] = kernel
    if len(_BY_ID) > 256:
        _BY_ID.clear()
    _BY_ID[fast_key] = (spec.config, _KERNELS[key])
    return _KERNELS[key]


def _flat(x: torch.Tensor, *shape: int) -> torch.Tensor:
    """``x`` viewed as ``shape``, as a tensor of its own (no ``_base``: dynamo would guard on the base's shape)."""
    return x.view(*shape).detach()


def _call(name: str, spec: _Spec, *args):
    """The kernel's result, or ``None`` (logged once) when compiling it failed."""
    if _FAILED:
        return None
    try:
        return _kernel(name, spec)(*args)
    except Exception as err:  # torch._dynamo / inductor / C++ compiler errors
        _FAILED.append(f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
        logger.warning("the fused CPU back end could not compile (%s); using the reference back end", _FAILED[0])
        return None


# ---- the step ---------------------------------------------------------------------------------------------


def fused_step_(
    config: RuleConfig,
    weights: Sequence[tuple[torch.Tensor, torch.Tensor]],
    params: Sequence[torch.Tensor],
    states: Sequence[dict[str, torch.Tensor]],
    roles: Sequence[str | None],
    lr: float,
    weight_decay: float,
    regime: str = "scratch",
    matrices: int = 0,
) -> list[torch.Tensor]:
    """Step ``params`` (CPU, gradients in ``.grad``, states initialized, all supported) in place.

    Tensors of one form, shape (matrices) or size (elementwise form) and dtype make a group; a group's tensors
    below `STACK_BELOW` elements are stacked and stepped by one call, larger ones by one call each on views of
    their own storage. Returns the parameters it did not step (not provably finite, or compilation failed); the
    caller steps those with the reference back end, which skips and counts non-finite ones.
    """
    flat_weights = [t for layer in weights for t in layer]
    # Adam's bias corrections of this step for every tensor at once, in fp32 as the reference computes them
    bias = torch.stack(bias_corrections(config, torch.stack([s["step"] for s in states]).to(torch.float32) + 1), 1)
    groups: dict[tuple, list[_Member]] = {}
    rows_lr = []
    for index, (param, state, role) in enumerate(zip(params, states, roles)):
        shape = tuple(param.shape)
        orthogonal = config.output == "hybrid_residual" and is_orthogonalized(config, role, shape)
        multiplier = step_multiplier(config, role, shape) if config.output == "hybrid_residual" else 1.0
        rows_lr.append((lr * regime_lr_factor(config, role, regime, matrices), weight_decay, multiplier))
        rows = shape[0] if orthogonal else 1
        key = (orthogonal, rows, param.numel() // rows, param.dtype, param.grad.dtype)
        groups.setdefault(key, []).append(_Member(param, state, rows_lr[-1], index))
    hypers = torch.cat([torch.tensor(rows_lr), 1 / bias], 1)  # (N, 5): the ``hyper`` rows, in `params`' order
    rest: list[torch.Tensor] = []
    for (orthogonal, rows, cols, *_), members in groups.items():
        spec = _Spec(config, orthogonal)
        stacked = [m for m in members if m.param.numel() < STACK_BELOW]
        if len(stacked) < 2:
            stacked = []
        members = stacked + [m for m in members if m.param.numel() >= STACK_BELOW or not stacked]
        batch = torch.empty((len(members), rows, cols)) if orthogonal else None  # the Newton–Schulz inputs
        done: list[int] = []  # indices into members of the tensors stepped (orthogonalized: up to the update)
        if stacked:
            out = _flat(batch[: len(stacked)], len(stacked), -1) if orthogonal else _UNUSED
            done += _step_stacked(spec, stacked, out, hypers[[m.index for m in stacked]], flat_weights)
        for index in range(len(stacked), len(members)):
            member = members[index]
            out = _flat(batch[index], 1, -1) if orthogonal else _UNUSED
            info = _call("step", spec, *_own_rows(member), hypers[member.index: member.index + 1], out,
                         *_own_momenta(config, member), *flat_weights)
            if info is not None and info[0, 0].item() == 1.0:
                member.info = info[0, 1:]
                done.append(index)
        if len(done) < len(members):
            stepped = set(done)
            rest += [m.param for i, m in enumerate(members) if i not in stepped]
        if orthogonal and done:
            _orthogonalized_update(config, [members[i] for i in done], batch if len(done) == len(members) else batch[done])
    return rest


@dataclass
class _Member:
    """One tensor of a group: its parameter, state, ``hyper``: ``[lr · role factor, weight decay, step
    multiplier]``, its index in the step's tensors (its full ``hyper`` row, ``_HYPER_*``), and, once stepped,
    ``info``: ``[mean φ magnitude, lr of this step]``."""

    param: torch.Tensor
    state: dict[str, torch.Tensor]
    hyper: tuple[float, float, float]
    index: int
    info: torch.Tensor | None = None


def _own_rows(member: _Member) -> list[torch.Tensor]:
    """``p, g, v, step, log_scale`` of one tensor as one-row views of its own storage (no copy; ``log_scale``:
    the lr multiplier's log, or a zero for rules without ``lr_adaptation``)."""
    state = member.state
    return [_flat(member.param, 1, -1), _flat(member.param.grad, 1, -1), _flat(state["second_moment"], 1, -1),
            _flat(state["step"], 1), _flat(state["lr_log_scale"], 1) if "lr_log_scale" in state else torch.zeros(1)]


def _own_momenta(config: RuleConfig, member: _Member) -> list[torch.Tensor]:
    momenta = _flat(member.state["momentum"], len(config.momentum_decays), 1, -1)
    return [m.detach() for m in momenta.unbind(0)]


def _step_stacked(spec: _Spec, members: list[_Member], out: torch.Tensor, hyper: torch.Tensor, flat_weights) -> list[int]:
    """Step same-sized small tensors with one call on stacked copies of their ``p, g, v, step`` and momenta,
    then copy back the rows of the tensors it stepped. Returns their indices in ``members``."""
    k = len(spec.config.momentum_decays)
    states = [m.state for m in members]
    adaptive = spec.config.lr_adaptation != "none"
    own = [  # the destinations, one list per argument, each tensor viewed as its row
        [m.param.view(-1) for m in members], [m.param.grad.view(-1) for m in members],
        [s["second_moment"].view(-1) for s in states], [s["step"] for s in states],
        [s["lr_log_scale"] if adaptive else torch.zeros(()) for s in states],
        *([s["momentum"][j].view(-1) for s in states] for j in range(k)),
    ]
    rows = [torch.stack(tensors) for tensors in own]
    info = _call("step", spec, *rows[:5], hyper, out, *rows[5:], *flat_weights)
    if info is None:
        return []
    stepped = [i for i, ok in enumerate(info[:, 0].tolist()) if ok == 1.0]
    written = [2, 3, *([4] if adaptive else []), *range(5, 5 + k)]
    if not spec.orthogonal:
        written.insert(0, 0)
    destinations = [own[a][i] for a in written for i in stepped]
    if destinations:
        torch._foreach_copy_(destinations, [rows[a][i] for a in written for i in stepped])
    for i in stepped:
        members[i].info = info[i, 1:]
    return stepped


def _orthogonalized_update(config: RuleConfig, members: list[_Member], batch: torch.Tensor) -> None:
    """Orthogonalize the stepped matrices' Newton–Schulz inputs ``batch`` (one batched iteration) and update
    the parameters: ``p ← p − decay · p − coefficient · o`` with φ's per-tensor magnitude and RMS 1 (× lr ·
    matrix_rms · multiplier)."""
    start = time.perf_counter()
    ortho = reference.newton_schulz(batch, config)
    NEWTON_SCHULZ_SECONDS[0] += time.perf_counter() - start
    norms = torch.linalg.vector_norm(ortho.flatten(1), dim=1).tolist()
    numel = ortho[0].numel()
    for o, norm, member in zip(ortho, norms, members):
        mean_magnitude, step_lr = member.info.tolist()
        multiplier = member.hyper[2]
        rms = norm / math.sqrt(numel)
        coefficient = (step_lr * config.step_mult * math.exp(config.magnitude_bound * math.tanh(mean_magnitude))
                       * multiplier * config.matrix_rms / math.sqrt(rms * rms + RMS_EPS))
        decay = step_lr * config.step_mult * member.hyper[1]
        _apply_matrix(member.param, o.view(member.param.shape), coefficient, decay)


def _apply_matrix(param: torch.Tensor, o: torch.Tensor, coefficient: float, decay: float) -> None:
    """``p ← p − decay · p − coefficient · o`` in fp32 (the Newton–Schulz output ``o``)."""
    if param.dtype == torch.float32:
        if decay:
            param.mul_(1 - decay)
        param.add_(o, alpha=-coefficient)
        return
    p32 = param.to(torch.float32)
    new32 = p32 * (1 - decay) - coefficient * o
    _write_param(param, p32, new32)
