"""bf16 accumulator state (``LearnedOptimizer(state_dtype=torch.bfloat16)``): tracks fp32 state, 8 B/param for the
shipped default rule, resumes bit-identically, refuses other dtypes, rounds stochastically."""

import io

import pytest
import torch
from torch import nn

from helpers import one_thread  # noqa: F401
from optbundle import Bundle, LearnedOptimizer, load_rule
from optbundle.step import fast_step, fused_step
from optbundle.step import optimizer as O

STEPS = 20
#: ‖p_bf16 − p_fp32‖ / ‖p_fp32 − p_start‖ after `STEPS` steps on `small_model` (measured: at most ≈0.01)
TOLERANCE = 0.03


def small_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Embedding(40, 16), nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 3))


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(step)
    return torch.randint(0, 40, (16, 4), generator=generator), torch.randint(0, 3, (16,), generator=generator)


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: range) -> None:
    for step in steps:
        x, y = batch(step)
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def make(rule, state_dtype, seed: int = 0):
    model = small_model(seed)
    return model, LearnedOptimizer(list(model.named_parameters()), rule, regime="finetune", state_dtype=state_dtype)


# format 2 (the shipped default) on the reference and fused back ends; format 1 on the torch path and on the
# Triton kernels (interpreted: tests/conftest.py sets TRITON_INTERPRET=1)
CASES = [("default", "reference"), ("default", "fused"), ("default-v2", "torch"),
         pytest.param("default-v2", "triton", marks=pytest.mark.slow)]


@pytest.mark.parametrize("rule_name,backend", CASES)
def test_bf16_state_tracks_fp32_state(rule_name, backend, monkeypatch, one_thread):
    monkeypatch.setenv(O.BACKEND_ENV, backend)
    monkeypatch.setattr(fused_step, "COMPILE", False)  # the same math eagerly (compiling is for the benchmarks)
    monkeypatch.setattr(fast_step, "SMALL_TENSOR", 0)  # the torch path takes these small tensors too
    if backend == "triton":
        kernels = pytest.importorskip("optbundle.kernels.learned_step")
        if not kernels.interpreter_active():
            pytest.skip("Triton's interpreter is not active")
        original = O.LearnedOptimizer._step_torch

        def kernels_only(self, params, *args):  # every tensor must go through the kernels
            assert not params, [tuple(p.shape) for p in params]
            original(self, params, *args)

        monkeypatch.setattr(O.LearnedOptimizer, "_step_torch", kernels_only)
    rule = load_rule(rule_name)
    start = [p.detach().clone() for p in small_model().parameters()]
    finals = {}
    for dtype in (torch.float32, torch.bfloat16):
        model, opt = make(rule, dtype)
        train(model, opt, range(STEPS))
        for p in model.parameters():
            assert int(opt.state[p]["step"]) == STEPS
            for key, value in opt.state[p].items():
                assert value.dtype == (torch.int64 if key in ("step", "skipped_steps") else dtype), key
        finals[dtype] = [p.detach().clone() for p in model.parameters()]
    for p0, p32, p16 in zip(start, finals[torch.float32], finals[torch.bfloat16]):
        moved = float((p32 - p0).norm())
        assert moved > 0
        assert float((p16 - p32).norm()) <= TOLERANCE * moved, (tuple(p0.shape), float((p16 - p32).norm()) / moved)


def state_bytes(opt: LearnedOptimizer) -> tuple[int, int, int]:
    """(accumulator bytes, counter bytes, parameter count)."""
    accumulators = counters = numel = 0
    for group in opt.param_groups:
        for p in group["params"]:
            numel += p.numel()
            for value in opt.state[p].values():
                size = value.numel() * value.element_size()
                if value.is_floating_point():
                    accumulators += size
                else:
                    counters += size
    return accumulators, counters, numel


def test_default_rule_state_is_8_bytes_per_parameter_in_bf16(one_thread):
    rule = load_rule("default")
    for dtype, expected in ((torch.float32, 16), (torch.bfloat16, 8)):
        model, opt = make(rule, dtype)
        train(model, opt, range(1))
        accumulators, counters, numel = state_bytes(opt)
        tensors = len(list(model.parameters()))
        # + the per-tensor lr multiplier (lr_log_scale, one number per tensor in the state dtype)
        assert accumulators == expected * numel + tensors * (expected // 4)
        assert counters == 16 * tensors  # step + skipped_steps, int64, per tensor


def saved_and_loaded(opt: LearnedOptimizer) -> dict:
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("backend", ["reference", "fused"])
def test_bf16_state_resumes_bit_identically(backend, monkeypatch, one_thread):
    monkeypatch.setenv(O.BACKEND_ENV, backend)
    monkeypatch.setattr(fused_step, "COMPILE", False)
    rule = load_rule("default")
    model_a, opt_a = make(rule, torch.bfloat16)
    train(model_a, opt_a, range(8))

    model_b, opt_b = make(rule, torch.bfloat16)
    train(model_b, opt_b, range(4))
    saved = saved_and_loaded(opt_b)
    assert saved["state_dtype"] == "bfloat16"
    model_c, opt_c = make(rule, torch.bfloat16)
    model_c.load_state_dict(model_b.state_dict())
    opt_c.load_state_dict(saved)
    train(model_c, opt_c, range(4, 8))
    for (name, a), c in zip(model_a.named_parameters(), model_c.parameters()):
        assert torch.equal(a, c), name
        for key, value in opt_a.state[a].items():
            assert torch.equal(value, opt_c.state[c][key]) and opt_c.state[c][key].dtype == value.dtype, (name, key)


def test_fp32_checkpoint_loads_into_bf16_state_by_rounding(one_thread):
    rule = load_rule("default")
    model_a, opt_a = make(rule, torch.float32)
    train(model_a, opt_a, range(3))
    saved = saved_and_loaded(opt_a)
    assert saved["state_dtype"] == "float32"
    model_b, opt_b = make(rule, torch.bfloat16)
    opt_b.load_state_dict(saved)
    assert opt_b.state_dict()["state_dtype"] == "bfloat16"
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        for key, value in opt_a.state[a].items():
            expected = value.to(torch.bfloat16) if value.is_floating_point() else value
            assert torch.equal(opt_b.state[b][key], expected), key
    train(model_b, opt_b, range(3, 5))  # and it steps on
    assert int(opt_b.state[next(model_b.parameters())]["step"]) == 5


def test_bundle_round_trip_keeps_bf16_state(tmp_path, one_thread):
    rule = load_rule("default")
    model, opt = make(rule, torch.bfloat16)
    train(model, opt, range(3))
    Bundle(model, rule, state=opt).save_pretrained(tmp_path / "b")
    loaded = Bundle.from_pretrained(tmp_path / "b", model=small_model(1))
    opt_b, _ = loaded.optimizer(state_dtype=torch.bfloat16)
    for (name, p), q in zip(model.named_parameters(), loaded.model.parameters()):
        for key, value in opt.state[p].items():
            assert torch.equal(opt_b.state[q][key], value) and opt_b.state[q][key].dtype == value.dtype, (name, key)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64, "bfloat16"])
def test_other_state_dtypes_are_refused(dtype):
    with pytest.raises(ValueError, match="state_dtype must be torch.float32 or torch.bfloat16"):
        LearnedOptimizer(small_model().parameters(), load_rule("default"), state_dtype=dtype)


def test_state_of_another_dtype_is_refused_before_stepping(one_thread):
    model, opt = make(load_rule("default"), torch.bfloat16)
    train(model, opt, range(1))
    first = next(model.parameters())
    opt.state[first]["second_moment"] = opt.state[first]["second_moment"].float()
    with pytest.raises(O.StateMismatchError, match="'second_moment'.*torch.float32.*torch.bfloat16"):
        train(model, opt, range(1, 2))


def ema(values: torch.Tensor, beta: float, rounding: str | None) -> torch.Tensor:
    """EMA of ``values`` (steps × n) kept in fp32 (``None``) or in bf16 with the given rounding."""
    state = torch.zeros(values.shape[1], dtype=torch.float32 if rounding is None else torch.bfloat16)
    for step, x in enumerate(values):
        new = beta * state.float() + (1 - beta) * x
        if rounding is None:
            state = new
        else:
            O.STOCHASTIC_ROUNDING = rounding == "stochastic"
            try:
                O.round_to_state_(state, new, seed=step)
            finally:
                O.STOCHASTIC_ROUNDING = True
    return state.float()


def test_stochastic_rounding_keeps_a_slow_second_moment_moving():
    """β=0.999 second moment of g² ~ χ²₁ (mean 1) over 3000 steps: round-to-nearest stalls well below the fp32
    EMA (increments below half a bf16 ulp are lost); stochastic rounding follows it."""
    g = torch.randn(3000, 4096, generator=torch.Generator().manual_seed(0))
    exact = ema(g * g, 0.999, None).mean()
    nearest = ema(g * g, 0.999, "nearest").mean()
    stochastic = ema(g * g, 0.999, "stochastic").mean()
    assert abs(stochastic / exact - 1) < 0.01
    assert abs(nearest / exact - 1) > 0.1


def test_rounding_keeps_representable_values_exactly():
    value = torch.randn(1000).to(torch.bfloat16)
    out = torch.empty_like(value)
    O.round_to_state_(out, value.float(), seed=3)
    assert torch.equal(out, value)


def test_trainer_factory_passes_state_dtype():
    model = small_model()
    factory, kwargs = Bundle(model, load_rule("default")).optimizer_factory(state_dtype=torch.bfloat16)
    opt = factory()(model, **kwargs)
    assert opt.state_dtype == torch.bfloat16
