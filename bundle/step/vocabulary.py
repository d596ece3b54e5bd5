"""The learned step's vocabulary, stated once: the feature table, the constants, the activations, the decay and
bias-correction helpers, Adam's direction, and the finiteness bound.

`rule.py` (what a config may name), `reference.py` (the torch reference), `fast_step.py` (the CPU fast path) and
the Triton kernels (`optbundle.kernels.learned_step`) read these; none of them restates them.

The fast path and the kernels build an elementwise feature matrix ``X`` whose row groups have short codes
(``g``, ``p``, ``m``, ...; `Feature.code`); a `FeaturePlan` says which rows of ``X`` (or which row/column
features of a factored tensor) feed each of φ's input columns. The kernels get one ``USE_<CODE>`` flag per
code (`KERNEL_FLAGS`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch.nn import functional as nn_functional

if TYPE_CHECKING:  # pragma: no cover
    from .rule import RuleConfig

# ---- the feature table --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Feature:
    """One feature group a rule may read (`RuleConfig.features`).

    ``width``: how many input columns it adds: ``"one"``, ``"momenta"`` (one per momentum decay),
    ``"factored"`` (one per factored decay) or ``"time"`` (one per time scale).
    ``code``: its row group in the elementwise feature matrix ``X`` (``None`` for time, which is folded into
    φ's first-layer bias). ``row_col``: for the row/column statistics, how a factored (rank ≥ 2) tensor reads
    them instead: ``(row or col, stat or rsqrt)``; unfactored tensors read ``code`` (one full accumulator).
    ``factored``: reads factored second-moment statistics (so the state must keep them).
    """

    name: str
    width: str
    code: str | None
    factored: bool = False
    row_col: tuple[str, str] | None = None


#: Feature groups in the order small_fc_lopt reads them; "time" (unnormalized tanh(t/τ − 1)) must come last.
FEATURES = (
    Feature("grad", "one", "g"),  # g
    Feature("param", "one", "p"),  # p
    Feature("momentum", "momenta", "m"),  # m_k, one per momentum decay
    Feature("second_moment", "one", "v"),  # v
    Feature("momentum_rsqrt_second_moment", "momenta", "mrs"),  # m_k · rsqrt(v + second_moment_eps)
    Feature("rsqrt_second_moment", "one", "rs"),  # rsqrt(v + second_moment_eps)
    Feature("adafactor_grad", "factored", "afg", factored=True),  # g · row_factor_j · col_factor_j
    Feature("row_second_moment", "factored", "full", True, ("row", "stat")),  # row EMA_j broadcast over columns
    Feature("col_second_moment", "factored", "full", True, ("col", "stat")),  # column EMA_j broadcast over rows
    Feature("rsqrt_row_second_moment", "factored", "rsfull", True, ("row", "rsqrt")),  # rsqrt(row_j + factored_rsqrt_eps)
    Feature("rsqrt_col_second_moment", "factored", "rsfull", True, ("col", "rsqrt")),  # rsqrt(col_j + factored_rsqrt_eps)
    # m_k · row_factor_k · col_factor_k (needs as many momenta as factored decays)
    Feature("adafactor_momentum", "momenta", "afm", factored=True),
    # bias-corrected m̂/(√v̂ + adam_eps) with β1 = momentum_decays[adam_momentum_index]
    Feature("adam_direction", "one", "adam"),
    Feature("time", "time", None),  # tanh(t/τ − 1) for τ in time_scales; not normalized
)
FEATURE_TABLE = {feature.name: feature for feature in FEATURES}
FEATURE_GROUPS = tuple(FEATURE_TABLE)
#: The small_fc_lopt feature list (39 inputs with the default decays and time scales).
SMALL_FC_LOPT_FEATURES = [name for name in FEATURE_GROUPS if name != "adam_direction"]
#: Groups that read the factored second moments.
FACTORED_FEATURES = frozenset(feature.name for feature in FEATURES if feature.factored)

#: Row groups of ``X`` in row order. ``afg``/``afm`` (Adafactor grad/momentum) come last: for factored tensors
#: they need the final column statistics, so their sums of squares come from a later reduction.
ELEMENTWISE_ORDER = ("g", "p", "m", "v", "mrs", "rs", "adam", "full", "rsfull", "afg", "afm")
#: Row groups of width > 1 (one row per momentum or per factored decay).
STACKED_CODES = frozenset(feature.code for feature in FEATURES if feature.code and feature.width != "one")
#: The Triton kernels' constexpr flag of each row group.
KERNEL_FLAGS = {code: f"USE_{code.upper()}" for code in ELEMENTWISE_ORDER}
_CODE_WIDTH = {feature.code: feature.width for feature in FEATURES if feature.code}


def feature_width(name_or_code: str, momenta: int, factored: int, time_scales: int) -> int:
    """Columns of a feature group (or rows of an ``X`` row group) for the given numbers of decays/scales."""
    feature = FEATURE_TABLE.get(name_or_code)
    width = feature.width if feature is not None else _CODE_WIDTH[name_or_code]
    return {"one": 1, "momenta": momenta, "factored": factored, "time": time_scales}[width]


def keeps_factored_state(config: RuleConfig) -> bool:
    """Whether the rule keeps factored second moments. Format-1 rules always do (their state layout is fixed);
    format-2 rules only when a feature reads them (16 B/parameter instead of ≈28 for three momenta)."""
    return config.format_version < 2 or any(name in FACTORED_FEATURES for name in config.features)


def is_factored(shape: Sequence[int]) -> bool:
    """Rank ≥ 2 tensors keep row/column statistics over their last two dims; others a full accumulator."""
    return len(shape) >= 2


# ---- feature plans (X's layout for one rule) -------------------------------------------------------------


@dataclass(frozen=True)
class FeaturePlan:
    """Where each of φ's (non-time) input columns comes from, for factored or unfactored tensors.

    ``slots``: ``(code, width)`` row blocks of the elementwise feature matrix ``X``, in order.
    ``direct_rows``: rows ``[0, direct_rows)`` of ``X`` get their sums of squares in the first reduction.
    ``columns``: per input column, ``("x", row)``, ``("row", i)`` or ``("col", i)``; row/column features are
    indexed in ``[stat_0 … stat_{J−1}, rsqrt_0 … rsqrt_{J−1}]``.
    """

    factored: bool
    slots: tuple[tuple[str, int], ...]
    direct_rows: int
    columns: tuple[tuple[str, int], ...]

    def positions(self, kind: str) -> tuple[list[int], list[int]]:
        """(input columns of ``kind``, their indices in X / the row / the column features)."""
        chosen = [(i, index) for i, (k, index) in enumerate(self.columns) if k == kind]
        return [i for i, _ in chosen], [index for _, index in chosen]

    def offset(self, code: str) -> int:
        row = 0
        for name, width in self.slots:
            if name == code:
                return row
            row += width
        raise KeyError(code)

    def has(self, code: str) -> bool:
        return any(name == code for name, _ in self.slots)

    @property
    def num_rows(self) -> int:
        return sum(width for _, width in self.slots)

    def kernel_flags(self) -> dict[str, bool]:
        """``{USE_<CODE>: whether X holds that row group}`` for the Triton kernels."""
        return {flag: self.has(code) for code, flag in KERNEL_FLAGS.items()}


_PLANS: dict[tuple[str, bool], FeaturePlan] = {}
_PLANS_BY_ID: dict[tuple[int, bool], tuple[RuleConfig, FeaturePlan]] = {}


def feature_plan(config: RuleConfig, factored: bool) -> FeaturePlan:
    """The `FeaturePlan` of ``config`` (cached by the config's JSON, and by identity for speed)."""
    hit = _PLANS_BY_ID.get((id(config), factored))
    if hit is not None and hit[0] is config:
        return hit[1]
    key = (config.to_json(), factored)
    if key not in _PLANS:
        _PLANS[key] = _make_plan(config, factored)
    if len(_PLANS_BY_ID) > 256:
        _PLANS_BY_ID.clear()
    _PLANS_BY_ID[(id(config), factored)] = (config, _PLANS[key])
    return _PLANS[key]


def _make_plan(config: RuleConfig, factored: bool) -> FeaturePlan:
    k, j, t = len(config.momentum_decays), len(config.factored_decays), len(config.time_scales)
    refs: list[tuple[str, str, int]] = []  # (kind, code or stat/rsqrt, index) per input column
    for name in config.features:
        feature = FEATURE_TABLE[name]
        if feature.code is None:  # time: folded into the first layer's bias
            continue
        for i in range(feature_width(name, k, j, t)):
            if factored and feature.row_col is not None:
                refs.append((*feature.row_col, i))
            else:
                refs.append(("x", feature.code, i))
    used = {code for kind, code, _ in refs if kind == "x"}
    slots = tuple((code, feature_width(code, k, j, t)) for code in ELEMENTWISE_ORDER if code in used)
    offsets, row = {}, 0
    for name, width in slots:
        offsets[name] = row
        row += width
    direct = sum(w for code, w in slots if not (factored and code in ("afg", "afm")))
    columns = []
    for kind, source, i in refs:
        if kind == "x":
            columns.append(("x", offsets[source] + i))
        else:
            columns.append((kind, i if source == "stat" else j + i))
    return FeaturePlan(factored=factored, slots=slots, direct_rows=direct, columns=tuple(columns))


# ---- constants -----------------------------------------------------------------------------------------

#: φ's output heads: direction ``d`` and log-magnitude ``a``.
NUM_OUTPUTS = 2
OUTPUT_FORMS = ("small_fc_lopt", "normalized", "adam_residual", "hybrid_residual")
#: ``ε`` of the ``normalized`` output's per-tensor RMS: ``u / sqrt(mean(u²) + ε)`` (so that scale is ≤ ε^-½).
NORMALIZED_EPS = 1e-12
#: ``ε`` of the per-tensor RMS normalizations of the orthogonalized step (`reference.orthogonal_direction`).
RMS_EPS = 1e-30
#: ``ε`` added to the Frobenius norm before Newton–Schulz.
NEWTON_SCHULZ_EPS = 1e-7
#: A gradient whose Σg² exceeds this (the largest fp32), or is NaN, is skipped: the fp32 second moments would
#: overflow.
MAX_GRADIENT_SQUARE_SUM = float(torch.finfo(torch.float32).max)
#: The finiteness proof: a bound on every new |parameter| below this leaves room for every intermediate value,
#: so the step may be written without checking it first (the fast path and the kernels use the same bound).
FINITE_BOUND = 1e37
#: ``exp(x)`` for ``x`` below this is far from fp32's maximum (e^80 ≈ 5.5e34); a larger exponent fails the proof.
MAX_EXPONENT = 80.0


# ---- activations ---------------------------------------------------------------------------------------

ACTIVATION_FUNCTIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": torch.relu,
    "tanh": torch.tanh,
    "gelu": nn_functional.gelu,
    "silu": nn_functional.silu,
}
ACTIVATIONS = tuple(ACTIVATION_FUNCTIONS)


def activate_(name: str, x: torch.Tensor) -> torch.Tensor:
    """φ's activation, in place where torch has an in-place form (the fast path's buffers)."""
    if name == "relu":
        return x.relu_()
    if name == "tanh":
        return x.tanh_()
    if name == "silu":
        return nn_functional.silu(x, inplace=True)
    return ACTIVATION_FUNCTIONS[name](x)


# ---- decays, bias corrections, Adam's direction ---------------------------------------------------------


def decay_view(decays: Sequence[float], rank: int, like: torch.Tensor) -> torch.Tensor:
    """Decays as a ``(K, 1, …, 1)`` tensor that broadcasts against ``(*B, K, *S)`` with ``len(S) == rank``.

    Every back end makes its decays here, so ``β`` and ``1 − β`` round identically everywhere."""
    return torch.tensor(list(decays), dtype=like.dtype, device=like.device).view(-1, *([1] * rank))


def decay_tensors(config: RuleConfig, device: torch.device) -> dict[str, torch.Tensor]:
    """fp32 ``beta_m``, ``one_minus_beta_m`` (K,) and ``beta_f``, ``one_minus_beta_f`` (J,)."""
    like = torch.empty((), device=device)
    beta_m = decay_view(config.momentum_decays, 0, like)
    beta_f = decay_view(config.factored_decays, 0, like)
    return {"beta_m": beta_m, "one_minus_beta_m": 1 - beta_m, "beta_f": beta_f, "one_minus_beta_f": 1 - beta_f}


def bias_corrections(config: RuleConfig, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Adam's ``(1 − β1^t, 1 − β_v^t)`` with ``β1 = momentum_decays[adam_momentum_index]``; ``t`` counts the
    current step (float tensor, any shape)."""
    return 1 - config.momentum_decays[config.adam_momentum_index] ** t, 1 - config.second_moment_decay**t


def adam_direction_from_moments(
    m: torch.Tensor,
    v: torch.Tensor,
    bias_correction1: torch.Tensor,
    bias_correction2: torch.Tensor,
    eps: float,
    out: torch.Tensor | None = None,
    work: torch.Tensor | None = None,
) -> torch.Tensor:
    """Adam's direction ``m̂/(√v̂ + eps)``, ``m̂ = m/bias_correction1``, ``v̂ = v/bias_correction2``.

    Without ``out`` the ops are out of place (differentiable: the reference and meta-training); with ``out``
    (and a ``work`` buffer shaped like ``v``) the same ops run in place into them, with the same rounding.
    """
    if out is None:
        return (m / bias_correction1) / (torch.sqrt(v / bias_correction2) + eps)
    denominator = torch.div(v, bias_correction2, out=work).sqrt_().add_(eps)
    return torch.div(m, bias_correction1, out=out).div_(denominator)


def surely_finite(new_param_bound: float) -> bool:
    """Whether a bound on every new |parameter| proves the step finite (False for NaN as well)."""
    return new_param_bound < FINITE_BOUND


def exp_bound(exponent: float) -> float:
    """``exp(exponent)``, or inf when it is too large for the finiteness proof (`MAX_EXPONENT`)."""
    return math.exp(exponent) if exponent < MAX_EXPONENT else math.inf
