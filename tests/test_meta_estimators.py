"""Meta-gradient estimators against the exact meta-gradient on a deterministic quadratic.

The task is ``L(x) = ½ Σ_i a_i x_i²`` from a fixed init, so every instance is the same problem and the only
randomness is the perturbation. The exact gradient of the meta-loss is autograd through the whole unroll
*including* the Hessian terms (the inner gradient ``a ⊙ x`` stays differentiable). Tolerances:

- ES and PES (4096 antithetic pairs, σ = 1e-3, 10 trainable φ entries): cosine ≥ 0.98 and relative norm error
  ≤ 0.15 (sampling error ≈ √(10/4096) ≈ 0.05 plus O(σ²) smoothing bias);
- first-order TBPTT drops the Hessian terms, O(step · a / |g|) relative here: cosine ≥ 0.95, norm error ≤ 0.25.
"""

import math

import pytest
import torch

from optbundle import LearnedRule, RuleConfig
from optbundle.step import reference as F
from optbundle.meta import estimators as E
from optbundle.meta import unroll as U

CURVATURE = torch.tensor([0.5, 1.0, 2.0, 4.0, 0.25, 1.5, 3.0, 0.75])
K = 8  # inner steps per truncation


class Quadratic:
    spec = {"family": "quadratic"}

    def init_params(self, generator, n):
        x0 = torch.linspace(-1.0, 1.2, CURVATURE.numel())
        return {"x": x0.expand(n, -1).clone()}

    def sample_batch(self, generator, n):
        return (torch.zeros(n, 1),)

    def loss(self, params, batch):
        return 0.5 * (CURVATURE * params["x"] ** 2).sum(-1)


def small_rule() -> LearnedRule:
    config = RuleConfig(
        features=["grad", "momentum", "adam_direction"],
        hidden_sizes=[4],
        output="adam_residual",
        step_mult=0.02,
        magnitude_bound=1.0,
    )
    torch.manual_seed(0)
    rule = LearnedRule(config)
    with torch.no_grad():
        rule.layers[-1].weight.mul_(0.5)
    return rule


def exact_gradient(rule, theta, truncations, loss_cfg):
    """d/dθ Σ_j ℓ_j, autograd through the unroll with differentiable inner gradients (Hessian terms kept)."""
    config = rule.config
    leaf = theta.clone().requires_grad_()
    weights = U.unflatten_weights(config, leaf)
    x = Quadratic().init_params(None, 1)["x"]
    state = F.init_state(config, x.shape[1:], batch_shape=(1,))
    initial = None
    total = 0.0
    for _ in range(truncations):
        chunk = 0.0
        for _ in range(K):
            loss = 0.5 * (CURVATURE * x**2).sum(-1)
            initial = loss.detach() if initial is None else initial
            chunk = chunk + E.normalized_meta_loss(loss, initial, loss_cfg)
            x, state = F.learned_update(config, weights, x, CURVATURE * x, state, batch_dims=1)
        total = total + chunk / K
    (grad,) = torch.autograd.grad(total.sum(), leaf)
    return grad


def make_group(config, num_phi, instances, copies, episode):
    group = U.TaskGroup(0, torch.Generator().manual_seed(1), instances, copies)
    U.reset_group(group, config, num_phi, None, (episode, episode), None, fixed_task=Quadratic())
    return group


def compare(estimate, exact, cosine_min, norm_error_max):
    cosine = torch.nn.functional.cosine_similarity(estimate, exact, dim=0)
    norm_error = (estimate.norm() - exact.norm()).abs() / exact.norm()
    assert cosine >= cosine_min, f"cosine {cosine:.4f}"
    assert norm_error <= norm_error_max, f"norm error {norm_error:.4f}"


@pytest.fixture(scope="module")
def setup():
    rule = small_rule()
    theta = U.flatten_rule(rule)
    mask = U.parameter_mask(rule.config, "last_layer")
    assert int(mask.sum()) == 10
    loss_cfg = E.MetaLossConfig()
    return rule, theta, mask, loss_cfg


def test_es_matches_exact(setup):
    rule, theta, mask, loss_cfg = setup
    exact = exact_gradient(rule, theta, 1, loss_cfg) * mask
    group = make_group(rule.config, theta.numel(), 4096, 2, K)
    reset = lambda: U.reset_group(group, rule.config, theta.numel(), None, (K, K), None, fixed_task=Quadratic())  # noqa: E731
    estimate, info = E.es_gradient(rule.config, theta, group, 1e-3, mask, loss_cfg, reset)
    assert info.steps == K and info.episode_done
    assert torch.all(estimate[mask == 0] == 0)
    compare(estimate, exact, 0.98, 0.15)


def test_pes_over_two_truncations_matches_exact(setup):
    rule, theta, mask, loss_cfg = setup
    exact = exact_gradient(rule, theta, 2, loss_cfg) * mask
    group = make_group(rule.config, theta.numel(), 4096, 2, 2 * K)
    first, info1 = E.pes_gradient(rule.config, theta, group, 1e-3, K, mask, loss_cfg)
    second, info2 = E.pes_gradient(rule.config, theta, group, 1e-3, K, mask, loss_cfg)
    assert not info1.episode_done and info2.episode_done
    compare(first + second, exact, 0.98, 0.15)


def test_pes_without_persistence_is_biased(setup):
    """Sanity check that the test can fail: dropping the second truncation's dependence on the first
    truncation's perturbation (plain truncated ES) gives a gradient measurably different from PES's."""
    rule, theta, mask, loss_cfg = setup
    exact = exact_gradient(rule, theta, 2, loss_cfg) * mask
    group = make_group(rule.config, theta.numel(), 4096, 2, 2 * K)
    first, _ = E.pes_gradient(rule.config, theta, group, 1e-3, K, mask, loss_cfg)
    group.perturbation_sum.zero_()  # forget the history → truncated ES
    second, _ = E.pes_gradient(rule.config, theta, group, 1e-3, K, mask, loss_cfg)
    cosine = torch.nn.functional.cosine_similarity(first + second, exact, dim=0)
    norm_error = ((first + second).norm() - exact.norm()).abs() / exact.norm()
    assert cosine < 0.98 or norm_error > 0.15


def test_tbptt_first_order_close_to_exact(setup):
    rule, theta, mask, loss_cfg = setup
    exact = exact_gradient(rule, theta, 1, loss_cfg) * mask
    group = make_group(rule.config, theta.numel(), 1, 1, K)
    estimate, info = E.tbptt_gradient(rule.config, theta, group, K, mask, loss_cfg)
    assert info.episode_done
    assert torch.all(estimate[mask == 0] == 0)
    compare(estimate, exact, 0.95, 0.25)


def test_meta_loss_clipping_and_nan():
    cfg = E.MetaLossConfig(clip_max=1.5, transform="linear")
    losses = torch.tensor([1.0, 10.0, float("nan"), float("inf"), -1.0])
    out = E.normalized_meta_loss(losses, torch.full((5,), 2.0), cfg)
    assert torch.allclose(out, torch.tensor([0.5, 1.5, 1.5, 1.5, 1e-4]))
    log_out = E.normalized_meta_loss(losses, torch.full((5,), 2.0), E.MetaLossConfig())
    assert math.isclose(float(log_out[2]), math.log(1.5), rel_tol=1e-6)


def test_sanitize_and_masked_adamw():
    grad = torch.tensor([float("nan"), 10.0, -float("inf"), 0.5])
    clean = E.sanitize_meta_gradient(grad, 3.0)
    assert clean.tolist() == [0.0, 3.0, -3.0, 0.5]
    theta = torch.ones(4)
    mask = torch.tensor([1.0, 1.0, 0.0, 1.0])
    state = E.AdamWState(torch.zeros(4), torch.zeros(4))
    new = E.adamw_update(theta, clean, state, 0.1, mask, weight_decay=0.1)
    assert new[2] == 1.0 and new[0] != 1.0 and new[1] < 1.0
