"""The fused Triton kernels against the torch reference, in Triton's interpreter on CPU tensors (no GPU).

Each of 20 steps compares the kernels with `features.learned_update` from identical inputs and continues from
the kernels' outputs (tests/_parity.py states the tolerances: fp32 as accurate as the fp32 reference up to
1e-5 of the step; bf16/fp16 within one unit of the dtype; accumulators rtol 1e-5). Shapes ``()``, ``(7,)``,
``(33, 65)``, ``(4, 3, 5, 5)``, ``(1, 1)``, ``(257, 3)`` go through one launch per pass (two launch classes:
factored and not), for fp32, bf16 and fp16, and mixed in one group.

``test_a_wrong_constant_breaks_parity`` shows the checks can fail: a decay perturbed by 1e-4 (relative) or
the step multiplier by 1e-3 inside the kernels is caught. tests/_compile_kernels.py (run here in a
subprocess) compiles the specializations for sm_90 through ptxas, which the interpreter cannot check.
"""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
from pathlib import Path

# tests/conftest.py sets TRITON_INTERPRET=1 (no CUDA) before anything imports triton; this covers running the
# file with a conftest-less runner
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from helpers import assert_non_finite_gradient_skips_that_tensor_only  # noqa: E402
from optbundle import LearnedOptimizer, LearnedRule, RuleConfig, load_rule  # noqa: E402
from optbundle.step import reference as F  # noqa: E402
from optbundle.step import optimizer as O  # noqa: E402
from optbundle.kernels import learned_step as K  # noqa: E402

import _parity  # noqa: E402
from _parity import ULP, weights_of  # noqa: E402

if not K.interpreter_active():
    pytest.skip(
        "Triton's interpreter is off (a CUDA device is present, or triton was imported before TRITON_INTERPRET=1); "
        "on a GPU run tests/test_kernels_cuda.py",
        allow_module_level=True,
    )


def _memoize_interpreter_patching() -> None:
    """Test speed only. Triton's interpreter re-scans ``triton.language`` with ``inspect.getmembers`` on every
    call of a @jit helper (``tl.sum``, ``tl.max`` …), which dominates these tests' time. Patch from a cached
    member list instead: the same attributes get the same wrappers. If Triton's internals differ, do nothing."""
    import inspect

    try:
        from triton.language import core
        from triton.runtime import interpreter
    except ImportError:  # pragma: no cover
        return
    original = getattr(interpreter, "_patch_builtin", None)
    patch_attr = getattr(interpreter, "_patch_attr", None)
    if original is None or patch_attr is None or getattr(original, "_memoized", False):
        return
    members: dict[int, list] = {}

    def patch_builtin(pkg, builder, scope):
        if id(pkg) not in members:  # first call of a launch: nothing is patched yet
            members[id(pkg)] = [(n, m) for n, m in inspect.getmembers(pkg) if core.is_builtin(m)]
        for name, member in members[id(pkg)]:
            patch_attr(pkg, name, member, builder, scope)

    patch_builtin._memoized = True
    interpreter._patch_builtin = patch_builtin


_memoize_interpreter_patching()

SHAPES = [(), (7,), (33, 65), (4, 3, 5, 5), (1, 1), (257, 3)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def fused(config, weights, params, grads, states, lr, weight_decay):
    K.learned_step_(config, weights, params, grads, states, lr, weight_decay)


def run_parity(config, rule, shapes, dtype, steps, lr, weight_decay=0.1, seed=0):
    _parity.run_parity(fused, config, rule, shapes, dtype, steps, lr, weight_decay, seed)


@pytest.fixture(scope="module")
def default_rule():
    return load_rule("default-v2")  # the fast paths serve format-1 rules (format 2 runs on the reference)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_default_rule_all_shapes_in_one_launch_20_steps(default_rule, dtype):
    config = default_rule.config
    lr = 1.0 if config.param_scale else 20.0  # large enough that bf16 parameters visibly move
    run_parity(config, default_rule, SHAPES, dtype, steps=20, lr=lr)


RULE_VARIANTS = {
    # small_fc_lopt's 39 features: row/column and Adafactor features, two hidden layers
    "adam-init": lambda: load_rule("adam-init").config,
    # one more per-tensor reduction (Σu²), relative steps, tanh
    "normalized+param_scale+tanh": lambda: RuleConfig(
        features=["grad", "momentum", "rsqrt_second_moment", "adafactor_grad", "row_second_moment", "time"],
        hidden_sizes=[6, 5], activation="tanh", output="normalized", param_scale=True, step_mult=0.01, exp_mult=0.5,
    ),
    # Adam-anchored output with the adam feature, silu, hidden width ≥ 16 (tl.dot path), no time features
    "adam_residual+silu+wide": lambda: RuleConfig(
        features=["grad", "momentum", "adam_direction", "adafactor_momentum", "col_second_moment"],
        hidden_sizes=[20], activation="silu", output="adam_residual", magnitude_bound=2.0, step_mult=0.01,
    ),
}


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # masked-out lanes may overflow exp in the interpreter
@pytest.mark.parametrize("name", list(RULE_VARIANTS))
def test_rule_variants(name):
    torch.manual_seed(1)
    config = RULE_VARIANTS[name]()
    rule = LearnedRule(config)
    with torch.no_grad():  # make every input matter
        for layer in rule.layers:
            layer.weight.mul_(2.0)
            layer.bias.normal_(0, 0.5)
    run_parity(config, rule, [(7,), (33, 65), (4, 3, 5, 5), (1, 1)], torch.float32, steps=4, lr=3.0)


@pytest.mark.parametrize(
    "perturb",
    ["momentum decay", "step multiplier"],
)
def test_a_wrong_constant_breaks_parity(default_rule, monkeypatch, perturb):
    if perturb == "momentum decay":
        original = K._decay_constants

        def wrong(config, device):
            consts = original(config, device).clone()
            consts[0] *= 1 + 1e-4  # β₁ of the first momentum, inside the kernels only
            return consts

        monkeypatch.setattr(K, "_decay_constants", wrong)
    else:
        original = K._output_constexprs
        monkeypatch.setattr(
            K, "_output_constexprs", lambda config: {**original(config), "STEP_MULT": config.step_mult * (1 + 1e-3)}
        )
    with pytest.raises(AssertionError):
        run_parity(default_rule.config, default_rule, [(33, 65), (7,)], torch.float32, steps=4, lr=1.0)


# ---- through LearnedOptimizer ------------------------------------------------------------------------


def make_params(dtype=torch.float32, seed=0, shapes=SHAPES):
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=generator).to(dtype)) for s in shapes]


def fill_grads(params, seed):
    generator = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator).to(p.dtype)


def test_mixed_dtypes_in_one_group(default_rule):
    """fp32, bf16 and fp16 tensors (and bf16 parameters with fp32 gradients) stepped together."""
    dtypes = [torch.float32, torch.bfloat16, torch.float16, torch.float32, torch.bfloat16, torch.float16]
    lr = 1.0 if default_rule.config.param_scale else 20.0  # steps visible in bf16
    run_parity(default_rule.config, default_rule, SHAPES, dtypes, steps=3, lr=lr)



@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, inside the interpreter, meeting the NaN on purpose
def test_non_finite_gradient_skips_that_tensor_only(default_rule, monkeypatch):
    monkeypatch.setenv(O.BACKEND_ENV, "triton")
    params = make_params()
    opt = LearnedOptimizer(params, default_rule)
    assert_non_finite_gradient_skips_that_tensor_only(params, opt, fill_grads)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # exp overflows on purpose
def test_non_finite_update_is_refused_after_the_check_pass(monkeypatch):
    """exp(1e4) overflows: the finiteness proof fails, the check pass finds inf, nothing is written."""
    monkeypatch.setenv(O.BACKEND_ENV, "triton")
    config = RuleConfig(hidden_sizes=[4], exp_mult=1.0)
    rule = LearnedRule(config)
    with torch.no_grad():
        rule.layers[-1].bias.copy_(torch.tensor([1.0, 1e4]))
    p = torch.nn.Parameter(torch.randn(5, 5))
    q = torch.nn.Parameter(torch.randn(3))
    before = [p.detach().clone(), q.detach().clone()]
    opt = LearnedOptimizer([p, q], rule)
    p.grad, q.grad = torch.randn(5, 5), torch.randn(3)
    opt.step()
    for t, b in zip((p, q), before):
        assert torch.equal(t, b)
        assert int(opt.state[t]["skipped_steps"]) == 1
        assert int(opt.state[t]["step"]) == 0
        assert torch.count_nonzero(opt.state[t]["momentum"]) == 0


def test_check_pass_applies_a_finite_update_it_could_not_prove():
    """The finiteness proof fails (tests/_parity.py: `unprovable_rule`): phase 0 checks, phase 1 writes."""
    rule = _parity.unprovable_rule()
    run_parity(rule.config, rule, [(33, 65), (7,)], torch.float32, steps=3, lr=1.0)


def saved_and_loaded(opt):
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def layout(state_dict):
    return {
        pid: {k: (tuple(v.shape), v.dtype) for k, v in s.items()} for pid, s in state_dict["state"].items()
    }


@pytest.mark.parametrize("first,second", [("torch", "triton"), ("triton", "torch")])
def test_checkpoint_moves_between_backends(default_rule, monkeypatch, first, second):
    def fresh():  # (100, 90) is above SMALL_TENSOR: the torch back end's chunked path, not the reference
        params = make_params(torch.bfloat16, shapes=[*SHAPES, (100, 90)])
        return params, LearnedOptimizer(params, default_rule, lr=2.0, weight_decay=0.1)

    monkeypatch.setenv(O.BACKEND_ENV, first)
    params_a, opt_a = fresh()
    for s in range(3):
        fill_grads(params_a, s)
        opt_a.step()
    saved = saved_and_loaded(opt_a)

    monkeypatch.setenv(O.BACKEND_ENV, second)
    params_b, opt_b = fresh()
    params_b_twin, opt_b_twin = fresh()
    other_layout = None
    # the same three steps on the second backend give a state dict of identical layout
    for s in range(3):
        fill_grads(params_b_twin, s)
        opt_b_twin.step()
    other_layout = layout(opt_b_twin.state_dict())
    assert layout(saved) == other_layout

    with torch.no_grad():
        for p, a in zip(params_b, params_a):
            p.copy_(a)
    opt_b.load_state_dict(saved)
    monkeypatch.setenv(O.BACKEND_ENV, "reference")
    params_r, opt_r = fresh()
    with torch.no_grad():
        for p, a in zip(params_r, params_a):
            p.copy_(a)
    opt_r.load_state_dict(saved)
    for s in range(3, 6):
        fill_grads(params_b, s)
        fill_grads(params_r, s)
        monkeypatch.setenv(O.BACKEND_ENV, second)
        opt_b.step()
        monkeypatch.setenv(O.BACKEND_ENV, "reference")
        opt_r.step()
    for b, r in zip(params_b, params_r):
        torch.testing.assert_close(b.float(), r.float(), rtol=2 * ULP[torch.bfloat16], atol=1e-6)
        for key, value in opt_r.state[r].items():
            torch.testing.assert_close(opt_b.state[b][key], value, rtol=1e-5, atol=1e-6)
        assert int(opt_b.state[b]["step"]) == 6


# ---- dispatch -----------------------------------------------------------------------------------------


def test_backend_selection(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv(O.BACKEND_ENV, raising=False)
    assert O.select_backend(cpu) == "torch"
    for name in O.BACKENDS:
        monkeypatch.setenv(O.BACKEND_ENV, name)
        assert O.select_backend(cpu) == name  # triton: interpreter mode is active in this module
    monkeypatch.setenv(O.BACKEND_ENV, "cuda-please")
    with pytest.raises(ValueError, match="OPTBUNDLE_BACKEND"):
        O.select_backend(cpu)


def test_unsupported_rule_falls_back_with_a_logged_reason(monkeypatch, caplog):
    monkeypatch.setenv(O.BACKEND_ENV, "triton")
    config = RuleConfig(hidden_sizes=[4], activation="gelu")
    assert "gelu" in K.unsupported_reason(config)
    rule = LearnedRule(config)
    launched = []
    monkeypatch.setattr(K, "learned_step_", lambda *a, **k: launched.append(a))
    p = torch.nn.Parameter(torch.randn(4, 4))
    q = p.detach().clone()
    opt = LearnedOptimizer([p], rule)
    p.grad = torch.randn(4, 4)
    with caplog.at_level(logging.INFO, logger="optbundle.step.optimizer"):
        opt.step()
    assert not launched
    assert any("gelu" in r.getMessage() for r in caplog.records)
    expected, _ = F.learned_update(config, weights_of(rule), q, p.grad, F.init_state(config, (4, 4)))
    torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-6)


def test_kernels_compile_for_hopper():
    """Every specialization of the default and adam-init rules compiles for sm_90 (ptxas), without a GPU."""
    script = Path(__file__).with_name("_compile_kernels.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, str(script), "--bf16-only", "default-v2", "adam-init"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert " 0 failed" in result.stdout
