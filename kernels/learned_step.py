"""Fused Triton kernels of the learned step, and their launcher `learned_step_`.

The math is `optbundle.step.reference.learned_update` (the one torch reference); this file organizes it for a GPU.
All tensors of a parameter group that share a class (factored or not, parameter dtype, gradient dtype) go
through each pass in **one launch**: an int64 table holds every tensor's pointers, another its sizes and
scratch offsets, and a program table maps each program to ``(tensor, tile)``. Offsets are 64-bit; any rank
works (rank ≥ 2 is viewed as ``(L, R, C)``: factored over the last two dims, leading dims are a batch of
slices; rank < 2 keeps full accumulators). Parameters and gradients may be fp32, bf16 or fp16; accumulators
and all arithmetic are fp32. Everything the rule fixes (feature groups, widths, decays, epsilons, output form)
is a ``tl.constexpr``, so each rule compiles to its own specialized kernels.

Why these passes (per-tensor reductions force the boundaries):

1. ``_reduce_kernel`` (2-D tiles of global rows × columns for factored tensors, 1-D blocks otherwise): for
   every elementwise feature its sum of squares (for the per-tensor normalizer) and the largest tile L2
   norm (≥ max |x|, for the finiteness bound below); row and column sums of ``g² + ε``, tile-reduced before
   the atomics (per element only when a tile spans several small slices, e.g. 3×3 conv kernels). New
   momenta and second moment are computed, not stored.
2. ``_rows_cols_kernel`` (one program per factored tensor): new row/column statistics need the *complete*
   row/column sums of pass 1; Adafactor's row factor also needs each slice's mean row statistic.
3. ``_reduce_adafactor_kernel`` (2-D tiles, factored tensors that read them): the Adafactor features
   ``g·rf·cf`` and ``m·rf·cf`` need the final factors of pass 2 before their sums of squares exist.
4. ``_fold_kernel`` (one program per tensor): normalizers, φ's first layer with the normalizers and time
   features folded in (as `reference.apply_network` does), per-row and per-column first-layer terms (row and
   column features are constant along a row/column), bias corrections, and a **finiteness proof**: the
   maxima of pass 1/3 pushed through ``|W|`` bound the step, hence the new parameter. The proof, or a
   non-finite gradient, sets the tensor's mode.
5. ``_apply_kernel`` phase 0 (1-D blocks): rebuild the features, run φ in registers, output form, lr, decoupled
   weight decay; for tensors in ``DIRECT`` mode write momenta, second moment, row/column statistics, the
   parameter (in its dtype) and ``step``. Tensors in ``CHECK`` mode (proof failed, or the ``normalized``
   output, which needs one more per-tensor reduction, Σu²) only reduce "all finite?" (and Σu²).
6. ``_apply_kernel`` phase 1: ``CHECK`` tensors whose update turned out finite are recomputed and written;
   the others count a skipped step. ``DIRECT``/``SKIP`` programs exit at once.

So accumulators are *computed* in pass 1 but *stored* by the apply pass: a tensor whose gradient or update is
not finite is skipped with its state untouched, exactly as `LearnedOptimizer._step_param` promises, without
a host synchronization and without staging the update in memory.

Bytes per element (fp32 parameter, default rule): pass 1 reads g, p, m₁₋₃, v (24 B); pass 3 reads g, m (16 B);
the apply pass reads the same 24 B and writes m, v, p (20 B). bf16 parameters/gradients save 4 B per read.

In interpreter mode (``TRITON_INTERPRET=1`` set before ``triton`` is first imported) the kernels run on CPU
tensors; tests/step/test_kernels.py checks them against the torch reference that way, and tests/_compile_kernels.py
compiles them for sm_90 without a GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import triton
import triton.language as tl

from optbundle.step.rule import RuleConfig
from optbundle.step.vocabulary import (
    FINITE_BOUND,
    MAX_EXPONENT,
    MAX_GRADIENT_SQUARE_SUM,
    NORMALIZED_EPS,
    FeaturePlan,
    decay_tensors,
    feature_plan,
    is_factored,
)

# ---- table layouts ------------------------------------------------------------------------------------

# The kernels index two int64 tables per launch, one row per tensor, with the columns named here:
#   pointers: param, grad, momentum, second moment, row statistics (rank ≥ 2) or full accumulators (rank < 2),
#             column statistics (or 0), step, skipped_steps
#   meta:     numel, slices L, rows R, cols C, scratch offsets of its scalars / row area / col area
# and, in each tensor's scalars, ``extra`` (Σg², Σp², max|g|, max|p|, then max|m_k| per momentum) and ``flags``.
# A tensor's mode (a flag): 0 DIRECT (proved finite: write in phase 0), 1 CHECK (check in phase 0, write in
# phase 1 if finite), 2 SKIP (non-finite gradient).
POINTER_COLUMNS = ("param", "grad", "momentum", "second_moment", "row_or_full", "col", "step", "skipped_steps")
META_COLUMNS = ("numel", "slices", "rows", "cols", "scalars", "row_area", "col_area")
EXTRA_FIELDS = ("grad_sq", "param_sq", "grad_max", "param_max", "momentum_max")
PROGRAM_COLUMNS = ("tensor", "tile")  # the program table: which tensor and which tile of it a program works on
FLAG_FIELDS = ("grad_bad", "mode", "update_bad", "step_sq", "rms", "bias_correction1", "bias_correction_v")
# ... as Triton constexprs (the kernels read globals only in this form)
POINTERS, METAS = tl.constexpr(len(POINTER_COLUMNS)), tl.constexpr(len(META_COLUMNS))
PROGRAMS = tl.constexpr(len(PROGRAM_COLUMNS))
R_TENSOR, R_TILE = map(tl.constexpr, range(len(PROGRAM_COLUMNS)))
P_PARAM, P_GRAD, P_MOMENTUM, P_SECOND, P_ROW, P_COL, P_STEP, P_SKIPPED = map(tl.constexpr, range(len(POINTER_COLUMNS)))
M_NUMEL, M_SLICES, M_ROWS, M_COLS, M_SCALARS, M_ROW_AREA, M_COL_AREA = map(tl.constexpr, range(len(META_COLUMNS)))
E_GRAD_SQ, E_PARAM_SQ, E_GRAD_MAX, E_PARAM_MAX, E_MOMENTUM_MAX = map(tl.constexpr, range(len(EXTRA_FIELDS)))
F_GRAD_BAD, F_MODE, F_UPDATE_BAD, F_STEP_SQ, F_RMS, F_BC1, F_BCV = map(tl.constexpr, range(len(FLAG_FIELDS)))
MODE_DIRECT, MODE_CHECK, MODE_SKIP = tl.constexpr(0.0), tl.constexpr(1.0), tl.constexpr(2.0)
# the step's bounds (`optbundle.step.vocabulary`), shared with the torch fast path
_FINITE_BOUND = tl.constexpr(FINITE_BOUND)
_MAX_EXPONENT = tl.constexpr(MAX_EXPONENT)
_MAX_GRADIENT_SQUARE_SUM = tl.constexpr(MAX_GRADIENT_SQUARE_SUM)
_NORMALIZED_EPS = tl.constexpr(NORMALIZED_EPS)
_NORMALIZED_SCALE_MAX = tl.constexpr(NORMALIZED_EPS**-0.5)  # rsqrt(mean u² + ε) ≤ ε^-½
_ACTIVATION_CODES = {"relu": 0, "tanh": 1, "silu": 2}
_OUTPUT_CODES = {"small_fc_lopt": 0, "normalized": 1, "adam_residual": 2}
#: Largest hidden width the register-resident φ supports.
MAX_HIDDEN = 64


@dataclass(frozen=True)
class BlockSizes:
    """Tile of the 2-D reduction passes, block of the 1-D passes, block of the per-tensor loops."""

    tile_rows: int
    tile_cols: int
    flat: int
    apply: int
    loop: int


#: On a GPU: small tiles, many programs. In interpreter mode every program costs Python time per op, so
#: fewer, larger programs (the code paths, masks and multi-tile atomics are the same).
GPU_BLOCKS = BlockSizes(tile_rows=16, tile_cols=64, flat=1024, apply=256, loop=256)
INTERPRETER_BLOCKS = BlockSizes(tile_rows=64, tile_cols=64, flat=4096, apply=1024, loop=1024)


@dataclass(frozen=True)
class _Layout:
    """Offsets (in floats) of one tensor's per-tensor scalars inside its scratch area."""

    fx: int  # rows of the elementwise feature matrix X
    j2: int  # row (or column) features: [stat_0..stat_{J-1}, rsqrt_0..rsqrt_{J-1}]
    k: int
    h: int  # padded hidden width

    @property
    def sums(self):  # Σx² per X row
        return 0

    @property
    def maxs(self):  # max |x| per X row
        return self.fx

    @property
    def row_sums(self):  # Σ over rows of (row stat)², (rsqrt)²
        return 2 * self.fx

    @property
    def row_maxs(self):
        return self.row_sums + self.j2

    @property
    def col_sums(self):
        return self.row_maxs + self.j2

    @property
    def col_maxs(self):
        return self.col_sums + self.j2

    @property
    def extra(self):  # Σg², Σp², max|g|, max|p|, max|m_k|
        return self.col_maxs + self.j2

    @property
    def flags(self):  # FLAG_FIELDS
        return self.extra + len(EXTRA_FIELDS) - 1 + self.k

    @property
    def w_row(self):  # (2J, H) first-layer weights of the row features, normalizers folded in
        return self.flags + len(FLAG_FIELDS)

    @property
    def w_col(self):
        return self.w_row + self.j2 * self.h

    @property
    def w_x(self):  # (FX, H) first-layer weights of X's rows, normalizers folded in
        return self.w_col + self.j2 * self.h

    @property
    def bias(self):  # (H,) b₁ + W₁ᵗ·time
        return self.w_x + self.fx * self.h

    @property
    def size(self):
        return self.bias + self.h



# ---- support ------------------------------------------------------------------------------------------


def unsupported_reason(config: RuleConfig) -> str | None:
    """``None`` when the fused kernels implement ``config``; otherwise why not (the caller falls back to torch)."""
    if config.activation not in _ACTIVATION_CODES:
        return f"activation {config.activation!r} has no Triton form here (supported: {', '.join(_ACTIVATION_CODES)})"
    if config.output not in _OUTPUT_CODES:
        return f"output form {config.output!r} is not implemented in the kernels"
    if not config.hidden_sizes:
        return "a rule without hidden layers"
    if max(config.hidden_sizes) > MAX_HIDDEN:
        return f"hidden width {max(config.hidden_sizes)} > {MAX_HIDDEN} (φ must fit in registers)"
    if config.factored_dims != "last_two":
        return f"factored_dims {config.factored_dims!r}"
    return None


def tensor_unsupported_reason(param: torch.Tensor, grad: torch.Tensor, state: dict) -> str | None:
    if param.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"parameter dtype {param.dtype}"
    if grad.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"gradient dtype {grad.dtype}"
    if param.numel() == 0:
        return "empty tensor"
    if not param.is_contiguous() or not all(v.is_contiguous() for v in state.values()):
        return "non-contiguous parameter or state"
    return None


# ---- jitted helpers -----------------------------------------------------------------------------------


@triton.jit
def _activation(z, ACTIVATION: tl.constexpr):
    if ACTIVATION == 0:
        out = tl.maximum(z, 0.0)
    elif ACTIVATION == 1:
        out = _tanh(z)
    else:
        out = z * tl.sigmoid(z)
    return out


@triton.jit
def _to_param_dtype(x, PARAM_DTYPE: tl.constexpr):
    """fp32 → parameter dtype with round-to-nearest-even (torch's rounding). bf16 is rounded with integer
    ops because Triton's interpreter truncates that cast; on hardware this is the same as cvt.rn.bf16."""
    if PARAM_DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        out = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        out = x.to(PARAM_DTYPE)
    return out


@triton.jit
def _adam_direction(m, v, bc1, bcv, ADAM_EPS: tl.constexpr):
    """``m̂/(√v̂ + ε)`` (`vocabulary.adam_direction_from_moments` in Triton)."""
    return (m / bc1) / (tl.sqrt(v / bcv) + ADAM_EPS)


@triton.jit
def _bias_correction(steps, LOG_BETA: tl.constexpr):
    """``1 − β^(t+1)`` for ``t`` completed steps (``β = exp(LOG_BETA)``)."""
    return 1.0 - tl.exp((steps + 1.0) * LOG_BETA)


@triton.jit
def _tanh(z):
    """tanh from exp (libdevice is not available in interpreter mode)."""
    e = tl.exp(-2.0 * tl.abs(z))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(z < 0, -t, t)


@triton.jit
def _ema_momenta(mom_ptr, idx, n, g, consts_ptr, mask, K: tl.constexpr):
    """New momenta ``β_k m_k + (1 − β_k) g`` as a tuple of K tensors (not stored)."""
    out = ()
    for k in tl.static_range(K):
        m = tl.load(mom_ptr + k * n + idx, mask=mask, other=0.0)
        beta = tl.load(consts_ptr + k)
        one_minus = tl.load(consts_ptr + K + k)
        out = out + (beta * m + one_minus * g,)
    return out


@triton.jit
def _ema_full(full_ptr, idx, n, g, consts_ptr, mask, K: tl.constexpr, J: tl.constexpr, FACTORED_EPS: tl.constexpr):
    """New full (rank < 2) accumulators ``β_j f_j + (1 − β_j)(g² + ε)`` as a tuple of J tensors."""
    out = ()
    g2 = g * g + FACTORED_EPS
    for j in tl.static_range(J):
        f = tl.load(full_ptr + j * n + idx, mask=mask, other=1.0)
        beta = tl.load(consts_ptr + 2 * K + j)
        one_minus = tl.load(consts_ptr + 2 * K + J + j)
        out = out + (beta * f + one_minus * g2,)
    return out


@triton.jit
def _features(
    g, p, m_new, v_new, full_new, row_factor, col_factor, bc1, bcv,
    K: tl.constexpr, J: tl.constexpr, FACTORED: tl.constexpr, WITH_ADAFACTOR: tl.constexpr,
    USE_G: tl.constexpr, USE_P: tl.constexpr, USE_M: tl.constexpr, USE_V: tl.constexpr, USE_MRS: tl.constexpr,
    USE_RS: tl.constexpr, USE_ADAM: tl.constexpr, USE_FULL: tl.constexpr, USE_RSFULL: tl.constexpr,
    USE_AFG: tl.constexpr, USE_AFM: tl.constexpr, SECOND_EPS: tl.constexpr, RSQRT_EPS: tl.constexpr,
    ADAM_EPS: tl.constexpr, ADAM_INDEX: tl.constexpr,
):
    """The elementwise features in X's row order (`optbundle.step.vocabulary.FeaturePlan`), as a tuple."""
    x = ()
    if USE_G:
        x = x + (g,)
    if USE_P:
        x = x + (p,)
    if USE_M:
        for k in tl.static_range(K):
            x = x + (m_new[k],)
    if USE_V:
        x = x + (v_new,)
    if USE_MRS or USE_RS:
        rs = tl.rsqrt(v_new + SECOND_EPS)
        if USE_MRS:
            for k in tl.static_range(K):
                x = x + (m_new[k] * rs,)
        if USE_RS:
            x = x + (rs,)
    if USE_ADAM:
        x = x + (_adam_direction(m_new[ADAM_INDEX], v_new, bc1, bcv, ADAM_EPS),)
    if not FACTORED:
        if USE_FULL:
            for j in tl.static_range(J):
                x = x + (full_new[j],)
        if USE_RSFULL:
            for j in tl.static_range(J):
                x = x + (tl.rsqrt(full_new[j] + RSQRT_EPS),)
        if USE_AFG:
            for j in tl.static_range(J):
                x = x + (g * tl.rsqrt(full_new[j]),)
        if USE_AFM:
            for k in tl.static_range(K):
                x = x + (m_new[k] * tl.rsqrt(full_new[k]),)
    elif WITH_ADAFACTOR:
        if USE_AFG:
            for j in tl.static_range(J):
                x = x + (g * row_factor[j] * col_factor[j],)
        if USE_AFM:
            for k in tl.static_range(K):
                x = x + (m_new[k] * row_factor[k] * col_factor[k],)
    return x


# ---- pass 1: sums of squares, maxima, row/column sums --------------------------------------------------


@triton.jit
def _reduce_kernel(
    pointers, meta, programs, scratch, consts,
    PARAM_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr, FACTORED: tl.constexpr,
    K: tl.constexpr, J: tl.constexpr, FX_DIRECT: tl.constexpr,
    USE_G: tl.constexpr, USE_P: tl.constexpr, USE_M: tl.constexpr, USE_V: tl.constexpr, USE_MRS: tl.constexpr,
    USE_RS: tl.constexpr, USE_ADAM: tl.constexpr, USE_FULL: tl.constexpr, USE_RSFULL: tl.constexpr,
    USE_AFG: tl.constexpr, USE_AFM: tl.constexpr,
    BETA_V: tl.constexpr, ONE_MINUS_BETA_V: tl.constexpr, SECOND_EPS: tl.constexpr, FACTORED_EPS: tl.constexpr,
    RSQRT_EPS: tl.constexpr, ADAM_EPS: tl.constexpr, ADAM_INDEX: tl.constexpr,
    LOG_BETA1: tl.constexpr, LOG_BETA_V: tl.constexpr,
    OFF_MAXS: tl.constexpr, OFF_EXTRA: tl.constexpr, OFF_FLAGS: tl.constexpr,
    TILE_R: tl.constexpr, TILE_C: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(programs + PROGRAMS * pid + R_TENSOR).to(tl.int64)
    tile = tl.load(programs + PROGRAMS * pid + R_TILE).to(tl.int64)
    n = tl.load(meta + t * METAS + M_NUMEL)
    scal = scratch + tl.load(meta + t * METAS + M_SCALARS)
    param_ptr = tl.load(pointers + t * POINTERS + P_PARAM).to(tl.pointer_type(PARAM_DTYPE))
    grad_ptr = tl.load(pointers + t * POINTERS + P_GRAD).to(tl.pointer_type(GRAD_DTYPE))
    mom_ptr = tl.load(pointers + t * POINTERS + P_MOMENTUM).to(tl.pointer_type(tl.float32))
    second_ptr = tl.load(pointers + t * POINTERS + P_SECOND).to(tl.pointer_type(tl.float32))
    if FACTORED:  # tiles of TILE_R global rows (they may span slices) × TILE_C columns
        rows = tl.load(meta + t * METAS + M_ROWS)
        cols = tl.load(meta + t * METAS + M_COLS)
        n_rows = tl.load(meta + t * METAS + M_SLICES) * rows
        col_tiles = (cols + TILE_C - 1) // TILE_C
        first_row = (tile // col_tiles) * TILE_R
        q = first_row + tl.arange(0, TILE_R).to(tl.int64)  # global row index = slice·R + r
        c = (tile % col_tiles) * TILE_C + tl.arange(0, TILE_C).to(tl.int64)
        row_mask = q < n_rows
        col_mask = c < cols
        idx = q[:, None] * cols + c[None, :]
        mask = row_mask[:, None] & col_mask[None, :]
    else:
        idx = tile * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        mask = idx < n
    g = tl.load(grad_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    p = tl.load(param_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(second_ptr + idx, mask=mask, other=0.0)
    m_new = _ema_momenta(mom_ptr, idx, n, g, consts, mask, K)
    v_new = BETA_V * v + ONE_MINUS_BETA_V * g * g
    if FACTORED:
        full_new = (g,)
    else:
        full_ptr = tl.load(pointers + t * POINTERS + P_ROW).to(tl.pointer_type(tl.float32))
        full_new = _ema_full(full_ptr, idx, n, g, consts, mask, K, J, FACTORED_EPS)
    if USE_ADAM:  # Adam's bias corrections 1 − β^(t+1), t = completed steps
        steps = tl.load(tl.load(pointers + t * POINTERS + P_STEP).to(tl.pointer_type(tl.int64))).to(tl.float32)
        bc1 = _bias_correction(steps, LOG_BETA1)
        bcv = _bias_correction(steps, LOG_BETA_V)
    else:
        bc1 = 1.0
        bcv = 1.0
    x = _features(
        g, p, m_new, v_new, full_new, (g,), (g,), bc1, bcv, K, J, FACTORED, False,
        USE_G, USE_P, USE_M, USE_V, USE_MRS, USE_RS, USE_ADAM, USE_FULL, USE_RSFULL, USE_AFG, USE_AFM,
        SECOND_EPS, RSQRT_EPS, ADAM_EPS, ADAM_INDEX,
    )
    # Σx² per feature; max over tiles of ‖x_tile‖₂ ≥ max |x| bounds the feature for the finiteness proof
    # (one reduction per feature instead of two; NaN becomes +inf so that it can never hide)
    for f in tl.static_range(FX_DIRECT):
        value = tl.where(mask, x[f], 0.0)
        total = tl.sum(value * value)
        tl.atomic_add(scal + f, total)
        tl.atomic_max(scal + OFF_MAXS + f, tl.where(total == total, tl.sqrt(total), float("inf")))
    grad_sq = tl.sum(g * g)
    param_sq = tl.sum(p * p)
    tl.atomic_add(scal + OFF_EXTRA + E_GRAD_SQ, grad_sq)
    tl.atomic_add(scal + OFF_EXTRA + E_PARAM_SQ, param_sq)
    tl.atomic_max(scal + OFF_EXTRA + E_GRAD_MAX, tl.where(grad_sq == grad_sq, tl.sqrt(grad_sq), float("inf")))
    tl.atomic_max(scal + OFF_EXTRA + E_PARAM_MAX, tl.where(param_sq == param_sq, tl.sqrt(param_sq), float("inf")))
    for k in tl.static_range(K):
        value = tl.where(mask, m_new[k], 0.0)
        total = tl.sum(value * value)
        tl.atomic_max(scal + OFF_EXTRA + E_MOMENTUM_MAX + k, tl.where(total == total, tl.sqrt(total), float("inf")))
    bad = tl.max(((g != g) | (tl.abs(g) == float("inf"))).to(tl.float32))
    tl.atomic_max(scal + OFF_FLAGS + F_GRAD_BAD, bad)
    if FACTORED:
        g2 = tl.where(mask, g * g + FACTORED_EPS, 0.0)
        row_area = scratch + tl.load(meta + t * METAS + M_ROW_AREA)
        col_area = scratch + tl.load(meta + t * METAS + M_COL_AREA)
        tl.atomic_add(row_area + q, tl.sum(g2, axis=1), mask=row_mask)  # row sums: area [0, L·R)
        first_slice = first_row // rows
        last_slice = (tl.minimum(first_row + TILE_R, n_rows) - 1) // rows
        if first_slice == last_slice:  # the usual case: reduce the tile over its rows first
            tl.atomic_add(col_area + first_slice * cols + c, tl.sum(g2, axis=0), mask=col_mask)
        else:  # a tile of several small slices: column sums per element
            tl.atomic_add(col_area + (q // rows)[:, None] * cols + c[None, :], g2, mask=mask)


# Per factored tensor (LR = L·R rows, LC = L·C columns, H = padded hidden width):
#   row area:    [row sums (LR) | new rows (J·LR) | row factors (J·LR) | row terms (H·LR) | slice sums (J·L)]
#   column area: [column sums (LC) | new columns (J·LC) | column factors (J·LC) | column terms (H·LC)]


def _row_area_size(slices: int, rows: int, j: int, h: int) -> int:
    return slices * rows * (1 + 2 * j + h) + j * slices


def _col_area_size(slices: int, cols: int, j: int, h: int) -> int:
    return slices * cols * (1 + 2 * j + h)


# ---- pass 2: final row/column statistics and Adafactor factors -----------------------------------------


@triton.jit
def _factor_geometry(meta, scratch, t):
    """Tensor ``t``'s factored layout: ``(slices, rows, cols, row_area, col_area)`` (areas as scratch pointers)."""
    slices = tl.load(meta + t * METAS + M_SLICES)
    rows = tl.load(meta + t * METAS + M_ROWS)
    cols = tl.load(meta + t * METAS + M_COLS)
    row_area = scratch + tl.load(meta + t * METAS + M_ROW_AREA)
    col_area = scratch + tl.load(meta + t * METAS + M_COL_AREA)
    return slices, rows, cols, row_area, col_area


@triton.jit
def _factor_ema_stats(
    area, state, slice_sums, sums, maxs, consts, j, n, width, rows, slices,
    STATE_OTHER: tl.constexpr, IS_ROW: tl.constexpr,
    K: tl.constexpr, J: tl.constexpr, RSQRT_EPS: tl.constexpr, BLOCK: tl.constexpr,
):
    """Decay ``j`` of one factor axis (``n`` rows or columns): ``new = β state + (1−β) area/width`` stored at
    ``area + n (1 + j)``; rows add ``new`` to their slice sum, columns store ``rsqrt(new)`` at ``area + n (1 + J + j)``;
    the sums of squares and maxima of ``new`` and ``rsqrt(new + ε)`` go to ``sums``/``maxs`` (``+ j``, ``+ J + j``)."""
    beta = tl.load(consts + 2 * K + j)
    one_minus = tl.load(consts + 2 * K + J + j)
    stat_sq = tl.zeros((BLOCK,), tl.float32)
    rsqrt_sq = tl.zeros((BLOCK,), tl.float32)
    stat_max = tl.zeros((BLOCK,), tl.float32)
    rsqrt_max = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, n, BLOCK):
        qq = start + tl.arange(0, BLOCK).to(tl.int64)
        mask = qq < n
        mean = tl.load(area + qq, mask=mask, other=0.0) / width
        new = beta * tl.load(state + j * n + qq, mask=mask, other=STATE_OTHER) + one_minus * mean
        tl.store(area + n * (1 + j) + qq, new, mask=mask)
        if IS_ROW:
            tl.atomic_add(slice_sums + j * slices + qq // rows, new, mask=mask)
        else:
            tl.store(area + n * (1 + J + j) + qq, tl.rsqrt(new), mask=mask)
        rs = tl.rsqrt(new + RSQRT_EPS)
        stat_sq += tl.where(mask, new * new, 0.0)
        rsqrt_sq += tl.where(mask, rs * rs, 0.0)
        stat_max = tl.maximum(stat_max, tl.where(mask, tl.where(new == new, tl.abs(new), float("inf")), 0.0))
        rsqrt_max = tl.maximum(rsqrt_max, tl.where(mask, tl.where(rs == rs, tl.abs(rs), float("inf")), 0.0))
    tl.store(sums + j, tl.sum(stat_sq))
    tl.store(sums + J + j, tl.sum(rsqrt_sq))
    tl.store(maxs + j, tl.max(stat_max))
    tl.store(maxs + J + j, tl.max(rsqrt_max))


@triton.jit
def _rows_cols_kernel(
    pointers, meta, scratch, consts,
    K: tl.constexpr, J: tl.constexpr, H: tl.constexpr, RSQRT_EPS: tl.constexpr,
    OFF_ROW_SUMS: tl.constexpr, OFF_ROW_MAXS: tl.constexpr, OFF_COL_SUMS: tl.constexpr, OFF_COL_MAXS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One program per factored tensor: ``row' = β row + (1−β) mean_c(g²+ε)``, the same for columns, the row
    factor ``rsqrt(row'/mean_r(row'))`` (mean per slice), the column factor ``rsqrt(col')``, and the sums of
    squares / maxima of the row and column features."""
    t = tl.program_id(0).to(tl.int64)
    slices, rows, cols, row_area, col_area = _factor_geometry(meta, scratch, t)
    scal = scratch + tl.load(meta + t * METAS + M_SCALARS)
    row_state = tl.load(pointers + t * POINTERS + P_ROW).to(tl.pointer_type(tl.float32))
    col_state = tl.load(pointers + t * POINTERS + P_COL).to(tl.pointer_type(tl.float32))
    n_rows = slices * rows
    n_cols = slices * cols
    slice_sums = row_area + n_rows * (1 + 2 * J + H)
    for j in tl.static_range(J):
        _factor_ema_stats(
            row_area, row_state, slice_sums, scal + OFF_ROW_SUMS, scal + OFF_ROW_MAXS, consts, j, n_rows, cols, rows,
            slices, 0.0, True, K, J, RSQRT_EPS, BLOCK,
        )
    tl.debug_barrier()  # slice sums and new rows are complete before the row factors read them
    for j in tl.static_range(J):
        for start in range(0, n_rows, BLOCK):
            qq = start + tl.arange(0, BLOCK).to(tl.int64)
            mask = qq < n_rows
            new = tl.load(row_area + n_rows * (1 + j) + qq, mask=mask, other=1.0)
            mean = tl.load(slice_sums + j * slices + qq // rows, mask=mask, other=1.0) / rows
            tl.store(row_area + n_rows * (1 + J + j) + qq, tl.rsqrt(new / mean), mask=mask)
    for j in tl.static_range(J):
        _factor_ema_stats(
            col_area, col_state, slice_sums, scal + OFF_COL_SUMS, scal + OFF_COL_MAXS, consts, j, n_cols, rows, rows,
            slices, 1.0, False, K, J, RSQRT_EPS, BLOCK,
        )


# ---- pass 3: sums of squares of the Adafactor features -------------------------------------------------


@triton.jit
def _reduce_adafactor_kernel(
    pointers, meta, programs, scratch, consts,
    GRAD_DTYPE: tl.constexpr, K: tl.constexpr, J: tl.constexpr,
    USE_AFG: tl.constexpr, USE_AFM: tl.constexpr, OFF_AFG: tl.constexpr, OFF_AFM: tl.constexpr,
    OFF_MAXS: tl.constexpr, TILE_R: tl.constexpr, TILE_C: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(programs + PROGRAMS * pid + R_TENSOR).to(tl.int64)
    tile = tl.load(programs + PROGRAMS * pid + R_TILE).to(tl.int64)
    n = tl.load(meta + t * METAS + M_NUMEL)
    slices, rows, cols, row_area, col_area = _factor_geometry(meta, scratch, t)
    scal = scratch + tl.load(meta + t * METAS + M_SCALARS)
    grad_ptr = tl.load(pointers + t * POINTERS + P_GRAD).to(tl.pointer_type(GRAD_DTYPE))
    mom_ptr = tl.load(pointers + t * POINTERS + P_MOMENTUM).to(tl.pointer_type(tl.float32))
    n_rows = slices * rows
    n_cols = slices * cols
    col_tiles = (cols + TILE_C - 1) // TILE_C
    q = (tile // col_tiles) * TILE_R + tl.arange(0, TILE_R).to(tl.int64)  # global rows (may span slices)
    c = (tile % col_tiles) * TILE_C + tl.arange(0, TILE_C).to(tl.int64)
    row_mask = q < n_rows
    col_mask = c < cols
    cidx = (q // rows)[:, None] * cols + c[None, :]  # global column slice·C + c, per element
    idx = q[:, None] * cols + c[None, :]
    mask = row_mask[:, None] & col_mask[None, :]
    g = tl.load(grad_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    m_new = _ema_momenta(mom_ptr, idx, n, g, consts, mask, K)
    if USE_AFG:
        for j in tl.static_range(J):
            rf = tl.load(row_area + n_rows * (1 + J + j) + q, mask=row_mask, other=0.0)
            cf = tl.load(col_area + n_cols * (1 + J + j) + cidx, mask=mask, other=0.0)
            value = tl.where(mask, g * rf[:, None] * cf, 0.0)
            total = tl.sum(value * value)
            tl.atomic_add(scal + OFF_AFG + j, total)
            tl.atomic_max(scal + OFF_MAXS + OFF_AFG + j, tl.where(total == total, tl.sqrt(total), float("inf")))
    if USE_AFM:
        for k in tl.static_range(K):
            rf = tl.load(row_area + n_rows * (1 + J + k) + q, mask=row_mask, other=0.0)
            cf = tl.load(col_area + n_cols * (1 + J + k) + cidx, mask=mask, other=0.0)
            value = tl.where(mask, m_new[k] * rf[:, None] * cf, 0.0)
            total = tl.sum(value * value)
            tl.atomic_add(scal + OFF_AFM + k, total)
            tl.atomic_max(scal + OFF_MAXS + OFF_AFM + k, tl.where(total == total, tl.sqrt(total), float("inf")))


# ---- pass 4: normalizers, folded first layer, finiteness proof -----------------------------------------


@triton.jit
def _fold_kernel(
    pointers, meta, scratch, consts, weights, lr, decay,
    FACTORED: tl.constexpr, K: tl.constexpr, J: tl.constexpr, H: tl.constexpr, FX: tl.constexpr,
    NF: tl.constexpr, NT: tl.constexpr, KINDS: tl.constexpr, INDICES: tl.constexpr, NUM_REST: tl.constexpr,
    NORM_EPS: tl.constexpr, RSQRT_EPS: tl.constexpr, LOG_BETA1: tl.constexpr, LOG_BETA_V: tl.constexpr,
    ADAM_EPS: tl.constexpr, ADAM_INDEX: tl.constexpr, OUTPUT: tl.constexpr, EXP_MULT: tl.constexpr,
    STEP_MULT: tl.constexpr, MAGNITUDE_BOUND: tl.constexpr, PARAM_SCALE: tl.constexpr, PARAM_SCALE_MIN: tl.constexpr,
    OFF_MAXS: tl.constexpr, OFF_ROW_SUMS: tl.constexpr, OFF_ROW_MAXS: tl.constexpr, OFF_COL_SUMS: tl.constexpr,
    OFF_COL_MAXS: tl.constexpr, OFF_EXTRA: tl.constexpr, OFF_FLAGS: tl.constexpr, OFF_W_ROW: tl.constexpr,
    OFF_W_COL: tl.constexpr, OFF_W_X: tl.constexpr, OFF_BIAS: tl.constexpr, BLOCK: tl.constexpr,
):
    """One program per tensor. ``weights``: [W₁ᵀ (NF+NT, H) | b₁ (H) | W_rest (NUM_REST, H, H) | b_rest]."""
    t = tl.program_id(0).to(tl.int64)
    n = tl.load(meta + t * METAS + M_NUMEL)
    slices = tl.load(meta + t * METAS + M_SLICES)
    rows = tl.load(meta + t * METAS + M_ROWS)
    cols = tl.load(meta + t * METAS + M_COLS)
    scal = scratch + tl.load(meta + t * METAS + M_SCALARS)
    hh = tl.arange(0, H)
    count = n.to(tl.float32)
    # normalizer of every φ input column: rsqrt(eps + mean x²), mean over the whole tensor
    norms = ()
    for f in tl.static_range(NF):
        if KINDS[f] == 0:
            total = tl.load(scal + INDICES[f])
        elif KINDS[f] == 1:
            total = tl.load(scal + OFF_ROW_SUMS + INDICES[f]) * cols.to(tl.float32)
        else:
            total = tl.load(scal + OFF_COL_SUMS + INDICES[f]) * rows.to(tl.float32)
        norms = norms + (tl.rsqrt(NORM_EPS + total / count),)
    # first layer with the normalizers folded into its columns
    bound = tl.zeros((H,), tl.float32)
    for xr in tl.static_range(FX):
        w = tl.zeros((H,), tl.float32)
        for f in tl.static_range(NF):
            if KINDS[f] == 0 and INDICES[f] == xr:
                w += tl.load(weights + f * H + hh) * norms[f]
        tl.store(scal + OFF_W_X + xr * H + hh, w)
        bound += tl.abs(w) * tl.load(scal + OFF_MAXS + xr)
    if FACTORED:
        for i in tl.static_range(2 * J):
            w_row = tl.zeros((H,), tl.float32)
            w_col = tl.zeros((H,), tl.float32)
            for f in tl.static_range(NF):
                if KINDS[f] == 1 and INDICES[f] == i:
                    w_row += tl.load(weights + f * H + hh) * norms[f]
                if KINDS[f] == 2 and INDICES[f] == i:
                    w_col += tl.load(weights + f * H + hh) * norms[f]
            tl.store(scal + OFF_W_ROW + i * H + hh, w_row)
            tl.store(scal + OFF_W_COL + i * H + hh, w_col)
            bound += tl.abs(w_row) * tl.load(scal + OFF_ROW_MAXS + i)
            bound += tl.abs(w_col) * tl.load(scal + OFF_COL_MAXS + i)
    # time features tanh(t/τ − 1), t = completed steps, folded into the bias
    step_ptr = tl.load(pointers + t * POINTERS + P_STEP).to(tl.pointer_type(tl.int64))
    steps = tl.load(step_ptr).to(tl.float32)
    bias = tl.load(weights + (NF + NT) * H + hh)
    for i in tl.static_range(NT):
        scale = tl.load(consts + 2 * K + 2 * J + i)
        bias += tl.load(weights + (NF + i) * H + hh) * _tanh(steps / scale - 1.0)
    tl.store(scal + OFF_BIAS + hh, bias)
    bound += tl.abs(bias)
    # Adam's bias corrections for this step (t + 1)
    bc1 = _bias_correction(steps, LOG_BETA1)
    bcv = _bias_correction(steps, LOG_BETA_V)
    tl.store(scal + OFF_FLAGS + F_BC1, bc1)
    tl.store(scal + OFF_FLAGS + F_BCV, bcv)
    rms = tl.maximum(tl.sqrt(tl.load(scal + OFF_EXTRA + E_PARAM_SQ) / count), PARAM_SCALE_MIN)
    tl.store(scal + OFF_FLAGS + F_RMS, rms)
    if FACTORED:
        row_area = scratch + tl.load(meta + t * METAS + M_ROW_AREA)
        col_area = scratch + tl.load(meta + t * METAS + M_COL_AREA)
        n_rows = slices * rows
        n_cols = slices * cols
        for start in range(0, n_rows, BLOCK):
            qq = start + tl.arange(0, BLOCK).to(tl.int64)
            mask = qq < n_rows
            term = tl.zeros((H, BLOCK), tl.float32)
            for j in tl.static_range(J):
                stat = tl.load(row_area + n_rows * (1 + j) + qq, mask=mask, other=1.0)
                term += tl.load(scal + OFF_W_ROW + j * H + hh)[:, None] * stat[None, :]
                term += tl.load(scal + OFF_W_ROW + (J + j) * H + hh)[:, None] * tl.rsqrt(stat + RSQRT_EPS)[None, :]
            tl.store(row_area + n_rows * (1 + 2 * J) + hh[:, None] * n_rows + qq[None, :], term, mask=mask[None, :])
        for start in range(0, n_cols, BLOCK):
            cc = start + tl.arange(0, BLOCK).to(tl.int64)
            mask = cc < n_cols
            term = tl.zeros((H, BLOCK), tl.float32) + bias[:, None]
            for j in tl.static_range(J):
                stat = tl.load(col_area + n_cols * (1 + j) + cc, mask=mask, other=1.0)
                term += tl.load(scal + OFF_W_COL + j * H + hh)[:, None] * stat[None, :]
                term += tl.load(scal + OFF_W_COL + (J + j) * H + hh)[:, None] * tl.rsqrt(stat + RSQRT_EPS)[None, :]
            tl.store(col_area + n_cols * (1 + 2 * J) + hh[:, None] * n_cols + cc[None, :], term, mask=mask[None, :])
    # finiteness proof: |x| ≤ max pushed through |W| bounds φ's outputs, hence the step and the new parameter
    rest_w = weights + (NF + NT + 1) * H
    rest_b = rest_w + NUM_REST * H * H
    for i in tl.static_range(NUM_REST):
        w_abs = tl.abs(tl.load(rest_w + i * H * H + hh[:, None] * H + hh[None, :]))
        bound = tl.sum(w_abs * bound[None, :], axis=1) + tl.abs(tl.load(rest_b + i * H + hh))
    direction = tl.sum(tl.where(hh == 0, bound, 0.0))
    magnitude = tl.sum(tl.where(hh == 1, bound, 0.0))
    if OUTPUT == 0:
        exponent = tl.minimum(magnitude * EXP_MULT, _MAX_EXPONENT)
        step_bound = tl.where(magnitude * EXP_MULT < _MAX_EXPONENT, direction * tl.exp(exponent) * STEP_MULT, float("inf"))
    elif OUTPUT == 1:
        step_bound = direction * 0.0 + float("inf")  # normalized: needs Σu², always checked
    else:
        m_max = tl.load(scal + OFF_EXTRA + E_MOMENTUM_MAX + ADAM_INDEX)
        step_bound = STEP_MULT * tl.exp(MAGNITUDE_BOUND) * (m_max / bc1 / ADAM_EPS + direction)
    if PARAM_SCALE:
        step_bound = step_bound * rms
    param_max = tl.load(scal + OFF_EXTRA + E_PARAM_MAX)
    new_param_bound = param_max * (1.0 + tl.abs(decay)) + tl.abs(lr) * step_bound
    grad_bad = tl.load(scal + OFF_FLAGS + F_GRAD_BAD)
    # Σg² beyond the largest fp32 (or NaN): the fp32 second moments would overflow, so skip like a NaN gradient
    grad_total = tl.load(scal + OFF_EXTRA + E_GRAD_SQ)
    grad_bad = tl.where(grad_total <= _MAX_GRADIENT_SQUARE_SUM, grad_bad, 1.0)
    mode = tl.where(grad_bad != 0.0, MODE_SKIP, tl.where(new_param_bound < _FINITE_BOUND, MODE_DIRECT, MODE_CHECK))
    tl.store(scal + OFF_FLAGS + F_MODE, mode)
    if grad_bad != 0.0:
        skipped_ptr = tl.load(pointers + t * POINTERS + P_SKIPPED).to(tl.pointer_type(tl.int64))
        tl.store(skipped_ptr, tl.load(skipped_ptr) + 1)


# ---- passes 5 and 6: features, φ, step, writes ----------------------------------------------------------


@triton.jit
def _apply_kernel(
    pointers, meta, programs, scratch, consts, weights, lr, decay,
    PHASE: tl.constexpr, PARAM_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr, FACTORED: tl.constexpr,
    K: tl.constexpr, J: tl.constexpr, H: tl.constexpr, FX: tl.constexpr, NF: tl.constexpr, NT: tl.constexpr,
    NUM_REST: tl.constexpr, ACTIVATION: tl.constexpr,
    USE_G: tl.constexpr, USE_P: tl.constexpr, USE_M: tl.constexpr, USE_V: tl.constexpr, USE_MRS: tl.constexpr,
    USE_RS: tl.constexpr, USE_ADAM: tl.constexpr, USE_FULL: tl.constexpr, USE_RSFULL: tl.constexpr,
    USE_AFG: tl.constexpr, USE_AFM: tl.constexpr,
    BETA_V: tl.constexpr, ONE_MINUS_BETA_V: tl.constexpr, SECOND_EPS: tl.constexpr, FACTORED_EPS: tl.constexpr,
    RSQRT_EPS: tl.constexpr, ADAM_EPS: tl.constexpr, ADAM_INDEX: tl.constexpr,
    OUTPUT: tl.constexpr, EXP_MULT: tl.constexpr, STEP_MULT: tl.constexpr, MAGNITUDE_BOUND: tl.constexpr,
    PARAM_SCALE: tl.constexpr, OFF_FLAGS: tl.constexpr, OFF_W_X: tl.constexpr, OFF_BIAS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(programs + PROGRAMS * pid + R_TENSOR).to(tl.int64)
    block = tl.load(programs + PROGRAMS * pid + R_TILE).to(tl.int64)
    scal = scratch + tl.load(meta + t * METAS + M_SCALARS)
    mode = tl.load(scal + OFF_FLAGS + F_MODE)
    update_bad = tl.load(scal + OFF_FLAGS + F_UPDATE_BAD)
    if PHASE == 0:
        active = mode != MODE_SKIP
        write = mode == MODE_DIRECT
    else:
        active = (mode == MODE_CHECK) & (update_bad == 0.0)
        write = active
        if (mode == MODE_CHECK) & (update_bad != 0.0) & (block == 0):
            skipped_ptr = tl.load(pointers + t * POINTERS + P_SKIPPED).to(tl.pointer_type(tl.int64))
            tl.store(skipped_ptr, tl.load(skipped_ptr) + 1)
    if active:
        n = tl.load(meta + t * METAS + M_NUMEL)
        idx = block * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        mask = idx < n
        hh = tl.arange(0, H)
        param_ptr = tl.load(pointers + t * POINTERS + P_PARAM).to(tl.pointer_type(PARAM_DTYPE))
        grad_ptr = tl.load(pointers + t * POINTERS + P_GRAD).to(tl.pointer_type(GRAD_DTYPE))
        mom_ptr = tl.load(pointers + t * POINTERS + P_MOMENTUM).to(tl.pointer_type(tl.float32))
        second_ptr = tl.load(pointers + t * POINTERS + P_SECOND).to(tl.pointer_type(tl.float32))
        g = tl.load(grad_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        p = tl.load(param_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(second_ptr + idx, mask=mask, other=0.0)
        m_new = _ema_momenta(mom_ptr, idx, n, g, consts, mask, K)
        v_new = BETA_V * v + ONE_MINUS_BETA_V * g * g
        bc1 = tl.load(scal + OFF_FLAGS + F_BC1)
        bcv = tl.load(scal + OFF_FLAGS + F_BCV)
        if FACTORED:
            slices, rows, cols, row_area, col_area = _factor_geometry(meta, scratch, t)
            n_rows = slices * rows
            n_cols = slices * cols
            q = idx // cols  # global row
            cidx = (q // rows) * cols + (idx - q * cols)  # global column: slice·C + c
            row_factor = ()
            col_factor = ()
            for j in tl.static_range(J):
                row_factor = row_factor + (tl.load(row_area + n_rows * (1 + J + j) + q, mask=mask, other=0.0),)
                col_factor = col_factor + (tl.load(col_area + n_cols * (1 + J + j) + cidx, mask=mask, other=0.0),)
            full_new = (g,)
            z = tl.load(row_area + n_rows * (1 + 2 * J) + hh[:, None] * n_rows + q[None, :], mask=mask[None, :], other=0.0)
            z += tl.load(col_area + n_cols * (1 + 2 * J) + hh[:, None] * n_cols + cidx[None, :], mask=mask[None, :], other=0.0)
        else:
            full_ptr = tl.load(pointers + t * POINTERS + P_ROW).to(tl.pointer_type(tl.float32))
            full_new = _ema_full(full_ptr, idx, n, g, consts, mask, K, J, FACTORED_EPS)
            row_factor = (g,)
            col_factor = (g,)
            z = tl.zeros((H, BLOCK), tl.float32) + tl.load(scal + OFF_BIAS + hh)[:, None]
        x = _features(
            g, p, m_new, v_new, full_new, row_factor, col_factor, bc1, bcv, K, J, FACTORED, True,
            USE_G, USE_P, USE_M, USE_V, USE_MRS, USE_RS, USE_ADAM, USE_FULL, USE_RSFULL, USE_AFG, USE_AFM,
            SECOND_EPS, RSQRT_EPS, ADAM_EPS, ADAM_INDEX,
        )
        for f in tl.static_range(FX):
            z += tl.load(scal + OFF_W_X + f * H + hh)[:, None] * x[f][None, :]
        rest_w = weights + (NF + NT + 1) * H
        rest_b = rest_w + NUM_REST * H * H
        for i in tl.static_range(NUM_REST):
            a = _activation(z, ACTIVATION)
            w = tl.load(rest_w + i * H * H + hh[:, None] * H + hh[None, :])
            if H >= 16:
                z = tl.dot(w, a, input_precision="ieee")
            else:
                z = tl.sum(w[:, :, None] * a[None, :, :], axis=1)
            z += tl.load(rest_b + i * H + hh)[:, None]
        direction = tl.sum(tl.where(hh[:, None] == 0, z, 0.0), axis=0)
        magnitude = tl.sum(tl.where(hh[:, None] == 1, z, 0.0), axis=0)
        if OUTPUT == 0:
            u = direction * tl.exp(magnitude * EXP_MULT) * STEP_MULT
        elif OUTPUT == 1:
            u = direction * tl.exp(magnitude * EXP_MULT)  # raw; scaled to unit RMS in phase 1
        else:
            adam = _adam_direction(m_new[ADAM_INDEX], v_new, bc1, bcv, ADAM_EPS)
            u = (STEP_MULT * tl.exp(MAGNITUDE_BOUND * _tanh(magnitude))) * (adam + direction)
        rms = tl.load(scal + OFF_FLAGS + F_RMS)
        if OUTPUT == 1:
            if PHASE == 1:
                scale = tl.rsqrt(tl.load(scal + OFF_FLAGS + F_STEP_SQ) / n.to(tl.float32) + _NORMALIZED_EPS)
                u = u * scale * STEP_MULT
                if PARAM_SCALE:
                    u = u * rms
        elif PARAM_SCALE:
            u = u * rms
        new_param = (p - lr * u) - decay * p
        if write:
            for k in tl.static_range(K):
                tl.store(mom_ptr + k * n + idx, m_new[k], mask=mask)
            tl.store(second_ptr + idx, v_new, mask=mask)
            tl.store(param_ptr + idx, _to_param_dtype(new_param, PARAM_DTYPE), mask=mask)
            if FACTORED:
                row_state = tl.load(pointers + t * POINTERS + P_ROW).to(tl.pointer_type(tl.float32))
                col_state = tl.load(pointers + t * POINTERS + P_COL).to(tl.pointer_type(tl.float32))
                first_col = mask & (idx - q * cols == 0)
                first_row = mask & (q - (q // rows) * rows == 0)
                for j in tl.static_range(J):
                    tl.store(row_state + j * n_rows + q, tl.load(row_area + n_rows * (1 + j) + q, mask=first_col, other=0.0), mask=first_col)
                    tl.store(col_state + j * n_cols + cidx, tl.load(col_area + n_cols * (1 + j) + cidx, mask=first_row, other=0.0), mask=first_row)
            else:
                for j in tl.static_range(J):
                    tl.store(full_ptr + j * n + idx, full_new[j], mask=mask)
            if block == 0:
                step_ptr = tl.load(pointers + t * POINTERS + P_STEP).to(tl.pointer_type(tl.int64))
                tl.store(step_ptr, tl.load(step_ptr) + 1)
        else:  # phase 0 of a CHECK tensor: is every new parameter finite? (and Σu² for the normalized output)
            if OUTPUT == 1:
                # the scale rsqrt(mean u² + ε) is at most ε^-½: this bound on |p'| is known before it exists
                limit = tl.abs(p) * (1.0 + tl.abs(decay)) + tl.abs(lr) * tl.abs(u) * (_NORMALIZED_SCALE_MAX * STEP_MULT) * rms
                bad = (u != u) | (tl.abs(u) == float("inf")) | ~(limit < _FINITE_BOUND)
                tl.atomic_add(scal + OFF_FLAGS + F_STEP_SQ, tl.sum(tl.where(mask, u * u, 0.0)))
            else:
                bad = (new_param != new_param) | (tl.abs(new_param) == float("inf"))
            tl.atomic_max(scal + OFF_FLAGS + F_UPDATE_BAD, tl.max(tl.where(mask & bad, 1.0, 0.0)))


# ---- launcher -----------------------------------------------------------------------------------------


def _decay_constants(config: RuleConfig, device: torch.device) -> torch.Tensor:
    """``[β_m (K) | 1−β_m (K) | β_f (J) | 1−β_f (J) | time scales (T)]`` in fp32, the decays made by
    `vocabulary.decay_tensors` (as every back end makes them, so ``1 − β`` rounds identically)."""
    decays = decay_tensors(config, device)
    scales = torch.tensor(config.time_scales, dtype=torch.float32, device=device)
    return torch.cat([decays["beta_m"], decays["one_minus_beta_m"], decays["beta_f"], decays["one_minus_beta_f"], scales])


def _hidden_pad(config: RuleConfig) -> int:
    return max(2, triton.next_power_of_2(max(config.hidden_sizes)))


def _pack_weights(config: RuleConfig, weights, h: int, device: torch.device) -> torch.Tensor:
    """``[W₁ᵀ (F+T, H) | b₁ (H) | W_rest (L, H, H) | b_rest (L, H)]`` zero-padded to width ``h``."""
    (w1, b1), rest = weights[0], weights[1:]
    hidden, inputs = w1.shape
    w1t = torch.zeros((inputs, h), dtype=torch.float32, device=device)
    w1t[:, :hidden] = w1.t()
    bias1 = torch.zeros(h, dtype=torch.float32, device=device)
    bias1[:hidden] = b1
    rest_w = torch.zeros((len(rest), h, h), dtype=torch.float32, device=device)
    rest_b = torch.zeros((len(rest), h), dtype=torch.float32, device=device)
    for i, (w, b) in enumerate(rest):
        rest_w[i, : w.shape[0], : w.shape[1]] = w
        rest_b[i, : b.shape[0]] = b
    return torch.cat([w1t.reshape(-1), bias1, rest_w.reshape(-1), rest_b.reshape(-1)]).contiguous()


def _plan_constexprs(config: RuleConfig, plan: FeaturePlan) -> dict:
    return dict(K=len(config.momentum_decays), J=len(config.factored_decays), **plan.kernel_flags())


def _numeric_constexprs(config: RuleConfig) -> dict:
    return dict(
        BETA_V=config.second_moment_decay,
        ONE_MINUS_BETA_V=1 - config.second_moment_decay,
        SECOND_EPS=config.second_moment_eps,
        FACTORED_EPS=config.factored_eps,
        RSQRT_EPS=config.factored_rsqrt_eps,
        ADAM_EPS=config.adam_eps,
        ADAM_INDEX=config.adam_momentum_index,
    )


def _block_sizes(device: torch.device) -> BlockSizes:
    return GPU_BLOCKS if device.type == "cuda" else INTERPRETER_BLOCKS


def _output_constexprs(config: RuleConfig) -> dict:
    return dict(
        OUTPUT=_OUTPUT_CODES[config.output],
        EXP_MULT=config.exp_mult,
        STEP_MULT=config.step_mult,
        MAGNITUDE_BOUND=config.magnitude_bound,
        PARAM_SCALE=config.param_scale,
    )


_TORCH_TO_TRITON = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def learned_step_(
    config: RuleConfig,
    weights: Sequence[tuple[torch.Tensor, torch.Tensor]],
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    states: Sequence[dict[str, torch.Tensor]],
    lr: float,
    weight_decay: float,
) -> None:
    """One learned step of every tensor in ``params``, in place, on the device (no host synchronization).

    ``states`` are `LearnedOptimizer` states (``reference.init_state`` + ``skipped_steps``), updated in place,
    including ``step`` and ``skipped_steps``. All tensors must sit on one device (CUDA, or CPU in interpreter
    mode) and pass `tensor_unsupported_reason`; ``config`` must pass `unsupported_reason`.
    """
    if not params:
        return
    device = params[0].device
    lr, weight_decay = float(lr), float(weight_decay)
    decay = lr * (config.step_mult * weight_decay)
    h = _hidden_pad(config)
    consts = _decay_constants(config, device)
    packed = _pack_weights(config, [(w.to(device, torch.float32), b.to(device, torch.float32)) for w, b in weights], h, device)
    classes: dict[tuple, list[int]] = {}
    for i, (p, g) in enumerate(zip(params, grads)):
        classes.setdefault((is_factored(p.shape), p.dtype, g.dtype), []).append(i)
    for (factored, param_dtype, grad_dtype), members in classes.items():
        _launch_class(
            config, consts, packed, h, factored, param_dtype, grad_dtype,
            [params[i] for i in members], [grads[i] for i in members], [states[i] for i in members], lr, decay,
        )


def _launch_class(config, consts, packed, h, factored, param_dtype, grad_dtype, params, grads, states, lr, decay):
    device = params[0].device
    blocks = _block_sizes(device)
    BLOCK_FLAT, BLOCK_APPLY = blocks.flat, blocks.apply
    # 2-D tiles: as wide as the class's widest tensor needs (up to tile_cols), as tall as the tile size allows
    widest = max(p.shape[-1] for p in params) if factored else 1
    TILE_COLS = min(blocks.tile_cols, triton.next_power_of_2(widest))
    TILE_ROWS = blocks.tile_rows * blocks.tile_cols // TILE_COLS
    plan = feature_plan(config, factored)
    k, j = len(config.momentum_decays), len(config.factored_decays)
    layout = _Layout(fx=plan.num_rows, j2=2 * j, k=k, h=h)
    grads = [g if g.is_contiguous() else g.contiguous() for g in grads]
    # sizes, scratch offsets and program counts
    meta, pointers, reduce_counts, apply_counts = [], [], [], []
    cursor = 0
    for p, g, s in zip(params, grads, states):
        n = p.numel()
        if factored:
            rows, cols = p.shape[-2], p.shape[-1]
            slices = n // (rows * cols)
        else:
            slices, rows, cols = 1, n, 1
        scalars = cursor
        cursor += layout.size
        row_area = col_area = 0
        if factored:
            row_area = cursor
            cursor += _row_area_size(slices, rows, j, h)
            col_area = cursor
            cursor += _col_area_size(slices, cols, j, h)
            reduce_counts.append(triton.cdiv(slices * rows, TILE_ROWS) * triton.cdiv(cols, TILE_COLS))
        else:
            reduce_counts.append(triton.cdiv(n, BLOCK_FLAT))
        apply_counts.append(triton.cdiv(n, BLOCK_APPLY))
        sizes = dict(numel=n, slices=slices, rows=rows, cols=cols, scalars=scalars, row_area=row_area, col_area=col_area)
        meta.append([sizes[name] for name in META_COLUMNS])
        row_state = s["row_second_moment"] if factored else s["full_second_moment"]
        addresses = dict(
            param=p.data_ptr(), grad=g.data_ptr(), momentum=s["momentum"].data_ptr(),
            second_moment=s["second_moment"].data_ptr(), row_or_full=row_state.data_ptr(),
            col=s["col_second_moment"].data_ptr() if factored else 0, step=s["step"].data_ptr(),
            skipped_steps=s["skipped_steps"].data_ptr(),
        )
        pointers.append([addresses[name] for name in POINTER_COLUMNS])
    meta_t = torch.tensor(meta, dtype=torch.int64, device=device)
    pointer_t = torch.tensor(pointers, dtype=torch.int64, device=device)
    scratch = torch.zeros(cursor, dtype=torch.float32, device=device)
    reduce_programs = _program_table(reduce_counts, device)
    apply_programs = _program_table(apply_counts, device)
    num_tensors = len(params)

    shared = dict(**_plan_constexprs(config, plan), **_numeric_constexprs(config))
    pdt, gdt = _TORCH_TO_TRITON[param_dtype], _TORCH_TO_TRITON[grad_dtype]
    direct_rows = plan.direct_rows
    beta1 = config.momentum_decays[config.adam_momentum_index]
    logs = dict(
        LOG_BETA1=math.log(beta1) if beta1 > 0 else -1e30,
        LOG_BETA_V=math.log(config.second_moment_decay) if config.second_moment_decay > 0 else -1e30,
    )
    _reduce_kernel[(reduce_programs.shape[0],)](
        pointer_t, meta_t, reduce_programs, scratch, consts,
        PARAM_DTYPE=pdt, GRAD_DTYPE=gdt, FACTORED=factored, FX_DIRECT=direct_rows, **shared, **logs,
        OFF_MAXS=layout.maxs, OFF_EXTRA=layout.extra, OFF_FLAGS=layout.flags,
        TILE_R=TILE_ROWS, TILE_C=TILE_COLS, BLOCK=BLOCK_FLAT,
    )
    if factored:
        _rows_cols_kernel[(num_tensors,)](
            pointer_t, meta_t, scratch, consts, K=k, J=j, H=h, RSQRT_EPS=config.factored_rsqrt_eps,
            OFF_ROW_SUMS=layout.row_sums, OFF_ROW_MAXS=layout.row_maxs, OFF_COL_SUMS=layout.col_sums,
            OFF_COL_MAXS=layout.col_maxs, BLOCK=blocks.loop,
        )
        if plan.has("afg") or plan.has("afm"):
            _reduce_adafactor_kernel[(reduce_programs.shape[0],)](
                pointer_t, meta_t, reduce_programs, scratch, consts, GRAD_DTYPE=gdt, K=k, J=j,
                USE_AFG=plan.has("afg"), USE_AFM=plan.has("afm"),
                OFF_AFG=plan.offset("afg") if plan.has("afg") else 0,
                OFF_AFM=plan.offset("afm") if plan.has("afm") else 0,
                OFF_MAXS=layout.maxs, TILE_R=TILE_ROWS, TILE_C=TILE_COLS,
            )
    kinds = tuple({"x": 0, "row": 1, "col": 2}[kind] for kind, _ in plan.columns)
    indices = tuple(index for _, index in plan.columns)
    output = _output_constexprs(config)
    _fold_kernel[(num_tensors,)](
        pointer_t, meta_t, scratch, consts, packed, lr, decay,
        FACTORED=factored, K=k, J=j, H=h, FX=plan.num_rows, NF=len(plan.columns), NT=config.num_time_inputs,
        KINDS=kinds, INDICES=indices, NUM_REST=len(config.hidden_sizes),
        NORM_EPS=config.normalization_eps, RSQRT_EPS=config.factored_rsqrt_eps,
        **logs, ADAM_EPS=config.adam_eps, ADAM_INDEX=config.adam_momentum_index, **output,
        PARAM_SCALE_MIN=config.param_scale_min,
        OFF_MAXS=layout.maxs, OFF_ROW_SUMS=layout.row_sums, OFF_ROW_MAXS=layout.row_maxs,
        OFF_COL_SUMS=layout.col_sums, OFF_COL_MAXS=layout.col_maxs, OFF_EXTRA=layout.extra,
        OFF_FLAGS=layout.flags, OFF_W_ROW=layout.w_row, OFF_W_COL=layout.w_col, OFF_W_X=layout.w_x,
        OFF_BIAS=layout.bias, BLOCK=blocks.loop,
    )
    apply_args = dict(
        PARAM_DTYPE=pdt, GRAD_DTYPE=gdt, FACTORED=factored, H=h, FX=plan.num_rows, NF=len(plan.columns),
        NT=config.num_time_inputs, NUM_REST=len(config.hidden_sizes),
        ACTIVATION=_ACTIVATION_CODES[config.activation], **shared, **output,
        OFF_FLAGS=layout.flags, OFF_W_X=layout.w_x, OFF_BIAS=layout.bias, BLOCK=BLOCK_APPLY,
    )
    for phase in (0, 1):
        _apply_kernel[(apply_programs.shape[0],)](
            pointer_t, meta_t, apply_programs, scratch, consts, packed, lr, decay, PHASE=phase, **apply_args
        )
    # keep contiguous gradient copies alive until the kernels are enqueued (the caching allocator handles reuse)
    del grads


def _program_table(counts: list[int], device: torch.device) -> torch.Tensor:
    """``(P, 2)`` int32 rows ``(tensor, tile)``, built on the device."""
    counts_t = torch.tensor(counts, dtype=torch.int64, device=device)
    tensor_ids = torch.repeat_interleave(torch.arange(len(counts), device=device), counts_t)
    starts = torch.cumsum(counts_t, 0) - counts_t
    tiles = torch.arange(tensor_ids.shape[0], device=device) - starts[tensor_ids]
    return torch.stack([tensor_ids, tiles], dim=1).to(torch.int32).contiguous()


def interpreter_active() -> bool:
    """Whether these kernels were built for Triton's interpreter (they then run on CPU tensors)."""
    return type(_apply_kernel).__name__ == "InterpretedFunction"
