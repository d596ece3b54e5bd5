"""The learned update rule: `RuleConfig` (every constant the step depends on) and `RuleNetwork` (φ + config).

A rule is a tiny MLP shared by all coordinates. It reads per-coordinate features (gradient, parameter,
momenta, second moments, Adafactor-style factored statistics, time) and writes a direction ``d`` and a
log-magnitude ``a`` that the output formula turns into a step. The math lives once, in `reference.py`.

On disk a rule is two files: ``rule_config.json`` (a `RuleConfig`) and ``rule.safetensors`` (φ), plus an
optional ``provenance.json`` saying how it was made. Nothing in a rule depends on code defaults: the JSON
holds every constant, and loading refuses fields it does not know and fields that are missing.

`RuleNetwork` is what the step consumes and what its files hold; the public `optbundle.LearnedRule`
(`optbundle.store.rule`) is this class plus loading from bundles and the Hub and publishing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..files import (
    CorruptFileError,
    FormatVersionError,
    RuleConfigError,
    atomic_write_bytes,
    load_safetensors_file,
    parse_json_text,
    read_json_file,
    read_safetensors_header,
    save_safetensors_bytes,
    short_repr,
)
from ..recipes import check_known_keys
from .vocabulary import ACTIVATIONS, FEATURE_GROUPS, NUM_OUTPUTS, OUTPUT_FORMS, SMALL_FC_LOPT_FEATURES, feature_width

RULE_FORMAT_VERSION = 2
RULE_CONFIG_NAME = "rule_config.json"
RULE_WEIGHTS_NAME = "rule.safetensors"
PROVENANCE_NAME = "provenance.json"

SCHEDULES = ("constant", "inverse_sqrt")
FACTORED_DIMS = ("last_two",)
#: Parameter roles (see `roles.py`): hidden matrices, 1-D tensors (biases, norms), embeddings, output heads,
#: and adapter matrices (LoRA A/B).
ROLES = ("matrix", "vector", "embedding", "head", "adapter")
#: Training regimes a rule may recommend its own learning rate for (`LearnedOptimizer(regime=...)`).
REGIMES = ("scratch", "finetune")
WIDTH_SCALINGS = ("none", "mup")

#: Size limits checked before φ is allocated (a rule may come from a stranger): hidden layers of φ and their
#: width, number of decays and time scales. The largest published rules use 2 hidden layers of width 32.
MAX_HIDDEN_LAYERS = 16
MAX_HIDDEN_WIDTH = 4096
MAX_DECAYS = 16
MAX_TIME_SCALES = 64
#: Ranges of the other numeric fields: epsilons in (0, MAX_EPS], time scales in (0, MAX_TIME_SCALE],
#: multipliers in [0, MAX_MULTIPLIER], base_fan_in at most MAX_BASE_FAN_IN.
MAX_EPS = 1.0
MAX_TIME_SCALE = 1e12
MAX_MULTIPLIER = 1e6
MAX_BASE_FAN_IN = 2**31
#: Largest ``finetune_depth_matrices`` and ``finetune_depth_exponent``
MAX_DEPTH_MATRICES = 2**31
MAX_DEPTH_EXPONENT = 2.0

#: Values the fields added in rule format 2 take for a format-1 rule (which behaves exactly as before).
#: Fields added to format 2 after rules of it were published: a JSON without them gets these values, and a
#: config equal to them serializes without them (so earlier rules keep their bytes and content hash).
LATE_DEFAULTS: dict[str, Any] = {
    "finetune_head_lr": "finetune",
    "schedule_steps": 1000.0,
    "lr_adaptation": "none",
    "lr_adaptation_rate": 0.03,
    "lr_adaptation_bounds": [0.01, 10.0],
    "lr_adaptation_momentum_index": 1,
    "finetune_depth_matrices": 0,
    "finetune_depth_exponent": 0.5,
}
#: ``lr_adaptation`` values: "none", or "gradient_alignment" (per-tensor lr multiplier, see `RuleConfig`)
LR_ADAPTATIONS = ("none", "gradient_alignment")
#: ``finetune_head_lr`` values: the lr that role-"head" tensors train at in the "finetune" regime
FINETUNE_HEAD_LRS = ("finetune", "scratch")
V1_DEFAULTS: dict[str, Any] = {
    "recommended_lr": {"scratch": 1.0, "finetune": 1.0},
    "role_lr": {role: 1.0 for role in ROLES},
    "orthogonal_roles": [],
    "orthogonal_momentum_index": 0,
    "ns_steps": 5,
    "ns_coefficients": [3.4445, -4.7750, 2.0315],
    "matrix_rms": 0.2,
    "width_scaling": "none",
    "base_fan_in": 128,
}


@dataclass
class RuleConfig:
    """Everything the learned step depends on, serializable to JSON.

    Output forms (``u`` is the step before ``lr``; the update is ``p ← p·(1 − lr·step_mult·wd) − lr·u``):

    - ``small_fc_lopt``: ``u = d · exp(a · exp_mult) · step_mult`` (Metz et al. 2022).
    - ``normalized``: ``u = step_mult · w / RMS(w)`` with ``w = d · exp(a · exp_mult)``, RMS over the tensor
      (Celo2-style: the rule picks the direction, ``lr``/the schedule picks the scale).
    - ``adam_residual``: ``u = step_mult · exp(magnitude_bound · tanh(a)) · (m̂/(√v̂ + adam_eps) + d)``: with a
      zero last layer this is exactly Adam with learning rate ``step_mult``.

    - ``hybrid_residual`` (format 2): per tensor, by role. A tensor whose role is in ``orthogonal_roles`` (and
      has ≥ 2 dims, viewed as ``fan_out × fan_in``) gets a Muon-like step
      ``u = step_mult · exp(magnitude_bound · tanh(mean(a))) · matrix_rms · o / RMS(o)`` with
      ``o = NewtonSchulz(m̃/RMS(m̃) + d)`` and ``m̃ = β m + (1 − β) g`` (Nesterov look-ahead of momentum
      ``orthogonal_momentum_index``); every other tensor the ``adam_residual`` step. Both are then multiplied by
      ``role_lr[role]`` and the width multiplier (``width_scaling: mup``: ``min(1, √(base_fan_in / fan_in))``
      for orthogonalized matrices, ``min(1, base_fan_in / fan_in)`` for heads, 1 otherwise). With a zero last
      layer this is Muon on hidden matrices and Adam elsewhere, at AdamW-equivalent update RMS.

    ``recommended_lr`` is the ``lr`` the rule runs at when none is given, per regime ("scratch": a freshly
    initialized model, "finetune": a pretrained one). For format-1 rules it is 1 (``lr`` is a multiplier on a
    step whose size is ``step_mult``); format-2 rules with ``step_mult`` 1 take ``lr`` as AdamW's learning rate.
    ``schedule``: "constant", or "inverse_sqrt" (format 2): the rule's own decay, ``lr · (1 + t/schedule_steps)^-½``
    at step ``t`` (counted per tensor from the start of its accumulators; a Trainer schedule multiplies on top).

    ``finetune_head_lr`` ("finetune" or "scratch"): in the "finetune" regime, role-"head" tensors (a task head
    put on a pretrained body: a classifier, PEFT's ``modules_to_save``) are new layers; "scratch" steps them
    at ``lr · recommended_lr.scratch / recommended_lr.finetune``, i.e. as if trained from scratch
    (`roles.regime_lr_factor`). Pretrained output layers that should keep the fine-tuning lr are overridden to
    another role (``Bundle(roles=...)``); tied LM heads are embeddings and are not affected.

    ``finetune_depth_matrices`` (format 2; 0 = off): in the "finetune" regime, the pretrained tensors (every role
    but ``adapter``, and ``head`` under ``finetune_head_lr: scratch``: those are new layers) step at ``lr`` ×
    ``min(1, finetune_depth_matrices / n) ^ finetune_depth_exponent``, where ``n`` is the number of role-"matrix"
    tensors the optimizer trains: the more pretrained layers are trained at once, the smaller each one's step, so
    that their changes, which add up through the network, move the function about as much as a few layers do
    (`roles.regime_lr_factor`). Fine-tuning a top layer keeps the fine-tuning lr; full fine-tuning of a deep
    model steps each layer less; LoRA (no pretrained matrix trained) is not affected.

    ``lr_adaptation`` "gradient_alignment" (format 2): each tensor keeps an lr multiplier ``s`` (state
    ``lr_log_scale`` = log s, starting at 0) that follows the sign of the alignment between the new gradient
    and the momentum ``lr_adaptation_momentum_index`` before this step's update:
    ``log s ← clip(log s + lr_adaptation_rate · sign(Σ g·m), log lo, log hi)`` with
    ``[lo, hi] = lr_adaptation_bounds``, and the tensor steps at ``lr · s``. Gradients that keep agreeing with
    the recent direction mean the steps are too short; disagreeing ones mean they overshoot: a sign-based
    hypergradient on the tensor's lr, so one shipped lr serves tasks whose best lr differs by 10×+.

    With ``param_scale`` the step is further multiplied by ``max(RMS(p), param_scale_min)`` (VeLO/Celo-style
    relative updates). Weight decay is decoupled and scaled by ``step_mult``, so ``weight_decay`` means what it
    means for AdamW at learning rate ``step_mult``.
    """

    features: list[str] = field(default_factory=lambda: list(SMALL_FC_LOPT_FEATURES))
    momentum_decays: list[float] = field(default_factory=lambda: [0.9, 0.99, 0.999])
    second_moment_decay: float = 0.999
    factored_decays: list[float] = field(default_factory=lambda: [0.9, 0.99, 0.999])
    time_scales: list[float] = field(
        default_factory=lambda: [1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1e3, 3e3, 1e4, 3e4, 1e5]
    )
    second_moment_eps: float = 1e-6
    factored_eps: float = 1e-30
    factored_rsqrt_eps: float = 1e-8
    factored_dims: str = "last_two"
    normalization_eps: float = 1e-5
    adam_eps: float = 1e-8
    adam_momentum_index: int = 0
    hidden_sizes: list[int] = field(default_factory=lambda: [32, 32])
    activation: str = "relu"
    output: str = "small_fc_lopt"
    exp_mult: float = 0.001
    step_mult: float = 0.001
    magnitude_bound: float = 1.0
    param_scale: bool = False
    param_scale_min: float = 1e-3
    schedule: str = "constant"
    schedule_steps: float = 1000.0
    recommended_lr: dict[str, float] = field(default_factory=lambda: dict(V1_DEFAULTS["recommended_lr"]))
    role_lr: dict[str, float] = field(default_factory=lambda: dict(V1_DEFAULTS["role_lr"]))
    orthogonal_roles: list[str] = field(default_factory=list)
    orthogonal_momentum_index: int = 0
    ns_steps: int = 5
    ns_coefficients: list[float] = field(default_factory=lambda: list(V1_DEFAULTS["ns_coefficients"]))
    matrix_rms: float = 0.2
    width_scaling: str = "none"
    base_fan_in: int = 128
    finetune_head_lr: str = "finetune"
    lr_adaptation: str = "none"
    lr_adaptation_rate: float = 0.03
    lr_adaptation_bounds: list[float] = field(default_factory=lambda: list(LATE_DEFAULTS["lr_adaptation_bounds"]))
    lr_adaptation_momentum_index: int = 1
    finetune_depth_matrices: int = 0
    finetune_depth_exponent: float = 0.5
    format_version: int = RULE_FORMAT_VERSION

    def __post_init__(self) -> None:
        self.validate()

    # ---- derived sizes -------------------------------------------------------------------------------
    def feature_width(self, group: str) -> int:
        """Number of input columns a feature group contributes (`vocabulary.FEATURES`)."""
        return feature_width(group, len(self.momentum_decays), len(self.factored_decays), len(self.time_scales))

    @property
    def num_inputs(self) -> int:
        return sum(self.feature_width(g) for g in self.features)

    @property
    def num_time_inputs(self) -> int:
        return self.feature_width("time") if "time" in self.features else 0

    @property
    def num_outputs(self) -> int:
        return NUM_OUTPUTS

    def layer_shapes(self) -> list[tuple[int, int]]:
        """(out, in) of each linear layer of φ."""
        sizes = [self.num_inputs, *self.hidden_sizes, self.num_outputs]
        return [(sizes[i + 1], sizes[i]) for i in range(len(sizes) - 1)]

    # ---- validation ----------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise `RuleConfigError` naming the first field that is wrong."""

        def bad(name: str, why: str) -> RuleConfigError:
            return RuleConfigError(f"RuleConfig.{name}: {why}")

        def check_choice(name: str, choices: tuple[str, ...] | list[str], what: str = "value") -> None:
            value = getattr(self, name)
            if not isinstance(value, str) or value not in choices:
                raise bad(name, f"unknown {what} {short_repr(value)}; known: {', '.join(choices)}")

        def check_momentum_index(name: str) -> None:
            value = getattr(self, name)
            if not _is_int(value) or not 0 <= value < len(self.momentum_decays):
                raise bad(name, f"must index momentum_decays, got {short_repr(value)}")

        if not _is_int(self.format_version):
            raise bad("format_version", f"must be an integer, got {short_repr(self.format_version)}")
        if self.format_version > RULE_FORMAT_VERSION:
            raise FormatVersionError(
                f"RuleConfig.format_version is {self.format_version}, but this optbundle reads rule format "
                f"versions up to {RULE_FORMAT_VERSION}; upgrade optbundle to load this rule"
            )
        if self.format_version < 1:
            raise bad("format_version", f"must be >= 1, got {self.format_version}")
        if not isinstance(self.features, list) or not self.features or len(self.features) > len(FEATURE_GROUPS):
            raise bad("features", f"must be a non-empty list of at most {len(FEATURE_GROUPS)} feature names")
        for name in self.features:
            if not isinstance(name, str) or name not in FEATURE_GROUPS:
                raise bad("features", f"unknown feature {short_repr(name)}; known features: {', '.join(FEATURE_GROUPS)}")
        if len(set(self.features)) != len(self.features):
            raise bad("features", "lists a feature twice")
        if "time" in self.features and self.features[-1] != "time":
            raise bad("features", "'time' must be the last feature (time features are appended unnormalized)")
        if self.features == ["time"]:
            raise bad("features", "needs at least one feature besides 'time'")
        for name in ("momentum_decays", "factored_decays"):
            decays = getattr(self, name)
            if not isinstance(decays, list) or not decays or len(decays) > MAX_DECAYS:
                raise bad(name, f"must be a non-empty list of at most {MAX_DECAYS} decays in [0, 1)")
            for d in decays:
                if not _is_number(d) or not 0.0 <= d < 1.0:
                    raise bad(name, f"decay {short_repr(d)} is not in [0, 1)")
        if not _is_number(self.second_moment_decay) or not 0.0 <= self.second_moment_decay < 1.0:
            raise bad("second_moment_decay", f"{short_repr(self.second_moment_decay)} is not in [0, 1)")
        if "adafactor_momentum" in self.features and len(self.momentum_decays) != len(self.factored_decays):
            raise bad(
                "features",
                "'adafactor_momentum' pairs momentum k with factored decay k, so momentum_decays and "
                "factored_decays need the same length",
            )
        if not isinstance(self.time_scales, list) or len(self.time_scales) > MAX_TIME_SCALES:
            raise bad("time_scales", f"must be a list of at most {MAX_TIME_SCALES} numbers")
        for t in self.time_scales:
            if not _is_number(t) or not 0 < t <= MAX_TIME_SCALE:  # NaN fails the comparison too
                raise bad("time_scales", f"{short_repr(t)} is not a number in (0, {MAX_TIME_SCALE:g}]")
        if "time" in self.features and not self.time_scales:
            raise bad("time_scales", "is empty but 'time' is a feature")
        for name in ("second_moment_eps", "factored_rsqrt_eps", "normalization_eps", "adam_eps"):
            value = getattr(self, name)
            if not _is_number(value) or not 0 < value <= MAX_EPS:  # NaN fails the comparison too
                raise bad(name, f"must be a number in (0, {MAX_EPS:g}], got {short_repr(value)}")
        if not _is_number(self.factored_eps) or not 0 <= self.factored_eps <= MAX_EPS:
            raise bad("factored_eps", f"must be a number in [0, {MAX_EPS:g}], got {short_repr(self.factored_eps)}")
        check_choice("factored_dims", FACTORED_DIMS)
        check_momentum_index("adam_momentum_index")
        if not isinstance(self.hidden_sizes, list) or len(self.hidden_sizes) > MAX_HIDDEN_LAYERS:
            raise bad("hidden_sizes", f"must be a list of at most {MAX_HIDDEN_LAYERS} positive integers")
        for width in self.hidden_sizes:
            if not _is_int(width) or not 0 < width <= MAX_HIDDEN_WIDTH:
                raise bad("hidden_sizes", f"width {short_repr(width)} is not an integer in [1, {MAX_HIDDEN_WIDTH}]")
        check_choice("activation", ACTIVATIONS, "activation")
        check_choice("output", OUTPUT_FORMS, "output form")
        for name in ("exp_mult", "step_mult", "magnitude_bound", "param_scale_min"):
            value = getattr(self, name)
            if not _is_number(value) or not 0 <= value <= MAX_MULTIPLIER:
                raise bad(name, f"must be a number in [0, {MAX_MULTIPLIER:g}], got {short_repr(value)}")
        if not isinstance(self.param_scale, bool):
            raise bad("param_scale", f"must be true or false, got {short_repr(self.param_scale)}")
        check_choice("schedule", SCHEDULES, "schedule")
        if not _is_number(self.schedule_steps) or not 0 < self.schedule_steps <= MAX_TIME_SCALE:
            raise bad("schedule_steps", f"must be a number of steps in (0, {MAX_TIME_SCALE:g}], got {short_repr(self.schedule_steps)}")
        if self.schedule != "constant" and self.output != "hybrid_residual":
            raise bad("schedule", f"{self.schedule!r} needs the 'hybrid_residual' output (format 2); use 'constant'")
        for name, keys in (("recommended_lr", REGIMES), ("role_lr", ROLES)):
            table = getattr(self, name)
            if not isinstance(table, dict) or set(table) != set(keys):
                raise bad(name, f"must map exactly {', '.join(keys)} to numbers, got {short_repr(table)}")
            for key, value in table.items():
                if not _is_number(value) or not 0 < value <= MAX_MULTIPLIER:
                    raise bad(name, f"{key}: must be a number in (0, {MAX_MULTIPLIER:g}], got {short_repr(value)}")
        if (
            not isinstance(self.orthogonal_roles, list)
            or len(self.orthogonal_roles) > len(ROLES)
            or any(not isinstance(r, str) or r not in ROLES for r in self.orthogonal_roles)
        ):
            raise bad("orthogonal_roles", f"must be a list of roles from {', '.join(ROLES)}, got {short_repr(self.orthogonal_roles)}")
        if self.orthogonal_roles and self.output != "hybrid_residual":
            raise bad("orthogonal_roles", "only the 'hybrid_residual' output orthogonalizes; leave it empty")
        check_momentum_index("orthogonal_momentum_index")
        if not _is_int(self.ns_steps) or not 1 <= self.ns_steps <= 20:
            raise bad("ns_steps", f"must be an integer in [1, 20], got {short_repr(self.ns_steps)}")
        if (
            not isinstance(self.ns_coefficients, list)
            or len(self.ns_coefficients) != 3
            or any(not _is_number(c) or not abs(c) <= MAX_MULTIPLIER for c in self.ns_coefficients)
        ):
            raise bad("ns_coefficients", f"must be three finite numbers (a, b, c), got {short_repr(self.ns_coefficients)}")
        if not _is_number(self.matrix_rms) or not 0 < self.matrix_rms <= MAX_MULTIPLIER:
            raise bad("matrix_rms", f"must be a number in (0, {MAX_MULTIPLIER:g}], got {short_repr(self.matrix_rms)}")
        check_choice("width_scaling", WIDTH_SCALINGS)
        if not _is_int(self.base_fan_in) or not 0 < self.base_fan_in <= MAX_BASE_FAN_IN:
            raise bad("base_fan_in", f"must be an integer in [1, {MAX_BASE_FAN_IN}], got {short_repr(self.base_fan_in)}")
        check_choice("finetune_head_lr", FINETUNE_HEAD_LRS)
        if self.format_version == 1 and self.finetune_head_lr != LATE_DEFAULTS["finetune_head_lr"]:
            raise bad("finetune_head_lr", "needs format_version 2 (set it)")
        check_choice("lr_adaptation", LR_ADAPTATIONS)
        if self.lr_adaptation != "none" and self.output != "hybrid_residual":
            raise bad("lr_adaptation", f"{self.lr_adaptation!r} needs the 'hybrid_residual' output (format 2); use 'none'")
        if not _is_number(self.lr_adaptation_rate) or not 0 <= self.lr_adaptation_rate <= 1:
            raise bad("lr_adaptation_rate", f"must be a number in [0, 1] (change of log lr per step), got {short_repr(self.lr_adaptation_rate)}")
        bounds = self.lr_adaptation_bounds
        if (
            not isinstance(bounds, list)
            or len(bounds) != 2
            or not all(_is_number(b) and 0 < b <= MAX_MULTIPLIER for b in bounds)
            or not bounds[0] <= 1 <= bounds[1]
        ):
            raise bad("lr_adaptation_bounds", f"must be [lo, hi] with 0 < lo ≤ 1 ≤ hi ≤ {MAX_MULTIPLIER:g}, got {short_repr(bounds)}")
        if self.lr_adaptation != "none":
            check_momentum_index("lr_adaptation_momentum_index")
        if not _is_int(self.finetune_depth_matrices) or not 0 <= self.finetune_depth_matrices <= MAX_DEPTH_MATRICES:
            raise bad("finetune_depth_matrices", f"must be an integer in [0, {MAX_DEPTH_MATRICES}] (0: off), "
                      f"got {short_repr(self.finetune_depth_matrices)}")
        if not _is_number(self.finetune_depth_exponent) or not 0 <= self.finetune_depth_exponent <= MAX_DEPTH_EXPONENT:
            raise bad("finetune_depth_exponent", f"must be a number in [0, {MAX_DEPTH_EXPONENT:g}], "
                      f"got {short_repr(self.finetune_depth_exponent)}")
        if self.finetune_depth_matrices and self.output != "hybrid_residual":
            raise bad("finetune_depth_matrices", "needs the 'hybrid_residual' output (format 2, per-role lr); use 0")

    # ---- (de)serialization ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        if self.format_version == 1:  # a format-1 rule serializes as it always did (same bytes, same hash)
            for key, value in V1_DEFAULTS.items():
                if data[key] != value:
                    raise RuleConfigError(f"RuleConfig.{key}: needs format_version 2 (set it), got {data[key]!r}")
                del data[key]
        for key, value in LATE_DEFAULTS.items():
            if data[key] == value:
                del data[key]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, source: str = "rule config") -> RuleConfig:
        """Build a config from JSON data; unknown or missing fields are errors that name the field."""
        if not isinstance(data, dict):
            raise RuleConfigError(f"{source}: expected a JSON object, got {type(data).__name__}")
        version = data.get("format_version")
        if isinstance(version, int) and version > RULE_FORMAT_VERSION:
            raise FormatVersionError(
                f"{source}: format_version {version} is newer than the {RULE_FORMAT_VERSION} this optbundle "
                "reads; upgrade optbundle to load this rule"
            )
        known = {f.name for f in dataclasses.fields(cls)}
        if version == 1:  # format 1 predates these fields; its rules behave as they always did
            data = {**{k: v for k, v in V1_DEFAULTS.items() if k not in data}, **data}
        data = {**{k: v for k, v in LATE_DEFAULTS.items() if k not in data}, **data}
        check_known_keys((cls,), data, source=source, kind="field", error=RuleConfigError)
        missing = sorted(known - set(data))
        if missing:
            raise RuleConfigError(
                f"{source}: missing field(s) {', '.join(missing)} (a rule stores every constant; none are defaulted)"
            )
        try:
            return cls(**data)
        except FormatVersionError:
            raise
        except RuleConfigError as err:
            raise RuleConfigError(f"{source}: {err}") from err
        except (TypeError, ValueError, OverflowError, RecursionError) as err:  # e.g. unhashable values inside lists
            raise RuleConfigError(f"{source}: {short_repr(str(err), 300)}") from err

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, *, source: str = "rule config") -> RuleConfig:
        try:
            data = parse_json_text(text, source=source)
        except CorruptFileError as err:
            raise RuleConfigError(str(err)) from err
        return cls.from_dict(data, source=source)


def _is_int(x: Any) -> bool:
    """An integer that is not a bool."""
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    """A real, finite number that is not a bool (NaN, inf and integers beyond float range are refused)."""
    if not isinstance(x, (int, float)) or isinstance(x, bool):
        return False
    try:
        return math.isfinite(x)
    except OverflowError:  # an int too large for a float
        return False


class RuleNetwork(nn.Module):
    """φ (an MLP shared by all coordinates) together with the `RuleConfig` that says how to use it.

    ``layers[i]`` are `nn.Linear` modules with the shapes of `RuleConfig.layer_shapes`. ``provenance`` is a
    JSON-serializable dict describing how the rule was made (kept beside the weights, never interpreted).
    """

    def __init__(self, config: RuleConfig, provenance: dict[str, Any] | None = None) -> None:
        super().__init__()
        config.validate()
        self.config = config
        self.layers = nn.ModuleList(nn.Linear(i, o) for o, i in config.layer_shapes())
        self.provenance: dict[str, Any] = dict(provenance or {})

    @property
    def weights(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """φ as ``[(weight, bias), ...]`` for the functional step in `reference.py`."""
        return [(layer.weight, layer.bias) for layer in self.layers]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def content_hash(self) -> str:
        """sha256 over the canonical config JSON and φ's bytes: identifies a rule (e.g. as a parent)."""
        digest = hashlib.sha256(self.config.to_json().encode())
        for name, tensor in sorted(self.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().to(torch.float32).contiguous().cpu().numpy().tobytes())
        return digest.hexdigest()

    def extra_repr(self) -> str:
        c = self.config
        return f"features={c.num_inputs}, hidden={c.hidden_sizes}, output={c.output!r}, params={self.num_parameters()}"

    # ---- files ---------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | Path) -> None:
        """Write ``rule_config.json``, ``rule.safetensors`` and ``provenance.json`` (each atomically)."""
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name, data in self.to_files().items():
            atomic_write_bytes(directory / name, data)

    def to_files(self) -> dict[str, bytes]:
        """The rule's files as bytes, keyed by file name."""
        tensors = {k: v.detach().to(torch.float32).contiguous().cpu() for k, v in self.state_dict().items()}
        files = {
            RULE_CONFIG_NAME: (self.config.to_json() + "\n").encode(),
            RULE_WEIGHTS_NAME: save_safetensors_bytes(tensors, metadata={"format": "pt", "kind": "optbundle-rule"}),
        }
        if self.provenance:
            files[PROVENANCE_NAME] = (json.dumps(self.provenance, indent=2, sort_keys=True) + "\n").encode()
        return files

    @classmethod
    def from_directory(cls, path: Path) -> RuleNetwork:
        """Load ``rule_config.json`` + ``rule.safetensors`` (+ ``provenance.json``) from ``path`` without any
        manifest check (callers that hold a manifest verify it first; see `load_rule_directory`). The config is
        validated before φ is allocated; φ's tensors must be exactly the expected names, F32 and shapes."""
        path = Path(path)
        config_path = path / RULE_CONFIG_NAME
        config = RuleConfig.from_dict(read_json_file(config_path), source=str(config_path))
        provenance_path = path / PROVENANCE_NAME
        provenance = read_json_file(provenance_path) if provenance_path.exists() else {}
        if not isinstance(provenance, dict):
            raise CorruptFileError(f"{provenance_path}: expected a JSON object")
        weights_path = path / RULE_WEIGHTS_NAME
        header = read_safetensors_header(weights_path)
        expected = {}
        for index, (out_features, in_features) in enumerate(config.layer_shapes()):
            expected[f"layers.{index}.weight"] = (out_features, in_features)
            expected[f"layers.{index}.bias"] = (out_features,)
        got = {k: tuple(v["shape"]) for k, v in header.items()}
        if set(expected) != set(got):
            missing = sorted(set(expected) - set(got))
            extra = sorted(set(got) - set(expected))
            raise RuleConfigError(
                f"{weights_path}: tensors do not match {config_path} (missing: {short_repr(missing, 200)}, "
                f"unexpected: {short_repr(extra, 200)})"
            )
        for key, shape in expected.items():
            if got[key] != shape:
                raise RuleConfigError(
                    f"{weights_path}: tensor {key!r} has shape {short_repr(list(got[key]))}, the config asks for {list(shape)}"
                )
            if header[key]["dtype"] != "F32":
                raise RuleConfigError(f"{weights_path}: tensor {key!r} is {header[key]['dtype']}, a rule stores F32")
        tensors = load_safetensors_file(weights_path)
        for key in expected:
            if not torch.isfinite(tensors[key]).all():
                raise RuleConfigError(f"{weights_path}: tensor {key!r} holds NaN or inf")
        rule = cls(config, provenance=provenance)
        try:
            rule.load_state_dict(tensors)
        except RuntimeError as err:  # unreachable after the checks above; kept so no foreign error escapes
            raise RuleConfigError(f"{weights_path}: {short_repr(str(err), 300)}") from err
        return rule
