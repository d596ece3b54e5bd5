"""Rule format 2: the hybrid residual form (Newton–Schulz on matrices, Adam elsewhere), parameter roles, width
multipliers, recommended learning rates per regime, and format-1 rules that keep loading and stepping as before."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from optbundle import Bundle, LearnedOptimizer, LearnedRule, RuleConfig, load_rule
from optbundle.step import reference as F
from optbundle.store.bundle import detect_regime, model_roles
from optbundle.files import RuleConfigError
from optbundle.meta import tasks as T
from optbundle.meta import unroll as U
from optbundle.store.pretrained import PRETRAINED_DIR
from optbundle.step.roles import assign_roles, step_multiplier

HYBRID = dict(
    format_version=2,
    features=["grad", "param", "momentum", "momentum_rsqrt_second_moment", "adam_direction", "time"],
    momentum_decays=[0.9, 0.95, 0.99],
    hidden_sizes=[8],
    output="hybrid_residual",
    step_mult=1.0,
    second_moment_eps=1e-12,
    orthogonal_roles=["matrix"],
    orthogonal_momentum_index=1,
    recommended_lr={"scratch": 1e-2, "finetune": 1e-4},
)


def hybrid_rule(zero: bool = True, **overrides) -> LearnedRule:
    torch.manual_seed(0)
    rule = LearnedRule(RuleConfig(**{**HYBRID, **overrides}))
    if zero:
        with torch.no_grad():
            rule.layers[-1].weight.zero_()
            rule.layers[-1].bias.zero_()
    return rule


# ---- format 1 keeps loading, serializing and stepping as before -------------------------------------------


@pytest.mark.parametrize("name", ["adam-init", "default-v1", "default-v2"])
def test_format1_rules_serialize_to_the_same_bytes(name):
    path = PRETRAINED_DIR / name / "rule_config.json"
    rule = load_rule(name)
    assert rule.config.format_version == 1
    assert (rule.config.to_json() + "\n").encode() == path.read_bytes()
    assert rule.config.recommended_lr == {"scratch": 1.0, "finetune": 1.0}  # lr stays a multiplier


def test_format1_rule_ignores_roles_and_regime():
    rule = load_rule("default-v2")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    grads = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    results = []
    for kwargs in ({}, {"regime": "finetune"}):
        copy = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
        copy.load_state_dict(model.state_dict())
        opt = LearnedOptimizer(copy.named_parameters(), rule, **kwargs)
        for n, p in copy.named_parameters():
            p.grad = grads[n].clone()
        opt.step()
        results.append(torch.cat([p.detach().flatten() for p in copy.parameters()]))
    # the reference math without roles gives the same parameters
    state = F.init_state(rule.config, model[0].weight.shape)
    expected, _ = F.learned_update(rule.config, rule.weights, model[0].weight.detach(), grads["0.weight"], state)
    assert torch.equal(results[0], results[1])
    assert torch.allclose(results[0][: expected.numel()], expected.flatten(), rtol=1e-5, atol=1e-7)


def test_format2_fields_validated_with_named_errors():
    for field, value, needle in [
        ("recommended_lr", {"scratch": 1e-3}, "recommended_lr"),
        ("recommended_lr", {"scratch": float("nan"), "finetune": 1e-4}, "recommended_lr"),
        ("role_lr", {"matrix": 1.0}, "role_lr"),
        ("orthogonal_roles", ["matrices"], "orthogonal_roles"),
        ("width_scaling", "spectral-ish", "width_scaling"),
        ("ns_steps", 0, "ns_steps"),
        ("ns_coefficients", [1.0, 2.0], "ns_coefficients"),
        ("matrix_rms", -1.0, "matrix_rms"),
        ("base_fan_in", 0, "base_fan_in"),
        ("orthogonal_momentum_index", 3, "orthogonal_momentum_index"),
    ]:
        with pytest.raises(RuleConfigError, match=needle):
            RuleConfig(**{**HYBRID, field: value})
    with pytest.raises(RuleConfigError, match="orthogonal_roles"):
        RuleConfig(**{**HYBRID, "output": "adam_residual"})
    # a format-2 field on a format-1 config cannot be written silently as format 1
    config = RuleConfig(**{**HYBRID, "format_version": 1})
    with pytest.raises(RuleConfigError, match="format_version 2"):
        config.to_json()


def test_format2_round_trip(tmp_path):
    rule = hybrid_rule(zero=False, width_scaling="mup", base_fan_in=64)
    rule.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "rule_config.json").read_text())
    assert data["format_version"] == 2 and data["orthogonal_roles"] == ["matrix"] and data["base_fan_in"] == 64
    loaded = LearnedRule.from_pretrained(tmp_path)
    assert loaded.config == rule.config and loaded.content_hash() == rule.content_hash()
    del data["ns_steps"]  # format 2 stores every constant: a missing one is an error
    (tmp_path / "rule_config.json").write_text(json.dumps(data))
    with pytest.raises(RuleConfigError, match="ns_steps"):
        LearnedRule.from_pretrained(tmp_path)


# ---- the math -------------------------------------------------------------------------------------------


def test_newton_schulz_orthogonalizes_batched():
    config = RuleConfig(**HYBRID)
    torch.manual_seed(0)
    for shape in [(3, 64, 32), (3, 32, 64), (2, 48, 48)]:
        x = torch.randn(shape)
        o = F.newton_schulz(x, config)
        singular = torch.linalg.svdvals(o)
        assert singular.min() > 0.5 and singular.max() < 1.3, shape
        # rotation-equivariant in the sense that matters: it keeps the singular vectors of x
        u, _, vh = torch.linalg.svd(x, full_matrices=False)
        polar = u @ vh
        cosine = (o * polar).sum((-2, -1)) / (o.norm(dim=(-2, -1)) * polar.norm(dim=(-2, -1)))
        assert (cosine > 0.97).all(), shape
        # copies are independent
        assert torch.allclose(F.newton_schulz(x[1:2], config), o[1:2], atol=1e-5)


def test_zero_phi_hybrid_is_muon_on_matrices_and_adam_elsewhere():
    rule = hybrid_rule()
    torch.manual_seed(0)
    weight = nn.Parameter(torch.randn(48, 32) * 0.1)
    bias = nn.Parameter(torch.zeros(48))
    twin_w, twin_b = nn.Parameter(weight.detach().clone()), nn.Parameter(bias.detach().clone())
    ours = LearnedOptimizer([{"params": [weight, bias], "roles": ["matrix", "vector"]}], rule, lr=1e-2)
    muon = torch.optim.Muon([twin_w], lr=1e-2, momentum=0.95, nesterov=True, weight_decay=0.0, adjust_lr_fn="match_rms_adamw")
    adam = torch.optim.Adam([twin_b], lr=1e-2, betas=(0.9, 0.999), eps=1e-8)
    for _ in range(5):
        grad_w, grad_b = torch.randn(48, 32), torch.randn(48)
        before_w, before_twin = weight.detach().clone(), twin_w.detach().clone()
        for p, g in ((weight, grad_w), (bias, grad_b), (twin_w, grad_w), (twin_b, grad_b)):
            p.grad = g.clone()
        ours.step(), muon.step(), adam.step()
        ours_update, muon_update = weight.detach() - before_w, twin_w.detach() - before_twin
        cosine = float((ours_update * muon_update).sum() / (ours_update.norm() * muon_update.norm()))
        assert cosine > 0.999
        assert 0.8 < float(ours_update.norm() / muon_update.norm()) < 1.25
        # AdamW-equivalent RMS: 0.2 · lr exactly (per-tensor normalized)
        assert math.isclose(float(ours_update.pow(2).mean().sqrt()), 0.2 * 1e-2, rel_tol=1e-3)
        assert torch.allclose(bias.detach(), twin_b.detach(), rtol=1e-4, atol=1e-7)
        weight.data.copy_(twin_w.data)  # compare one step at a time from the same point


def test_mup_width_multiplier_shrinks_wide_matrices_and_heads():
    config = RuleConfig(**{**HYBRID, "width_scaling": "mup", "base_fan_in": 128})
    assert step_multiplier(config, "matrix", (64, 512)) == pytest.approx(0.5)
    assert step_multiplier(config, "matrix", (64, 32)) == 1.0  # never larger than AdamW-equivalent
    assert step_multiplier(config, "matrix", (16, 32, 3, 3)) == pytest.approx(math.sqrt(128 / 288))
    assert step_multiplier(config, "head", (10, 1024)) == pytest.approx(0.125)
    assert step_multiplier(config, "vector", (1024,)) == 1.0
    rule = hybrid_rule(width_scaling="mup", base_fan_in=128)
    weight = nn.Parameter(torch.randn(64, 512) * 0.05)
    opt = LearnedOptimizer([{"params": [weight], "roles": ["matrix"]}], rule, lr=1e-2)
    weight.grad = torch.randn_like(weight)
    before = weight.detach().clone()
    opt.step()
    assert math.isclose(float((weight.detach() - before).pow(2).mean().sqrt()), 0.2 * 1e-2 * 0.5, rel_tol=1e-3)


def test_learned_residual_changes_direction_and_stays_bounded():
    rule = hybrid_rule(zero=False)
    with torch.no_grad():
        rule.layers[-1].bias.copy_(torch.tensor([0.0, 50.0]))  # magnitude saturates at exp(bound)
    weight = nn.Parameter(torch.randn(32, 16))
    opt = LearnedOptimizer([{"params": [weight], "roles": ["matrix"]}], rule, lr=1e-2)
    weight.grad = torch.randn_like(weight) * 1e6  # gradient scale does not matter to a normalized step
    before = weight.detach().clone()
    opt.step()
    rms = float((weight.detach() - before).pow(2).mean().sqrt())
    assert rms <= 0.2 * 1e-2 * math.e * 1.001


# ---- roles and regimes ----------------------------------------------------------------------------------


def test_assign_roles_by_name_and_shape():
    mlp = [("layer0.weight", (64, 784)), ("layer0.bias", (64,)), ("layer1.weight", (10, 64)), ("layer1.bias", (10,))]
    assert assign_roles(mlp) == ["matrix", "vector", "head", "vector"]
    bert = [
        ("bert.embeddings.word_embeddings.weight", (30522, 384)),
        ("bert.embeddings.LayerNorm.weight", (384,)),
        ("bert.encoder.layer.0.attention.self.query.weight", (384, 384)),
        ("bert.pooler.dense.weight", (384, 384)),
        ("classifier.weight", (2, 384)),
    ]
    assert assign_roles(bert) == ["embedding", "vector", "matrix", "matrix", "head"]
    lora = [("base_model.model.q_proj.lora_A.default.weight", (8, 64)), ("base_model.model.q_proj.lora_B.default.weight", (64, 8))]
    assert assign_roles(lora) == ["adapter", "adapter"]
    gpt2 = [("transformer.wte.weight", (50, 16)), ("transformer.h.0.mlp.c_fc.weight", (16, 64)), ("transformer.h.0.mlp.c_proj.weight", (64, 16))]
    assert assign_roles(gpt2) == ["embedding", "matrix", "matrix"]  # tied head: no readout guessed
    assert assign_roles([(None, (4, 4)), (None, (4,))]) == ["matrix", "vector"]


def test_optimizer_roles_in_groups_survive_state_dict_and_can_be_overridden():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    rule = hybrid_rule()
    opt = LearnedOptimizer(model.named_parameters(), rule)
    assert opt.param_groups[0]["roles"] == ["matrix", "vector", "head", "vector"]
    assert opt.param_groups[0]["lr"] == 1e-2  # the rule's recommended scratch lr
    model(torch.randn(4, 8)).sum().backward()
    opt.step()
    saved = opt.state_dict()
    assert saved["param_groups"][0]["roles"] == ["matrix", "vector", "head", "vector"]
    other = LearnedOptimizer(model.named_parameters(), rule)
    other.load_state_dict(saved)
    assert other.param_groups[0]["roles"] == ["matrix", "vector", "head", "vector"]
    custom = LearnedOptimizer([{"params": list(model.parameters()), "roles": ["matrix"] * 4}], rule)
    assert custom.param_groups[0]["roles"] == ["matrix"] * 4
    with pytest.raises(ValueError, match="unknown role 'hidden'"):
        LearnedOptimizer([{"params": list(model.parameters()), "roles": ["hidden"] * 4}], rule)
    with pytest.raises(ValueError, match="one role per parameter"):
        LearnedOptimizer([{"params": list(model.parameters()), "roles": ["matrix"]}], rule)
    with pytest.raises(ValueError, match="regime"):
        LearnedOptimizer(model.parameters(), rule, regime="pretrain")


def test_bundle_detects_regime_and_uses_the_rules_lr(tmp_path):
    from helpers import digits_bert
    from transformers import BertForSequenceClassification

    rule = hybrid_rule()
    fresh = digits_bert()
    assert detect_regime(fresh) == "scratch"
    opt, _ = Bundle(fresh, rule).optimizer()
    assert {g["lr"] for g in opt.param_groups} == {1e-2}
    fresh.save_pretrained(tmp_path / "m")
    pretrained = BertForSequenceClassification.from_pretrained(tmp_path / "m")
    assert detect_regime(pretrained) == "finetune"
    opt, _ = Bundle(pretrained, rule).optimizer()
    assert {g["lr"] for g in opt.param_groups} == {1e-4}
    opt, _ = Bundle(pretrained, rule).optimizer(lr=3e-4)
    assert {g["lr"] for g in opt.param_groups} == {3e-4}
    roles = model_roles(pretrained)
    assert roles["bert.embeddings.word_embeddings.weight"] == "embedding"
    assert roles["classifier.weight"] == "head"
    assert roles["bert.encoder.layer.0.attention.self.query.weight"] == "matrix"


def test_hybrid_rule_trains_a_real_model():
    from helpers import digits_dataset

    torch.manual_seed(0)
    data = digits_dataset(256)
    x = torch.tensor(data["input_ids"], dtype=torch.float32)[:, 1:] / 17
    y = torch.tensor(data["labels"])
    model = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 10))
    opt, sched = Bundle(model, hybrid_rule()).optimizer()
    losses = []
    for step in range(60):
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]


# ---- meta-training tasks --------------------------------------------------------------------------------


def test_conv_task_matches_a_torch_conv_net_per_copy():
    task = T.ConvClassifier("digits8", channels=(4, 6), activation="relu", batch_size=5)
    gen = torch.Generator().manual_seed(0)
    params = task.init_params(gen, 3)
    batch = task.sample_batch(gen, 3)
    losses = task.loss(params, batch)
    for c in range(3):
        x = batch[0][c].view(-1, 1, 8, 8)
        x = torch.relu(nn.functional.conv2d(x, params["conv0.weight"][c], params["conv0.bias"][c], padding=1))
        x = torch.relu(nn.functional.conv2d(x, params["conv1.weight"][c], params["conv1.bias"][c], padding=1))
        x = nn.functional.avg_pool2d(x, 2).mean((-2, -1))
        logits = x @ params["head.weight"][c].T + params["head.bias"][c]
        assert torch.allclose(losses[c], nn.functional.cross_entropy(logits, batch[1][c]), rtol=1e-5)
    assert U.task_roles(task, params) == {
        "conv0.weight": "matrix", "conv0.bias": "vector", "conv1.weight": "matrix", "conv1.bias": "vector",
        "head.weight": "head", "head.bias": "vector",
    }


@pytest.mark.slow
def test_finetune_episode_starts_from_cached_pretrained_body(tmp_path, monkeypatch):
    monkeypatch.setenv("OPTBUNDLE_CACHE", str(tmp_path))
    spec = dict(family="mlp", dataset="digits8", hidden=[16], activation="relu", batch_size=32,
                input_scale=1.0, label_noise=0.0, pretrain_dataset="mnist8", pretrain_steps=30)
    task = T.build_task(spec)
    assert task.spec == spec
    params = task.init_params(torch.Generator().manual_seed(0), 3)
    cached = T.pretrained_weights(T.MLPClassifier("mnist8", (16,), "relu", 64), 30)
    assert len(list((tmp_path / "pretrained-tasks").glob("*.safetensors"))) == 1
    for c in range(3):  # each instance's body is one of the pre-trained copies; the head is fresh
        assert any(torch.equal(params["layer0.weight"][c], w) for w in cached["layer0.weight"])
        assert not any(torch.equal(params["layer1.weight"][c], w) for w in cached["layer1.weight"])
    scratch = T.build_task({k: v for k, v in spec.items() if not k.startswith("pretrain")})
    assert not torch.equal(scratch.init_params(torch.Generator().manual_seed(0), 3)["layer0.weight"], params["layer0.weight"])


def test_format2_state_is_16_bytes_per_parameter():
    rule = hybrid_rule()
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    opt = LearnedOptimizer(model.named_parameters(), rule)
    model(torch.randn(4, 32)).sum().backward()
    opt.step()
    per_param = {
        n: sum(v.numel() * v.element_size() for v in opt.state[p].values() if v.dim() > 0) / p.numel()
        for n, p in model.named_parameters()
    }
    assert set(per_param.values()) == {16.0}  # three momenta + the second moment, fp32
    # format-1 rules keep their layout (factored statistics included)
    v1 = LearnedOptimizer(model.named_parameters(), load_rule("adam-init"))
    v1.step()
    assert "row_second_moment" in v1.state[model[0].weight]


def test_bundle_records_roles_and_knows_it_is_pretrained(tmp_path):
    from helpers import digits_bert

    from optbundle.store.bundle import read_roles
    from optbundle.files import CorruptFileError

    model = digits_bert()
    override = {"bert.pooler.dense.weight": "head"}
    bundle = Bundle(model, hybrid_rule(), roles=override)
    opt, _ = bundle.optimizer()
    assert opt.param_groups[0]["lr"] == 1e-2  # a fresh model: the rule's scratch lr
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    roles = dict(zip(names, opt.param_groups[0]["roles"]))
    assert roles["bert.pooler.dense.weight"] == "head" and roles["bert.encoder.layer.0.attention.self.query.weight"] == "matrix"
    bundle.save_pretrained(tmp_path / "b")
    saved = json.loads((tmp_path / "b" / "optimizer" / "roles.json").read_text())
    assert saved["roles"] == roles and saved["regime"] == "scratch"
    loaded = Bundle.from_pretrained(tmp_path / "b")  # no optimizer state: trained weights to fine-tune
    assert loaded.regime == "finetune" and loaded.roles == roles
    opt, _ = loaded.optimizer()
    assert opt.param_groups[0]["lr"] == 1e-4 and dict(zip(names, opt.param_groups[0]["roles"])) == roles
    # a format-1 bundle writes no roles file
    Bundle(model, load_rule("default-v2")).save_pretrained(tmp_path / "v1")
    assert not (tmp_path / "v1" / "optimizer" / "roles.json").exists()
    with pytest.raises(ValueError, match="unknown role"):
        Bundle(model, hybrid_rule(), roles={"classifier.weight": "readout"})
    with pytest.raises(ValueError, match="no parameter named"):
        Bundle(model, hybrid_rule(), roles={"nope.weight": "matrix"})
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "roles.json").write_text(json.dumps({"format_version": 1, "roles": {"classifier.weight": "x"}}))
    with pytest.raises(CorruptFileError, match="unknown role"):
        read_roles(tmp_path / "bad", model)
    # with its accumulators a bundle continues the run in the regime it was trained in
    run_opt, _ = bundle.optimizer()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    run_opt.step()
    bundle.set_state(run_opt)
    bundle.save_pretrained(tmp_path / "with-state")
    assert Bundle.from_pretrained(tmp_path / "with-state").regime == "scratch"


def test_finetune_head_lr_trains_a_new_head_at_the_scratch_lr(tmp_path):
    """``finetune_head_lr: scratch``: in the finetune regime the head's step is scratch/finetune times larger,
    every other tensor's is unchanged; in the scratch regime nothing changes; the field round-trips, and rules
    saved without it (default-v3) load as "finetune" with their bytes and hash unchanged."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    names = [n for n, _ in model.named_parameters()]
    roles = assign_roles([(n, tuple(p.shape)) for n, p in model.named_parameters()])
    assert roles[names.index("2.weight")] == "head"

    def one_step(head_lr: str, regime: str) -> dict[str, torch.Tensor]:
        m = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
        m.load_state_dict(model.state_dict())
        rule = hybrid_rule(finetune_head_lr=head_lr)
        opt = LearnedOptimizer([{"params": list(m.parameters()), "param_names": names}], rule, regime=regime)
        nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
        return {n: (p.detach() - model.state_dict()[n]) for n, p in m.named_parameters()}

    base, head = one_step("finetune", "finetune"), one_step("scratch", "finetune")
    factor = HYBRID["recommended_lr"]["scratch"] / HYBRID["recommended_lr"]["finetune"]
    for name in names:
        expected = factor if name == "2.weight" else 1.0
        torch.testing.assert_close(head[name], base[name] * expected, rtol=1e-4, atol=1e-9)
    scratch_a, scratch_b = one_step("finetune", "scratch"), one_step("scratch", "scratch")
    for name in names:
        torch.testing.assert_close(scratch_a[name], scratch_b[name], rtol=0, atol=0)

    rule = hybrid_rule(finetune_head_lr="scratch")
    rule.save_pretrained(tmp_path / "r")
    assert LearnedRule.from_pretrained(tmp_path / "r").config.finetune_head_lr == "scratch"
    with pytest.raises(RuleConfigError, match="finetune_head_lr"):
        RuleConfig(**{**HYBRID, "finetune_head_lr": "fast"})
    v3 = json.loads((PRETRAINED_DIR / "default-v3" / "rule_config.json").read_text())
    assert "finetune_head_lr" not in v3
    assert load_rule("default-v3").config.to_json() == json.dumps(v3, indent=2, sort_keys=True)


def test_inverse_sqrt_schedule_scales_each_step_by_the_rules_decay():
    """``schedule: inverse_sqrt``: step t's update is the constant rule's × (1 + t/schedule_steps)^-½ (same
    accumulators, so the ratio is exact up to rounding), in the optimizer and in batched meta-training steps."""
    torch.manual_seed(0)
    constant, decayed = hybrid_rule(zero=False), hybrid_rule(zero=False, schedule="inverse_sqrt", schedule_steps=4.0)
    param = torch.randn(16, 8)
    state_c, state_d = F.init_state(constant.config, param.shape), F.init_state(decayed.config, param.shape)
    pc, pd = param.clone(), param.clone()
    for t in range(6):
        grad = torch.randn(16, 8)
        new_c, state_c = F.learned_update(constant.config, constant.weights, pc, grad, state_c, lr=1e-2, role="matrix")
        new_d, state_d = F.learned_update(decayed.config, decayed.weights, pc, grad, state_d, lr=1e-2, role="matrix")
        torch.testing.assert_close(pc - new_d, (pc - new_c) / math.sqrt(1 + t / 4.0), rtol=1e-4, atol=3e-7)  # fp32 rounding of p
        pc = new_c
    # batched (meta-training) copies: each copy decays by its own step count
    batched = F.init_state(decayed.config, param.shape, batch_shape=(2,))
    batched["step"] = torch.tensor([0, 8])
    grad = torch.randn(2, 16, 8)
    stacked = param.expand(2, 16, 8).clone()
    new, _ = F.learned_update(decayed.config, decayed.weights, stacked, grad, batched, lr=1e-2, batch_dims=1, role="matrix")
    one = {k: v[0] for k, v in batched.items()}
    first, _ = F.learned_update(decayed.config, decayed.weights, stacked[0], grad[0], one, lr=1e-2, role="matrix")
    torch.testing.assert_close(new[0], first)
    with pytest.raises(RuleConfigError, match="schedule_steps"):
        RuleConfig(**{**HYBRID, "schedule": "inverse_sqrt", "schedule_steps": float("nan")})
    with pytest.raises(RuleConfigError, match="schedule"):
        RuleConfig(**{**HYBRID, "output": "adam_residual", "orthogonal_roles": [], "schedule": "inverse_sqrt"})


def test_finetune_depth_scaling_steps_pretrained_tensors_less_when_many_matrices_train(tmp_path):
    """``finetune_depth_matrices`` B: fine-tuning a model whose optimizer trains n > B hidden matrices steps every
    pretrained tensor (matrices, biases; not a new head under ``finetune_head_lr: scratch``, not an adapter) at
    ``(B/n)^exponent`` of the lr; n ≤ B, the scratch regime and B = 0 change nothing; the fields are validated,
    round-trip, and rules saved without them keep their bytes."""
    from optbundle.step.roles import regime_lr_factor, trained_matrices

    torch.manual_seed(0)
    layers = [nn.Linear(6, 16), nn.ReLU()] + [m for _ in range(3) for m in (nn.Linear(16, 16), nn.ReLU())] + [nn.Linear(16, 3)]
    model = nn.Sequential(*layers)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    names = [n for n, _ in model.named_parameters()]
    roles = assign_roles([(n, tuple(p.shape)) for n, p in model.named_parameters()])
    assert trained_matrices(roles) == 4 and roles[-2] == "head"

    def one_step(regime: str, **fields) -> dict[str, torch.Tensor]:
        m = nn.Sequential(*[type(l)(l.in_features, l.out_features) if isinstance(l, nn.Linear) else l for l in layers])
        m.load_state_dict(model.state_dict())
        rule = hybrid_rule(finetune_head_lr="scratch", **fields)
        opt = LearnedOptimizer([{"params": list(m.parameters()), "param_names": names}], rule, regime=regime)
        nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
        return {n: (p.detach() - model.state_dict()[n]) for n, p in m.named_parameters()}

    base = one_step("finetune")
    for exponent in (0.5, 1.0):
        deep = one_step("finetune", finetune_depth_matrices=2, finetune_depth_exponent=exponent)
        for name, role in zip(names, roles):
            expected = 1.0 if role == "head" else (2 / 4) ** exponent
            torch.testing.assert_close(deep[name], base[name] * expected, rtol=1e-4, atol=1e-7)  # p's fp32 rounding
    for regime, fields in (("finetune", dict(finetune_depth_matrices=4)), ("scratch", dict(finetune_depth_matrices=2))):
        same, reference_step = one_step(regime, **fields), one_step(regime)
        for name in names:
            torch.testing.assert_close(same[name], reference_step[name], rtol=0, atol=0)

    config = RuleConfig(**{**HYBRID, "finetune_depth_matrices": 8, "finetune_depth_exponent": 1.0})
    assert regime_lr_factor(config, "adapter", "finetune", 100) == 1.0  # LoRA matrices are new, not pretrained
    assert regime_lr_factor(config, "embedding", "finetune", 32) == pytest.approx(0.25)
    assert regime_lr_factor(config, "matrix", "scratch", 32) == 1.0
    rule = hybrid_rule(finetune_depth_matrices=8)
    rule.save_pretrained(tmp_path / "r")
    assert LearnedRule.from_pretrained(tmp_path / "r").config.finetune_depth_matrices == 8
    assert "finetune_depth_matrices" not in json.loads(hybrid_rule().config.to_json())
    for field, value in (("finetune_depth_matrices", -1), ("finetune_depth_matrices", 2.5), ("finetune_depth_exponent", 3.0)):
        with pytest.raises(RuleConfigError, match=field):
            RuleConfig(**{**HYBRID, field: value})
    with pytest.raises(RuleConfigError, match="finetune_depth_matrices"):
        RuleConfig(finetune_depth_matrices=8)
