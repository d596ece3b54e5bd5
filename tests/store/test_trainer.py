"""The real transformers.Trainer with a bundle's learned optimizer: the loss falls; resume is exact.

Data: scikit-learn's 8×8 digits, each image read as a 64-token sequence (pixel intensities 0–16 as token
ids), classified by a tiny BERT. Real data, a real transformers model, CPU-sized.
"""

import pytest
import torch
from transformers import Trainer

from helpers import digits_bert as digits_model
from helpers import digits_dataset, params_of as final_params, trainer_args
from optbundle import Bundle, LearnedOptimizer, load_rule


@pytest.mark.slow
def test_trainer_fine_tunes_with_the_learned_optimizer(tmp_path):
    bundle = Bundle(digits_model(), load_rule("default"))
    optimizer, scheduler = bundle.optimizer()  # the default rule as shipped: its own lr for a fresh model
    trainer = Trainer(model=bundle.model, args=trainer_args(tmp_path, 200), train_dataset=digits_dataset(),
                      optimizers=(optimizer, scheduler))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) >= 10
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:2]) / 2, losses
    assert isinstance(trainer.optimizer.optimizer, LearnedOptimizer)  # accelerate wraps ours
    # the constant schedule kept the rule's lr (Trainer's default would have decayed it to 0)
    assert optimizer.param_groups[0]["lr"] == bundle.rule.config.recommended_lr["scratch"]
    # a bundle saved after training carries the accumulators and loads back
    bundle.set_state(optimizer)
    loaded = Bundle.from_pretrained(bundle.save_pretrained(tmp_path / "bundle"))
    assert int(loaded.optimizer()[0].state[loaded.model.classifier.weight]["step"]) == 200


@pytest.mark.slow
@pytest.mark.parametrize("path", ["optimizers", "factory"])
def test_resume_from_trainer_checkpoint_is_exact(tmp_path, path):
    def run(out, resume=None):
        bundle = Bundle(digits_model(), load_rule("default"))
        if path == "optimizers":
            kwargs = dict(optimizers=bundle.optimizer())
        else:
            kwargs = dict(optimizer_cls_and_kwargs=bundle.optimizer_factory())
        args = trainer_args(out, 12, save_strategy="steps", save_steps=6)
        trainer = Trainer(model=bundle.model, args=args, train_dataset=digits_dataset(256), **kwargs)
        trainer.train(resume_from_checkpoint=resume)
        return final_params(bundle.model), trainer

    uninterrupted, _ = run(tmp_path / "a")
    checkpoint = tmp_path / "a" / "checkpoint-6"
    assert (checkpoint / "optimizer.pt").exists() and (checkpoint / "scheduler.pt").exists()
    resumed, trainer = run(tmp_path / "b", resume=str(checkpoint))
    assert trainer.state.global_step == 12
    for name, value in uninterrupted.items():
        assert torch.equal(value, resumed[name]), name
    # the resumed optimizer really continued (step counts), not restarted
    opt = trainer.optimizer.optimizer
    assert int(opt.state[trainer.model.classifier.weight]["step"]) == 12
