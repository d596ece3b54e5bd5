"""Trainer checkpoints that resume after a kill -9 (issue 14): a half-written newest checkpoint is set aside."""

import multiprocessing
import os
import shutil
import signal
import time

import torch
from helpers import digits_bert, digits_dataset, private_tqdm_lock, trainer_args
from transformers import Trainer

from optbundle import Bundle, load_rule
from optbundle.store.checkpoints import ResumableCheckpointsCallback, is_complete_checkpoint, last_complete_checkpoint

STEPS = 8


def run(out, resume=None, max_steps=STEPS):
    bundle = Bundle(digits_bert(hidden=16), load_rule("default"))
    args = trainer_args(out, max_steps, save_strategy="steps", save_steps=1, per_device_train_batch_size=16)
    trainer = Trainer(model=bundle.model, args=args, train_dataset=digits_dataset(256), optimizers=bundle.optimizer(),
                      callbacks=[ResumableCheckpointsCallback()])
    trainer.train(resume_from_checkpoint=resume)
    return {n: p.detach().clone() for n, p in bundle.model.named_parameters()}, trainer


def test_a_half_written_newest_checkpoint_is_skipped_on_resume(tmp_path):
    reference, _ = run(tmp_path / "a")
    out = tmp_path / "b"
    run(out, max_steps=4)
    broken = out / "checkpoint-5"  # what a kill while writing checkpoint-5 leaves: no trainer_state.json yet
    shutil.copytree(out / "checkpoint-4", broken)
    (broken / "trainer_state.json").unlink()
    (broken / "optimizer.pt").write_bytes(b"\x80")
    assert not is_complete_checkpoint(broken) and last_complete_checkpoint(out).name == "checkpoint-4"
    resumed, trainer = run(out, resume=True)
    assert trainer.state.global_step == STEPS
    assert any(p.name.startswith(".incomplete-checkpoint-5") for p in out.iterdir())
    for name, value in reference.items():
        assert torch.equal(value, resumed[name]), name


def _train_until_killed(out):
    private_tqdm_lock()
    run(out, max_steps=10_000)


def test_kill_9_during_training_always_resumes(tmp_path):
    context = multiprocessing.get_context("fork")
    out = tmp_path / "run"
    for trial in range(3):
        process = context.Process(target=_train_until_killed, args=(out,))
        process.start()
        time.sleep(2.0 + 0.7 * trial)
        os.kill(process.pid, signal.SIGKILL)
        process.join(timeout=60)
        newest = last_complete_checkpoint(out)
        if newest is None:
            continue
        step = int(newest.name.split("-")[1])
        _, trainer = run(out, resume=True, max_steps=step + 1)
        assert trainer.state.global_step == step + 1
