"""``lr_adaptation: gradient_alignment``: a per-tensor lr multiplier that follows the sign of the alignment between
the new gradient and the momentum (a sign hypergradient on each tensor's lr)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from optbundle import LearnedOptimizer, LearnedRule, RuleConfig, load_rule
from optbundle.files import RuleConfigError
from optbundle.step import reference as F

from test_hybrid_rule import HYBRID, hybrid_rule

ADAPTIVE = dict(lr_adaptation="gradient_alignment", lr_adaptation_rate=0.1, lr_adaptation_bounds=[0.5, 2.0])


def test_multiplier_follows_the_sign_of_gradient_momentum_alignment():
    """Aligned gradients raise log s by the rate, opposed ones lower it, within the bounds; the first step
    (zero momentum) leaves it at 1; the step is the non-adaptive rule's at lr · s."""
    torch.manual_seed(0)
    adaptive, plain = hybrid_rule(zero=False, **ADAPTIVE), hybrid_rule(zero=False)
    param = torch.randn(16, 8)
    state = F.init_state(adaptive.config, param.shape)
    assert state["lr_log_scale"].shape == () and float(state["lr_log_scale"]) == 0.0
    plain_state = F.init_state(plain.config, param.shape)
    direction = torch.randn(16, 8)
    expected, trajectory = 0.0, []
    for t, sign in enumerate([1, 1, 1, 1, 1, 1, 1, 1, -1, -1, -1, -1, -1, -1, -1, -1, -1, -1]):
        grad = sign * direction + 0.01 * torch.randn(16, 8)
        momentum = state["momentum"][adaptive.config.lr_adaptation_momentum_index]
        alignment = float((grad * momentum).sum())
        if t > 0:
            expected = min(math.log(2.0), max(math.log(0.5), expected + 0.1 * math.copysign(1.0, alignment)))
        new, state = F.learned_update(adaptive.config, adaptive.weights, param, grad, state, lr=1e-2, role="matrix")
        assert float(state["lr_log_scale"]) == pytest.approx(expected, abs=1e-6)
        reference, plain_state = F.learned_update(
            plain.config, plain.weights, param, grad, plain_state, lr=1e-2 * math.exp(expected), role="matrix"
        )
        torch.testing.assert_close(new, reference, rtol=1e-5, atol=1e-7)
        param = new
        trajectory.append(expected)
    # up to the upper bound while gradients agree; down for the 6 steps the momentum still points the old way
    assert trajectory[7] == pytest.approx(math.log(2.0)) and trajectory[13] == pytest.approx(math.log(2.0) - 0.6)
    # an Adam-form tensor (vector role) adapts the same way
    vec = torch.randn(8)
    vstate = F.init_state(adaptive.config, vec.shape)
    for _ in range(4):
        _, vstate = F.learned_update(adaptive.config, adaptive.weights, vec, torch.ones(8), vstate, lr=1e-2, role="vector")
    assert float(vstate["lr_log_scale"]) == pytest.approx(0.3)


def test_batched_copies_adapt_independently():
    """Meta-training steps many copies at once: each copy's multiplier follows its own gradients."""
    torch.manual_seed(1)
    rule = hybrid_rule(zero=False, **ADAPTIVE)
    params = torch.randn(2, 12, 6)
    state = F.init_state(rule.config, params.shape[1:], batch_shape=(2,))
    direction = torch.randn(12, 6)
    for t in range(5):
        grads = torch.stack([direction, direction * (-1) ** t])  # copy 0 consistent, copy 1 oscillating
        new, state_new = F.learned_update(rule.config, rule.weights, params, grads, state, lr=1e-2, batch_dims=1, role="matrix")
        single = {k: v[1] for k, v in state.items()}
        one, _ = F.learned_update(rule.config, rule.weights, params[1], grads[1], single, lr=1e-2, role="matrix")
        torch.testing.assert_close(new[1], one)
        params, state = new, state_new
    assert float(state["lr_log_scale"][0]) == pytest.approx(0.4)
    assert float(state["lr_log_scale"][1]) == pytest.approx(-0.4)


def test_config_validation_and_old_rules_keep_their_bytes():
    for bad, field in [
        (dict(lr_adaptation="hypergradient"), "lr_adaptation"),
        (dict(lr_adaptation="gradient_alignment", lr_adaptation_rate=-0.1), "lr_adaptation_rate"),
        (dict(lr_adaptation="gradient_alignment", lr_adaptation_rate=float("nan")), "lr_adaptation_rate"),
        (dict(lr_adaptation="gradient_alignment", lr_adaptation_bounds=[2.0, 3.0]), "lr_adaptation_bounds"),
        (dict(lr_adaptation="gradient_alignment", lr_adaptation_bounds=[0.1]), "lr_adaptation_bounds"),
        (dict(lr_adaptation="gradient_alignment", lr_adaptation_momentum_index=3), "lr_adaptation_momentum_index"),
    ]:
        with pytest.raises(RuleConfigError, match=field):
            RuleConfig(**{**HYBRID, **bad})
    with pytest.raises(RuleConfigError, match="lr_adaptation"):
        RuleConfig(**{**HYBRID, "output": "adam_residual", "orthogonal_roles": [], "lr_adaptation": "gradient_alignment"})
    config = RuleConfig(**{**HYBRID, **ADAPTIVE})
    assert RuleConfig.from_json(config.to_json()) == config
    assert "lr_adaptation" not in RuleConfig(**HYBRID).to_dict()  # a rule without it keeps its JSON and hash
    assert "lr_adaptation" not in load_rule("default-v3").config.to_dict()


def test_optimizer_state_resumes_bit_identically_and_counts_bytes():
    """The multiplier is optimizer state: saved, reloaded and continued exactly; 4 bytes per tensor."""
    torch.manual_seed(2)
    rule = hybrid_rule(zero=False, **ADAPTIVE)

    def model_and_batches():
        torch.manual_seed(3)
        return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3)), [torch.randn(8, 6) for _ in range(8)]

    def train(model, opt, batches):
        for x in batches:
            opt.zero_grad()
            model(x).square().mean().backward()
            opt.step()

    model, batches = model_and_batches()
    opt = LearnedOptimizer(model.named_parameters(), rule, lr=1e-2)
    train(model, opt, batches)
    expected = [p.detach().clone() for p in model.parameters()]
    scales = [float(opt.state[p]["lr_log_scale"]) for p in model.parameters()]
    assert any(s != 0.0 for s in scales)
    model, batches = model_and_batches()
    opt = LearnedOptimizer(model.named_parameters(), rule, lr=1e-2)
    train(model, opt, batches[:4])
    saved = opt.state_dict()
    opt = LearnedOptimizer(model.named_parameters(), rule, lr=1e-2)
    opt.load_state_dict(saved)
    train(model, opt, batches[4:])
    for got, want in zip(model.parameters(), expected):
        assert torch.equal(got, want)
    extra = {n: sum(v.numel() * v.element_size() for v in opt.state[p].values() if v.dim() == 0 and v.is_floating_point())
             for n, p in model.named_parameters()}
    assert set(extra.values()) == {4}
    plain = LearnedOptimizer(model.named_parameters(), LearnedRule(RuleConfig(**HYBRID)))
    with pytest.raises(Exception, match="another config"):
        plain.load_state_dict(saved)


def test_fused_back_end_adapts_like_the_reference(monkeypatch):
    """The fused CPU back end computes the same multipliers and steps as the reference (every role, conv and
    1×n matrices), and a handed-back tensor is adapted once, by the reference."""
    import dataclasses

    from optbundle.step import fused_step
    from optbundle.step import optimizer as O
    from test_fused_step import SHAPES, run_parity

    monkeypatch.setattr(fused_step, "COMPILE", False)
    monkeypatch.setenv(O.BACKEND_ENV, "fused")
    base = load_rule("default")
    rule = LearnedRule(dataclasses.replace(base.config, **ADAPTIVE), base.provenance)
    rule.load_state_dict(base.state_dict())
    opt, params = run_parity(SHAPES, "scratch", steps=12, rule=rule)
    scales = [float(opt.state[p]["lr_log_scale"]) for p in params]
    assert len({round(s, 4) for s in scales}) > 2  # tensors adapted differently
