"""The fast torch path (`optbundle.step.fast_step`, LearnedOptimizer's CPU default) against the torch reference.

Tolerances as stated in tests/_parity.py. Small ``chunk_elements`` force every chunking case on small
tensors: chunks of whole slices, chunks of rows inside a slice, several chunks per unfactored tensor.
"""

from __future__ import annotations

import pytest
import torch

import _parity
from _parity import fresh_state, weights_of
from optbundle import LearnedOptimizer, LearnedRule, RuleConfig, load_rule
from optbundle.step import fast_step
from optbundle.step import reference as F

SHAPES = [(), (7,), (33, 65), (4, 3, 5, 5), (1, 1), (257, 3), (3, 40, 24)]


def per_tensor(chunk_elements, workers=1):
    def step(config, weights, params, grads, states, lr, weight_decay):
        scratch = fast_step.Scratch()
        with fast_step.single_threaded_ops():
            for p, g, s in zip(params, grads, states):
                if fast_step.learned_step_(config, weights, p, g, s, lr, weight_decay, scratch, chunk_elements, workers):
                    s["skipped_steps"] += 1

    return step


@pytest.fixture(scope="module")
def default_rule():
    return load_rule("default-v2")  # the fast paths serve format-1 rules (format 2 runs on the reference)


@pytest.mark.parametrize("chunk_elements", [64, 1 << 15], ids=["many-chunks", "one-chunk"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_default_rule_20_steps(default_rule, dtype, chunk_elements):
    config = default_rule.config
    lr = 1.0 if config.param_scale else 20.0
    _parity.run_parity(per_tensor(chunk_elements), config, default_rule, SHAPES, dtype, steps=20, lr=lr)


RULES = {
    "adam-init": lambda: load_rule("adam-init").config,
    "normalized+param_scale+tanh": lambda: RuleConfig(
        features=["grad", "momentum", "rsqrt_second_moment", "adafactor_grad", "row_second_moment", "time"],
        hidden_sizes=[6, 5], activation="tanh", output="normalized", param_scale=True, step_mult=0.01, exp_mult=0.5,
    ),
    "adam_residual+gelu": lambda: RuleConfig(
        features=["grad", "momentum", "adam_direction", "adafactor_momentum", "col_second_moment"],
        hidden_sizes=[7], activation="gelu", output="adam_residual", magnitude_bound=2.0, step_mult=0.01,
    ),
    "no elementwise features": lambda: RuleConfig(
        features=["row_second_moment", "rsqrt_col_second_moment", "time"], hidden_sizes=[3], activation="silu"
    ),
}


def test_chunks_on_several_threads(default_rule):
    """Chunks of one tensor (and of one slice) processed concurrently: per-worker column accumulators."""
    _parity.run_parity(per_tensor(64, workers=3), default_rule.config, default_rule, SHAPES, torch.float32, 5, 1.0)
    rule = load_rule("adam-init")
    _parity.run_parity(per_tensor(64, workers=3), rule.config, rule, SHAPES, torch.float32, 5, 20.0)


def test_optimizer_spreads_chunks_over_threads(default_rule):
    """With several intra-op threads configured, LearnedOptimizer runs chunks on a pool (grad mode off in it).
    Chunks go to threads in a fixed order, so threaded steps are deterministic (resume stays bit-identical);
    they differ from one thread only in the order of column sums."""
    previous = torch.get_num_threads()
    try:
        results = []
        for threads in (3, 3, 1):
            torch.set_num_threads(threads)
            p = torch.nn.Parameter(torch.randn(700, 600, generator=torch.Generator().manual_seed(0)))  # 3 chunks
            opt = LearnedOptimizer([p], default_rule)
            for step in range(2):
                p.grad = torch.randn(700, 600, generator=torch.Generator().manual_seed(step + 1))
                opt.step()
            assert (opt._scratch._pool is not None) == (threads > 1)
            results.append(p.detach().clone())
        assert torch.equal(results[0], results[1])
        torch.testing.assert_close(results[0], results[2], rtol=1e-5, atol=1e-6)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.parametrize("name", list(RULES))
def test_rule_variants(name):
    torch.manual_seed(1)
    config = RULES[name]()
    rule = LearnedRule(config)
    with torch.no_grad():
        for layer in rule.layers:
            layer.weight.mul_(2.0)
            layer.bias.normal_(0, 0.5)
    _parity.run_parity(per_tensor(100), config, rule, SHAPES, torch.float32, steps=5, lr=3.0)


def test_staged_path_when_finiteness_cannot_be_proved(monkeypatch):
    """The step is staged, checked and only then committed; the result is still the reference's."""
    rule = _parity.unprovable_rule()
    proofs = []
    original = fast_step._StepContext.update_is_surely_finite
    monkeypatch.setattr(
        fast_step._StepContext, "update_is_surely_finite", lambda self, *a: proofs.append(original(self, *a)) or proofs[-1]
    )
    _parity.run_parity(per_tensor(64), rule.config, rule, [(33, 65), (7,)], torch.float32, steps=3, lr=1.0)
    assert proofs and not any(proofs)


def test_default_rule_takes_the_direct_path(default_rule, monkeypatch):
    proofs = []
    original = fast_step._StepContext.update_is_surely_finite
    monkeypatch.setattr(
        fast_step._StepContext, "update_is_surely_finite", lambda self, *a: proofs.append(original(self, *a)) or proofs[-1]
    )
    p = torch.nn.Parameter(torch.randn(300, 200))
    opt = LearnedOptimizer([p], default_rule)
    for _ in range(3):
        p.grad = torch.randn(300, 200)
        opt.step()
    assert proofs == [True, True, True]


@pytest.mark.parametrize("chunk_elements", [64, 1 << 15])
def test_non_finite_gradient_or_update_changes_nothing(chunk_elements):
    config = RuleConfig(hidden_sizes=[4], exp_mult=1.0)
    rule = LearnedRule(config)
    weights = weights_of(rule)
    for make_bad in ("gradient", "update"):
        p = torch.randn(33, 65)
        state = fresh_state(config, p.shape)
        g = torch.randn(33, 65)
        if make_bad == "gradient":
            g[20, 3] = float("nan")
        else:
            with torch.no_grad():
                rule.layers[-1].bias.copy_(torch.tensor([1.0, 1e4]))  # exp(1e4) = inf
            weights = weights_of(rule)
        before_p, before_state = p.clone(), {k: v.clone() for k, v in state.items()}
        reason = fast_step.learned_step_(config, weights, p, g, state, 1.0, 0.1, chunk_elements=chunk_elements)
        assert reason == make_bad
        assert torch.equal(p, before_p)
        for key, value in before_state.items():
            assert torch.equal(state[key], value), key


def test_a_wrong_constant_breaks_parity(default_rule, monkeypatch):
    original = fast_step.decay_tensors

    def wrong(config, device):
        consts = dict(original(config, device))
        consts["beta_m"] = consts["beta_m"] * (1 + 1e-4)
        return consts

    monkeypatch.setattr(fast_step, "decay_tensors", wrong)
    with pytest.raises(AssertionError):
        _parity.run_parity(per_tensor(64), default_rule.config, default_rule, [(33, 65)], torch.float32, steps=4, lr=1.0)


def test_unsupported_tensor_falls_back_to_the_reference(default_rule):
    """A non-contiguous parameter (above SMALL_TENSOR, so it would take this path) gets the reference's step."""
    p = torch.nn.Parameter(torch.randn(200, 100).t())  # non-contiguous view, 20000 > SMALL_TENSOR elements
    assert p.numel() > fast_step.SMALL_TENSOR
    assert fast_step.unsupported_reason(p, p, F.init_state(default_rule.config, p.shape)) is not None
    opt = LearnedOptimizer([p], default_rule)
    p.grad = torch.randn(100, 200)
    q = p.detach().clone()
    opt.step()
    expected, _ = F.learned_update(default_rule.config, weights_of(default_rule), q, p.grad, F.init_state(default_rule.config, (100, 200)))
    torch.testing.assert_close(p.detach(), expected, rtol=1e-6, atol=1e-7)


def test_small_tensors_take_the_reference_exactly(default_rule, monkeypatch):
    """At most SMALL_TENSOR elements: LearnedOptimizer's torch back end is the reference, bit for bit."""
    from optbundle.step import optimizer as O

    results = []
    for backend in ("torch", "reference"):
        monkeypatch.setenv(O.BACKEND_ENV, backend)
        params = [torch.nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(0))) for s in [(64,), (32, 64)]]
        opt = LearnedOptimizer(params, default_rule, lr=3.0)
        for step in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(step))
            opt.step()
        results.append([p.detach().clone() for p in params])
    assert all(torch.equal(a, b) for a, b in zip(*results))
