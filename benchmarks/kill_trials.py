"""kill -9 during saves and during Trainer training, then load / resume (issue 14's acceptance trials).

    OMP_NUM_THREADS=1 python benchmarks/kill_trials.py                      # 50 save + 30 Trainer trials
    OMP_NUM_THREADS=1 python benchmarks/kill_trials.py --save 6 --trainer 3 # quick look

(a) Save: the fuzzer's tiny GPT-2 bundle (default rule, one step of optimizer state; `fuzz_bundles.make_base_bundle`)
is the existing bundle at the target path ("old"); a second bundle ("new": the same model one more optimizer step
later, other weights and state) is saved over it by a forked child with ``Bundle.save_pretrained``, which is killed
with SIGKILL at a moment drawn uniformly over one save's duration (measured first). The parent then loads the
target with ``Bundle.from_pretrained`` (which recovers an interrupted commit) and checks that every file of the
target is byte-for-byte the old bundle's or the new one's (one of the two as a whole) and that no staging or backup
folder is left. Unloadable = ``from_pretrained`` raised, or the content is neither.

(b) Trainer: a tiny BERT on scikit-learn digits (tests/helpers.py) trained by ``transformers.Trainer`` with the
default rule, ``BundleCallback`` (every checkpoint is also a bundle) and ``ResumableCheckpointsCallback``, a
checkpoint every ``--save-steps`` steps. A forked child trains a fresh output folder and is killed with SIGKILL at a
moment drawn uniformly over one uninterrupted run's ``train()``; the parent builds a new Trainer and calls
``train(resume_from_checkpoint=True)`` to the end, and compares the final weights with the uninterrupted run's
(``torch.equal``). Failed resume = the resumed ``train()`` raised or stopped at another step; a kill before the
first checkpoint was written leaves nothing to resume (Trainer raises "no valid checkpoint"): those trials train
from scratch instead and are counted apart. The newest complete checkpoint left by the kill must also load with
``Bundle.from_pretrained``.

Children are forked (as in tests/test_untrusted.py and tests/test_checkpoints.py) and each takes its own tqdm lock
(`helpers.private_tqdm_lock`): a child killed while holding the shared one would deadlock the parent.
The table is printed and written to benchmarks/results/kill_trials.md.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
from fuzz_bundles import make_base_bundle, snapshot  # noqa: E402
from helpers import digits_bert, digits_dataset, params_of, private_tqdm_lock, trainer_args  # noqa: E402
from transformers import PrinterCallback, Trainer, TrainerCallback  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from optbundle import Bundle, load_rule  # noqa: E402
from optbundle.store.checkpoints import ResumableCheckpointsCallback, last_complete_checkpoint  # noqa: E402
from optbundle.store.trainer import BundleCallback  # noqa: E402

CONTEXT = multiprocessing.get_context("fork")


def _kill(process, delay: float) -> bool:
    """SIGKILL ``process`` after ``delay`` s; whether it was still running (killed) rather than already done."""
    time.sleep(delay)
    alive = process.is_alive()  # reaps a child that already exited: then there is nothing to kill
    if alive:
        os.kill(process.pid, signal.SIGKILL)
    process.join(timeout=120)
    if process.is_alive():
        raise RuntimeError(f"child {process.pid} survived SIGKILL")
    return alive and process.exitcode == -signal.SIGKILL


# ---- (a) kill during Bundle.save_pretrained ---------------------------------------------------------------------


def _next_bundle(base: Path) -> Bundle:
    """``base`` one optimizer step later: other weights and accumulators, same files."""
    bundle = Bundle.from_pretrained(base)
    optimizer, _ = bundle.optimizer()
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    bundle.model(ids, labels=ids).loss.backward()
    optimizer.step()
    bundle.set_state(optimizer)
    return bundle


def _save_child(bundle: Bundle, target: Path, ready) -> None:
    private_tqdm_lock()
    ready.send(1)
    begin = time.perf_counter()
    bundle.save_pretrained(target)
    ready.send(time.perf_counter() - begin)  # read only by the calibration runs
    os._exit(0)


def _forked_save(bundle: Bundle, target: Path):
    receive, send = CONTEXT.Pipe(duplex=False)
    process = CONTEXT.Process(target=_save_child, args=(bundle, target, send))
    process.start()
    receive.recv()
    return process, receive


def save_trials(n: int, rng: random.Random, work: Path) -> dict:
    old = snapshot(make_base_bundle(work / "old"))
    new_bundle = _next_bundle(work / "old")
    new_bundle.save_pretrained(work / "new")
    new = snapshot(work / "new")
    durations = []
    for _ in range(5):  # how long one save over an existing bundle takes in a forked child
        process, receive = _forked_save(new_bundle, work / "new")
        durations.append(receive.recv())
        process.join()
    save_seconds = sorted(durations)[len(durations) // 2]
    assert snapshot(work / "new") == new, "saving the same bundle twice gave other bytes"
    assert new != old and new.keys() == old.keys()
    target = work / "trials" / "bundle"
    counts = {"unloadable": 0, "killed": 0, "as_old": 0, "as_new": 0, "leftovers": 0}
    failures = []
    for trial in range(n):
        shutil.rmtree(target.parent, ignore_errors=True)
        shutil.copytree(work / "old", target)
        process, _ = _forked_save(new_bundle, target)
        counts["killed"] += _kill(process, rng.uniform(0.0, save_seconds))
        try:
            Bundle.from_pretrained(target)
            content = snapshot(target)
        except Exception as err:  # noqa: BLE001
            counts["unloadable"] += 1
            failures.append(f"save trial {trial}: {type(err).__name__}: {err}")
            continue
        if content == old:
            counts["as_old"] += 1
        elif content == new:
            counts["as_new"] += 1
        else:
            counts["unloadable"] += 1
            failures.append(f"save trial {trial}: loaded content is neither the old nor the new bundle")
        if sorted(p.name for p in target.parent.iterdir()) != ["bundle"]:
            counts["leftovers"] += 1
            failures.append(f"save trial {trial}: left {sorted(p.name for p in target.parent.iterdir())}")
    return {**counts, "save_seconds": save_seconds, "failures": failures}


# ---- (b) kill during Trainer training ---------------------------------------------------------------------------


class _Signal(TrainerCallback):
    def __init__(self, ready) -> None:
        self.ready = ready

    def on_train_begin(self, args, state, control, **kwargs):
        self.ready.send(1)
        return control


def train(out: Path, steps: int, save_steps: int, resume=None, extra_callbacks=()) -> tuple[dict, Trainer]:
    bundle = Bundle(digits_bert(hidden=16), load_rule("default"))
    args = trainer_args(out, steps, save_strategy="steps", save_steps=save_steps, per_device_train_batch_size=16,
                        learning_rate=3e-3)
    trainer = Trainer(
        model=bundle.model, args=args, train_dataset=digits_dataset(256), optimizers=bundle.optimizer(args=args),
        callbacks=[BundleCallback(bundle), ResumableCheckpointsCallback(), *extra_callbacks],
    )
    trainer.remove_callback(PrinterCallback)
    trainer.train(resume_from_checkpoint=resume)
    return params_of(bundle.model), trainer


def _train_child(out: Path, steps: int, save_steps: int, ready) -> None:
    private_tqdm_lock()
    train(out, steps, save_steps, extra_callbacks=[_Signal(ready)])
    os._exit(0)


class _Clock(TrainerCallback):
    def on_train_begin(self, args, state, control, **kwargs):
        self.begin = time.perf_counter()
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.seconds = time.perf_counter() - self.begin
        return control


def trainer_trials(n: int, rng: random.Random, work: Path, steps: int, save_steps: int) -> dict:
    reference, _ = train(work / "reference-0", steps, save_steps)
    clock = _Clock()  # a second, warm run: how long train() takes from on_train_begin (when a child signals) on
    again, _ = train(work / "reference-1", steps, save_steps, extra_callbacks=[clock])
    assert all(torch.equal(value, again[name]) for name, value in reference.items()), "training is not deterministic"
    train_seconds = clock.seconds
    counts = {"failed": 0, "different": 0, "killed": 0, "no_checkpoint": 0, "unloadable_checkpoint": 0, "extra_step": 0,
              "set_aside": 0}
    resumed_from = []
    failures = []
    for trial in range(n):
        out = work / f"run-{trial}"
        receive, send = CONTEXT.Pipe(duplex=False)
        process = CONTEXT.Process(target=_train_child, args=(out, steps, save_steps, send))
        process.start()
        receive.recv()
        counts["killed"] += _kill(process, rng.uniform(0.0, train_seconds))
        newest = last_complete_checkpoint(out)
        resumed_from.append(int(newest.name.split("-")[1]) if newest else 0)
        if newest is not None:
            try:
                Bundle.from_pretrained(newest)
            except Exception as err:  # noqa: BLE001
                counts["unloadable_checkpoint"] += 1
                failures.append(f"trainer trial {trial}: {newest.name} does not load: {type(err).__name__}: {err}")
        try:
            try:
                final, trainer = train(out, steps, save_steps, resume=True)
            except ValueError as err:
                if newest is not None or "checkpoint" not in str(err):
                    raise
                counts["no_checkpoint"] += 1  # killed before the first checkpoint: nothing to resume
                final, trainer = train(out, steps, save_steps)
        except Exception as err:  # noqa: BLE001
            counts["failed"] += 1
            failures.append(f"trainer trial {trial}: resume raised {type(err).__name__}: {err}\n{traceback.format_exc()}")
            continue
        counts["set_aside"] += any(p.name.startswith(".incomplete-checkpoint-") for p in out.iterdir())
        extra_step = trainer.state.global_step == steps + 1 and resumed_from[-1] == steps
        # transformers resuming a finished run takes one more step (at lr 0 at the end of the default linear
        # schedule: the weights do not change; AdamW does the same) and reports step max_steps + 1
        counts["extra_step"] += extra_step
        if trainer.state.global_step != steps and not extra_step:
            counts["failed"] += 1
            failures.append(f"trainer trial {trial}: resumed run ended at step {trainer.state.global_step}")
        elif any(not torch.equal(value, final[name]) for name, value in reference.items()):
            counts["different"] += 1
            failures.append(f"trainer trial {trial}: resumed from step {resumed_from[-1]}, final weights differ")
        shutil.rmtree(out, ignore_errors=True)
    return {**counts, "train_seconds": train_seconds, "resumed_from": resumed_from, "failures": failures}


# ---- report -----------------------------------------------------------------------------------------------------


def table(save: dict | None, trainer: dict | None, args) -> str:
    rows = [
        "| kill -9 during | trials | killed mid-run | unloadable targets | failed resumes | non-identical resumes | wall time |",
        "|---|---|---|---|---|---|---|",
    ]
    if save is not None:
        rows.append(
            f"| `Bundle.save_pretrained` over an existing bundle | {args.save} | {save['killed']} | {save['unloadable']} "
            f"| – | – | {save['wall']:.0f} s |"
        )
    if trainer is not None:
        rows.append(
            f"| `Trainer.train` (`BundleCallback` + `ResumableCheckpointsCallback`), resumed | {args.trainer} "
            f"| {trainer['killed']} | {trainer['unloadable_checkpoint']} | {trainer['failed']} | {trainer['different']} "
            f"| {trainer['wall']:.0f} s |"
        )
    notes = []
    if save is not None:
        notes.append(
            f"Save: one save takes {save['save_seconds'] * 1e3:.0f} ms (kill drawn uniformly over it); the target "
            f"loaded as the old bundle {save['as_old']}×, as the new one {save['as_new']}× (byte-for-byte); "
            f"staging/backup folders left after the load: {save['leftovers']}."
        )
    if trainer is not None:
        steps = sorted(trainer["resumed_from"])
        notes.append(
            f"Trainer: {args.steps} steps, a checkpoint every {args.save_steps}, uninterrupted `train()` "
            f"{trainer['train_seconds']:.1f} s (kill drawn uniformly over it); resumed from steps {steps} "
            f"(0 = killed before the first checkpoint, trained from scratch: {trainer['no_checkpoint']}; "
            f"{args.steps} = killed after the last checkpoint: the resumed `train()` takes transformers' one extra "
            f"step at lr 0 and reports step {args.steps + 1}, weights unchanged, as with AdamW: "
            f"{trainer['extra_step']}); "
            f"kills that left a half-written checkpoint (set aside by `ResumableCheckpointsCallback`): "
            f"{trainer['set_aside']}; \"unloadable targets\" here = newest complete checkpoint not loading with `Bundle.from_pretrained`."
        )
    command = (
        f"`OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '?')} python benchmarks/kill_trials.py --save {args.save} "
        f"--trainer {args.trainer} --seed {args.seed}`, torch {torch.__version__}, {torch.get_num_threads()} thread(s)"
    )
    return "\n".join(rows) + "\n\n" + "\n".join(f"- {n}" for n in [command, *notes]) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--save", type=int, default=50, help="kill -9 trials during Bundle.save_pretrained")
    parser.add_argument("--trainer", type=int, default=30, help="kill -9 trials during Trainer training")
    parser.add_argument("--steps", type=int, default=24, help="Trainer max_steps")
    parser.add_argument("--save-steps", type=int, default=3, help="Trainer save_steps")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "kill_trials.md"))
    args = parser.parse_args(argv)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    rng = random.Random(args.seed)
    save = trainer = None
    failures = []
    with tempfile.TemporaryDirectory(prefix="kill_trials-") as tmp:
        work = Path(tmp)
        if args.save:
            begin = time.perf_counter()
            save = save_trials(args.save, rng, work / "save")
            save["wall"] = time.perf_counter() - begin
            failures += save["failures"]
        if args.trainer:
            begin = time.perf_counter()
            trainer = trainer_trials(args.trainer, rng, work / "trainer", args.steps, args.save_steps)
            trainer["wall"] = time.perf_counter() - begin
            failures += trainer["failures"]
    text = table(save, trainer, args)
    print(text)
    for failure in failures:
        print("FAIL", failure, file=sys.stderr)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("# kill -9 trials (issue 14)\n\n" + text, encoding="utf-8")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
