"""Shared parity harness: a back end of the learned step against `features.learned_update`.

Every step compares the back end with the reference from *identical* inputs (parameters, gradients,
accumulators), then continues from the back end's own outputs: a long run exercises the back end's state
evolution while each comparison stays one step. Tolerances:

- fp32 parameters: ``max|p_backend − p₆₄| ≤ 2·max|p₃₂ − p₆₄| + 1e-5·max|Δp₆₄|`` with ``p₆₄`` the reference in
  float64 and ``p₃₂`` the reference in float32: as accurate as the fp32 reference, up to 1e-5 of the step
  (the rounding of ``p − lr·u`` is in the first term; sums and the first layer are regrouped).
- bf16/fp16 parameters: within one unit of the dtype (relative 2⁻⁷ / 2⁻¹⁰) plus 2e-5 of the step of the
  fp32 reference, and equal to its rounding except for ≤ 2% of elements (fp32 results straddling a rounding
  midpoint; cancellation in ``p − lr·u`` makes that likelier than 1e-6 relative differences suggest).
- accumulators (always fp32): ``rtol=1e-5``, ``atol=1e-6·max|reference|``; ``step``, ``skipped_steps`` exactly.
"""

from __future__ import annotations

import torch

from optbundle.step import reference as F

ULP = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def weights_of(rule, dtype=torch.float32, device="cpu"):
    return [(w.detach().to(device, dtype), b.detach().to(device, dtype)) for w, b in rule.weights]


def fresh_state(config, shape, device="cpu"):
    state = F.init_state(config, shape, device=device)
    state["skipped_steps"] = torch.zeros((), dtype=torch.int64, device=device)
    return state


def gradients(shapes, step, generator):
    """fp32 gradients whose scale varies by tensor and step (1e-3 … 10)."""
    out = []
    for i, shape in enumerate(shapes):
        scale = 10.0 ** (((step * 7 + i * 3) % 5) - 3)
        out.append(torch.randn(shape, generator=generator) * scale)
    return out


def check_one_step(step_fn, config, rule, params, grads, states, lr, weight_decay):
    """``step_fn(config, weights, params, grads, states, lr, wd)`` (in place) vs the reference from identical
    inputs; returns the back end's new parameters and states."""
    new_params = [p.clone() for p in params]
    new_states = [{k: v.clone() for k, v in s.items()} for s in states]
    device = params[0].device
    step_fn(config, weights_of(rule, device=device), new_params, grads, new_states, lr, weight_decay)
    for p, g, s, kp, ks in zip(params, grads, states, new_params, new_states):
        shape = tuple(p.shape)
        accumulators = {k: v for k, v in s.items() if k != "skipped_steps"}
        ref32, ref_state = F.learned_update(
            config, weights_of(rule, device=device), p.float(), g.float(), accumulators, lr, weight_decay
        )
        acc64 = {k: v.double() if v.is_floating_point() else v for k, v in accumulators.items()}
        ref64, _ = F.learned_update(
            config, weights_of(rule, torch.float64, device), p.double(), g.double(), acc64, lr, weight_decay
        )
        if p.dtype == torch.float32:
            step64 = (ref64 - p.double()).abs().max().item()
            err32 = (ref32.double() - ref64).abs().max().item()
            err = (kp.double() - ref64).abs().max().item()
            assert err <= 2 * err32 + 1e-5 * step64, f"{shape}: error {err:.3e}, fp32 reference error {err32:.3e}"
        else:
            got, expected = kp.float(), ref32.to(p.dtype).float()
            step32 = (ref32 - p.float()).abs().max().item()
            differ = got != expected
            assert differ.float().mean().item() <= 0.02, f"{shape}: {int(differ.sum())} of {differ.numel()} round differently"
            limit = ref32.abs() * ULP[p.dtype] + 2e-5 * step32 + 1e-30
            assert ((got - ref32).abs() <= limit).all(), f"{shape}: a {p.dtype} parameter is off by more than one unit"
        for key, value in ref_state.items():
            if key == "step":
                assert torch.equal(ks[key], value), f"{shape}: step {ks[key]} vs {value}"
                continue
            scale = value.abs().max().item()
            torch.testing.assert_close(ks[key], value, rtol=1e-5, atol=1e-6 * scale + 1e-30, msg=f"{shape} {key}")
        assert int(ks["skipped_steps"]) == int(s["skipped_steps"])
    return new_params, new_states


def run_parity(step_fn, config, rule, shapes, dtype, steps, lr, weight_decay=0.1, seed=0, device="cpu"):
    """``dtype``: one dtype for every tensor, or a list with one per shape."""
    dtypes = dtype if isinstance(dtype, list) else [dtype] * len(shapes)
    generator = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=generator).to(device, d) for s, d in zip(shapes, dtypes)]
    states = [fresh_state(config, s, device) for s in shapes]
    moved = [torch.zeros(p.shape, dtype=torch.bool, device=device) for p in params]
    for step in range(steps):
        grads = [g.to(device, d) for g, d in zip(gradients(shapes, step, generator), dtypes)]
        new_params, states = check_one_step(step_fn, config, rule, params, grads, states, lr, weight_decay)
        moved = [m | (a != b) for m, a, b in zip(moved, new_params, params)]
        params = new_params
    for shape, m, state in zip(shapes, moved, states):
        assert m.float().mean() > 0.5, f"{shape}: most coordinates never moved; the comparison would be vacuous"
        assert int(state["step"]) == steps


def unprovable_rule():
    """A rule whose update is finite but cannot be proved finite in advance.

    φ's hidden units are all exactly 1 (zero first-layer weights, bias 1); the magnitude output weighs them
    +10, −10, +10, −10, so it is exactly 0, while the bound ``|W|·max`` says 40 and ``exp(40·exp_mult)``
    with ``exp_mult = 5`` would overflow. Back ends must then check the update before writing it.
    """
    from optbundle import LearnedRule, RuleConfig

    rule = LearnedRule(RuleConfig(hidden_sizes=[4], exp_mult=5.0, step_mult=1e-2))
    with torch.no_grad():
        first, last = rule.layers[0], rule.layers[-1]
        first.weight.zero_()
        first.bias.fill_(1.0)
        last.weight.copy_(torch.tensor([[0.5, -0.25, 0.25, 0.5], [10.0, -10.0, 10.0, -10.0]]))
        last.bias.copy_(torch.tensor([0.1, 0.0]))
    return rule
