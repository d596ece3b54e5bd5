"""Shared test fixtures: real (scikit-learn digits) data as token sequences and tiny transformers models; parameters
and gradients of the optimizer tests."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from sklearn.datasets import load_digits
from transformers import BertConfig, BertForSequenceClassification, TrainingArguments

from _parity import SHAPES


def digits_dataset(n: int = 512, offset: int = 0) -> Dataset:
    """Each 8×8 digit as 65 tokens: [CLS]=0 then the 64 pixel intensities + 1 (0..16 → 1..17)."""
    digits = load_digits()
    rows = digits.data[offset : offset + n]
    ids = [[0] + [int(v) + 1 for v in row] for row in rows]
    return Dataset.from_dict({"input_ids": ids, "labels": digits.target[offset : offset + n].tolist()})


def digits_bert(seed: int = 0, hidden: int = 32) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=18, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2, intermediate_size=2 * hidden,
        max_position_embeddings=72, num_labels=10, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(config)


def trainer_args(out, max_steps: int, **kw) -> TrainingArguments:
    kw = {"save_strategy": "no", "per_device_train_batch_size": 32, "logging_steps": 10, **kw}
    return TrainingArguments(
        output_dir=str(out), max_steps=max_steps, report_to="none", use_cpu=True, disable_tqdm=True, seed=0, **kw
    )


def logged_losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def params_of(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def make_params(dtype=torch.float32, seed=0, shapes=SHAPES) -> list[torch.nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=generator).to(dtype)) for s in shapes]


def fill_grads(params, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for p in params:
        p.grad = torch.randn(p.shape, generator=generator).to(p.dtype)


def assert_non_finite_gradient_skips_that_tensor_only(params, opt) -> None:
    """Step ``opt`` once on finite gradients, then once with NaN in ``params[2]``'s gradient and inf in all of
    ``params[0]``'s: those two tensors and their state stay untouched and count one skipped step; the others step."""
    fill_grads(params, 0)
    opt.step()
    snapshot = [p.detach().clone() for p in params]
    states = [{k: v.clone() for k, v in opt.state[p].items()} for p in params]
    fill_grads(params, 1)
    params[2].grad[3, 4] = float("nan")
    params[0].grad.fill_(float("inf"))
    opt.step()
    for i, p in enumerate(params):
        if i in (0, 2):
            assert torch.equal(p, snapshot[i])
            assert int(opt.state[p]["skipped_steps"]) == 1
            for key, value in states[i].items():
                if key != "skipped_steps":
                    assert torch.equal(opt.state[p][key], value), key
        else:
            assert not torch.equal(p, snapshot[i])
            assert int(opt.state[p]["skipped_steps"]) == 0
            assert int(opt.state[p]["step"]) == 2
        assert all(torch.isfinite(v.float()).all() for v in opt.state[p].values())
        assert torch.isfinite(p.float()).all()


def private_tqdm_lock():
    """Give this (forked) process its own tqdm lock: tqdm's default lock includes a multiprocessing semaphore shared
    with the parent, and a child killed while holding it (a progress bar of from_pretrained/save_pretrained) would
    leave the parent deadlocked at its next progress bar."""
    import threading

    from tqdm import tqdm

    lock = threading.RLock()
    classes = [tqdm]
    while classes:  # the class and every subclass that made its own lock (tqdm.auto's, huggingface_hub's)
        cls = classes.pop()
        if cls is tqdm or "_lock" in vars(cls):
            cls._lock = lock
        classes.extend(cls.__subclasses__())


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread for the test (tiny models; a second thread only adds contention), restored after.
    Import it into a test module to use it there."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
