"""lr and schedules with the real Trainer: the optimizer's lr is the learning rate Trainer logs and schedules.

Tiny BERT on scikit-learn digits (see helpers), the shipped ``default`` rule (format 2: ``lr`` is AdamW's).
"""

import inspect
import logging
import math

import pytest
import torch
from transformers import Trainer

from helpers import digits_bert, digits_dataset, logged_losses, trainer_args, one_thread  # noqa: F401 (autouse fixture)
from optbundle import Bundle, load_rule

STEPS = 16
WARMUP = 4
PEAK = 3e-3


def run(tmp_path, path, schedule, **arg_overrides):
    bundle = Bundle(digits_bert(), load_rule("default"))
    args = trainer_args(tmp_path / f"{path}-{schedule}", STEPS, logging_steps=1, learning_rate=PEAK,
                        lr_scheduler_type=schedule, warmup_steps=WARMUP, **arg_overrides)
    if path == "optimizers":  # Trainer builds its schedule over the optimizer bundle.optimizer(args=...) made
        kwargs = dict(optimizers=bundle.optimizer(args=args))
    elif path == "explicit":  # the schedule built by optbundle, no TrainingArguments involved
        kwargs = dict(optimizers=bundle.optimizer(lr=PEAK, lr_scheduler_type=schedule, num_training_steps=STEPS,
                                                  num_warmup_steps=WARMUP))
    else:
        kwargs = dict(optimizer_cls_and_kwargs=bundle.optimizer_factory())
    trainer = Trainer(model=bundle.model, args=args, train_dataset=digits_dataset(256), **kwargs)
    trainer.train()
    lrs = [h["learning_rate"] for h in trainer.state.log_history if "learning_rate" in h]
    return lrs, logged_losses(trainer), trainer


def expected_cosine(step):
    """transformers' cosine with warmup, as logged after ``step`` optimizer steps (lr of the next step)."""
    if step < WARMUP:
        return PEAK * step / WARMUP
    progress = (step - WARMUP) / (STEPS - WARMUP)
    return PEAK * 0.5 * (1 + math.cos(math.pi * progress))


@pytest.mark.slow
@pytest.mark.parametrize("path", ["optimizers", "explicit", "factory"])
def test_cosine_with_warmup_is_logged_and_changes_the_loss_curve(tmp_path, path):
    lrs, cosine_losses, trainer = run(tmp_path, path, "cosine")
    assert len(lrs) == STEPS
    # the logged learning_rate is the real lr (Trainer's learning_rate, not a multiplier of 1) and follows
    # warmup + cosine; the learned optimizer's group lr is what the scheduler set
    for step, lr in enumerate(lrs):
        assert lr == pytest.approx(expected_cosine(step), rel=1e-6, abs=1e-12), (step, lrs)
    assert max(lrs) == pytest.approx(PEAK)
    assert trainer.optimizer.optimizer.param_groups[0]["lr"] == pytest.approx(expected_cosine(STEPS), abs=1e-12)
    _, constant_losses, _ = run(tmp_path, path, "constant")
    assert len(cosine_losses) == len(constant_losses) == STEPS
    assert cosine_losses[0] == pytest.approx(constant_losses[0])  # same start
    assert max(abs(a - b) for a, b in zip(cosine_losses[1:], constant_losses[1:])) > 1e-3, (cosine_losses, constant_losses)


@pytest.mark.slow
def test_trainer_and_explicit_schedules_give_the_same_run(tmp_path):
    lrs_a, losses_a, _ = run(tmp_path / "a", "optimizers", "cosine")
    lrs_b, losses_b, _ = run(tmp_path / "b", "explicit", "cosine")
    assert lrs_a == pytest.approx(lrs_b)
    assert losses_a == pytest.approx(losses_b, rel=1e-5)


def test_lr_is_a_visible_parameter():
    for method in (Bundle.optimizer, Bundle.optimizer_factory):
        parameters = inspect.signature(method).parameters
        assert "lr" in parameters and "weight_decay" in parameters
        assert parameters["lr"].default is None
    assert "learning rate" in (Bundle.optimizer.__doc__ or "")


def test_an_lr_far_from_the_recommended_one_warns_once(caplog):
    model = digits_bert()
    bundle = Bundle(model, load_rule("default"))  # fresh model: recommended lr 1e-2
    with caplog.at_level(logging.WARNING, logger="optbundle"):
        bundle.optimizer(lr=3e-3)  # within 30x: silent
        assert not caplog.records
        bundle.optimizer(lr=1e-6)
        bundle.optimizer(lr=1e-6)
    warnings = [r for r in caplog.records if "recommended lr" in r.getMessage()]
    assert len(warnings) == 1 and "stall" in warnings[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="optbundle"):
        Bundle(digits_bert(), load_rule("default-v2")).optimizer(lr=1e-3)  # AdamW's habit on a multiplier rule
    assert any("multiplier" in r.getMessage() for r in caplog.records)


@pytest.mark.slow
@pytest.mark.parametrize("path", ["optimizers", "factory"])
def test_gradient_accumulation_does_not_scale_gradients(tmp_path, path):
    """Without the user setting accepts_loss_kwargs, accumulation 2 × batch 16 sees the gradient of batch 32."""

    def first_grad_norm(batch, accumulation):
        bundle = Bundle(digits_bert(), load_rule("default"))
        args = trainer_args(tmp_path / f"{path}{batch}", 1, logging_steps=1, per_device_train_batch_size=batch,
                            gradient_accumulation_steps=accumulation)
        kwargs = (dict(optimizers=bundle.optimizer(args=args)) if path == "optimizers"
                  else dict(optimizer_cls_and_kwargs=bundle.optimizer_factory()))
        trainer = Trainer(model=bundle.model, args=args, train_dataset=digits_dataset(64), **kwargs)
        trainer.train()
        return [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h][0]

    assert first_grad_norm(16, 2) == pytest.approx(first_grad_norm(32, 1), rel=1e-3)


def test_weight_decay_spares_biases_and_norms_like_trainer(tmp_path):
    model = digits_bert()
    names = {p: n for n, p in model.named_parameters()}
    optimizer, scheduler = Bundle(model, load_rule("default")).optimizer(
        args=trainer_args(tmp_path, 1, weight_decay=0.1, learning_rate=3e-3))
    assert scheduler is None  # Trainer builds its own schedule from the same args
    decay = {names[p] for g in optimizer.param_groups if g["weight_decay"] == 0.1 for p in g["params"]}
    no_decay = {names[p] for g in optimizer.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    assert decay | no_decay == set(names.values()) and not decay & no_decay
    assert "classifier.weight" in decay and "classifier.bias" in no_decay
    assert all("LayerNorm" in n or n.endswith("bias") for n in no_decay)
    assert all(g["lr"] == 3e-3 for g in optimizer.param_groups)


@pytest.mark.parametrize("rule", ["default", "default-v2"])
def test_both_optimizer_paths_take_lr_and_weight_decay_from_trainer_alike(tmp_path, rule):
    """``optimizer(args=...)`` and the factory Trainer calls read the same lr and weight decay from the args:
    the learning rate for a format-2 rule, the rule's recommended multiplier (not 3e-3) for a format-1 rule."""
    args = trainer_args(tmp_path, 1, weight_decay=0.1, learning_rate=3e-3)
    direct, _ = Bundle(digits_bert(), load_rule(rule)).optimizer(args=args)
    bundle = Bundle(digits_bert(), load_rule(rule))
    trainer = Trainer(model=bundle.model, args=args, train_dataset=digits_dataset(32),
                      optimizer_cls_and_kwargs=bundle.optimizer_factory())
    built = trainer.create_optimizer()

    def settings(optimizer):
        return sorted((len(g["params"]), g["lr"], g["weight_decay"]) for g in optimizer.param_groups)

    assert settings(direct) == settings(built)
    lrs = {g["lr"] for g in built.param_groups}
    assert lrs == ({3e-3} if rule == "default" else {bundle.rule.config.recommended_lr["scratch"]})  # a fresh model
    assert {g["weight_decay"] for g in built.param_groups} == {0.0, 0.1}
