"""MetaTrainer: resume-after-kill gives bit-identical φ, masks freeze φ, outputs, task families, vectorization."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from optbundle import LearnedRule, load_rule
from optbundle.step import reference as F
from optbundle.files import load_safetensors_file
from optbundle.meta import MetaTrainConfig, MetaTrainer, ModuleTask, tasks as T, unroll as U
from optbundle.meta.evaluate import adam_rule, loss_curves

TINY = dict(
    name="tiny-test",
    seed=3,
    init="scratch",
    rule_config=dict(
        features=["grad", "momentum", "adam_direction", "time"],
        hidden_sizes=[4],
        output="adam_residual",
        step_mult=0.01,
        magnitude_bound=1.0,
    ),
    zero_init_last_layer=False,
    estimator="pes",
    truncation=3,
    episode_length=[4, 9],
    task_groups=3,
    instances_per_group=2,
    tasks=[{"family": "mlp", "datasets": ["digits8"], "width": [4, 8], "depth": [1, 1], "batch_sizes": [16]}],
    reparam_range=[0.5, 2.0],
    outer_lr=0.01,
    meta_steps=8,
    checkpoint_every=1,
    progress=False,
    threads=1,  # bit-identity across processes needs the same intra-op thread count
)


@pytest.fixture(autouse=True)
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def tiny(tmp_path, **overrides):
    data = {**TINY, "out_dir": str(tmp_path), **overrides}
    return MetaTrainConfig.from_dict(data)


@pytest.mark.slow
def test_resume_in_process_is_bit_identical(tmp_path):
    reference = MetaTrainer(tiny(tmp_path / "a"))
    reference.train()
    # the same run, stopped after every meta-step (max_wall_time_s=0) and resumed by a fresh trainer each time
    resumes = 0
    while True:
        trainer = MetaTrainer(tiny(tmp_path / "b", max_wall_time_s=0.0))
        if trainer.train() is not None:
            break
        resumes += 1
    assert resumes == TINY["meta_steps"] - 1
    assert torch.equal(trainer.theta, reference.theta)
    assert [h["meta_loss"] for h in trainer.history] == [h["meta_loss"] for h in reference.history]
    assert not torch.equal(reference.theta, U.flatten_rule(reference.parent)), "φ did not move"


@pytest.mark.slow
def test_resume_after_sigkill_is_bit_identical(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({**TINY, "meta_steps": 14}))
    command = [sys.executable, "-m", "optbundle.meta.train", str(recipe), "--out-dir", str(tmp_path / "killed"), "--no-progress"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pointer = tmp_path / "killed" / "checkpoints" / "latest.json"
    deadline = time.time() + 60
    while time.time() < deadline and not (pointer.exists() and json.loads(pointer.read_text())["meta_step"] >= 3):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = json.loads(pointer.read_text())["meta_step"]
    assert 3 <= killed_at < 14, killed_at
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    resumed = LearnedRule.from_pretrained(tmp_path / "killed" / "rule")
    reference = MetaTrainer(tiny(tmp_path / "uninterrupted", meta_steps=14))
    reference.train()
    assert torch.equal(U.flatten_rule(resumed), reference.theta)


@pytest.mark.slow
def test_mask_freezes_phi_and_outputs(tmp_path):
    trainer = MetaTrainer(tiny(tmp_path, trainable="last_layer", meta_steps=4, estimator="tbptt"))
    start = trainer.theta.clone()
    rule = trainer.train()
    mask = U.parameter_mask(trainer.rule_config, "last_layer")
    assert torch.equal(trainer.theta[mask == 0], start[mask == 0])
    assert not torch.equal(trainer.theta[mask == 1], start[mask == 1])
    saved = load_rule(tmp_path / "rule")
    assert torch.equal(U.flatten_rule(saved), U.flatten_rule(rule))
    prov = saved.provenance
    assert prov["meta_trained"] is True and prov["recipe"] == "tiny-test" and prov["estimator"] == "tbptt"
    assert prov["meta_steps"] == 4 and prov["seed"] == 3 and len(prov["parent_rule"]) == 64
    assert (tmp_path / "meta_loss.png").read_bytes()[:4] == b"\x89PNG"
    checkpoint = sorted((tmp_path / "checkpoints").glob("step-*"))[-1]
    assert not list(checkpoint.glob("*.pt")) and (checkpoint / "outer.safetensors").exists()


def test_es_estimator_runs_and_learns_direction(tmp_path):
    trainer = MetaTrainer(tiny(tmp_path, estimator="es", meta_steps=2, episode_length=[4, 4]))
    trainer.train()
    assert all(g.episode_step == 4 for g in trainer.groups)


@pytest.mark.slow
@pytest.mark.parametrize(
    "spec",
    [
        dict(family="mlp", dataset="digits8", hidden=[32], activation="relu", batch_size=64, input_scale=1.0, label_noise=0.0),
        dict(family="mlp", dataset="mnist8", hidden=[32, 32], activation="tanh", batch_size=64, input_scale=2.0, label_noise=0.1),
        dict(family="mlp", dataset="mnist28", hidden=[64], activation="gelu", batch_size=64, input_scale=1.0, label_noise=0.0),
        dict(family="char_lm", d_model=16, layers=1, heads=2, context=16, batch_size=8, genres=["comedies"]),
    ],
)
def test_task_families_losses_fall(spec):
    curves = loss_curves(adam_rule(3e-3), spec, 80, seeds=2)
    assert torch.isfinite(curves).all()
    assert curves[:, -10:].mean() < 0.8 * curves[:, :5].mean()


def test_module_task_with_functional_call_learns():
    torch.manual_seed(0)
    inputs = torch.randn(256, 5)
    targets = (inputs[:, 0] + inputs[:, 1] > 0).long()
    module = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.ReLU(), torch.nn.Linear(16, 2))
    before = {k: v.clone() for k, v in module.state_dict().items()}
    task = ModuleTask.from_tensors(module, inputs, targets, batch_size=32, name="toy")
    curves = loss_curves(adam_rule(1e-2), task, 60, seeds=3)
    assert curves[:, -10:].mean() < 0.6 * curves[:, :5].mean()
    assert all(torch.equal(v, module.state_dict()[k]) for k, v in before.items()), "module was modified"
    # the stacked loss of copy c equals the module's own loss on copy c's batch
    params = task.init_params(torch.Generator().manual_seed(0), 3)
    batch = task.sample_batch(torch.Generator().manual_seed(1), 3)
    stacked = task.loss(params, batch)
    for c in range(3):
        assert torch.allclose(stacked[c], torch.nn.functional.cross_entropy(module(batch[0][c]), batch[1][c]), atol=1e-6)


def test_module_task_meta_training_runs(tmp_path):
    torch.manual_seed(0)
    inputs = torch.randn(128, 4)
    targets = (inputs.sum(-1) > 0).long()
    module = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    task = ModuleTask.from_tensors(module, inputs, targets, batch_size=16, name="toy", init_noise=0.1)
    trainer = MetaTrainer(tiny(tmp_path, meta_steps=3, reparam_range=None), task=task)
    rule = trainer.train()
    assert rule.provenance["tasks"] == [{"family": "module", "name": "toy"}]
    resumed = MetaTrainer(tiny(tmp_path, meta_steps=3, reparam_range=None), task=task)
    assert resumed.meta_step == 3 and torch.equal(resumed.theta, trainer.theta)


def test_vectorized_copies_match_single_copy_runs():
    """Copy c of a stacked unroll (its own perturbed φ, data and scales) equals running copy c alone."""
    config = MetaTrainConfig(**{k: v for k, v in TINY.items() if k in ("rule_config",)}).rule_config
    from optbundle import RuleConfig

    rule_config = RuleConfig(**config)
    rule = LearnedRule(rule_config)
    theta = U.flatten_rule(rule)
    task = T.build_task(dict(family="mlp", dataset="digits8", hidden=[8], activation="relu", batch_size=16, input_scale=1.0, label_noise=0.0))
    gen = torch.Generator().manual_seed(0)
    params = task.init_params(gen, 4)
    scales = T.sample_reparam_scales(params, gen, 0.5, 2.0)
    params = T.reparametrize(params, scales, inverse=True)
    weights = U.unflatten_weights(rule_config, theta + 0.05 * torch.randn(4, theta.numel(), generator=gen))
    state = {k: F.init_state(rule_config, v.shape[1:], batch_shape=(4,)) for k, v in params.items()}
    batches = [task.sample_batch(gen, 4) for _ in range(3)]
    stacked_params, stacked_state = params, state
    for batch in batches:
        _, stacked_params, stacked_state = U.inner_step(rule_config, weights, task, stacked_params, stacked_state, batch, scales)
    for c in range(4):
        p = {k: v[c : c + 1] for k, v in params.items()}
        s = {k: {kk: vv[c : c + 1] for kk, vv in st.items()} for k, st in state.items()}
        w = [(a[c : c + 1], b[c : c + 1]) for a, b in weights]
        sc = {k: v[c : c + 1] for k, v in scales.items()}
        for batch in batches:
            _, p, s = U.inner_step(rule_config, w, task, p, s, tuple(b[c : c + 1] for b in batch), sc)
        for k in p:
            assert torch.allclose(p[k][0], stacked_params[k][c], atol=1e-6, rtol=1e-5)


def test_consuming_inner_step_gives_the_same_step_and_empties_its_inputs():
    """``consume=True`` (what the PES/ES unroll uses) frees the old parameters and accumulators as it goes:
    same losses, parameters and accumulators as the pure step, and the input dicts end up empty."""
    from optbundle import RuleConfig

    rule_config = RuleConfig(**TINY["rule_config"])
    theta = U.flatten_rule(LearnedRule(rule_config))
    task = T.build_task(dict(family="mlp", dataset="digits8", hidden=[8], activation="relu", batch_size=16, input_scale=1.0, label_noise=0.0))
    gen = torch.Generator().manual_seed(1)
    params = task.init_params(gen, 2)
    weights = U.unflatten_weights(rule_config, theta + 0.05 * torch.randn(2, theta.numel(), generator=gen))
    state = {k: F.init_state(rule_config, v.shape[1:], batch_shape=(2,)) for k, v in params.items()}
    batch = task.sample_batch(gen, 2)
    losses, new_params, new_state = U.inner_step(rule_config, weights, task, params, state, batch)
    given_params, given_state = dict(params), dict(state)
    consumed = U.inner_step(rule_config, weights, task, given_params, given_state, batch, consume=True)
    assert given_params == {} and given_state == {}
    assert torch.equal(consumed[0], losses)
    for k in params:
        assert torch.equal(consumed[1][k], new_params[k])
        for key in new_state[k]:
            assert torch.equal(consumed[2][k][key], new_state[k][key])
    with pytest.raises(ValueError, match="consume needs differentiable=False"):
        U.inner_step(rule_config, weights, task, dict(params), dict(state), batch, differentiable=True, consume=True)


def test_reparametrization_preserves_the_function():
    task = T.build_task(dict(family="mlp", dataset="digits8", hidden=[8], activation="tanh", batch_size=16, input_scale=1.0, label_noise=0.0))
    gen = torch.Generator().manual_seed(0)
    params = task.init_params(gen, 2)
    scales = T.sample_reparam_scales(params, gen, 1e-3, 1e3)
    theta = T.reparametrize(params, scales, inverse=True)
    batch = task.sample_batch(gen, 2)
    assert torch.allclose(task.loss(T.reparametrize(theta, scales, inverse=False), batch), task.loss(params, batch), rtol=1e-5)


@pytest.mark.parametrize(
    "name,recipe",
    [("default-v3", "meta-train-default"), ("default-v2", "meta-train-default-v2"), ("default-v1", "meta-train-default-v1")],
)
def test_shipped_meta_trained_rules_and_adam_init_remains(name, recipe):
    # default-v3 is made by recipes/meta-train-default.yaml; default-v2 and default-v1 were made by recipes/meta-train-default-v2.yaml and -v1.yaml (each was named
    # meta-train-default when it was trained, which their provenance records)
    from optbundle.meta.trainer import initial_rule, load_recipe

    rule = load_rule(name)
    assert rule.provenance["meta_trained"] is True
    assert rule.provenance["recipe"] == "meta-train-default"
    assert rule.provenance["estimator"] == "pes" and rule.provenance["meta_steps"] > 0
    config = load_recipe(recipe)
    assert rule.provenance["meta_steps"] == config.meta_steps
    adam_init = load_rule("adam-init")
    assert adam_init.provenance["meta_trained"] is False
    # the shipped φ is what the recipe's config describes, and it moved away from its (Adam) start
    start = initial_rule(config)
    assert rule.config == start.config
    assert not torch.equal(U.flatten_rule(rule), U.flatten_rule(start))
    # and it is a usable torch optimizer
    model = torch.nn.Linear(4, 2)
    from optbundle import LearnedOptimizer

    opt = LearnedOptimizer(model.parameters(), rule)
    model(torch.randn(8, 4)).pow(2).mean().backward()
    before = model.weight.detach().clone()
    opt.step()
    assert torch.isfinite(model.weight).all() and not torch.equal(before, model.weight)


def test_default_is_default_v3_phi_with_the_shipped_settings_of_ship_settings():
    """"default" (default-v7) is default-v3's φ bit for bit, with the settings of benchmarks/ship_settings.py."""
    import dataclasses

    import ship_settings  # benchmarks/ is on pytest's pythonpath (pyproject.toml)

    rule, parent = load_rule("default"), load_rule("default-v3")
    assert rule.content_hash() == load_rule("default-v7").content_hash()
    assert torch.equal(U.flatten_rule(rule), U.flatten_rule(parent))
    settings = {k: v for k, v in ship_settings.SETTINGS["default-v7"].items() if k not in ("parent", "section")}
    assert rule.config == dataclasses.replace(parent.config, **settings)
    assert rule.provenance["recipe"] == "meta-train-default"
    assert rule.provenance["settings_parent_rule"] == parent.content_hash()


def test_checkpoint_holds_the_outer_adamw_state_and_recipes_name_unknown_keys(tmp_path):
    trainer = MetaTrainer(tiny(tmp_path / "a"))
    trainer.train()
    resumed = MetaTrainer(tiny(tmp_path / "a"))  # loads the last checkpoint
    assert isinstance(resumed.outer, torch.optim.AdamW) and resumed.meta_step == trainer.meta_step
    saved, loaded = trainer.outer.state_dict()["state"][0], resumed.outer.state_dict()["state"][0]
    assert saved.keys() == loaded.keys() == {"step", "exp_avg", "exp_avg_sq"}
    assert int(loaded["step"]) == trainer.meta_step and all(torch.equal(saved[k], loaded[k]) for k in saved)
    assert resumed.outer.param_groups[0]["params"][0] is resumed.theta

    from optbundle.meta.trainer import load_recipe

    bad = tmp_path / "bad.yaml"
    bad.write_text("sigmaa: 0.1\n")
    with pytest.raises(ValueError, match=r"bad\.yaml: unknown key\(s\) sigmaa"):
        load_recipe(bad)
