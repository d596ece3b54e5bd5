"""Scalar refinement (`Bundle.refine(adapt="scalars", budget=...)`, `optbundle.meta.scalars`): the budget is
counted and never exceeded, the refined scalars land in the rule's JSON and reload bit-identically, provenance
and card say what was done, bad budgets are named.

Model: the tiny digits BERT of helpers.py on real data (scikit-learn digits as token sequences), the shipped
default rule (format 2, inverse_sqrt schedule, per-role multipliers).
"""

import json
import math

import pytest
import torch

from helpers import digits_bert, digits_dataset
from optbundle import Bundle, load_rule
from optbundle.meta import scalars as S
from optbundle.meta.refine import RefineConfig, phi_budget

HORIZON = 5
#: 48 held-out examples = 1 evaluation batch, so one run costs HORIZON + 1 passes
SMALL = dict(adapt="scalars", horizon=HORIZON, batch_size=8, progress=False)


def _bundle(seed=0):
    return Bundle(digits_bert(seed, hidden=16), load_rule("default"))


def _refine(bundle, tmp_path, **kw):
    return bundle.refine(digits_dataset(96), digits_dataset(48, offset=96), out_dir=str(tmp_path / "run"), **SMALL, **kw)


@pytest.mark.parametrize("budget", ["sweep5", 6 * 3 + 4, "sweep2"])
def test_budget_is_counted_and_never_exceeded(tmp_path, budget):
    bundle = _bundle()
    before = {n: p.detach().clone() for n, p in bundle.model.named_parameters()}
    refined = _refine(bundle, tmp_path, budget=budget)
    spent = refined.rule.provenance["budget"]
    per_run = HORIZON + 1
    allowed = {"sweep5": 5 * per_run, "sweep2": 2 * per_run}.get(budget, budget)
    assert spent["passes"] == allowed
    assert spent["spent"] <= allowed
    assert spent["spent"] == spent["runs"] * per_run == len(refined.rule.provenance["search"]) * per_run
    assert spent["runs"] == allowed // per_run  # it uses what it may
    # the search fine-tuned copies of the weights: the bundle's model is back where it started
    assert all(torch.equal(p, before[n]) for n, p in bundle.model.named_parameters())


def test_pass_counter_refuses_to_overspend():
    counter = S.PassCounter(10)
    counter.charge(6, "run 1")
    assert not counter.affords(5)
    with pytest.raises(RuntimeError, match="budget"):
        counter.charge(5, "run 2")
    assert counter.spent == 6


@pytest.mark.parametrize("budget", ["sweep0", "sweep", "five", -3, 0, True, 2.5, "sweep5x"])
def test_bad_budget_is_named(budget):
    with pytest.raises(ValueError, match="budget"):
        RefineConfig.from_kwargs(adapt="scalars", budget=budget)


def test_budget_below_one_run_is_named(tmp_path):
    with pytest.raises(ValueError, match=r"budget .*does not pay for one run"):
        _refine(_bundle(), tmp_path, budget=HORIZON)


def test_bad_scalar_options_are_named(tmp_path):
    for kw, word in ((dict(adapt="weights"), "adapt"), (dict(horizon=0), "horizon"), (dict(scalar_step=1.0), "scalar_step"),
                     (dict(starts=0), "starts")):
        with pytest.raises(ValueError, match=word):
            RefineConfig.from_kwargs(**kw)
    with pytest.raises(ValueError, match="unknown refinement scalar 'momentum'"):
        _refine(_bundle(), tmp_path, budget="sweep2", scalars=["momentum"])


def test_refined_scalars_are_in_the_json_and_reload_bit_identically(tmp_path):
    bundle = _bundle()
    refined = _refine(bundle, tmp_path, budget="sweep5")
    rule, parent = refined.rule, bundle.rule
    factors = rule.provenance["scalars"]
    assert rule.config.recommended_lr == pytest.approx({k: v * factors["lr"] for k, v in parent.config.recommended_lr.items()})
    assert rule.config.schedule_steps == pytest.approx(parent.config.schedule_steps * factors["schedule_steps"])
    for role in ("head", "matrix", "vector", "embedding"):
        assert rule.config.role_lr[role] == pytest.approx(parent.config.role_lr[role] * factors[f"role_lr.{role}"])
    assert rule.content_hash() != parent.content_hash()  # the search moved at least the step size here
    assert torch.equal(torch.cat([p.flatten() for p in rule.parameters()]), torch.cat([p.flatten() for p in parent.parameters()]))

    target = refined.save_pretrained(tmp_path / "bundle")
    config = json.loads((target / "optimizer" / "rule_config.json").read_text())
    assert config["recommended_lr"] == rule.config.recommended_lr and config["role_lr"] == rule.config.role_lr
    loaded = Bundle.from_pretrained(target)
    assert loaded.rule.content_hash() == rule.content_hash()
    assert loaded.rule.config.to_json() == rule.config.to_json() == (target / "optimizer" / "rule_config.json").read_text().strip()
    # runs with no arguments, exactly like the refined rule in memory
    stepped = []
    for b in (Bundle(digits_bert(3, hidden=16), rule), Bundle(digits_bert(3, hidden=16), loaded.rule)):
        opt, _ = b.optimizer()
        ids = torch.tensor([digits_dataset(8)[i]["input_ids"] for i in range(8)])
        b.model(input_ids=ids, labels=torch.tensor(digits_dataset(8)["labels"])).loss.backward()
        opt.step()
        stepped.append(torch.cat([p.detach().flatten() for p in b.model.parameters()]))
    assert torch.equal(*stepped)


def test_provenance_and_card_record_parent_data_budget_and_before_after(tmp_path):
    bundle = _bundle()
    refined = _refine(bundle, tmp_path, budget="sweep3", dataset_name="digits-as-tokens")
    prov = refined.rule.provenance
    assert prov["method"] == "scalar-refinement"
    assert prov["parent_rule"] == bundle.rule.content_hash()
    assert prov["data"]["name"] == "digits-as-tokens" and prov["data"]["held_out_examples"] == 48
    assert prov["budget"]["budget"] == "sweep3" and prov["budget"]["spent"] <= prov["budget"]["passes"]
    ba = prov["before_after"]
    assert ba["held_out_loss_parent"] == prov["search"][0]["held_out_loss"]
    assert ba["held_out_loss_refined"] == min(r["held_out_loss"] for r in prov["search"]) <= ba["held_out_loss_parent"]
    target = refined.save_pretrained(tmp_path / "bundle")
    png = target / "refinement.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "refinement.png" in json.loads((target / "bundle.json").read_text())["files"]
    card = (target / "README.md").read_text()
    assert "![before / after refinement](refinement.png)" in card and "scalar-refinement" in card
    assert Bundle.from_pretrained(target).attachments["refinement.png"] == png.read_bytes()


def test_scaled_rule_moves_only_the_named_scalars():
    rule = load_rule("default")
    scaled = S.scaled_rule(rule, {"lr": math.log(2.0), "role_lr.head": math.log(0.5), "schedule_steps": math.log(3.0)})
    config, parent = scaled.config, rule.config
    assert config.recommended_lr == pytest.approx({k: 2 * v for k, v in parent.recommended_lr.items()})
    assert config.role_lr["head"] == pytest.approx(0.5 * parent.role_lr["head"])
    assert {k: v for k, v in config.role_lr.items() if k != "head"} == {k: v for k, v in parent.role_lr.items() if k != "head"}
    assert config.schedule_steps == pytest.approx(3 * parent.schedule_steps)
    assert S.scaled_rule(rule, {}).content_hash() == rule.content_hash()
    assert S.scalar_names(rule, ["adapter", "head", "vector"]) == ["lr", "role_lr.head", "role_lr.adapter", "role_lr.vector", "schedule_steps"]
    assert S.scalar_names(rule, ["matrix"]) == ["lr", "schedule_steps"]


def test_coordinate_search_finds_a_quadratic_minimum_within_its_evaluations():
    target = {"lr": math.log(3.0), "role_lr.head": math.log(0.5)}
    calls = []

    def loss(x, label):
        calls.append(label)
        return sum((x[k] - target[k]) ** 2 for k in x)

    best, history = S.coordinate_search(loss, ["lr", "role_lr.head"], lambda: len(calls) < 12, 2.0)
    assert len(history) == len(calls) <= 12
    assert loss(best, "check") == min(h["held_out_loss"] for h in history)
    assert abs(best["lr"] - target["lr"]) < 0.05 and abs(best["role_lr.head"] - target["role_lr.head"]) < 0.05


def test_phi_budget_caps_meta_steps():
    cfg = RefineConfig.from_kwargs(budget="sweep5", horizon=40, pairs=2, truncation=8, meta_steps=100)
    capped = phi_budget(cfg, held_out_examples=128)
    per_meta_step = 1 * 2 * 2 * 8 * 2
    assert capped["passes"] == 5 * (40 + 2)
    assert capped["meta_steps"] == 5 * 42 // per_meta_step and capped["spent"] <= capped["passes"]
    assert phi_budget(RefineConfig.from_kwargs(), 128) is None


def test_every_candidate_run_starts_fresh_and_the_refined_rule_keeps_lr_adaptation(tmp_path):
    """default's per-tensor lr adaptation (`lr_log_scale` in optimizer state) starts at 0 in every candidate run:
    the same candidate twice scores the same, the parent scores what a plain fine-tune with the bundle's optimizer
    scores, and the refined rule keeps ``lr_adaptation``."""
    from optbundle.meta.refine import finetune_curve, token_data

    bundle = _bundle()
    assert bundle.rule.config.lr_adaptation == "gradient_alignment"
    train, held_out = token_data(digits_dataset(96), 0, 128), token_data(digits_dataset(48, offset=96), 0, 128)
    runner = S.CandidateRunner(bundle, train, held_out, HORIZON, 8, [0], S.PassCounter(100), finetune_curve)
    first, again = runner(bundle.rule, "parent")["held_out_loss"], runner(bundle.rule, "parent again")["held_out_loss"]
    assert first == again
    plain = Bundle(digits_bert(0, hidden=16), bundle.rule)
    optimizers = []

    def make(_named):
        optimizers.append(plain.build_optimizer(plain.model))
        return optimizers[-1]

    assert finetune_curve(plain.model, make, train, held_out, HORIZON, seed=0, batch_size=8, eval_start=False)["final"] == first
    adapted = [float(s["lr_log_scale"]) for s in optimizers[0].state.values()]
    assert any(v != 0 for v in adapted)  # the adaptation ran, so a run that reused its state would score differently
    refined = _refine(bundle, tmp_path, budget="sweep3")
    assert refined.rule.config.lr_adaptation == bundle.rule.config.lr_adaptation
    assert refined.rule.provenance["search"][0]["held_out_loss"] == first
