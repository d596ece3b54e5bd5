"""The fused CPU back end (`fused_step`) against `reference.learned_update`, through `LearnedOptimizer`.

Most tests run the fused kernels' math eagerly (``fused_step.COMPILE = False``: the same Python, no compile);
one smoke test compiles them (inductor's C++), once per process. Tolerances as in tests/_parity.py.
"""

from __future__ import annotations

import dataclasses

import logging

import pytest
import torch
from helpers import assert_non_finite_gradient_skips_that_tensor_only, one_thread  # noqa: F401

from optbundle import LearnedOptimizer, load_rule
from optbundle.step import fused_step
from optbundle.step import optimizer as O
from optbundle.step import reference as F
from optbundle.step.roles import regime_lr_factor, trained_matrices

SHAPES = [  # (shape, role): 0-d, 1-element, odd sizes, factored matrices, 1×n, conv, every role
    ((), "vector"), ((1,), "vector"), ((7,), "vector"), ((33, 17), "matrix"), ((33, 17), "matrix"),
    ((1, 9), "matrix"), ((1, 1), "matrix"), ((8, 3, 3, 3), "matrix"), ((20, 8), "embedding"), ((10, 7), "head"),
    ((5, 4), "adapter"), ((3, 130), "matrix"),
]


@pytest.fixture
def eager(monkeypatch):
    monkeypatch.setattr(fused_step, "COMPILE", False)
    monkeypatch.setenv(O.BACKEND_ENV, "fused")


@pytest.fixture
def spy(monkeypatch):
    """Records what `fused_step.fused_step_` was given and handed back."""
    calls = []
    original = fused_step.fused_step_

    def recording(config, weights, params, *args, **kwargs):
        rest = original(config, weights, params, *args, **kwargs)
        calls.append(([tuple(p.shape) for p in params], [tuple(p.shape) for p in rest]))
        return rest

    monkeypatch.setattr(fused_step, "fused_step_", recording)
    return calls


def _gradient(shape, step, index, generator):
    scale = 10.0 ** (((step * 7 + index * 3) % 5) - 3)  # 1e-3 … 10, varying by tensor and step
    return torch.randn(shape, generator=generator) * scale


def _reference(config, weights, param, grad, state, lr, weight_decay, role, dtype):
    accumulators = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state.items() if k != "skipped_steps"}
    new, _ = F.learned_update(
        config, [(w.to(dtype), b.to(dtype)) for w, b in weights], param.to(dtype), grad.to(dtype), accumulators,
        lr=lr, weight_decay=weight_decay, role=role,
    )
    return new


def run_parity(shapes, regime, steps, lr=None, weight_decay=0.1, seed=0, rule=None):
    """Step with the fused back end; after every step compare each tensor with the reference from identical
    inputs (fp32 and fp64), continue from the fused results. Returns the optimizer."""
    rule = rule or load_rule("default")
    config = rule.config
    weights = [(w.detach().float(), b.detach().float()) for w, b in rule.weights]
    generator = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=generator)) for s, _ in shapes]
    roles = [role for _, role in shapes]
    opt = LearnedOptimizer([{"params": params, "roles": roles}], rule, lr=lr, weight_decay=weight_decay, regime=regime)
    lr = opt.param_groups[0]["lr"]
    moved = [torch.zeros(p.shape, dtype=torch.bool) for p in params]
    for step in range(steps):
        for i, p in enumerate(params):
            p.grad = _gradient(p.shape, step, i, generator)
        before = [p.detach().clone() for p in params]
        states = [{k: v.clone() for k, v in opt.state[p].items()} if opt.state[p] else None for p in params]
        opt.step()
        for p, old, state, role in zip(params, before, states, roles):
            if state is None:
                state = F.init_state(config, p.shape)
            tensor_lr = lr * regime_lr_factor(config, role, regime, trained_matrices(roles))
            ref32 = _reference(config, weights, old, p.grad, state, tensor_lr, weight_decay, role, torch.float32)
            ref64 = _reference(config, weights, old, p.grad, state, tensor_lr, weight_decay, role, torch.float64)
            err = (p.detach().double() - ref64).abs().max().item()
            err32 = (ref32.double() - ref64).abs().max().item()
            step64 = (ref64 - old.double()).abs().max().item()
            ulp = torch.finfo(torch.float32).eps * old.abs().max().item()  # one fp32 rounding of the largest entry
            assert err <= 2 * err32 + 1e-5 * step64 + ulp, f"{tuple(p.shape)} {role} step {step}: {err:.3e} vs {err32:.3e}"
            assert int(opt.state[p]["step"]) == step + 1
            assert int(opt.state[p]["skipped_steps"]) == 0
        moved = [m | (p.detach() != old) for m, p, old in zip(moved, params, before)]
    for (shape, role), m in zip(shapes, moved):
        assert m.float().mean() > 0.5, f"{shape} {role}: most coordinates never moved"
    return opt, params


@pytest.mark.parametrize("regime", ["scratch", "finetune"])
def test_fused_matches_the_reference_over_20_steps(eager, spy, regime):
    run_parity(SHAPES, regime, steps=20)
    assert all(handed_back == [] for _, handed_back in spy)  # every tensor it was given went through the fused math
    assert len(spy[0][0]) == len(SHAPES) - 3  # all but the 0-d and the two 1-element tensors (the reference)


def test_fused_applies_the_finetune_depth_scaling(eager, spy):
    """A rule with ``finetune_depth_matrices`` below the 6 matrices of `SHAPES`: the fused back end steps the
    pretrained tensors at the reference's smaller lr (run_parity compares with the depth factor applied)."""
    rule = load_rule("default")
    rule.config = dataclasses.replace(rule.config, finetune_depth_matrices=2, finetune_depth_exponent=1.0)
    assert trained_matrices([role for _, role in SHAPES]) == 6
    run_parity(SHAPES, "finetune", steps=5, rule=rule)
    assert spy and all(handed_back == [] for _, handed_back in spy)


def test_state_moves_between_fused_and_reference(eager, monkeypatch):
    """A checkpoint written by one back end resumes on the other: 3 fused + 3 reference steps (and the reverse)
    equal 6 reference steps to fp32 rounding."""
    rule = load_rule("default")
    shapes = [(33, 17), (7,), (10, 7)]

    def train(backends):
        generator = torch.Generator().manual_seed(1)
        params = [torch.nn.Parameter(torch.randn(s, generator=generator)) for s in shapes]
        opt = LearnedOptimizer(params, rule, weight_decay=0.1)
        for step, backend in enumerate(backends):
            monkeypatch.setenv(O.BACKEND_ENV, backend)
            if step == 3:  # a fresh optimizer from the checkpoint
                saved = opt.state_dict()
                opt = LearnedOptimizer(params, rule, weight_decay=0.1)
                opt.load_state_dict(saved)
            for i, p in enumerate(params):
                p.grad = _gradient(p.shape, step, i, generator)
            opt.step()
        return params, opt

    reference, ref_opt = train(["reference"] * 6)
    for order in (["fused"] * 3 + ["reference"] * 3, ["reference"] * 3 + ["fused"] * 3):
        params, opt = train(order)
        for p, r in zip(params, reference):
            torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-6)
            for key, value in ref_opt.state[r].items():
                torch.testing.assert_close(opt.state[p][key], value, rtol=1e-5, atol=1e-7)


def test_non_finite_gradient_skips_that_tensor_only(eager, spy):
    rule = load_rule("default")
    shapes = [(33, 17), (40,), (12, 16), (16, 12)]
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    opt = LearnedOptimizer([{"params": params, "roles": ["matrix", "vector", "matrix", "head"]}], rule)
    assert_non_finite_gradient_skips_that_tensor_only(params, opt)
    assert spy[1][1] == [(33, 17), (12, 16)]  # the fused path handed the two bad tensors to the reference


#: Stacked groups: three same-shaped matrices (one Newton–Schulz group) and three same-sized vectors, plus loners.
GROUPED = [((12, 16), "matrix")] * 3 + [((9,), "vector")] * 3 + [((16, 12), "matrix"), ((9,), "head")]


def test_stacked_groups_match_the_reference(eager, spy, monkeypatch):
    """Same-shaped tensors are stepped by one call on stacked rows; every row still matches the reference."""
    calls = []
    original = fused_step._step_stacked

    def recording(spec, members, *args):
        calls.append((spec.orthogonal, len(members)))
        return original(spec, members, *args)

    monkeypatch.setattr(fused_step, "_step_stacked", recording)
    run_parity(GROUPED, "scratch", steps=6)
    # per step: the three matrices, then the three vectors with the (9,) head (its own lr multiplier, one row)
    assert calls[:2] == [(True, 3), (False, 4)]
    assert all(rest == [] for _, rest in spy)


def test_non_finite_gradient_in_a_stacked_group_skips_that_tensor_only(eager, spy, monkeypatch):
    """NaN in one stacked matrix's gradient and inf in one stacked vector's: those two are handed back untouched
    (the reference skips and counts them); the other rows of their groups step exactly as the reference back end."""
    rule = load_rule("default")
    generator = torch.Generator().manual_seed(5)
    start = [torch.randn(s, generator=generator) for s, _ in GROUPED]
    roles = [role for _, role in GROUPED]
    grads = [[torch.randn(s, generator=generator) for s, _ in GROUPED] for _ in range(2)]
    grads[1][1][3, 4] = float("nan")
    grads[1][4].fill_(float("inf"))
    results = {}
    for backend in ("fused", "reference"):
        monkeypatch.setenv(O.BACKEND_ENV, backend)
        params = [torch.nn.Parameter(p.clone()) for p in start]
        opt = LearnedOptimizer([{"params": params, "roles": roles}], rule, weight_decay=0.1)
        snapshots = []
        for step_grads in grads:
            snapshots.append(([p.detach().clone() for p in params], [{k: v.clone() for k, v in opt.state[p].items()}
                                                                     for p in params]))
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            opt.step()
        results[backend] = (params, opt, snapshots[-1])
    assert spy[1][1] == [(12, 16), (9,)]  # handed back: the two bad tensors only
    params, opt, (before, states) = results["fused"]
    ref_params, ref_opt, _ = results["reference"]
    for i, (p, r) in enumerate(zip(params, ref_params)):
        if i in (1, 4):
            assert torch.equal(p, before[i])
            assert int(opt.state[p]["skipped_steps"]) == 1
            assert all(torch.equal(opt.state[p][k], v) for k, v in states[i].items() if k != "skipped_steps")
        else:
            assert not torch.equal(p, before[i])
            assert int(opt.state[p]["step"]) == 2 and int(opt.state[p]["skipped_steps"]) == 0
        torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-6)
        for key, value in ref_opt.state[r].items():
            torch.testing.assert_close(opt.state[p][key], value, rtol=1e-5, atol=1e-7)


def test_stacked_groups_resume_bit_identically(eager):
    """3 steps, state_dict into a fresh optimizer, 3 more steps: bit-identical to 6 uninterrupted steps."""
    rule = load_rule("default")
    roles = [role for _, role in GROUPED]

    def train(resume: bool):
        generator = torch.Generator().manual_seed(2)
        params = [torch.nn.Parameter(torch.randn(s, generator=generator)) for s, _ in GROUPED]
        opt = LearnedOptimizer([{"params": params, "roles": roles}], rule, weight_decay=0.1)
        for step in range(6):
            if resume and step == 3:
                saved = opt.state_dict()
                opt = LearnedOptimizer([{"params": params, "roles": roles}], rule, weight_decay=0.1)
                opt.load_state_dict(saved)
            for i, p in enumerate(params):
                p.grad = _gradient(p.shape, step, i, generator)
            opt.step()
        return params, opt

    (straight, opt_a), (resumed, opt_b) = train(False), train(True)
    for p, q in zip(straight, resumed):
        assert torch.equal(p, q)
        assert all(torch.equal(opt_a.state[p][k], opt_b.state[q][k]) for k in opt_a.state[p])


def test_unprovable_update_goes_to_the_reference(eager, spy):
    """A parameter near the fp32 limit: the step cannot be proved finite, so the reference decides (and skips)."""
    rule = load_rule("default")
    p = torch.nn.Parameter(torch.full((6, 5), 3e38))
    q = torch.nn.Parameter(torch.randn(6, 5))
    opt = LearnedOptimizer([{"params": [p, q], "roles": ["head", "head"]}], rule, lr=0.03, weight_decay=1.0)
    p.grad, q.grad = torch.ones(6, 5), torch.ones(6, 5)
    opt.step()
    assert spy[0][1] == [(6, 5)]
    assert int(opt.state[q]["step"]) == 1 and int(opt.state[q]["skipped_steps"]) == 0
    assert torch.isfinite(p).all()


def test_compile_failure_falls_back_to_the_reference_with_one_log(monkeypatch, caplog):
    monkeypatch.setenv(O.BACKEND_ENV, "fused")
    monkeypatch.setattr(fused_step, "COMPILE", True)
    monkeypatch.setattr(fused_step, "_KERNELS", {})
    monkeypatch.setattr(fused_step, "_BY_ID", {})
    monkeypatch.setattr(fused_step, "_FAILED", [])

    def broken(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch, "compile", broken)
    rule = load_rule("default")
    generator = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=generator)) for s in [(12, 16), (30,)]]
    copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
    grads = [[torch.randn(p.shape, generator=generator) for p in params] for _ in range(2)]
    opt = LearnedOptimizer(params, rule)
    with caplog.at_level(logging.WARNING, logger="optbundle.step.fused_step"):
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            opt.step()
    assert sum("could not compile" in r.getMessage() for r in caplog.records) == 1
    monkeypatch.setenv(O.BACKEND_ENV, "reference")
    ref = LearnedOptimizer(copies, rule)
    for step_grads in grads:
        for c, g in zip(copies, step_grads):
            c.grad = g.clone()
        ref.step()
    for p, c in zip(params, copies):
        assert torch.equal(p, c)  # the reference stepped them


def test_default_backend_on_cpu_uses_fused_once_a_tensor_is_large(monkeypatch, spy):
    """By default the fused path takes every tensor it can once one is large enough to pay for a compile, and
    none otherwise (a small model steps on the reference without compiling)."""
    monkeypatch.delenv(O.BACKEND_ENV, raising=False)
    monkeypatch.setattr(fused_step, "COMPILE", False)
    rule = load_rule("default")
    big, small, scalar = (torch.nn.Parameter(torch.randn(s)) for s in [(128, 160), (64,), ()])
    opt = LearnedOptimizer([big, small, scalar], rule)
    big.grad, small.grad, scalar.grad = torch.randn(128, 160), torch.randn(64), torch.randn(())
    opt.step()
    assert spy == [([(128, 160), (64,)], [])]  # the 0-d tensor: the reference
    assert int(opt.state[scalar]["step"]) == 1
    tiny = [torch.nn.Parameter(torch.randn(64, 64)), torch.nn.Parameter(torch.randn(64))]
    opt = LearnedOptimizer(tiny, rule)
    for p in tiny:
        p.grad = torch.randn(p.shape)
    opt.step()
    assert len(spy) == 1 and all(int(opt.state[p]["step"]) == 1 for p in tiny)
    assert O.select_backend(torch.device("cpu")) == "torch"


@pytest.mark.slow
def test_compiled_kernels_match_the_reference(monkeypatch, spy):
    """One compiled smoke run (inductor C++; each kernel compiles once, for every size): both step forms,
    same-shaped matrices batched, 4 steps."""
    monkeypatch.setenv(O.BACKEND_ENV, "fused")
    monkeypatch.setattr(fused_step, "COMPILE", True)
    if fused_step.unsupported_reason(load_rule("default").config) is not None:
        pytest.skip(fused_step.unsupported_reason(load_rule("default").config))
    run_parity([((24, 40), "matrix"), ((24, 40), "matrix"), ((40,), "vector"), ((10, 24), "head")], "finetune", steps=4)
    assert all(rest == [] for _, rest in spy)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_low_and_double_precision_parameters_match_the_reference_back_end(monkeypatch, dtype):
    """bf16/fp16 parameters: fp32 math, rounded once (within one unit of the dtype of the reference back end's
    result, equal for ≥ 98% of elements); float64: the fp32 change is added, so lr 0 leaves them exactly as they were."""
    monkeypatch.setattr(fused_step, "COMPILE", False)
    rule = load_rule("default")
    generator = torch.Generator().manual_seed(3)
    shapes = [(24, 40), (40,)]
    start = [torch.randn(s, generator=generator).to(dtype) for s in shapes]
    grads = [[torch.randn(s, generator=generator).to(dtype) for s in shapes] for _ in range(3)]
    results = {}
    for backend in ("fused", "reference"):
        monkeypatch.setenv(O.BACKEND_ENV, backend)
        params = [torch.nn.Parameter(p.clone()) for p in start]
        opt = LearnedOptimizer(params, rule)
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g.clone()
            opt.step()
        results[backend] = params
    unit = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10, torch.float64: 1e-6}[dtype]
    for got, expected in zip(results["fused"], results["reference"]):
        assert got.dtype == dtype
        if dtype != torch.float64:  # float64 results differ from the reference's at fp32 rounding, not in rounding
            assert (got != expected).float().mean().item() <= 0.02
        assert ((got.double() - expected.double()).abs() <= expected.double().abs() * unit + 1e-6).all()
    if dtype == torch.float64:
        monkeypatch.setenv(O.BACKEND_ENV, "fused")
        params = [torch.nn.Parameter(p.clone()) for p in start]
        opt = LearnedOptimizer(params, rule, lr=0.0)
        for p, g in zip(params, grads[0]):
            p.grad = g.clone()
        opt.step()
        assert all(torch.equal(p, s) for p, s in zip(params, start))
