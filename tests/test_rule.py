"""RuleConfig validation and (de)serialization; LearnedRule files; shipped rules."""

import json

import pytest
import torch

import optbundle
from optbundle import BundleError, LearnedOptimizer, LearnedRule, RuleConfig, load_rule
from optbundle.step import reference as F
from optbundle.files import CorruptFileError, FormatVersionError, RuleConfigError


def test_config_json_round_trip_stores_every_constant():
    config = RuleConfig(output="normalized", param_scale=True, hidden_sizes=[4, 4], step_mult=0.01)
    data = json.loads(config.to_json())
    for name in ("features", "momentum_decays", "second_moment_decay", "factored_decays", "time_scales",
                 "second_moment_eps", "factored_eps", "factored_rsqrt_eps", "normalization_eps", "hidden_sizes",
                 "activation", "output", "exp_mult", "step_mult", "param_scale", "format_version"):
        assert name in data
    assert RuleConfig.from_json(config.to_json()) == config


@pytest.mark.parametrize(
    "change, field",
    [
        ({"features": ["grad", "bogus"]}, "features"),
        ({"features": ["time", "grad"]}, "features"),
        ({"hidden_sizes": [4, 0]}, "hidden_sizes"),
        ({"hidden_sizes": [4, 2.5]}, "hidden_sizes"),
        ({"momentum_decays": [0.9, 1.0]}, "momentum_decays"),
        ({"activation": "swish9"}, "activation"),
        ({"output": "magic"}, "output"),
        ({"normalization_eps": 0}, "normalization_eps"),
        ({"momentum_decays": [0.9]}, "features"),  # adafactor_momentum needs K == J
    ],
)
def test_bad_config_names_the_field(change, field):
    with pytest.raises(RuleConfigError, match=f"RuleConfig.{field}"):
        RuleConfig(**change)


def test_newer_format_version_is_refused_clearly():
    data = RuleConfig().to_dict()
    data["format_version"] = 99
    with pytest.raises(FormatVersionError, match="upgrade optbundle"):
        RuleConfig.from_dict(data)
    assert issubclass(FormatVersionError, BundleError)


def test_unknown_and_missing_fields_are_errors():
    data = RuleConfig().to_dict()
    data["learning_rate"] = 3
    with pytest.raises(RuleConfigError, match="unknown field.*learning_rate"):
        RuleConfig.from_dict(data)
    data = RuleConfig().to_dict()
    del data["exp_mult"]
    with pytest.raises(RuleConfigError, match="missing field.*exp_mult"):
        RuleConfig.from_dict(data)


def test_rule_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    rule = LearnedRule(RuleConfig(hidden_sizes=[6]), provenance={"method": "test"})
    rule.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["provenance.json", "rule.safetensors", "rule_config.json"]
    loaded = LearnedRule.from_pretrained(tmp_path)
    assert loaded.config == rule.config
    assert loaded.provenance == {"method": "test"}
    assert loaded.content_hash() == rule.content_hash()
    for a, b in zip(rule.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)


def test_rule_weights_must_fit_config(tmp_path):
    LearnedRule(RuleConfig(hidden_sizes=[6])).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "rule_config.json").read_text())
    config["hidden_sizes"] = [7]
    (tmp_path / "rule_config.json").write_text(json.dumps(config))
    with pytest.raises(RuleConfigError, match="layers.0.weight.*shape"):
        LearnedRule.from_pretrained(tmp_path)
    (tmp_path / "rule.safetensors").write_bytes(b"\x00" * 5)
    with pytest.raises(CorruptFileError, match="rule.safetensors"):
        LearnedRule.from_pretrained(tmp_path)


def test_shipped_rules():
    adam_init = load_rule("adam-init")
    default = load_rule("default")
    assert adam_init.provenance["meta_trained"] is False
    assert "NOT meta-trained" in adam_init.provenance["description"]
    assert default.provenance.get("recipe")
    with pytest.raises(BundleError, match="neither a shipped rule"):
        load_rule("no-such-rule")


def adam_reference_step(params, grads_seq, lr=1e-3):
    """torch.optim.Adam's last step (p_T − p_{T−1}) along a given gradient sequence."""
    params = [torch.nn.Parameter(p.clone()) for p in params]
    adam = torch.optim.Adam(params, lr=lr)
    before = None
    for grads in grads_seq:
        before = [p.detach().clone() for p in params]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        adam.step()
    return [p.detach() - b for p, b in zip(params, before)], before


def test_adam_init_imitates_adam_on_random_problems():
    """On a real training trajectory (an MLP on random data, trained by Adam) the learned rule's step from the
    same accumulators has cosine similarity > 0.99 with Adam's step, per tensor, at many points in time."""
    rule = load_rule("adam-init")
    config = rule.config
    weights = [(w.detach(), b.detach()) for w, b in rule.weights]
    cosines, ratios = [], []
    for seed in range(3):
        torch.manual_seed(seed)
        width = 16 * (seed + 1)
        model = torch.nn.Sequential(torch.nn.Linear(10, width), torch.nn.Tanh(), torch.nn.Linear(width, 3))
        x, y = torch.randn(256, 10), torch.randint(0, 3, (256,))
        adam = torch.optim.Adam(model.parameters(), lr=1e-3)
        states = {p: F.init_state(config, p.shape) for p in model.parameters()}
        for step in range(1, 201):
            idx = torch.randint(0, 256, (32,))
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            adam.zero_grad()
            loss.backward()
            before = {p: p.detach().clone() for p in model.parameters()}
            adam.step()
            for p in model.parameters():
                new_p, states[p] = F.learned_update(config, weights, before[p], p.grad, states[p])
                if step in (1, 2, 5, 20, 100, 200):
                    ours, theirs = before[p] - new_p, before[p] - p.detach()
                    cosines.append(torch.nn.functional.cosine_similarity(ours.flatten(), theirs.flatten(), dim=0))
                    ratios.append(ours.norm() / theirs.norm())
    cosines = torch.stack(cosines)
    assert cosines.min() > 0.99, cosines.min()
    ratios = torch.stack(ratios)
    assert 0.3 < ratios.median() < 3.0  # magnitude: Adam's up to a per-tensor factor


def test_public_api():
    for name in ("RuleConfig", "LearnedRule", "LearnedOptimizer", "Bundle", "load_rule", "BundleError"):
        assert hasattr(optbundle, name)
    assert issubclass(LearnedOptimizer, torch.optim.Optimizer)
