"""LearnedOptimizer behaviour: dtypes, ranks, lr/weight decay, non-finite gradients, state dicts, resume."""

import io

import pytest
import torch

from helpers import assert_non_finite_gradient_skips_that_tensor_only
from optbundle import LearnedOptimizer, LearnedRule, RuleConfig, load_rule
from optbundle.step import reference as F


def make_params(dtype=torch.float32):
    torch.manual_seed(0)
    shapes = [(), (7,), (33, 65), (4, 3, 5, 5), (1, 1), (257, 3)]
    return [torch.nn.Parameter(torch.randn(s).to(dtype)) for s in shapes]


def fill_grads(params, seed):
    gen = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)


@pytest.fixture(scope="module")
def rule():
    return load_rule("adam-init")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_any_rank_and_dtype_keeps_fp32_state(rule, dtype):
    params = make_params(dtype)
    before = [p.detach().clone() for p in params]
    opt = LearnedOptimizer(params, rule, lr=20.0)  # steps large enough to survive bf16 rounding
    for step in range(3):
        fill_grads(params, step)
        opt.step()
    for p, b in zip(params, before):
        assert p.dtype == dtype
        assert not torch.equal(p, b), f"shape {tuple(p.shape)} did not move"
        state = opt.state[p]
        assert int(state["step"]) == 3
        assert int(state["skipped_steps"]) == 0
        for key, value in state.items():
            if key not in ("step", "skipped_steps"):
                assert value.dtype == torch.float32, key
        if p.dim() >= 2:
            assert state["row_second_moment"].shape == (3, *p.shape[:-1])
            assert state["col_second_moment"].shape == (3, *p.shape[:-2], p.shape[-1])
            assert "full_second_moment" not in state
        else:
            assert state["full_second_moment"].shape == (3, *p.shape)


def test_lr_is_a_multiplier_and_weight_decay_is_decoupled(rule):
    def run(lr, wd):
        params = make_params()
        opt = LearnedOptimizer(params, rule, lr=lr, weight_decay=wd)
        fill_grads(params, 0)
        start = [p.detach().clone() for p in params]
        opt.step()
        return [p.detach() - s for p, s in zip(params, start)], start

    base, start = run(1.0, 0.0)
    doubled, _ = run(2.0, 0.0)
    zero, _ = run(0.0, 0.5)
    decayed, _ = run(1.0, 0.5)
    for b, d, z, w, s in zip(base, doubled, zero, decayed, start):
        torch.testing.assert_close(d, 2 * b, rtol=1e-5, atol=5e-7)  # p − lr·u rounds at p's ulp
        assert torch.count_nonzero(z) == 0
        torch.testing.assert_close(w, b - rule.config.step_mult * 0.5 * s, rtol=1e-5, atol=5e-7)


def test_standard_scheduler_scales_the_step(rule):
    params = make_params()
    opt = LearnedOptimizer(params, rule)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.0 if s >= 1 else 1.0)
    fill_grads(params, 0)
    opt.step()
    sched.step()
    frozen = [p.detach().clone() for p in params]
    fill_grads(params, 1)
    opt.step()
    for p, f in zip(params, frozen):
        assert torch.equal(p, f)


def test_non_finite_gradient_skips_that_tensor_only(rule):
    params = make_params()
    opt = LearnedOptimizer(params, rule)
    assert_non_finite_gradient_skips_that_tensor_only(params, opt, fill_grads)


def test_non_finite_update_from_rule_is_refused():
    config = RuleConfig(hidden_sizes=[4], exp_mult=1.0)
    rule = LearnedRule(config)
    with torch.no_grad():
        rule.layers[-1].bias.copy_(torch.tensor([1.0, 1e4]))  # exp(1e4) overflows to inf
    p = torch.nn.Parameter(torch.randn(5, 5))
    before = p.detach().clone()
    opt = LearnedOptimizer([p], rule)
    p.grad = torch.randn(5, 5)
    opt.step()
    assert torch.equal(p, before)
    assert int(opt.state[p]["skipped_steps"]) == 1
    assert torch.count_nonzero(opt.state[p]["momentum"]) == 0


def test_closure_and_no_grad_params(rule):
    p = torch.nn.Parameter(torch.randn(3, 3))
    q = torch.nn.Parameter(torch.randn(3))
    opt = LearnedOptimizer([p, q], rule)

    def closure():
        opt.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss.item() > 0
    assert q not in opt.state or not opt.state[q]


def saved_and_loaded(opt):
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resume_is_bit_identical(rule, dtype):
    def fresh():
        params = make_params(dtype)
        return params, LearnedOptimizer(params, rule, lr=0.5, weight_decay=0.1)

    params_a, opt_a = fresh()
    for s in range(8):
        fill_grads(params_a, s)
        opt_a.step()

    params_b, opt_b = fresh()
    for s in range(4):
        fill_grads(params_b, s)
        opt_b.step()
    saved = saved_and_loaded(opt_b)
    saved_params = [p.detach().clone() for p in params_b]

    params_c, opt_c = fresh()
    with torch.no_grad():
        for p, s in zip(params_c, saved_params):
            p.copy_(s)
    opt_c.load_state_dict(saved)
    for p in params_c:
        for key, value in opt_c.state[p].items():
            expected = torch.int64 if key in ("step", "skipped_steps") else torch.float32
            assert value.dtype == expected, (key, value.dtype)
    for s in range(4, 8):
        fill_grads(params_c, s)
        opt_c.step()
    for a, c in zip(params_a, params_c):
        assert torch.equal(a, c)
    for a, c in zip(params_a, params_c):
        for key in opt_a.state[a]:
            assert torch.equal(opt_a.state[a][key], opt_c.state[c][key]), key


def test_state_dict_holds_only_plain_types(rule):
    params = make_params()
    opt = LearnedOptimizer(params, rule)
    fill_grads(params, 0)
    opt.step()
    sd = opt.state_dict()

    def check(obj):
        if isinstance(obj, dict):
            for k, v in obj.items():
                assert isinstance(k, (str, int))
                check(v)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                check(v)
        else:
            assert obj is None or isinstance(obj, (torch.Tensor, int, float, str, bool)), type(obj)

    check(sd)
    saved_and_loaded(opt)  # weights_only=True accepts it


def test_named_state_round_trip_and_mismatch(rule):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    opt = LearnedOptimizer(list(model.named_parameters()), rule)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    named = opt.named_state()
    assert set(named) == {"0.weight", "0.bias", "1.weight", "1.bias"}
    other = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    opt2 = LearnedOptimizer(list(other.named_parameters()), rule)
    partial = {k: v for k, v in named.items() if k != "1.bias"}
    restored = opt2.load_named_state(partial)
    assert sorted(restored) == ["0.bias", "0.weight", "1.weight"]
    assert torch.equal(opt2.state[other[0].weight]["momentum"], named["0.weight"]["momentum"])
    assert not opt2.state.get(other[1].bias)
    wrong = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Linear(5, 2))
    opt3 = LearnedOptimizer(list(wrong.named_parameters()), rule)
    with pytest.raises(Exception, match="0.weight"):
        opt3.load_named_state(named)


def test_multiple_rules_by_group():
    fast = LearnedRule(RuleConfig(hidden_sizes=[4]))
    slow = LearnedRule(RuleConfig(hidden_sizes=[4], step_mult=0.0))
    a = torch.nn.Parameter(torch.randn(4, 4))
    b = torch.nn.Parameter(torch.randn(4, 4))
    opt = LearnedOptimizer([{"params": [a]}, {"params": [b], "rule": "frozen"}], {"default": fast, "frozen": slow})
    a0, b0 = a.detach().clone(), b.detach().clone()
    a.grad, b.grad = torch.randn(4, 4), torch.randn(4, 4)
    opt.step()
    assert not torch.equal(a, a0)
    assert torch.equal(b, b0)
    with pytest.raises(ValueError, match="nope"):
        LearnedOptimizer([{"params": [a], "rule": "nope"}], fast)


def test_batched_math_equals_per_copy_math():
    """The meta-training path (leading batch dims, per-copy φ) is the optimizer's math per copy."""
    torch.manual_seed(3)
    config = RuleConfig(hidden_sizes=[5])
    rules = [LearnedRule(config) for _ in range(3)]
    weights = [
        (torch.stack([r.weights[i][0] for r in rules]).detach(), torch.stack([r.weights[i][1] for r in rules]).detach())
        for i in range(2)
    ]
    p = torch.randn(3, 6, 4)
    state = F.init_state(config, (6, 4), batch_shape=(3,))
    singles = [(p[i].clone(), F.init_state(config, (6, 4))) for i in range(3)]
    for step in range(3):
        g = torch.randn(3, 6, 4)
        p, state = F.learned_update(config, weights, p, g, state, batch_dims=1)
        for i, r in enumerate(rules):
            w = [(a.detach(), b.detach()) for a, b in r.weights]
            singles[i] = F.learned_update(config, w, singles[i][0], g[i], singles[i][1])
    for i in range(3):
        torch.testing.assert_close(p[i], singles[i][0], rtol=1e-6, atol=1e-7)
