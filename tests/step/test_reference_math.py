"""The torch reference of the learned step against an independent, plainly written implementation.

The plain version below loops over coordinates with Python floats (float64), writing each formula of the
README's "The learned step" and of `optbundle.step.reference`' docstring directly: no broadcasting, no folding of the
normalization into φ, no shared helpers.
"""

import math
import itertools

import pytest
import torch

from optbundle import LearnedOptimizer, LearnedRule, RuleConfig, load_rule
from optbundle.step import reference as F
from optbundle.step.rule import FEATURE_GROUPS, SMALL_FC_LOPT_FEATURES


def plain_indices(shape):
    return list(itertools.product(*[range(n) for n in shape])) if shape else [()]


class PlainState:
    """Per-coordinate accumulators as Python dicts."""

    def __init__(self, config, shape):
        self.c = config
        self.shape = tuple(shape)
        self.idx = plain_indices(self.shape)
        self.t = 0
        k, j = len(config.momentum_decays), len(config.factored_decays)
        self.m = {i: [0.0] * k for i in self.idx}
        self.v = {i: 0.0 for i in self.idx}
        if len(shape) >= 2:
            self.row = {i[:-1]: [0.0] * j for i in self.idx}
            self.col = {i[:-2] + i[-1:]: [0.0] * j for i in self.idx}
        else:
            self.full = {i: [0.0] * j for i in self.idx}

    def update(self, g):
        c = self.c
        for i in self.idx:
            for k, b in enumerate(c.momentum_decays):
                self.m[i][k] = b * self.m[i][k] + (1 - b) * g[i]
            self.v[i] = c.second_moment_decay * self.v[i] + (1 - c.second_moment_decay) * g[i] ** 2
        if len(self.shape) >= 2:
            rows, cols = self.shape[-2], self.shape[-1]
            for key in self.row:
                mean = sum(g[key + (cc,)] ** 2 + c.factored_eps for cc in range(cols)) / cols
                for j, b in enumerate(c.factored_decays):
                    self.row[key][j] = b * self.row[key][j] + (1 - b) * mean
            for key in self.col:
                mean = sum(g[key[:-1] + (r, key[-1])] ** 2 + c.factored_eps for r in range(rows)) / rows
                for j, b in enumerate(c.factored_decays):
                    self.col[key][j] = b * self.col[key][j] + (1 - b) * mean
        else:
            for i in self.idx:
                for j, b in enumerate(c.factored_decays):
                    self.full[i][j] = b * self.full[i][j] + (1 - b) * (g[i] ** 2 + c.factored_eps)
        self.t += 1

    def row_col(self, i, j):
        """(row stat, col stat, row factor, col factor) at coordinate i for factored decay j."""
        if len(self.shape) >= 2:
            row, col = self.row[i[:-1]][j], self.col[i[:-2] + i[-1:]][j]
            lead = i[:-2]
            rows = [self.row[lead + (r,)][j] for r in range(self.shape[-2])]
            row_mean = sum(rows) / len(rows)
            return row, col, 1 / math.sqrt(row / row_mean), 1 / math.sqrt(col)
        f = self.full[i][j]
        return f, f, 1 / math.sqrt(f), 1.0

    def adam_dir(self, i):
        c = self.c
        b1 = c.momentum_decays[c.adam_momentum_index]
        m_hat = self.m[i][c.adam_momentum_index] / (1 - b1**self.t)
        v_hat = self.v[i] / (1 - c.second_moment_decay**self.t)
        return m_hat / (math.sqrt(v_hat) + c.adam_eps)

    def features(self, i, p, g):
        c = self.c
        out = []
        K, J = range(len(c.momentum_decays)), range(len(c.factored_decays))
        rs = 1 / math.sqrt(self.v[i] + c.second_moment_eps)
        for name in c.features:
            if name == "grad":
                out.append(g[i])
            elif name == "param":
                out.append(p[i])
            elif name == "momentum":
                out += [self.m[i][k] for k in K]
            elif name == "second_moment":
                out.append(self.v[i])
            elif name == "momentum_rsqrt_second_moment":
                out += [self.m[i][k] * rs for k in K]
            elif name == "rsqrt_second_moment":
                out.append(rs)
            elif name == "adafactor_grad":
                out += [g[i] * self.row_col(i, j)[2] * self.row_col(i, j)[3] for j in J]
            elif name == "row_second_moment":
                out += [self.row_col(i, j)[0] for j in J]
            elif name == "col_second_moment":
                out += [self.row_col(i, j)[1] for j in J]
            elif name == "rsqrt_row_second_moment":
                out += [1 / math.sqrt(self.row_col(i, j)[0] + c.factored_rsqrt_eps) for j in J]
            elif name == "rsqrt_col_second_moment":
                out += [1 / math.sqrt(self.row_col(i, j)[1] + c.factored_rsqrt_eps) for j in J]
            elif name == "adafactor_momentum":
                out += [self.m[i][k] * self.row_col(i, k)[2] * self.row_col(i, k)[3] for k in K]
            elif name == "adam_direction":
                out.append(self.adam_dir(i))
        return out


def plain_mlp(layers, x, activation):
    act = {"relu": lambda z: max(z, 0.0), "tanh": math.tanh}[activation]
    h = x
    for n, (w, b) in enumerate(layers):
        h = [sum(w[o][k] * h[k] for k in range(len(h))) + b[o] for o in range(len(b))]
        if n < len(layers) - 1:
            h = [act(z) for z in h]
    return h


def plain_step(config, layers, state, p, g, lr, wd):
    """Returns (new params dict, raw features per coordinate, step per coordinate)."""
    c = config
    time_t = state.t
    state.update(g)
    raw = {i: state.features(i, p, g) for i in state.idx}
    n = len(state.idx)
    nf = len(next(iter(raw.values())))
    norms = [1 / math.sqrt(c.normalization_eps + sum(raw[i][f] ** 2 for i in state.idx) / n) for f in range(nf)]
    time = [math.tanh(time_t / tau - 1) for tau in c.time_scales] if "time" in c.features else []
    outputs = {i: plain_mlp(layers, [raw[i][f] * norms[f] for f in range(nf)] + time, c.activation) for i in state.idx}
    step = {}
    for i in state.idx:
        d, a = outputs[i]
        if c.output == "small_fc_lopt":
            step[i] = d * math.exp(a * c.exp_mult) * c.step_mult
        elif c.output == "normalized":
            step[i] = d * math.exp(a * c.exp_mult)
        else:
            step[i] = c.step_mult * math.exp(c.magnitude_bound * math.tanh(a)) * (state.adam_dir(i) + d)
    if c.output == "normalized":
        rms = math.sqrt(sum(s * s for s in step.values()) / n + 1e-12)
        step = {i: s / rms * c.step_mult for i, s in step.items()}
    if c.param_scale:
        prms = max(math.sqrt(sum(p[i] ** 2 for i in state.idx) / n), c.param_scale_min)
        step = {i: s * prms for i, s in step.items()}
    new_p = {i: p[i] - lr * step[i] - lr * c.step_mult * wd * p[i] for i in state.idx}
    return new_p, raw, step


def to_dict(t):
    return {i: float(t[i]) if i else float(t) for i in plain_indices(tuple(t.shape))}


def layers_as_lists(rule):
    return [(w.double().tolist(), b.double().tolist()) for w, b in rule.weights]


SHAPES = [(), (5,), (3, 4), (2, 3, 4), (1, 1)]
CONFIGS = {
    "small_fc_lopt": dict(),
    "normalized+param_scale": dict(output="normalized", param_scale=True, step_mult=0.01, exp_mult=0.5),
    "adam_residual+adam_feature": dict(
        output="adam_residual", features=["grad", "momentum", "adam_direction", "adafactor_momentum", "time"],
        hidden_sizes=[6], activation="tanh", magnitude_bound=2.0,
    ),
    "subset_no_time": dict(features=["param", "second_moment", "row_second_moment", "rsqrt_col_second_moment"]),
}


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_reference_matches_plain_formulas(shape, name):
    torch.manual_seed(0)
    config = RuleConfig(**CONFIGS[name])
    rule = LearnedRule(config).double()
    with torch.no_grad():  # larger weights so that every input actually matters
        for layer in rule.layers:
            layer.weight.mul_(3.0)
    layers = layers_as_lists(rule)
    weights = [(w.detach(), b.detach()) for w, b in rule.weights]
    p = torch.randn(shape, dtype=torch.float64)
    state = F.init_state(config, shape, dtype=torch.float64)
    plain = PlainState(config, shape)
    plain_p = to_dict(p)
    for step in range(4):
        g = torch.randn(shape, dtype=torch.float64) * (0.1 + step)
        lr, wd = 0.7, 0.3
        # reference features (before normalization) for this step
        upd = F.update_accumulators(config, g, state)
        upd["step"] = state["step"] + 1
        feats = F.compute_features(config, p, g, upd)
        new_p, state = F.learned_update(config, weights, p, g, state, lr=lr, weight_decay=wd)
        plain_p, raw, _ = plain_step(config, layers, plain, plain_p, to_dict(g), lr, wd)
        for col, i in enumerate(plain.idx):
            assert feats[:, col].tolist() == pytest.approx(raw[i], rel=1e-6, abs=1e-12)
        expected = torch.tensor([plain_p[i] for i in plain.idx], dtype=torch.float64)
        got = new_p.reshape(-1)
        # compare the updates (p' − p), which is where any error in the step would show
        torch.testing.assert_close(got - p.reshape(-1), expected - p.reshape(-1), rtol=1e-6, atol=1e-12)
        p = new_p


def test_small_fc_lopt_has_39_inputs():
    config = RuleConfig(features=list(SMALL_FC_LOPT_FEATURES))
    assert config.num_inputs == 39
    assert set(SMALL_FC_LOPT_FEATURES) | {"adam_direction"} == set(FEATURE_GROUPS)


def test_fp32_optimizer_agrees_with_fp64_reference():
    """The fp32 optimizer path is the fp64 math up to fp32 rounding."""
    torch.manual_seed(1)
    config = RuleConfig()
    rule = LearnedRule(config)
    p32 = torch.nn.Parameter(torch.randn(6, 7))
    p64 = p32.detach().double().clone()
    opt = LearnedOptimizer([p32], rule, lr=2.0)
    weights = [(w.detach().double(), b.detach().double()) for w, b in rule.weights]
    state = F.init_state(config, p64.shape, dtype=torch.float64)
    for _ in range(5):
        g = torch.randn(6, 7)
        p32.grad = g.clone()
        opt.step()
        p64, state = F.learned_update(config, weights, p64, g.double(), state, lr=2.0)
    torch.testing.assert_close(p32.detach().double() - 0, p64, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(5,), (3, 4), (6, 3, 4), (7, 1)], ids=str)
@pytest.mark.parametrize("name", [*CONFIGS, "default"])
def test_row_blocks_give_the_one_pass_step(monkeypatch, shape, name):
    """Features and φ in blocks of rows (two passes: normalizers, then φ) = the whole tensor at once, for
    copies stacked in front with one φ per copy."""
    torch.manual_seed(2)
    config = RuleConfig(**CONFIGS[name]) if name in CONFIGS else load_rule("default").config
    copies = 3
    rule = LearnedRule(config).double()
    weights = [(w.detach().expand(copies, *w.shape) + 0.1 * torch.randn(copies, *w.shape, dtype=torch.float64),
                b.detach().expand(copies, *b.shape) + 0.1 * torch.randn(copies, *b.shape, dtype=torch.float64))
               for w, b in rule.weights]
    p = torch.randn(copies, *shape, dtype=torch.float64)
    state = F.init_state(config, shape, batch_shape=(copies,), dtype=torch.float64)
    chunked_p, chunked_state = p, state
    for step in range(3):
        g = torch.randn(copies, *shape, dtype=torch.float64)
        p, state = F.learned_update(config, weights, p, g, state, lr=0.5, batch_dims=1)
        with monkeypatch.context() as patch:
            patch.setattr(F, "CHUNK_ELEMENTS", 1)  # one row per block
            assert F.row_blocks(config, chunked_p, 1) == [(r, r + 1) for r in range(shape[0])]
            chunked_p, chunked_state = F.learned_update(
                config, weights, chunked_p, g, chunked_state, lr=0.5, batch_dims=1)
        torch.testing.assert_close(chunked_p, p, rtol=1e-12, atol=1e-14)
        for key in state:
            torch.testing.assert_close(chunked_state[key], state[key], rtol=0, atol=0)
    assert F.row_blocks(config, p, 1) is None  # small tensors: one pass, as before
