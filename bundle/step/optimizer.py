"""`LearnedOptimizer`: a real `torch.optim.Optimizer` that applies a `LearnedRule` to parameters.

One state layout for every back end: per parameter, fp32 (or, with ``state_dtype``, bf16) accumulators as
described in `reference.py`, an int64 ``step`` and an int64 ``skipped_steps`` counter. State is created lazily
at the first step, so FSDP-style parameter swapping after construction is fine.

Back ends, chosen per parameter group and device at every step (`select_backend`):

- ``triton``: the fused kernels of `optbundle.kernels.learned_step`, one launch per pass for all tensors of
  the group; the default for CUDA tensors when Triton is importable. On CPU tensors only in Triton's
  interpreter mode (``TRITON_INTERPRET=1`` set before the kernels are imported), which is for tests.
- ``torch``: `fast_step.learned_step_`, the chunked in-place torch path; the default everywhere else.
- ``fused``: `fused_step.fused_step_`, `torch.compile`d passes (inductor's C++ code) for format-2 rules with
  elementwise features (the shipped default); on CPU the default for such rules once a group has a tensor of
  at least `fused_step.DEFAULT_MIN_NUMEL` elements (small tensors are stacked, a call per size; tensors of
  fewer than 2 elements and tensors it cannot prove finite: the reference).
- ``reference``: `reference.learned_update` per tensor, the plain math (slow; for debugging and checks).

``OPTBUNDLE_BACKEND=torch|triton|fused|reference`` overrides the choice. A rule or tensor a back end cannot
handle falls back (triton → torch → reference) with the reason logged once. All three read and write the
same state, so a checkpoint written by one resumes on another.

``state_dtype=torch.bfloat16`` keeps momenta and second moment in bf16 (8 B per parameter for the shipped
default rule instead of 16): every back end steps one tensor at a time on fp32 copies of its accumulators, which
are then rounded back to bf16 stochastically (`round_to_state_`; round-to-nearest would freeze the β=0.999
second moment, whose per-step change is below half a bf16 ulp). Counters stay int64.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from . import fast_step, fused_step
from . import reference
from ..files import StateMismatchError
from .roles import assign_roles, check_roles, regime_lr_factor, trained_matrices
from .rule import REGIMES, RuleNetwork
from .vocabulary import MAX_GRADIENT_SQUARE_SUM  # every back end skips a tensor whose Σg² exceeds it

logger = logging.getLogger(__name__)

DEFAULT_RULE_NAME = "default"
BACKENDS = ("triton", "torch", "fused", "reference")
BACKEND_ENV = "OPTBUNDLE_BACKEND"
MAX_STEP_THREADS = 8  # threads the torch path spreads chunks over (at most torch.get_num_threads())
STATE_DTYPES = (torch.float32, torch.bfloat16)
#: Round bf16 state stochastically (False: to nearest; benchmarks/state_dtype.py compares the two).
STOCHASTIC_ROUNDING = True
_LOGGED: set[str] = set()


def _log_once(message: str, *args: Any) -> None:
    text = message % args
    if text not in _LOGGED:
        _LOGGED.add(text)
        logger.info(text)


def _triton_kernels():
    """The fused kernels module, or ``None`` (with the reason logged once) when Triton cannot be used."""
    try:
        from optbundle.kernels import learned_step  # optional and heavy: Triton
    except Exception as err:  # ImportError, or Triton failing to initialize
        _log_once("Triton kernels unavailable (%s); using the torch path", err)
        return None
    return learned_step


def select_backend(device: torch.device) -> str:
    """The back end for tensors on ``device``: ``$OPTBUNDLE_BACKEND`` if set, else ``triton`` on CUDA with
    Triton importable, else ``torch``."""
    requested = os.environ.get(BACKEND_ENV, "").strip().lower()
    if requested:
        if requested not in BACKENDS:
            raise ValueError(f"{BACKEND_ENV}={requested!r}; expected one of {', '.join(BACKENDS)}")
        if requested == "fused" and device.type != "cpu":
            _log_once("%s=fused serves CPU tensors only; using the torch path on %s", BACKEND_ENV, device.type)
            return "torch"
        if requested == "triton" and device.type != "cuda":
            kernels = _triton_kernels()
            if kernels is None or not kernels.interpreter_active():
                _log_once("%s=triton on %s tensors needs Triton's interpreter (TRITON_INTERPRET=1 before import); "
                          "using the torch path", BACKEND_ENV, device.type)
                return "torch"
        return requested
    if device.type == "cuda" and _triton_kernels() is not None:
        return "triton"
    return "torch"


class LearnedOptimizer(torch.optim.Optimizer):
    """Apply a learned rule to ``params``.

    Args:
        params: parameters, ``(name, parameter)`` pairs, or param-group dicts (as for any torch optimizer).
            A group may name its rule with ``"rule": NAME`` when several rules are given.
        rule: a `LearnedRule`, or a mapping ``{name: LearnedRule}`` for layer-wise rules.
        lr: the learning rate: ``p ← p − lr · u``. ``None`` (default) takes the rule's
            ``recommended_lr[regime]``. For format-2 rules (``step_mult`` 1) the update ``u`` has AdamW's RMS,
            so ``lr`` means what it means for AdamW; for format-1 rules it is a multiplier (1.0 = as
            meta-trained) on a step of size ``step_mult``. LR schedulers scale it.
        weight_decay: decoupled weight decay: ``p ← p · (1 − lr · step_mult · weight_decay)`` (AdamW's meaning).
        regime: "scratch" (a freshly initialized model) or "finetune" (a pretrained one): picks the rule's
            recommended lr when ``lr`` is None.
        state_dtype: dtype of the accumulators in memory: ``torch.float32`` (default) or ``torch.bfloat16``
            (half the memory; the math still runs in fp32, see the module docstring).

    Each param group holds ``"roles"``, one role per parameter (`optbundle.step.roles`), assigned from the
    parameter names (``(name, parameter)`` pairs) and shapes unless the group gives them; format-2 rules
    treat hidden matrices, vectors, embeddings, heads and adapters differently.

    A tensor whose gradient is not finite or so large that its squares overflow fp32 (Σg² over the tensor above
    `MAX_GRADIENT_SQUARE_SUM`, e.g. |g| ≳ 1e19), or whose proposed update is not finite, is left untouched for
    that step (skipped, not clamped), and its ``skipped_steps`` counter grows; no NaN/inf reaches parameters or
    accumulators, so a bundle saved after training always loads.

    Refused at construction (`ValueError`): complex and empty (zero-element) parameters. float64 parameters
    are stepped in fp32 and the fp32 change is added to them, so they are not rounded to fp32 (at lr 0 they
    do not change at all). ``step()`` checks every group's ``lr``/``weight_decay`` (finite, ≥ 0) and every
    parameter's state layout before it changes anything, and `load_state_dict` checks parameter names,
    shapes, state layouts and the rules' configs before it changes anything.
    """

    def __init__(
        self,
        params: Iterable[Any],
        rule: RuleNetwork | Mapping[str, RuleNetwork],
        lr: float | None = None,
        weight_decay: float = 0.0,
        regime: str = "scratch",
        state_dtype: torch.dtype = torch.float32,
    ) -> None:
        if isinstance(rule, RuleNetwork):
            rules = {DEFAULT_RULE_NAME: rule}
        elif isinstance(rule, Mapping) and rule and all(isinstance(r, RuleNetwork) for r in rule.values()):
            rules = dict(rule)
        else:
            raise TypeError(f"rule must be a LearnedRule or a non-empty mapping name -> LearnedRule, got {type(rule).__name__}")
        if regime not in REGIMES:
            raise ValueError(f"regime must be one of {', '.join(REGIMES)}, got {regime!r}")
        if state_dtype not in STATE_DTYPES:
            raise ValueError(f"state_dtype must be torch.float32 or torch.bfloat16, got {state_dtype!r}")
        self.regime = regime
        self.state_dtype = state_dtype
        first = rules[DEFAULT_RULE_NAME] if DEFAULT_RULE_NAME in rules else next(iter(rules.values()))
        if lr is None:
            lr = float(first.config.recommended_lr[regime])
        if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0):
            raise ValueError(f"lr must be a finite non-negative number, got {lr!r}")
        _check_lr_range(first, float(lr), regime)
        if not (isinstance(weight_decay, (int, float)) and math.isfinite(weight_decay) and weight_decay >= 0):
            raise ValueError(f"weight_decay must be a finite non-negative number, got {weight_decay!r}")
        default_rule = DEFAULT_RULE_NAME if DEFAULT_RULE_NAME in rules else next(iter(rules))
        self.rules: dict[str, RuleNetwork] = {name: r.requires_grad_(False) for name, r in rules.items()}
        self._scratch = fast_step.Scratch()  # work buffers of the torch path: not state, never saved
        self._roles: dict[torch.Tensor, str | None] = {}  # filled from the groups' "roles" at each step
        self._matrices = 0  # role-"matrix" tensors over all groups (`roles.trained_matrices`), at each step
        super().__init__(params, dict(lr=float(lr), weight_decay=float(weight_decay), rule=default_rule))
        for index, group in enumerate(self.param_groups):
            if group["rule"] not in self.rules:
                raise ValueError(f"param group asks for rule {group['rule']!r}; known rules: {sorted(self.rules)}")
            if "roles" in group:
                group["roles"] = list(group["roles"])
                check_roles(group["roles"], len(group["params"]), f"param group {index}")
            else:
                names = group.get("param_names") or [None] * len(group["params"])
                group["roles"] = assign_roles([(n, tuple(p.shape)) for n, p in zip(names, group["params"])])
            names = group.get("param_names") or [None] * len(group["params"])
            for name, param in zip(names, group["params"]):
                label = f"parameter {name!r}" if name else f"a parameter of shape {tuple(param.shape)} (group {index})"
                if param.is_complex():
                    raise ValueError(f"LearnedOptimizer: {label} is complex; learned rules step real tensors only")
                if not param.is_floating_point():
                    raise ValueError(f"LearnedOptimizer: {label} has dtype {param.dtype}; it must be floating point")
                if param.numel() == 0:
                    raise ValueError(f"LearnedOptimizer: {label} has no elements; leave it out of the optimizer")
        self._checked_states: dict[torch.Tensor, tuple] = {}  # parameter → ids of the state last checked

    # ---- the step -----------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One learned step for every parameter with a gradient. ``closure`` (optional) re-evaluates the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # every check first, so that a bad group or state raises before any tensor changes (all or nothing)
        plan = []
        self._matrices = trained_matrices([role for group in self.param_groups for role in group.get("roles") or ()])
        for index, group in enumerate(self.param_groups):
            for key in ("lr", "weight_decay"):
                value = group[key]
                if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0):
                    raise ValueError(f"param group {index}: {key} must be a finite non-negative number, got {value!r}")
            if group["rule"] not in self.rules:
                raise ValueError(f"param group {index} asks for rule {group['rule']!r}; known rules: {sorted(self.rules)}")
            rule = self.rules[group["rule"]]
            by_device: dict[torch.device, list[torch.Tensor]] = {}
            roles = group.get("roles") or [None] * len(group["params"])
            for param, role in zip(group["params"], roles):
                self._roles[param] = role
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise RuntimeError("LearnedOptimizer does not support sparse gradients")
                if param.grad.shape != param.shape:
                    raise RuntimeError(f"gradient of shape {tuple(param.grad.shape)} for a parameter of shape {tuple(param.shape)}")
                self._init_state(param, rule)
                self._check_state(param, rule)
                by_device.setdefault(param.device, []).append(param)
            plan.append((group, rule, by_device))
        for group, rule, by_device in plan:
            for device, params in by_device.items():
                self._step_params(params, rule, device, group["lr"], group["weight_decay"])
        return loss

    def _check_state(self, param: torch.Tensor, rule: RuleNetwork) -> None:
        """Raise `StateMismatchError` unless ``param``'s state has the keys, shapes and dtypes ``rule`` needs
        (checked again whenever the state dict or one of its tensors was replaced)."""
        state = self.state[param]
        key = (id(state), *(id(v) for v in state.values()))
        if self._checked_states.get(param) == key:
            return
        label = f"a parameter of shape {tuple(param.shape)}"
        check_state_layout(rule.config, param.shape, state, label)
        for name, value in state.items():
            if value.is_floating_point() and value.dtype != self.state_dtype:
                raise StateMismatchError(
                    f"optimizer state {name!r} for {label} is {value.dtype}; this optimizer keeps {self.state_dtype} "
                    "state (load state through load_state_dict, which converts it)"
                )
        self._checked_states[param] = key

    def _init_state(self, param: torch.Tensor, rule: RuleNetwork) -> None:
        state = self.state[param]
        if not state:
            state.update(reference.init_state(rule.config, param.shape, device=param.device, dtype=self.state_dtype))
            state["skipped_steps"] = torch.zeros((), dtype=torch.int64, device=param.device)

    def _step_params(self, params: list[torch.Tensor], rule: RuleNetwork, device: torch.device, lr, weight_decay) -> None:
        """One step of ``params`` (all on ``device``, states initialized); bf16 state: one tensor at a time on
        fp32 copies of its accumulators, rounded back after the step."""
        if self.state_dtype == torch.float32:
            self._step_group(params, rule, device, lr, weight_decay)
            return
        for param in params:
            state = self.state[param]
            narrow = {key: value for key, value in state.items() if value.is_floating_point()}
            state.update({key: value.to(torch.float32) for key, value in narrow.items()})
            try:
                self._step_group([param], rule, device, lr, weight_decay)
                for salt, (key, value) in enumerate(narrow.items()):
                    round_to_state_(value, state[key], seed=int(state["step"]) * len(narrow) + salt)
            finally:
                state.update(narrow)  # the same tensors as before: checked layouts stay valid

    def _step_group(self, params: list[torch.Tensor], rule: RuleNetwork, device: torch.device, lr, weight_decay) -> None:
        """One step of ``params`` (all on ``device``, fp32 states initialized) with the selected back end."""
        config = rule.config
        weights = [(w.detach().to(device, torch.float32), b.detach().to(device, torch.float32)) for w, b in rule.weights]
        lr, weight_decay = float(lr), float(weight_decay)
        backend = select_backend(device)
        if backend in ("torch", "fused") and device.type == "cpu" and fused_step.unsupported_reason(config) is None:
            params = self._step_fused(params, config, weights, lr, weight_decay, everything=backend == "fused")
            if backend == "fused" or config.output == "hybrid_residual":
                backend = "reference"  # for what it leaves: small, unproved or unsupported tensors
        elif backend == "fused":
            _log_once("rule not supported by the fused back end (%s); using the torch path",
                      fused_step.unsupported_reason(config))
            backend = "torch"
        if config.output == "hybrid_residual" and backend != "reference":
            _log_once("the %s output form runs on the reference back end", config.output)
            backend = "reference"
        if config.finetune_head_lr != "finetune" and self.regime == "finetune":  # per-role lr: the reference has it
            backend = "reference"
        if backend == "triton":
            kernels = _triton_kernels()
            reason = kernels.unsupported_reason(config) if kernels is not None else "Triton unavailable"
            if reason is not None:
                _log_once("rule not supported by the Triton kernels (%s); using the torch path", reason)
            else:
                fused, rest = [], []
                for param in params:
                    why = kernels.tensor_unsupported_reason(param, param.grad, self.state[param])
                    if why:
                        _log_once("tensor of shape %s not supported by the Triton kernels (%s); using the torch path",
                                  tuple(param.shape), why)
                    (rest if why else fused).append(param)
                kernels.learned_step_(
                    config, weights, fused, [p.grad for p in fused], [self.state[p] for p in fused], lr, weight_decay
                )
                params = rest
            backend = "torch"
        # on CPU, chunks run on threads and each op on one thread; on a GPU threads would only contend
        workers = min(torch.get_num_threads(), MAX_STEP_THREADS) if device.type == "cpu" else 1
        with fast_step.single_threaded_ops():
            self._step_torch(params, rule, config, weights, backend, lr, weight_decay, workers)

    def _step_fused(self, params, config, weights, lr, weight_decay, everything: bool) -> list[torch.Tensor]:
        """Step the tensors the fused back end takes (all it can with ``everything``; by default the same, but
        only when one of them has at least `fused_step.DEFAULT_MIN_NUMEL` elements: below that the compile
        costs more than it saves); returns the others."""
        fused, rest = [], []
        for param in params:
            why = fused_step.tensor_unsupported_reason(param, param.grad, self.state[param])
            if why and everything:
                _log_once("tensor of shape %s not supported by the fused back end (%s)", tuple(param.shape), why)
            (rest if why else fused).append(param)
        if not everything and all(p.numel() < fused_step.DEFAULT_MIN_NUMEL for p in fused):
            return params
        if fused:
            rest += fused_step.fused_step_(config, weights, fused, [self.state[p] for p in fused],
                                           [self._roles.get(p) for p in fused], lr, weight_decay, self.regime,
                                           self._matrices)
        return rest

    def _step_torch(self, params, rule, config, weights, backend, lr, weight_decay, workers) -> None:
        for param in params:
            if backend == "torch" and param.numel() > fast_step.SMALL_TENSOR:  # small ones: the reference is faster
                why = fast_step.unsupported_reason(param, param.grad, self.state[param])
                if why is None:
                    skipped = fast_step.learned_step_(
                        config, weights, param, param.grad, self.state[param], lr, weight_decay,
                        scratch=self._scratch, workers=workers,
                    )
                    self._count_skip(param, skipped)
                    continue
                _log_once("tensor of shape %s not supported by the fast torch path (%s); using the reference",
                          tuple(param.shape), why)
            self._step_param(param, rule, weights, lr, weight_decay)

    def _count_skip(self, param: torch.Tensor, reason: str | None) -> None:
        if reason is None:
            return
        self.state[param]["skipped_steps"] += 1
        if reason == "gradient" and "non-finite gradient" not in _LOGGED:
            _LOGGED.add("non-finite gradient")
            logger.warning("a non-finite gradient (tensor of shape %s): that tensor's step is skipped and counted in "
                           "its skipped_steps; later skips are only counted (BundleCallback logs them)", tuple(param.shape))
        if reason == "update":
            logger.warning("learned step proposed a non-finite update for a tensor of shape %s; skipped", tuple(param.shape))

    def _step_param(self, param: torch.Tensor, rule: RuleNetwork, weights, lr: float, weight_decay: float) -> None:
        """The reference back end: `reference.learned_update` on fp32 copies, written back when finite."""
        config = rule.config
        self._init_state(param, rule)
        state = self.state[param]
        weights = [(w.to(param.device), b.to(param.device)) for w, b in weights]
        grad = param.grad.to(torch.float32)
        if not float(grad.double().square().sum()) <= MAX_GRADIENT_SQUARE_SUM:  # NaN/inf, or g² overflows fp32
            self._count_skip(param, "gradient")
            return
        accumulators = {k: v for k, v in state.items() if k != "skipped_steps"}
        role = self._roles.get(param)
        lr = lr * regime_lr_factor(config, role, self.regime, self._matrices)
        new_param, new_state = reference.learned_update(
            config, weights, param.to(torch.float32), grad, accumulators, lr=lr, weight_decay=weight_decay,
            role=role,
        )
        if not torch.isfinite(new_param).all():
            self._count_skip(param, "update")
            return
        if any(v.is_floating_point() and not bool(torch.isfinite(v).all()) for v in new_state.values()):
            self._count_skip(param, "update")
            return
        for key, value in new_state.items():
            state[key].copy_(value)
        if param.dtype == torch.float64:  # add the fp32 change: a float64 parameter is not rounded to fp32
            param.add_(new_param.to(torch.float64) - param.to(torch.float32).to(torch.float64))
        else:
            param.copy_(new_param)

    # ---- state (de)serialization ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """torch's state dict plus ``"rule_configs"``: sha256 of each rule's config, checked on load (the state
        layout depends on it). Only tensors, strings and plain containers: ``torch.load(weights_only=True)`` works."""
        state = super().state_dict()
        state["rule_configs"] = {name: _config_digest(rule) for name, rule in self.rules.items()}
        state["state_dtype"] = str(self.state_dtype).removeprefix("torch.")
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Like torch's, but keeps accumulators in this optimizer's ``state_dtype`` (fp32 state loaded into a
        bf16-state optimizer is rounded to nearest, bf16 into fp32 is exact) and counters int64 whatever the
        parameter dtype, and checks everything before it changes anything.

        ``torch.optim.Optimizer.load_state_dict`` casts floating per-parameter state to the parameter's dtype,
        which would round fp32 accumulators of bf16/fp16 parameters (and even cast integer counters). Checked
        first (`StateMismatchError` naming what differs): the groups' sizes, rule names, parameter names (when
        both sides have them), the rules' configs (when recorded) and every saved state's keys and shapes.
        """
        if not isinstance(state_dict, dict) or not isinstance(state_dict.get("state"), dict) or not isinstance(
            state_dict.get("param_groups"), list
        ):
            raise StateMismatchError("optimizer state dict needs a 'state' mapping and a 'param_groups' list")
        saved_state = state_dict["state"]
        saved_groups = state_dict["param_groups"]
        roles = [group.get("roles") for group in self.param_groups]
        if len(saved_groups) != len(self.param_groups):
            raise StateMismatchError(
                f"optimizer state holds {len(saved_groups)} param groups, this optimizer has {len(self.param_groups)}"
            )
        saved_ids = [pid for group in saved_groups for pid in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        if len(saved_ids) != len(params):
            raise StateMismatchError(
                f"optimizer state holds {len(saved_ids)} parameters, this optimizer has {len(params)}"
            )
        recorded = state_dict.get("rule_configs")
        if isinstance(recorded, dict):
            for name, digest in recorded.items():
                if name in self.rules and digest != _config_digest(self.rules[name]):
                    raise StateMismatchError(
                        f"optimizer state was made with another config of rule {name!r}; its accumulators do not fit"
                    )
        for index, (saved, group) in enumerate(zip(saved_groups, self.param_groups)):
            if len(saved["params"]) != len(group["params"]):
                raise StateMismatchError(
                    f"param group {index}: saved with {len(saved['params'])} parameters, this one has {len(group['params'])}"
                )
            if saved.get("rule", group["rule"]) != group["rule"]:
                raise StateMismatchError(f"param group {index}: saved for rule {saved.get('rule')!r}, this one uses {group['rule']!r}")
            saved_names, names = saved.get("param_names"), group.get("param_names")
            if saved_names is not None and names is not None and list(saved_names) != list(names):
                differ = next(((a, b) for a, b in zip(saved_names, names) if a != b), None)
                raise StateMismatchError(f"param group {index}: saved for other parameters (first difference: {differ})")
            config = self.rules[group["rule"]].config
            for position, (pid, param) in enumerate(zip(saved["params"], group["params"])):
                if pid in saved_state:
                    label = f"parameter {names[position]!r}" if names else f"parameter {position} of group {index}"
                    check_state_layout(config, param.shape, saved_state[pid], label)
        super().load_state_dict(state_dict)
        for group, group_roles in zip(self.param_groups, roles):
            if "roles" not in group and group_roles is not None:  # a state dict from before roles existed
                group["roles"] = group_roles
        for pid, param in zip(saved_ids, params):
            if pid in saved_state:
                self.state[param] = {key: self._own_state(value, param) for key, value in saved_state[pid].items()}

    def _own_state(self, value: Any, param: torch.Tensor) -> Any:
        """A saved state entry as this optimizer keeps it: a copy on ``param``'s device, accumulators in
        ``state_dtype``."""
        if not isinstance(value, torch.Tensor):
            return value
        dtype = self.state_dtype if value.is_floating_point() else torch.int64
        return value.detach().to(device=param.device, dtype=dtype, copy=True)

    def parameter_names(self) -> dict[torch.Tensor, str]:
        """Map parameter → name from ``param_names`` stored by torch when named parameters were given."""
        names = {}
        for group in self.param_groups:
            for param, name in zip(group["params"], group.get("param_names", [])):
                names[param] = name
        return names

    def named_state(self, names: Mapping[torch.Tensor, str] | None = None) -> dict[str, dict[str, torch.Tensor]]:
        """Accumulators keyed by parameter name (for bundles). ``names`` defaults to `parameter_names`."""
        names = dict(names) if names is not None else self.parameter_names()
        out: dict[str, dict[str, torch.Tensor]] = {}
        for group in self.param_groups:
            for param in group["params"]:
                state = self.state.get(param)
                if not state:
                    continue
                if param not in names:
                    raise StateMismatchError(
                        "a parameter with optimizer state has no name; build the optimizer from named_parameters() "
                        "or pass names"
                    )
                out[names[param]] = {k: v.detach().clone() for k, v in state.items()}
        return out

    def load_named_state(
        self, named_state: Mapping[str, Mapping[str, torch.Tensor]], names: Mapping[torch.Tensor, str] | None = None
    ) -> list[str]:
        """Restore accumulators by parameter name; parameters without saved state start fresh.

        Returns the names that received state. A saved shape or layout that does not fit the parameter is a
        `StateMismatchError` naming it.
        """
        names = dict(names) if names is not None else self.parameter_names()
        restored = []
        for group in self.param_groups:
            config = self.rules[group["rule"]].config
            for param in group["params"]:
                name = names.get(param)
                if name is None or name not in named_state:
                    continue
                saved = named_state[name]
                expected = reference.init_state(config, param.shape, device="meta")
                expected["skipped_steps"] = torch.zeros((), dtype=torch.int64, device="meta")
                if set(saved) != set(expected):
                    raise StateMismatchError(
                        f"optimizer state for parameter {name!r} has keys {sorted(saved)}, the rule expects {sorted(expected)}"
                    )
                for key, ref in expected.items():
                    if tuple(saved[key].shape) != tuple(ref.shape):
                        raise StateMismatchError(
                            f"optimizer state {key!r} for parameter {name!r} has shape {list(saved[key].shape)}, "
                            f"expected {list(ref.shape)} (parameter shape {list(param.shape)})"
                        )
                self.state[param] = {key: self._own_state(saved[key], param) for key in expected}
                restored.append(name)
        return restored


#: an ``lr`` outside [recommended / LR_RANGE_FACTOR, recommended · LR_RANGE_FACTOR] is warned about (once)
LR_RANGE_FACTOR = 30.0


def _check_lr_range(rule: RuleNetwork, lr: float, regime: str) -> None:
    """Warn once when ``lr`` is far from the rule's ``recommended_lr[regime]`` (training would stall or blow up).

    The usual mistake: AdamW's habit ``lr=1e-3`` given to a format-1 rule, whose ``lr`` is a multiplier (1 = as
    meta-trained), or a format-1 multiplier (1.0) given to a format-2 rule, whose ``lr`` is AdamW's.
    """
    recommended = float(rule.config.recommended_lr[regime])
    if lr == 0 or recommended / LR_RANGE_FACTOR <= lr <= recommended * LR_RANGE_FACTOR:
        return
    meaning = (
        "an AdamW-equivalent learning rate" if rule.config.format_version >= 2
        else "a multiplier on the rule's own step (1.0 = as meta-trained), not AdamW's learning rate"
    )
    text = (
        f"lr={lr:g} is {'below' if lr < recommended else 'above'} the rule's recommended lr {recommended:g} "
        f"({regime}) by more than {LR_RANGE_FACTOR:g}x; training will likely "
        f"{'stall' if lr < recommended else 'diverge'}. For this rule (format {rule.config.format_version}) lr is "
        f"{meaning}; pass lr=None for the recommended value"
    )
    if text not in _LOGGED:
        _LOGGED.add(text)
        logger.warning(text)


def _config_digest(rule: RuleNetwork) -> str:
    return hashlib.sha256(rule.config.to_json().encode()).hexdigest()


def check_state_layout(config, shape, state: Mapping[str, Any], label: str) -> None:
    """`StateMismatchError` unless ``state`` has exactly the keys `reference.init_state` gives ``config`` for a
    parameter of ``shape`` (plus ``skipped_steps``), with the same shapes and kinds (int64 counters, float
    accumulators)."""
    expected = reference.init_state(config, tuple(shape), device="meta")
    expected["skipped_steps"] = torch.zeros((), dtype=torch.int64, device="meta")
    if not isinstance(state, Mapping) or set(state) != set(expected):
        keys = sorted(state) if isinstance(state, Mapping) else type(state).__name__
        raise StateMismatchError(f"optimizer state for {label} has keys {keys}, the rule expects {sorted(expected)}")
    for key, ref in expected.items():
        value = state[key]
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(ref.shape):
            got = list(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise StateMismatchError(
                f"optimizer state {key!r} for {label} is {got}, expected shape {list(ref.shape)} (parameter shape {list(shape)})"
            )
        if value.is_floating_point() != ref.is_floating_point():
            raise StateMismatchError(f"optimizer state {key!r} for {label} has dtype {value.dtype}, expected {ref.dtype}")


def constant_schedule(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    """A scheduler that keeps every group's ``lr`` multiplier as it is (Trainer's default would decay it to 0)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _constant_one)


def _constant_one(_: int) -> float:
    return 1.0


def round_to_state_(out: torch.Tensor, value: torch.Tensor, seed: int) -> None:
    """Write fp32 ``value`` into bf16 ``out``: stochastically (`STOCHASTIC_ROUNDING`; rounded up in magnitude
    with probability equal to the dropped fraction, so small EMA increments survive on average) or to nearest.

    The random bits come from a generator seeded with ``seed`` (the step count), so a resumed run rounds exactly
    as the uninterrupted one. A value already representable in bf16 (e.g. a skipped step's) is kept exactly.
    """
    if not STOCHASTIC_ROUNDING or out.dtype != torch.bfloat16:
        out.copy_(value)
        return
    generator = torch.Generator(device=value.device).manual_seed(seed)
    noise = torch.randint(0, 1 << 16, value.shape, generator=generator, device=value.device, dtype=torch.int32)
    bits = value.contiguous().view(torch.int32) + noise  # sign-magnitude: adds to |value|'s low 16 bits
    out.copy_(bits.bitwise_and_(-(1 << 16)).view(torch.float32))  # truncated to bf16's bits: exact copy
