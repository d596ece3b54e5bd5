"""Meta-refinement (`Bundle.refine`, `optbundle refine`): the mask, resume after a stop, provenance, errors.

Model: the tiny digits BERT of helpers.py (real data: scikit-learn digits as token sequences); the CLI test runs
the real MiniLM on real SMS data for a couple of meta-steps.
"""

import copy
import json

import pytest
import torch

from helpers import digits_bert, digits_dataset
from optbundle import Bundle, LearnedOptimizer, load_rule
from optbundle.meta import unroll as U
from optbundle.meta.refine import (
    RefineConfig,
    TransformersTask,
    finetune_curve,
    learned_optimizer_factory,
    token_data,
)

SMALL = dict(meta_steps=3, truncation=2, episode_length=[3, 6], pairs=2, batch_size=8, meta_batch_size=16,
             compare_steps=4, checkpoint_every=1, progress=False, sigma=0.05, outer_lr=0.05)


def _bundle(seed=0):
    return Bundle(digits_bert(seed, hidden=16), load_rule("adam-init"))


def _flat(rule):
    return U.flatten_rule(rule)


@pytest.mark.slow
@pytest.mark.parametrize("trainable", ["output_scale", "last_layer"])
def test_phi_changes_only_where_the_mask_allows(tmp_path, trainable):
    bundle = _bundle()
    refined = bundle.refine(digits_dataset(96), digits_dataset(48, offset=96), lr=2.0, trainable=trainable,
                            out_dir=str(tmp_path / "run"), **SMALL)
    before, after = _flat(bundle.rule), _flat(refined.rule)
    mask = U.parameter_mask(bundle.rule.config, trainable).bool()
    assert torch.equal(before[~mask], after[~mask])
    assert not torch.equal(before[mask], after[mask])
    # the lr multiplier is folded into the refined rule (it runs at lr=1)
    assert refined.rule.config.step_mult == pytest.approx(2.0 * bundle.rule.config.step_mult)
    assert refined.rule.config.features == bundle.rule.config.features


def test_output_scale_mask_is_the_magnitude_row():
    config = load_rule("adam-init").config
    mask = U.parameter_mask(config, "output_scale")
    hidden = config.layer_shapes()[-1][1]
    assert int(mask.sum()) == hidden + 1
    rule = load_rule("adam-init")
    names = U.rule_parameter_names(config)
    # mark each φ entry by where it lives and read back what the mask selects
    with torch.no_grad():
        for layer in rule.layers:
            layer.weight.zero_()
            layer.bias.zero_()
        rule.layers[-1].weight[1].fill_(1.0)
        rule.layers[-1].bias[1].fill_(1.0)
    assert torch.equal(U.flatten_rule(rule).bool(), mask.bool()), names


@pytest.mark.slow
def test_resume_after_stop_equals_uninterrupted_run(tmp_path):
    data, held_out = digits_dataset(96), digits_dataset(48, offset=96)
    whole = _bundle().refine(data, held_out, out_dir=str(tmp_path / "whole"), **SMALL)
    # a run stopped after every meta-step (max_wall_time_s=0), then resumed until done
    options = dict(SMALL, out_dir=str(tmp_path / "parts"), max_wall_time_s=0.0)
    results = [_bundle().refine(data, held_out, **options) for _ in range(SMALL["meta_steps"])]
    assert results[:-1] == [None] * (SMALL["meta_steps"] - 1)
    assert torch.equal(_flat(results[-1].rule), _flat(whole.rule))
    # a resume with different settings is refused, naming what differs
    with pytest.raises(RuntimeError, match="sigma"):
        _bundle().refine(data, held_out, **dict(options, sigma=0.2, meta_steps=5))


@pytest.mark.slow
def test_provenance_links_to_parent_and_refined_bundle_loads_and_trains(tmp_path):
    bundle = _bundle()
    refined = bundle.refine(digits_dataset(96), dataset_name="digits-tokens", out_dir=str(tmp_path / "run"), **SMALL)
    prov = refined.rule.provenance
    assert prov["method"] == "meta-refinement"
    assert prov["parent_rule"] == bundle.rule.content_hash()
    assert prov["data"]["name"] == "digits-tokens"
    assert prov["data"]["held_out_examples"] == 24 and prov["data"]["train_examples"] == 72  # meta_fraction 0.25
    assert prov["refine_config"]["trainable"] == "last_layer" and prov["meta_steps"] == 3
    numbers = prov["before_after"]
    assert numbers["steps"] == 4 and numbers["held_out_loss_parent"] > 0 and numbers["held_out_loss_refined"] > 0
    assert (tmp_path / "run" / "refinement.png").stat().st_size > 0
    assert json.loads((tmp_path / "run" / "refinement.json").read_text())["parent_rule"] == prov["parent_rule"]
    # saved, reloaded, it trains: the loss on a fixed batch falls under the refined rule
    loaded = Bundle.from_pretrained(refined.save_pretrained(tmp_path / "bundle"))
    assert loaded.rule.content_hash() == refined.rule.content_hash()
    assert loaded.rule.provenance["parent_rule"] == bundle.rule.content_hash()
    model = loaded.model
    optimizer = LearnedOptimizer(model.parameters(), loaded.rule, lr=10.0)
    batch = digits_dataset(32)
    ids, labels = torch.tensor(batch["input_ids"]), torch.tensor(batch["labels"])
    losses = []
    for _ in range(40):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss))
    assert losses[-1] < 0.8 * losses[0], losses


def test_meta_objective_is_the_held_out_split(tmp_path):
    train, held_out = token_data(digits_dataset(64), 0, 128), token_data(digits_dataset(32, offset=200), 0, 128)
    task = TransformersTask(digits_bert(0, hidden=16), train, held_out, batch_size=8, meta_batch_size=16)
    gen = torch.Generator().manual_seed(0)
    ids, mask, labels = task.sample_meta_batch(gen, 3)
    assert ids.shape[:2] == (3, 16) and torch.equal(ids[0], ids[2])  # one held-out batch shared by every instance
    rows = {tuple(r.tolist()) for r in held_out.input_ids}
    assert all(tuple(r.tolist()) in rows for r in ids[0])
    # the vmapped functional loss equals the module's own loss
    params = task.init_params(gen, 3)
    with torch.no_grad():
        expected = task.module(input_ids=ids[0], attention_mask=mask[0], labels=labels[0]).loss
        assert torch.allclose(task.loss(params, (ids, mask, labels)), expected.expand(3), rtol=1e-5, atol=1e-6)


def test_bad_input_is_named(tmp_path):
    bundle = _bundle()
    with pytest.raises(TypeError, match="unknown refinement option"):
        bundle.refine(digits_dataset(32), truncation_steps=3)
    with pytest.raises(ValueError, match="meta_fraction"):
        bundle.refine(digits_dataset(32), meta_fraction=1.5)
    with pytest.raises(ValueError, match="train_dataset: every example must be a mapping with 'input_ids'"):
        bundle.refine([{"text": "not tokenized"}])
    with pytest.raises(ValueError, match="eval_dataset is empty"):
        bundle.refine(digits_dataset(32), [])
    frozen = _bundle()
    frozen.model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        frozen.refine(digits_dataset(32))
    assert RefineConfig().trainable == "last_layer"


@pytest.mark.slow
def test_cli_refine_minilm_recipe(tmp_path, capsys):
    from optbundle.cli import main

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "model: minilm\ntask: sequence-classification\nnum_labels: 2\nlora_r: 4\nlora_target_modules: [query, value]\n"
        "dataset: sms-spam\nmax_length: 32\n"
        "train_size: 64\neval_size: 32\nrule: adam-init\nlr: 0.05\nmeta_steps: 2\ntruncation: 2\n"
        "episode_length: [2, 4]\npairs: 1\nbatch_size: 4\nmeta_batch_size: 8\ncompare_steps: 2\nprogress: false\n"
        f"out_dir: {tmp_path / 'run'}\n"
    )
    assert main(["refine", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "refined bundle:" in out and "held-out loss after 2 fine-tuning steps" in out
    loaded = Bundle.from_pretrained(tmp_path / "run" / "bundle")
    assert loaded.rule.provenance["data"]["name"] == "sms-spam"
    assert loaded.rule.provenance["parent_rule"] == load_rule("adam-init").content_hash()
    # the refined adapter bundle trains: a few learned steps lower the loss on a fixed batch
    from optbundle.apps.finetune import ModelArguments, load_tokenizer

    tokenizer = load_tokenizer(ModelArguments(model="minilm"))
    batch = tokenizer(["free prize call now", "see you at lunch", "win cash today", "ok thanks"], padding=True,
                      return_tensors="pt")
    labels = torch.tensor([1, 0, 1, 0])
    model = loaded.model
    optimizer, _ = loaded.optimizer(lr=5.0)
    losses = []
    for _ in range(8):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0], losses


@pytest.mark.slow
@pytest.mark.parametrize("progress", [True, False])
def test_before_after_runs_show_a_progress_bar_unless_quiet(tmp_path, capsys, progress):
    refined = _bundle().refine(digits_dataset(64), out_dir=str(tmp_path / "run"), **dict(SMALL, meta_steps=1, progress=progress))
    assert refined.rule.provenance["before_after"]["steps"] == SMALL["compare_steps"]
    err = capsys.readouterr().err
    for label in ("parent", "refined"):
        assert (f"before/after: {label} rule" in err) == progress, err
    if progress:
        assert f"{SMALL['compare_steps']}/{SMALL['compare_steps']}" in err


def test_learned_optimizer_factory_runs_a_rule_at_its_recommended_lr():
    """A format-2 rule's lr is AdamW's: the factory (the phi path's before/after runs) must not run it at 1.0."""
    named = list(digits_bert(0, hidden=16).named_parameters())
    default, adam_init = load_rule("default"), load_rule("adam-init")
    assert learned_optimizer_factory(default)(named).param_groups[0]["lr"] == default.config.recommended_lr["finetune"]
    scratch = learned_optimizer_factory(default, regime="scratch")(named)
    assert scratch.param_groups[0]["lr"] == default.config.recommended_lr["scratch"] and scratch.regime == "scratch"
    assert learned_optimizer_factory(adam_init)(named).param_groups[0]["lr"] == 1.0  # format 1: a multiplier
    roles = {n: "matrix" for n, _ in named}
    assert set(learned_optimizer_factory(default, roles=roles)(named).param_groups[0]["roles"]) == {"matrix"}


def test_phi_refinement_of_a_format2_rule_runs_as_the_bundles_optimizer(tmp_path):
    """adapt="phi" on the shipped default: the unroll steps with the bundle's regime and roles, and the
    before/after parent run is exactly a fine-tune with ``bundle.build_optimizer`` (same batches and seed)."""
    train, held_out = digits_dataset(64), digits_dataset(32, offset=96)
    bundle = Bundle(digits_bert(0, hidden=16), load_rule("default"), roles={"classifier.weight": "matrix"})
    start = copy.deepcopy(bundle.model)
    options = dict(SMALL, meta_steps=1, truncation=2, episode_length=[2, 2], pairs=1, outer_lr=0.0)
    refined = bundle.refine(train, held_out, out_dir=str(tmp_path / "run"), **options)
    reported = refined.rule.provenance["before_after"]["held_out_loss_parent"]
    own = Bundle(start, load_rule("default"), roles=bundle.roles)
    pad = 0
    expected = finetune_curve(start, lambda _named: own.build_optimizer(start), token_data(train, pad, 128),
                              token_data(held_out, pad, 128), options["compare_steps"], seed=1,  # refine seed 0, + 1
                              batch_size=options["batch_size"])["final"]
    assert reported == pytest.approx(expected, rel=1e-5)
    # the unroll's task gets the bundle's roles (the override included) and regime
    task = TransformersTask(bundle.model, token_data(train, pad, 128), token_data(held_out, pad, 128), 8, 16,
                            regime=bundle.regime or "scratch", roles=bundle.resolved_roles(bundle.model))
    roles = U.task_roles(task, task.init_params(torch.Generator().manual_seed(0), 2))
    assert roles["classifier.weight"] == "matrix" and roles["classifier.bias"] == "vector"
    assert U.task_lr(bundle.rule.config, task) == bundle.rule.config.recommended_lr["scratch"]
