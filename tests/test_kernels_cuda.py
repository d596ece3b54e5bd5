"""The fused Triton kernels compiled for a real GPU, against the torch reference on the same GPU.

Skipped without CUDA. Run alone on a GPU machine (benchmarks/gpu_check.sh does): in a process where
``TRITON_INTERPRET=1`` was set the kernels would be interpreted instead. Tolerances: tests/_parity.py (the
GPU contracts multiply-adds and sums with atomics in arbitrary order, both well inside them).
"""

from __future__ import annotations

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
pytest.importorskip("triton")

import _parity  # noqa: E402
from optbundle import LearnedOptimizer, LearnedRule, RuleConfig, load_rule  # noqa: E402
from optbundle.step import optimizer as O  # noqa: E402
from optbundle.kernels import learned_step as K  # noqa: E402

if K.interpreter_active():
    pytest.skip("TRITON_INTERPRET=1 is set: run this file alone, without it", allow_module_level=True)

CUDA = torch.device("cuda")
SHAPES = [(), (7,), (33, 65), (4, 3, 5, 5), (1, 1), (257, 3)]
LARGE = [(1024, 4096), (3, 128, 512), (1 << 20,), (64, 64, 3, 3), (50_000, 17)]


def fused(config, weights, params, grads, states, lr, weight_decay):
    K.learned_step_(config, weights, params, grads, states, lr, weight_decay)


def on_cuda(step_fn):
    """The parity harness with every tensor on the GPU (the reference runs there too)."""

    def run(config, rule, shapes, dtype, steps, lr):
        _parity.run_parity(step_fn, config, rule, shapes, dtype, steps, lr, device=CUDA)

    return run


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("rule_name", ["default-v2", "adam-init"])
def test_parity_small_shapes_20_steps(rule_name, dtype):
    rule = load_rule(rule_name)
    lr = 1.0 if rule.config.param_scale else 20.0
    on_cuda(fused)(rule.config, rule, SHAPES, dtype, 20, lr)


@pytest.mark.parametrize("rule_name", ["default-v2", "adam-init"])
def test_parity_large_shapes(rule_name):
    rule = load_rule(rule_name)
    on_cuda(fused)(rule.config, rule, LARGE, torch.float32, 3, 1.0)


def test_check_path_on_the_gpu():
    rule = _parity.unprovable_rule()
    on_cuda(fused)(rule.config, rule, [(33, 65), (7,)], torch.float32, 3, 1.0)


def test_optimizer_dispatches_to_the_kernels_and_skips_non_finite(monkeypatch):
    monkeypatch.delenv(O.BACKEND_ENV, raising=False)
    assert O.select_backend(CUDA) == "triton"
    rule = load_rule("default-v2")
    params = [torch.nn.Parameter(torch.randn(s, device=CUDA)) for s in SHAPES]
    opt = LearnedOptimizer(params, rule)
    for p in params:
        p.grad = torch.randn_like(p)
    params[2].grad[1, 1] = float("nan")
    before = [p.detach().clone() for p in params]
    opt.step()
    for i, (p, b) in enumerate(zip(params, before)):
        assert torch.equal(p, b) == (i == 2)
        assert int(opt.state[p]["skipped_steps"]) == (1 if i == 2 else 0)


def test_rule_with_wide_hidden_layers():
    torch.manual_seed(0)
    config = RuleConfig(hidden_sizes=[32, 32], activation="tanh")
    rule = LearnedRule(config)
    on_cuda(fused)(config, rule, [(33, 65), (7,), (4, 3, 5, 5)], torch.float32, 3, 20.0)
