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
    moved = {k: f for k, f in prov["scalars"].items() if (f != 0.0 if k == "adam_form" else f != 1.0)}
    chosen = [entry for entry in prov["search"] if entry["scales"] == moved]
    assert len(chosen) == 1 and ba["held_out_loss_refined"] == chosen[0]["held_out_loss"] <= ba["held_out_loss_parent"]
    if moved:  # the default gate (1 SE, paired over held-out chunks) let the chosen candidate through
        assert chosen[0]["z"] > 1.0
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
    assert S.scalar_names(rule, ["matrix"]) == ["lr", "schedule_steps", "adam_form"]  # default orthogonalizes matrices
    assert S.scalar_names(rule, ["adapter", "head"]) == ["lr", "role_lr.head", "role_lr.adapter", "schedule_steps"]
    adam = S.scaled_rule(rule, {"adam_form": 1.0, "lr": math.log(0.125)})
    assert adam.config.orthogonal_roles == [] and rule.config.orthogonal_roles == ["matrix"]
    assert adam.config.recommended_lr == pytest.approx({k: v / 8 for k, v in parent.recommended_lr.items()})
    assert S.scaled_rule(rule, {"adam_form": 0.0}).content_hash() == rule.content_hash()
    with pytest.raises(ValueError, match="adam_form"):
        S.scaled_rule(rule, {"adam_form": 0.5})
    assert S.describe({"lr": 0.5, "schedule_steps": 1.0, "adam_form": 1.0}) == "lr ×0.5, adam_form"
    assert S.describe({"lr": 1.0, "adam_form": 0.0}) == "parent (no change)"


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
    # the search scores its final evaluation per chunk for the significance gate: the same examples, summed in
    # another order (float rounding only)
    assert refined.rule.provenance["search"][0]["held_out_loss"] == pytest.approx(first, rel=1e-6, abs=0)
    ungated = _refine(bundle, tmp_path / "ungated", budget="sweep3", significance=0)
    assert ungated.rule.provenance["search"][0]["held_out_loss"] == first


def test_paired_z_reads_a_consistent_gain_and_ignores_noise():
    best = [0.5 + 0.1 * (i % 4) for i in range(16)]
    shifted = [b - 0.02 + 0.001 * (i % 3) for i, b in enumerate(best)]  # every chunk lower by about 0.02
    assert S.paired_z(best, shifted) > 10
    noisy = [b + (0.2 if i % 2 else -0.21) for i, b in enumerate(best)]  # mean 0.005 lower, chunks ±0.2
    assert 0 < S.paired_z(best, noisy) < 0.5
    assert S.paired_z(best, None) == -math.inf and S.paired_z(None, best) == math.inf
    with pytest.raises(ValueError):
        S.paired_z(best, best[:-1])


def _chunked(target, noise, curvature, seed=0):
    """A search objective returning (mean, 16 chunk losses): a quadratic in lr, and per-chunk noise of SD
    ``noise`` that depends on the candidate (as another run's luck on each held-out chunk)."""
    def evaluate(x, label):
        g = torch.Generator().manual_seed(seed * 7919 + len(label) * 1009 + int(1e6 * abs(x["lr"])) % 100003)
        base = curvature * (x["lr"] - target) ** 2
        chunks = [base + noise * float(torch.randn((), generator=g)) for _ in range(16)]
        return sum(chunks) / 16, chunks
    return evaluate


def test_significance_gate_keeps_the_parent_against_noise_and_takes_a_real_gain():
    # a nearly flat objective (true gains < 0.001) under chunk noise of SD 0.1, 40 draws of the noise: the plain
    # search follows the noise away from the parent most of the time, the gate rarely (≈ 2.5% per comparison)
    moved_free = moved_gated = 0
    for seed in range(40):
        noise_only = _chunked(math.log(1.1), 0.1, 0.001, seed)
        free, free_history = S.coordinate_search(noise_only, ["lr"], lambda: True, 2.0)
        gated, gated_history = S.coordinate_search(noise_only, ["lr"], lambda: True, 2.0, significance=2.0)
        moved_free += free != {"lr": 0.0}
        moved_gated += gated != {"lr": 0.0}
        assert all("z" not in h for h in free_history) and all("z" in h for h in gated_history[1:])
    assert moved_free >= 20 and moved_gated <= 6
    # the optimum at lr ×2 with little noise: the gate takes the step
    real = _chunked(math.log(2.0), 0.001, 1.0)
    best, history = S.coordinate_search(real, ["lr"], lambda: True, 2.0, significance=2.0)
    assert best["lr"] == pytest.approx(math.log(2.0)) and max(h.get("z", 0) for h in history) > 2.0


def test_evaluate_chunks_scores_what_evaluate_loss_scores():
    from optbundle.meta.refine import evaluate_chunks, evaluate_loss, token_data

    model = digits_bert(0, hidden=16).eval()
    data = token_data(digits_dataset(48, offset=96), 0, 128)
    mean, chunks = evaluate_chunks(model, data, 16)
    assert len(chunks) == 16 and mean == pytest.approx(evaluate_loss(model, data), rel=1e-6)
    assert mean == pytest.approx(sum(chunks) / 16, rel=1e-6)  # 48 examples: 16 equal chunks
    assert len(evaluate_chunks(model, token_data(digits_dataset(5), 0, 128), 16)[1]) == 5  # one example per chunk


def test_refinement_with_the_gate_records_z_and_never_picks_an_insignificant_candidate(tmp_path):
    bundle = _refine(_bundle(), tmp_path, budget="sweep4", significance=1e6).rule
    prov = bundle.provenance
    assert all("z" in entry for entry in prov["search"][1:]) and len(prov["search"]) == 4
    # nothing can clear 1e6 standard errors: the parent's scalars and form
    assert prov["scalars"].pop("adam_form") == 0.0 and set(prov["scalars"].values()) == {1.0}
    assert any(entry["scales"].get("adam_form") == 1.0 for entry in prov["search"])  # the Adam form was tried
    assert prov["before_after"]["held_out_loss_refined"] == prov["before_after"]["held_out_loss_parent"]
    assert bundle.content_hash() == load_rule("default").content_hash()
    with pytest.raises(ValueError, match="significance"):
        RefineConfig.from_kwargs(significance=-1)


def test_the_search_tries_the_adam_form_after_the_parent_and_keeps_it_only_if_it_wins():
    names = ["lr", "schedule_steps", "adam_form"]
    alternatives = S.form_alternatives(names, 0.125, 2.0)
    assert [round(math.exp(a["lr"]), 6) for a in alternatives] == [0.125, 0.5, 0.03125]
    assert S.form_alternatives(["lr"], 0.125, 2.0) == [] and S.form_alternatives(names, None, 2.0) == []

    labels = []

    def loss(x, label):  # the Adam form is better, best at lr ×1/8; the rule's form best at ×1
        labels.append(label)
        return (0.5 if x["adam_form"] else 1.0) + (x["lr"] - (math.log(0.125) if x["adam_form"] else 0.0)) ** 2

    best, history = S.coordinate_search(loss, names, lambda: len(labels) < 6, 2.0, alternatives=alternatives)
    assert labels[:4] == ["parent", "lr×0.125 adam_form", "lr×0.5 adam_form", "lr×0.0313 adam_form"]
    assert labels[4] == "lr×0.25 adam_form"  # the coordinate steps go on from the best, and say so
    assert len(history) == 6 and best["adam_form"] == 1.0
    assert abs(best["lr"] - math.log(0.125)) < 1e-9 and best["schedule_steps"] == 0.0

    def worse(x, label):  # the Adam form never helps: the parent's form is kept, its lr then searched
        return (2.0 if x["adam_form"] else 1.0) + (x["lr"] - math.log(2.0)) ** 2

    best, history = S.coordinate_search(worse, names, lambda: True, 2.0, alternatives=alternatives)
    assert best["adam_form"] == 0.0 and abs(best["lr"] - math.log(2.0)) < 0.05

