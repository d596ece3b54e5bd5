"""Online refinement of the rule inside the real transformers.Trainer (tiny BERT on scikit-learn digits).

The model gets dropout (p=0.1) so that the probe's forward passes draw random numbers: the "does not disturb
training" test then also checks that the probe runs on a forked RNG stream. The dataset (256 images, batch 32)
ends its first epoch at step 8, after the first probe, so the main loader's reshuffle draws from the global
RNG after a probe has run.
"""

import pytest
import torch
from torch import nn
from transformers import Trainer

from helpers import digits_bert, digits_dataset, params_of, trainer_args
from optbundle import LearnedOptimizer, load_rule
from optbundle.meta.online import OnlineRefinementCallback
from optbundle.step.optimizer import constant_schedule

STEPS = 12


def _model():
    model = digits_bert()
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.1
    return model


def _train(tmp_path, callback=None, optimizer_cls=None):
    model = _model()
    if optimizer_cls is None:
        optimizer = LearnedOptimizer(model.parameters(), load_rule("adam-init"), lr=1.0)
    else:
        optimizer = optimizer_cls(model.parameters(), lr=1e-3)
    trainer = Trainer(
        model=model, args=trainer_args(tmp_path, STEPS), train_dataset=digits_dataset(256),
        optimizers=(optimizer, constant_schedule(optimizer)), callbacks=[callback] if callback else None,
    )
    trainer.train()
    return model, optimizer, trainer


def _phi(rule):
    return {k: v.detach().clone() for k, v in rule.state_dict().items()}


def test_refinement_changes_only_the_last_layer(tmp_path):
    callback = OnlineRefinementCallback(every=5, probe_steps=2, trainable="last_layer", sigma=0.01, outer_lr=1e-3)
    before = _phi(load_rule("adam-init"))
    _, optimizer, trainer = _train(tmp_path, callback)
    after = _phi(optimizer.rules["default"])
    last = len(optimizer.rules["default"].layers) - 1
    for name, value in before.items():
        if name.startswith(f"layers.{last}."):
            assert not torch.equal(value, after[name]), name
        else:
            assert torch.equal(value, after[name]), name
    assert after["layers.0.weight"].dtype == before["layers.0.weight"].dtype
    assert callback.probes == 2 and [h["step"] for h in callback.history] == [5, 10]
    assert 0 < callback.probe_seconds
    for entry in callback.history:
        assert 0 < entry["probe_fraction"] < 1
        assert entry["gradient_rms"] > 0
    logged = [h for h in trainer.state.log_history if "online_refinement_meta_loss_plus" in h]
    assert [h["step"] for h in logged] == [5, 10]
    summary = trainer.state.log_history[-1]
    assert summary["online_refinement_probes"] == 2 and 0 < summary["online_refinement_probe_fraction"] < 1

    refined = callback.refined_rule()
    assert refined is not optimizer.rules["default"]
    assert refined.content_hash() == optimizer.rules["default"].content_hash()
    assert refined.provenance["method"] == "online-refinement"
    assert refined.provenance["parent_rule"] == load_rule("adam-init").content_hash()
    assert refined.provenance["probes"] == 2 and refined.provenance["trainable"] == "last_layer"


def test_probe_does_not_disturb_training(tmp_path):
    plain, _, _ = _train(tmp_path / "plain")
    callback = OnlineRefinementCallback(every=5, probe_steps=2, outer_lr=0.0)
    probed, optimizer, _ = _train(tmp_path / "probed", callback)
    assert callback.probes == 2
    assert torch.equal(
        torch.cat([v.reshape(-1) for v in _phi(optimizer.rules["default"]).values()]),
        torch.cat([v.reshape(-1) for v in _phi(load_rule("adam-init")).values()]),
    )
    plain_params, probed_params = params_of(plain), params_of(probed)
    assert plain_params.keys() == probed_params.keys()
    for name, value in plain_params.items():
        assert torch.equal(value, probed_params[name]), name
    assert probed.training  # train/eval flags restored


def test_refinement_is_reproducible(tmp_path):
    phis = []
    for run in ("a", "b"):
        callback = OnlineRefinementCallback(every=5, probe_steps=2, pairs=2, trainable="all", seed=3)
        _, optimizer, _ = _train(tmp_path / run, callback)
        phis.append(_phi(optimizer.rules["default"]))
    assert not torch.equal(phis[0]["layers.0.weight"], _phi(load_rule("adam-init"))["layers.0.weight"])
    for name, value in phis[0].items():
        assert torch.equal(value, phis[1][name]), name


def test_plain_optimizer_is_rejected(tmp_path):
    with pytest.raises(TypeError, match="LearnedOptimizer"):
        _train(tmp_path, OnlineRefinementCallback(every=5, probe_steps=2), optimizer_cls=torch.optim.AdamW)
