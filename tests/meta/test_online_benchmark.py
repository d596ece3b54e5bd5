"""The online-refinement arm of ``benchmarks/refine.py`` (issue 16): `OnlineRefinementCallback` inside a real
`transformers.Trainer` fed `finetune_curve`'s batches, on a tiny BERT (scikit-learn digits)."""

import torch

import refine  # benchmarks/refine.py
from helpers import digits_bert, digits_dataset, params_of
from optbundle import Bundle, load_rule
from optbundle.meta.refine import finetune_curve, token_data

STEPS, BATCH, SEED = 8, 8, 5


def _data():
    return token_data(digits_dataset(128), 0, 72, "digits")


def test_online_arm_is_the_unrefined_run_plus_probes(tmp_path):
    data, rule = _data(), load_rule("default")
    plain = digits_bert()
    finetune_curve(plain, lambda _named: Bundle(plain, rule).build_optimizer(plain), data, data, STEPS, seed=SEED,
                   batch_size=BATCH, eval_every=STEPS + 1, eval_start=False)
    # outer lr 0: the probes run (and cost time) but φ stays, so training must be finetune_curve's run exactly:
    # same batches in the same order, eval mode, no clipping, the probe's state restored after each probe
    frozen = digits_bert()
    off = refine.finetune_online(frozen, rule, data, STEPS, SEED, BATCH, tmp_path / "off", every=4, probe_steps=2,
                                 pairs=1, outer_lr=0.0)
    assert off["probes"] == 2 and off["phi_change"] == 0.0
    for name, value in params_of(plain).items():
        assert torch.equal(value, params_of(frozen)[name]), name

    moved = digits_bert()
    on = refine.finetune_online(moved, rule, data, STEPS, SEED, BATCH, tmp_path / "on", every=4, probe_steps=2,
                                pairs=2, outer_lr=1e-2)
    assert on["probes"] == 2 and [h["step"] for h in on["history"]] == [4, 8]
    assert on["probe_passes"] == 2 * 2 * 2 * 2  # probes × (+/−) × pairs × probe steps
    assert 0 < on["probe_seconds"] < on["wall_s"] and on["probe_share"] == on["probe_seconds"] / on["wall_s"]
    assert on["phi_change"] > 0 and on["options"]["train_mode"] is False
    assert rule.content_hash() == load_rule("default").content_hash()  # the caller's rule is not refined in place
    # φ changed after the step-4 probe, so steps 5..8 differ from the plain run
    assert any(not torch.equal(v, params_of(moved)[n]) for n, v in params_of(plain).items())


def test_data_seed_changes_the_probe_batches_not_the_perturbation(tmp_path):
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from optbundle.meta.online import OnlineRefinementCallback

    data, rule = _data(), load_rule("default")
    model = digits_bert()
    optimizer = Bundle(model, rule).build_optimizer(model)
    model.eval()
    args = TrainingArguments(output_dir=str(tmp_path), max_grad_norm=0.0, report_to="none", use_cpu=True)
    loader = refine.index_loader(data, batch_size=BATCH)

    def delta(seed, data_seed):
        callback = OnlineRefinementCallback(every=1, probe_steps=2, sigma=0.1, outer_lr=0.0, seed=seed,
                                            data_seed=data_seed, train_mode=False, log=False)
        callback.on_step_end(args, TrainerState(global_step=1), TrainerControl(), model=model, optimizer=optimizer,
                             train_dataloader=loader)
        entry = callback.history[-1]
        return entry["meta_loss_plus"], entry["meta_loss_minus"]

    first = delta(1, 7)
    assert delta(1, 7) == first  # outer lr 0: the probe restores the state, so it repeats exactly
    other_batches, other_direction = delta(1, 8), delta(2, 7)
    assert other_batches != first and other_direction != first
    assert not model.training
