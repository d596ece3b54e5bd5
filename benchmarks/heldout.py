"""Held-out benchmark: a rule, as shipped, against AdamW and Muon (best lr of a sweep) on tasks outside meta-training.

    python benchmarks/heldout.py            # full: writes benchmarks/results/heldout.{md,json,png}
    python benchmarks/heldout.py --quick    # every task, fewer steps: writes benchmarks/results/heldout-quick.*
    python benchmarks/heldout.py --rule runs/meta-train-default   # a run directory (its rule or newest checkpoint)
    python benchmarks/heldout.py --rule adam-init                 # any shipped rule name or rule directory
    python benchmarks/heldout.py --quick --tasks wine-mlp-64x3-elu --seeds 2 --out /tmp/ho   # a subset

Held-out list (`HELD_OUT`, never tuned on). The default recipe (recipes/meta-train-default.yaml) meta-trains on
MLPs on 8x8 digits / 8x8 MNIST (widths 32–512, depths 1–4, relu/gelu/tanh, some fine-tuning episodes), MLPs on
28x28 MNIST (widths 32–128, depths 1–2), conv nets (2–3 3x3 layers, 8–32 channels) on 8x8 images, and char
transformers (d 16–64, 1–2 layers, context ≤ 32) on comedies/histories/problems/roman/romances. Held out here:
other datasets (wine, breast cancer, 28x28 images for conv nets, tragedies, SMS spam, tweets), other activations
(silu, elu, leaky relu), larger widths (MLP 4096 = 8x, conv 32/64 channels on 28x28, transformer d 128,
context 64), and real pretrained models (MiniLM-L6 top-layer, full and LoRA fine-tuning; SmolLM2-135M LoRA).
Each task is marked ``kind`` "scratch" (fresh init) or "finetune" (pretrained model).

Optimizers, all on exactly the same initial weights and batches (seed ``s`` fixes both, identically for every
optimizer; stacked tasks run all seeds as copies of one batched model, nn.Module tasks reset the model to its
pretrained weights before every run, see `heldout_tasks.py`):

- the rule as shipped, no tuning: stacked tasks through `optbundle.meta.unroll.inner_step` (the rule's
  recommended "scratch" lr, parameter roles from `optbundle.step.roles.assign_roles`); nn.Module tasks through
  ``opt, sched = Bundle(model, rule).optimizer()`` with no arguments (regime detected from the model, the rule's
  recommended lr for it, the rule's default weight decay), ``sched.step()`` after every step;
- AdamW (weight decay 0.01) at each lr of the task's 5-value log-spaced sweep (``lrs``);
- Muon: ``torch.optim.Muon`` (``adjust_lr_fn="match_rms_adamw"``, momentum 0.95 Nesterov, 5 Newton–Schulz
  steps) on the tensors whose role (`optbundle.step.roles`) is "matrix" (hidden weight matrices; conv kernels
  viewed as ``out × in·k·k``) or "adapter" (LoRA A/B: without them Muon would equal AdamW on LoRA tasks), and
  ``torch.optim.AdamW`` on every other tensor (biases, norms, embeddings, output heads/classifiers), both at
  the same lr and weight decay 0.01, over the same 5 lrs. Muon takes 2-D tensors only: in stacked tasks every
  seed's matrix is its own 2-D leaf (``torch.stack``-ed inside the loss), conv kernels are 2-D leaves
  ``(out, in·9)`` viewed back to 4-D in the forward.

Best lr = lowest mean final loss over seeds. Metrics per task and seed, on a fixed evaluation set of the
training data (the optimization objective), against best AdamW and, the same way, against best Muon:
- final loss ratio = rule's final loss / baseline's final loss;
- speedup = (steps the baseline needs to reach its final loss) / (steps the rule needs to reach that loss);
  when the rule never reaches it: (steps the baseline needs to reach the rule's final loss) / (total steps),
  i.e. < 1. Steps are counted on the evaluation grid (every ``eval_every`` steps).
Per task: geometric mean over seeds with [min, max]; overall: geometric mean and worst task, and whether the
rule's mean final loss is ≤ best AdamW's on every task. Losses are floored at `LOSS_FLOOR` (1e-4) for ratios
and speedups (tiny datasets reach float-level zero loss). A best lr at the edge of its sweep is marked ``*``.

Cost on CPU (one thread, per optimizer step; measured with the other core busy): MiniLM full fine-tuning ≈ 0.6 s
with AdamW, ≈ 4 s with Muon (``torch.optim.Muon`` runs Newton–Schulz in bf16, slow on CPUs without bf16 matrix
units) and ≈ 6–10 s with a format-2 rule (``hybrid_residual`` runs on the reference back end), ≈ 1.5 s with a
format-1 rule; SmolLM2 LoRA ≈ 1.5–2.5 s for every optimizer. The fine-tuning tasks dominate: full mode takes
about 2 h on one thread (estimated), ``--quick`` about half an hour (use ``--tasks`` for a subset).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from optbundle import Bundle, LearnedRule, load_rule
from optbundle.step import reference
from optbundle.store.bundle import model_roles
from optbundle.meta import data as D
from optbundle.meta import tasks as T
from optbundle.meta import unroll as U

if str(Path(__file__).resolve().parent) not in sys.path:  # run as a script it is already there
    sys.path.append(str(Path(__file__).resolve().parent))
import heldout_tasks as HT  # noqa: E402
import muon_baseline  # noqa: E402  (also: Muon's Newton–Schulz in fp32 on CPU)
import results_json  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_LR = 1e-3
WEIGHT_DECAY = 0.01  # AdamW and Muon baselines
#: roles that the Muon baseline orthogonalizes (when 2-D, or conv kernels viewed as 2-D); the rest gets AdamW
MUON_ROLES = muon_baseline.MUON_ROLES
#: losses are floored here before ratios and crossings are computed: tiny datasets reach float-level zero loss,
#: and a ratio of two numbers below this floor says nothing about an optimizer
LOSS_FLOOR = 1e-4
SCRATCH_LRS = [3e-4, 1e-3, 3e-3, 1e-2, 3e-2]
FULL_FT_LRS = [1e-5, 3e-5, 1e-4, 3e-4, 1e-3]
LORA_LRS = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]


@dataclass
class HeldOutTask:
    name: str
    held_out: str  # what is outside the meta-training distribution
    spec: dict[str, Any] | None  # a stacked task spec (`optbundle.meta.tasks.build_task`), or None
    steps: int
    quick_steps: int
    eval_every: int
    lrs: list[float] = field(default_factory=lambda: list(SCRATCH_LRS))
    module: str | None = None  # key of `heldout_tasks.MODULE_TASKS` when ``spec`` is None
    quick_eval_every: int | None = None  # default: eval_every
    kind: str = "scratch"  # "scratch" (fresh init) or "finetune" (pretrained model)

    def horizon(self, quick: bool) -> tuple[int, int]:
        """``(steps, eval_every)``."""
        if quick:
            return self.quick_steps, self.quick_eval_every or self.eval_every
        return self.steps, self.eval_every


HELD_OUT = [
    # ---- from scratch: stacked tasks, all seeds as copies of one batched model ----
    HeldOutTask(
        "mnist28-mlp784-256-10-gelu",
        "width 256 (2x the widest 28x28 MLP trained on)",
        dict(family="mlp", dataset="mnist28", hidden=[256], activation="gelu", batch_size=128, input_scale=1.0, label_noise=0.0),
        400, 150, 10,
    ),
    HeldOutTask(
        "digits8-mlp-1024-silu",
        "width 1024 (2x the widest 8x8 MLP trained on), silu",
        dict(family="mlp", dataset="digits8", hidden=[1024], activation="silu", batch_size=64, input_scale=1.0, label_noise=0.0),
        400, 150, 10,
    ),
    HeldOutTask(
        "digits8-mlp-4096-silu",
        "width 4096 (8x the widest 8x8 MLP trained on), silu",
        dict(family="mlp", dataset="digits8", hidden=[4096], activation="silu", batch_size=64, input_scale=1.0, label_noise=0.0),
        400, 150, 10,
    ),
    HeldOutTask(
        "wine-mlp-64x3-elu",
        "dataset (wine), elu",
        dict(family="mlp", dataset="wine", hidden=[64, 64, 64], activation="elu", batch_size=32, input_scale=1.0, label_noise=0.0),
        400, 150, 10,
    ),
    HeldOutTask(
        "breast_cancer-mlp-32x4-leaky_relu",
        "dataset (breast cancer), leaky relu",
        dict(family="mlp", dataset="breast_cancer", hidden=[32, 32, 32, 32], activation="leaky_relu", batch_size=32, input_scale=1.0, label_noise=0.0),
        400, 150, 10,
    ),
    HeldOutTask(
        "mnist28-conv-32-64",
        "conv net on 28x28 images (trained: 8x8 only), 32/64 channels (trained: ≤ 32)",
        dict(family="conv", dataset="mnist28", channels=[32, 64], activation="relu", batch_size=16),
        200, 50, 10, quick_eval_every=5,
    ),
    HeldOutTask(
        "char-lm-d64-L2-ctx64-tragedies",
        "context 64 (trained: ≤ 32), text (tragedies)",
        dict(family="char_lm", d_model=64, layers=2, heads=4, context=64, batch_size=8, genres=list(D.HELD_OUT_GENRES)),
        300, 100, 10,
    ),
    HeldOutTask(
        "char-lm-d128-L2-ctx64-tragedies",
        "width d 128 (2x the widest trained), 4 heads, context 64, text (tragedies)",
        dict(family="char_lm", d_model=128, layers=2, heads=4, context=64, batch_size=8, genres=list(D.HELD_OUT_GENRES)),
        300, 100, 10,
    ),
    # ---- fine-tuning pretrained models: nn.Module tasks (heldout_tasks.py), one run per seed ----
    HeldOutTask(
        "minilm-sms-spam-finetune",
        "pretrained MiniLM-L6 fine-tune (top layer + pooler + head), SMS spam",
        None, 40, 16, 4, lrs=list(FULL_FT_LRS), module="minilm-top", kind="finetune",
    ),
    HeldOutTask(
        "minilm-sms-spam-full-ft",
        "pretrained MiniLM-L6, full fine-tuning (22.7M params), SMS spam, 48 tokens, batch 16",
        None, 24, 4, 4, lrs=list(FULL_FT_LRS), module="minilm-full-sms", quick_eval_every=2, kind="finetune",
    ),
    HeldOutTask(
        "minilm-lora-vader-tweets",
        "pretrained MiniLM-L6, LoRA r=8 on query/value + head, tweet sentiment (VADER, > 0), 48 tokens, batch 16",
        None, 60, 12, 6, lrs=list(LORA_LRS), module="minilm-lora-vader", quick_eval_every=4, kind="finetune",
    ),
    HeldOutTask(
        "smollm2-135m-lora-tragedies",
        "pretrained SmolLM2-135M, LoRA r=8 on q/v, causal LM on tragedies, 4x64 tokens",
        None, 16, 3, 4, lrs=list(LORA_LRS), module="smollm2-lora-tragedies", quick_eval_every=3, kind="finetune",
    ),
]

#: The development suite (``--suite dev``): where a rule's shipped settings (recommended lr per regime, role
#: multipliers) are chosen. Its from-scratch tasks are draws from the meta-training distribution; its
#: fine-tuning tasks use the same pretrained models as the held-out ones on *other* data (VADER Amazon reviews
#: and NYT editorials, Shakespeare comedies). Nothing here is in `HELD_OUT`, and `HELD_OUT` never sets a default.
DEV = [
    HeldOutTask(
        "dev-mnist8-mlp-256x2-relu", "meta-training distribution",
        dict(family="mlp", dataset="mnist8", hidden=[256, 256], activation="relu", batch_size=64, input_scale=1.0, label_noise=0.0),
        300, 100, 10,
    ),
    HeldOutTask(
        "dev-mnist28-mlp-128-tanh", "meta-training distribution",
        dict(family="mlp", dataset="mnist28", hidden=[128], activation="tanh", batch_size=128, input_scale=1.0, label_noise=0.0),
        300, 100, 10,
    ),
    HeldOutTask(
        "dev-digits8-conv-16-32", "meta-training distribution",
        dict(family="conv", dataset="digits8", channels=[16, 32], activation="gelu", batch_size=32),
        200, 50, 10,
    ),
    HeldOutTask(
        "dev-char-lm-d64-L1-comedies", "meta-training distribution",
        dict(family="char_lm", d_model=64, layers=1, heads=4, context=32, batch_size=8, genres=["comedies"]),
        300, 100, 10,
    ),
    HeldOutTask(
        "dev-mnist8-mlp-1024-gelu", "width 1024 (2x the widest trained) on a meta-training dataset",
        dict(family="mlp", dataset="mnist8", hidden=[1024], activation="gelu", batch_size=64, input_scale=1.0, label_noise=0.0),
        400, 150, 10,
    ),
    HeldOutTask(
        "dev-digits8-mlp-48x4-relu", "narrow and deep (4 x 48) on a meta-training dataset",
        dict(family="mlp", dataset="digits8", hidden=[48, 48, 48, 48], activation="relu", batch_size=32, input_scale=1.0, label_noise=0.0),
        400, 150, 10,
    ),
    HeldOutTask(
        "dev-iris-mlp-32x3-tanh", "a tiny tabular dataset (iris, 150 rows) on 3 x 32 tanh: memorization",
        dict(family="mlp", dataset="iris", hidden=[32, 32, 32], activation="tanh", batch_size=16, input_scale=1.0, label_noise=0.0),
        400, 150, 10,
    ),
    HeldOutTask(
        "dev-char-lm-d96-L2-histories", "2 layers, d 96 (trained: ≤ 64), histories",
        dict(family="char_lm", d_model=96, layers=2, heads=4, context=32, batch_size=8, genres=["histories"]),
        300, 100, 10,
    ),
    HeldOutTask(
        "dev-minilm-top-amazon", "MiniLM-L6 top layer + pooler + head, VADER Amazon reviews (> 0)",
        None, 40, 16, 4, lrs=list(FULL_FT_LRS), module="minilm-top-amazon", kind="finetune",
    ),
    HeldOutTask(
        "dev-minilm-full-nyt", "MiniLM-L6 full fine-tuning, VADER NYT editorials (> 0), 48 tokens, batch 16",
        None, 16, 4, 4, lrs=list(FULL_FT_LRS), module="minilm-full-nyt", quick_eval_every=2, kind="finetune",
    ),
    HeldOutTask(
        "dev-minilm-lora-amazon", "MiniLM-L6 LoRA r=8 on query/value + head, VADER Amazon reviews (> 0)",
        None, 60, 12, 6, lrs=list(LORA_LRS), module="minilm-lora-amazon", quick_eval_every=4, kind="finetune",
    ),
    HeldOutTask(
        "dev-smollm2-lora-comedies", "SmolLM2-135M LoRA r=8 on q/v, causal LM on comedies, 4x64 tokens",
        None, 16, 3, 4, lrs=list(LORA_LRS), module="smollm2-lora-comedies", quick_eval_every=3, kind="finetune",
    ),
]
SUITES = {"heldout": HELD_OUT, "dev": DEV}


# ---- stacked tasks (seeds as copies) ------------------------------------------------------------------


def eval_batch(task: T.Task, seeds: int) -> T.Batch:
    generator = torch.Generator().manual_seed(12345)
    if isinstance(task, (T.MLPClassifier, T.ConvClassifier)):
        n = task.inputs.shape[0]
        size = 2000 if isinstance(task, T.MLPClassifier) else 256  # conv nets on 28x28 images: keep evals cheap
        index = torch.randperm(n, generator=generator)[: min(n, size)]
        inputs, labels = task.inputs[index] * getattr(task, "input_scale", 1.0), task.labels[index]
    else:
        saved = task.batch_size
        task.batch_size = 32
        inputs, labels = (b[0] for b in task.sample_batch(generator, 1))
        task.batch_size = saved
    return inputs.expand(seeds, *inputs.shape), labels.expand(seeds, *labels.shape)


def run_stacked(task: T.Task, optimizer: str, value: Any, steps: int, eval_every: int, seeds: int) -> torch.Tensor:
    """Eval-loss curve ``(seeds, steps // eval_every + 1)``; ``optimizer`` "adamw" / "muon" (value = lr) or
    "rule" (value = the rule)."""
    generator = torch.Generator().manual_seed(0)
    params = task.init_params(generator, seeds)
    evaluation = eval_batch(task, seeds)
    curve = []

    def evaluate(p):
        with torch.no_grad():
            losses = task.loss(p, evaluation)
        curve.append(torch.where(torch.isfinite(losses), losses, torch.full_like(losses, math.inf)))

    if optimizer in ("adamw", "muon"):
        roles = U.task_roles(task, params)
        if optimizer == "muon":  # one 2-D leaf per seed: (fan_out, fan_in) (conv: (out, in·k·k))
            split = [k for k, v in params.items() if roles[k] in MUON_ROLES and v.dim() >= 3]
        else:
            split = []
        per_seed = {k: [params[k][c].reshape(params[k].shape[1], -1).clone().requires_grad_() for c in range(seeds)] for k in split}
        stacked = {k: v.clone().requires_grad_() for k, v in params.items() if k not in per_seed}

        def assemble() -> dict[str, torch.Tensor]:
            return {k: stacked[k] if k in stacked else torch.stack(per_seed[k]).view(params[k].shape) for k in params}

        if optimizer == "muon":
            opt = muon_baseline.MuonAdamW([leaf for leaves in per_seed.values() for leaf in leaves], list(stacked.values()), value)
        else:
            opt = torch.optim.AdamW(stacked.values(), lr=value, weight_decay=WEIGHT_DECAY)
        for step in range(steps):
            if step % eval_every == 0:
                evaluate(assemble())
            batch = task.sample_batch(generator, seeds)
            opt.zero_grad(set_to_none=True)
            task.loss(assemble(), batch).sum().backward()
            opt.step()
        evaluate(assemble())
    else:
        rule: LearnedRule = value
        weights = [(w.detach(), b.detach()) for w, b in rule.weights]
        state = {k: reference.init_state(rule.config, v.shape[1:], batch_shape=(seeds,)) for k, v in params.items()}
        for step in range(steps):
            if step % eval_every == 0:
                evaluate(params)
            batch = task.sample_batch(generator, seeds)
            _, params, state = U.inner_step(rule.config, weights, task, params, state, batch)
        evaluate(params)
    return torch.stack(curve, dim=1)


# ---- nn.Module tasks (the shipped optimizer path) -------------------------------------------------------


def run_module(task: HT.ModuleTask, optimizer: str, value: Any, steps: int, eval_every: int, seed: int,
               state_dtype: torch.dtype = torch.float32) -> tuple[list[float], float | None]:
    """Eval-loss curve of one seed (every ``eval_every`` steps and at the end) and, for the rule, the lr it ran
    at. The rule runs exactly as a user runs it: ``Bundle(model, rule).optimizer()``, no arguments but
    ``state_dtype`` (benchmarks/state_dtype.py)."""
    task.reset(seed)
    named = task.trainable()
    scheduler, rule_lr = None, None
    if optimizer == "adamw":
        opt = torch.optim.AdamW([p for _, p in named], lr=value, weight_decay=WEIGHT_DECAY)
    elif optimizer == "muon":
        roles = model_roles(task.model)
        to_muon = [roles[n] in MUON_ROLES and p.dim() == 2 for n, p in named]
        opt = muon_baseline.MuonAdamW([p for (_, p), m in zip(named, to_muon) if m], [p for (_, p), m in zip(named, to_muon) if not m], value)
    else:
        opt, scheduler = Bundle(task.model, value).optimizer(state_dtype=state_dtype)
        rule_lr = float(opt.param_groups[0]["lr"])
    generator = torch.Generator().manual_seed(seed)
    curve = []
    for step in range(steps + 1):
        if step % eval_every == 0 or step == steps:
            loss = task.eval_loss()
            curve.append(loss if math.isfinite(loss) else math.inf)
        if step == steps:
            break
        batch = task.sample(generator)
        opt.zero_grad(set_to_none=True)
        task.loss(batch).backward()
        opt.step()
        if scheduler is not None:
            scheduler.step()
    return curve, rule_lr


# ---- metrics -------------------------------------------------------------------------------------------


def first_reach(curve: list[float], axis: list[int], target: float) -> int | None:
    for value, step in zip(curve, axis):
        if value <= target:
            return step
    return None


def speedup(rule_curve: list[float], base_curve: list[float], axis: list[int]) -> float:
    """See the module docstring (``base_curve``: the baseline's, best AdamW or best Muon)."""
    total = axis[-1]
    target = base_curve[-1]
    base_steps = first_reach(base_curve, axis, target) or total
    rule_steps = first_reach(rule_curve, axis, target)
    if rule_steps is not None:
        return base_steps / max(rule_steps, 1)
    if not math.isfinite(rule_curve[-1]):
        return 0.0
    reach = first_reach(base_curve, axis, rule_curve[-1])
    return (reach if reach is not None else total) / total


def geomean(values: list[float]) -> float:
    values = [max(v, 1e-12) for v in values]
    return math.exp(sum(math.log(v) for v in values) / len(values))


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def floored_mean(values: list[float]) -> float:
    return mean([max(v, LOSS_FLOOR) for v in values])


def compare(curves: dict[str, list[list[float]]], base_key: str, axis: list[int]) -> tuple[list[float], list[float]]:
    """Per seed: (final loss ratio rule / base, speedup of the rule over base)."""
    final_rule, final_base = [c[-1] for c in curves["rule"]], [c[-1] for c in curves[base_key]]
    ratios = [
        max(r, LOSS_FLOOR) / max(b, LOSS_FLOOR) if math.isfinite(r) else math.inf
        for r, b in zip(final_rule, final_base)
    ]
    floor = lambda cs: [[max(x, LOSS_FLOOR) for x in c] for c in cs]  # noqa: E731
    speedups = [speedup(r, b, axis) for r, b in zip(floor(curves["rule"]), floor(curves[base_key]))]
    return ratios, speedups


def summarize(spec: HeldOutTask, steps: int, eval_every: int, curves: dict[str, list[list[float]]], rule_lr: float | None, seconds: float) -> dict[str, Any]:
    axis = list(range(0, steps, eval_every)) + [steps]
    final = {k: [c[-1] for c in v] for k, v in curves.items()}
    mean_final = {k: mean(v) for k, v in final.items()}
    best_adamw = min((k for k in curves if k.startswith("adamw@")), key=lambda k: mean_final[k])
    best_muon = min((k for k in curves if k.startswith("muon@")), key=lambda k: mean_final[k])
    ratio, speed = compare(curves, best_adamw, axis)
    ratio_muon, speed_muon = compare(curves, best_muon, axis)
    default_key = f"adamw@{DEFAULT_LR:g}"
    speed_default = compare(curves, default_key, axis)[1] if default_key in curves else None
    return {
        "task": spec.name,
        "kind": spec.kind,
        "held_out": spec.held_out,
        "steps": steps,
        "eval_every": eval_every,
        "axis": axis,
        "lrs": spec.lrs,
        "rule_lr": rule_lr,
        "best_lr": float(best_adamw.split("@")[1]),  # best AdamW lr
        "best_muon_lr": float(best_muon.split("@")[1]),
        "final": final,
        "mean_final": {"rule": mean_final["rule"], "adamw": mean_final[best_adamw], "muon": mean_final[best_muon]},
        "curves": curves,
        "loss_ratio": ratio,  # vs best AdamW
        "speedup": speed,  # vs best AdamW
        "loss_ratio_vs_muon": ratio_muon,
        "speedup_vs_muon": speed_muon,
        "speedup_vs_default": speed_default,  # vs AdamW lr 1e-3 (when in the sweep)
        "beats_default_lr": (mean_final["rule"] < mean_final[default_key]) if default_key in curves else None,
        # compared on losses floored at LOSS_FLOOR, like the ratios (two losses below it count as equal)
        "rule_le_best_adamw": floored_mean(final["rule"]) <= floored_mean(final[best_adamw]),
        "rule_le_best_muon": floored_mean(final["rule"]) <= floored_mean(final[best_muon]),
        "diverged": any(not math.isfinite(v) or v > c[0] for v, c in zip(final["rule"], curves["rule"])),
        "seconds": round(seconds, 1),
    }


def task_line(r: dict[str, Any]) -> str:
    m = r["mean_final"]
    return (
        f"{r['task']:34s} [{r['kind']:8s}] best lr AdamW {r['best_lr']:g} Muon {r['best_muon_lr']:g} | final rule "
        f"{m['rule']:.4f} AdamW {m['adamw']:.4f} Muon {m['muon']:.4f} | vs AdamW: ratio {geomean(r['loss_ratio']):.3f} "
        f"speedup {geomean(r['speedup']):.2f} | vs Muon: ratio {geomean(r['loss_ratio_vs_muon']):.3f} "
        f"speedup {geomean(r['speedup_vs_muon']):.2f} ({r['seconds']:.0f}s)"
    )


# ---- main ----------------------------------------------------------------------------------------------


def resolve_rule(name: str) -> tuple[LearnedRule, str]:
    path = Path(name)
    if path.is_dir() and (path / "checkpoints" / "latest.json").exists() and not (path / "rule").exists():
        from optbundle.meta.trainer import rule_from_checkpoint

        rule = rule_from_checkpoint(path)
        return rule, f"{name} (checkpoint, meta-step {rule.provenance['meta_steps']})"
    if path.is_dir() and (path / "rule").exists():
        return load_rule(path / "rule"), str(path / "rule")
    rule = load_rule(name)
    return rule, name


def reusable_baselines(spec: HeldOutTask, quick: bool, seeds: int, sources: list[dict[str, Any]]) -> dict[str, list[list[float]]]:
    """The AdamW/Muon curves of ``spec`` from earlier runs' JSON (``--baselines``), when they ran the same horizon,
    lr sweep and at least ``seeds`` seeds (seed ``s`` is the same data and init in every run, so the curves are
    what a rerun would compute); ``{}`` when no source matches."""
    steps, eval_every = spec.horizon(quick)
    for source in sources:
        for r in source["results"]:
            if (r["task"] == spec.name and r["steps"] == steps and r["eval_every"] == eval_every
                    and r["lrs"] == spec.lrs and source["seeds"] >= seeds):
                return {k: v[:seeds] for k, v in r["curves"].items() if k.startswith(("adamw@", "muon@"))}
    return {}


def run_task(spec: HeldOutTask, rule: LearnedRule, quick: bool, seeds: int, verbose: bool,
             reuse: dict[str, list[list[float]]] | None = None) -> dict[str, Any]:
    steps, eval_every = spec.horizon(quick)
    t0 = time.time()
    curves: dict[str, list[list[float]]] = dict(reuse or {})
    settings = [("adamw", lr) for lr in spec.lrs] + [("muon", lr) for lr in spec.lrs] + [("rule", rule)]
    settings = [(name, value) for name, value in settings if name == "rule" or f"{name}@{value:g}" not in curves]
    rule_lr = None
    if spec.spec is not None:
        task = T.build_task(spec.spec)
        rule_lr = U.task_lr(rule.config, task)
        for name, value in settings:
            t = time.time()
            key = name if name == "rule" else f"{name}@{value:g}"
            curves[key] = run_stacked(task, name, value, steps, eval_every, seeds).tolist()
            if verbose:
                print(f"  {spec.name} {key}: final {mean([c[-1] for c in curves[key]]):.4f} ({time.time() - t:.1f}s)", flush=True)
    else:
        task = HT.MODULE_TASKS[spec.module]()
        try:
            for name, value in settings:
                t = time.time()
                key = name if name == "rule" else f"{name}@{value:g}"
                runs = [run_module(task, name, value, steps, eval_every, s) for s in range(seeds)]
                curves[key] = [curve for curve, _ in runs]
                rule_lr = runs[0][1] if name == "rule" else rule_lr
                if verbose:
                    print(f"  {spec.name} {key}: final {mean([c[-1] for c in curves[key]]):.4f} ({time.time() - t:.1f}s)", flush=True)
        finally:
            task.close()
    return summarize(spec, steps, eval_every, curves, rule_lr, time.time() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # the shipped default (the meta-trained rule of recipes/meta-train-default.yaml)
    parser.add_argument("--rule", default="default")
    parser.add_argument("--quick", action="store_true", help="every task, fewer steps")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--tasks", nargs="*", default=None, help="subset of task names (for debugging only)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--verbose", action="store_true", help="also print each optimizer setting as it finishes")
    parser.add_argument("--out", type=Path, default=None, help="output stem (default benchmarks/results/heldout[-quick])")
    parser.add_argument("--merge", type=Path, nargs="+", default=None,
                        help="write one report from the JSON files of runs over disjoint task subsets (same rule)")
    parser.add_argument("--suite", choices=sorted(SUITES), default="heldout",
                        help="heldout (judges a rule) or dev (where shipped settings are chosen)")
    parser.add_argument("--baselines", type=Path, nargs="+", default=None,
                        help="reuse the AdamW/Muon curves of earlier runs' JSON (same tasks, horizon, sweep, ≥ seeds); "
                             "only the rule runs where they match")
    args = parser.parse_args()
    suite = SUITES[args.suite]
    known = [t.name for t in suite]
    unknown = sorted(set(args.tasks or []) - set(known))
    if unknown:
        parser.error(f"unknown task(s) {unknown}; known: {', '.join(known)}")
    torch.set_num_threads(args.threads)
    rule, rule_label = resolve_rule(args.rule)
    rule.requires_grad_(False)
    stem = args.out or RESULTS / (args.suite + ("-quick" if args.quick else ""))
    stem.parent.mkdir(parents=True, exist_ok=True)
    if args.merge:
        parts = [json.loads(path.read_text()) for path in args.merge]
        order = [spec.name for spec in suite]
        results = sorted((r for part in parts for r in part["results"]), key=lambda r: order.index(r["task"]))
        args.tasks = None
        args.quick = any(part["quick"] for part in parts)
        args.seeds = min(part["seeds"] for part in parts)
        args.parts = [part["command"] for part in parts]
        write_outputs(results, rule, rule_label, args, stem, sum(part["seconds"] for part in parts))
        return
    sources = [json.loads(path.read_text()) for path in args.baselines or []]
    start = time.time()
    results = []
    for spec in suite:
        if args.tasks and spec.name not in args.tasks:
            continue
        reuse = reusable_baselines(spec, args.quick, args.seeds, sources)
        if args.baselines and not reuse:
            print(f"{spec.name}: no matching baselines in {[str(p) for p in args.baselines]}; running them", flush=True)
        result = run_task(spec, rule, args.quick, args.seeds, args.verbose, reuse)
        results.append(result)
        print(task_line(result), flush=True)
    write_outputs(results, rule, rule_label, args, stem, time.time() - start)


def command_line(args) -> str:
    parts = ["python benchmarks/heldout.py"]
    if args.suite != "heldout":
        parts.append(f"--suite {args.suite}")
    if args.quick:
        parts.append("--quick")
    if args.rule != "default":
        parts.append(f"--rule {args.rule}")
    if args.seeds != 3:
        parts.append(f"--seeds {args.seeds}")
    if args.tasks:
        parts.append("--tasks " + " ".join(args.tasks))
    if args.baselines:
        parts.append("--baselines " + " ".join(str(p) for p in args.baselines))
    return " ".join(parts)


def with_ext(stem: Path, ext: str) -> Path:
    """``stem`` + ``ext`` (``Path.with_suffix`` would cut a stem with a dot in it, e.g. ``dev-lr0.03``)."""
    return stem.parent / (stem.name + ext)


def write_outputs(results, rule, rule_label, args, stem: Path, seconds: float) -> None:
    config = rule.config
    with_ext(stem, ".json").write_text(results_json.dumps({
        "rule": rule_label,
        "rule_output": config.output,
        "recommended_lr": getattr(config, "recommended_lr", None),
        "command": command_line(args),
        "quick": args.quick,
        "seeds": args.seeds,
        "threads": args.threads,
        "seconds": round(seconds, 1),
        "results": results,
    }))  # compact: curves are long; the .md holds the readable table
    if not results:
        print("no task selected")
        return
    lines = [
        f"# {'Held-out benchmark' if args.suite == 'heldout' else 'Development suite (chooses shipped settings; not a judge)'}"
        f"{' (quick)' if args.quick else ''}",
        "",
        f"Rule: `{rule_label}` ({config.output}, {rule.num_parameters()} φ parameters, "
        f"meta-trained: {rule.provenance.get('meta_trained')}, recipe: {rule.provenance.get('recipe')}; "
        f"recommended lr {getattr(config, 'recommended_lr', None)}). Command: `{command_line(args)}`; "
        f"{args.seeds} seeds; {seconds / 60:.1f} min on {platform.machine()} (torch threads: {args.threads}).",
        *([f"Merged from runs over task subsets: {'; '.join(f'`{c}`' for c in args.parts)}. `--baselines` reuses the"
           " AdamW/Muon curves of an earlier run of the same tasks, horizon, sweep and seeds (deterministic on CPU,"
           " so a rerun computes the same curves); only the rule ran again."] if getattr(args, "parts", None) else []),
        "",
        "Loss = training objective on a fixed evaluation set. The rule runs as shipped (recommended lr, no tuning);"
        " AdamW and Muon (+ AdamW on non-matrix tensors), weight decay 0.01, at the best of 5 log-spaced lrs."
        " Ratio = rule final loss / baseline final loss (< 1 is better). Speedup = steps the baseline needs for"
        " its final loss / steps the rule needs for it (> 1 is better; < 1 when the rule never gets there)."
        f" Per task: geometric mean over seeds [min, max]. Losses floored at {LOSS_FLOOR:g} for ratios/speedups."
        " A best lr marked * is at the edge of its sweep (the baseline might do better outside it).",
        "",
        "| task | kind | held out | steps | best AdamW lr | best Muon lr | final loss: rule | best AdamW | best Muon "
        "| loss ratio vs AdamW | speedup vs AdamW | loss ratio vs Muon | speedup vs Muon | rule ≤ AdamW | diverged |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:--:|:--:|",
    ]
    lr_cell = lambda lr, lrs: f"{lr:g}" + ("*" if lr in (min(lrs), max(lrs)) else "")  # noqa: E731
    spread = lambda xs, f: f"{geomean(xs):{f}} [{min(xs):{f}}, {max(xs):{f}}]"  # noqa: E731
    for r in results:
        m = r["mean_final"]
        lines.append(
            f"| {r['task']} | {r['kind']} | {r['held_out']} | {r['steps']} | {lr_cell(r['best_lr'], r['lrs'])} | "
            f"{lr_cell(r['best_muon_lr'], r['lrs'])} | "
            f"{m['rule']:.4f} | {m['adamw']:.4f} | {m['muon']:.4f} | {spread(r['loss_ratio'], '.3f')} | "
            f"{spread(r['speedup'], '.2f')} | {spread(r['loss_ratio_vs_muon'], '.3f')} | {spread(r['speedup_vs_muon'], '.2f')} | "
            f"{'yes' if r['rule_le_best_adamw'] else 'no'} | {'YES' if r['diverged'] else 'no'} |"
        )

    def overall(key: str, subset=results) -> tuple[float, dict]:
        values = [geomean(r[key]) for r in subset]
        return geomean(values), subset[values.index(min(values)) if "speedup" in key else values.index(max(values))]

    lines.append("")
    for base, speed_key, ratio_key in (("AdamW", "speedup", "loss_ratio"), ("Muon", "speedup_vs_muon", "loss_ratio_vs_muon")):
        g, worst = overall(speed_key)
        wins = sum(geomean(r[speed_key]) > 1 for r in results)
        goal = " (goal ≥ 1.5)" if base == "AdamW" else " (goal ≥ 1.0)"
        lines.append(
            f"- geometric-mean speedup vs best-lr {base}: **{g:.2f}**{goal}; worst task {worst['task']} "
            f"{geomean(worst[speed_key]):.2f}; speedup > 1 on **{wins}/{len(results)}** tasks"
        )
        g, worst = overall(ratio_key)
        lines.append(
            f"- geometric-mean final loss ratio vs best-lr {base}: **{g:.3f}**; worst task {worst['task']} "
            f"{geomean(worst[ratio_key]):.3f}"
        )
    for kind in ("scratch", "finetune"):
        subset = [r for r in results if r["kind"] == kind]
        if subset:
            lines.append(
                f"- {kind} tasks ({len(subset)}): geometric-mean speedup vs AdamW {overall('speedup', subset)[0]:.2f}, "
                f"vs Muon {overall('speedup_vs_muon', subset)[0]:.2f}; loss ratio vs AdamW "
                f"{overall('loss_ratio', subset)[0]:.3f}, vs Muon {overall('loss_ratio_vs_muon', subset)[0]:.3f}"
            )
    not_le = [r["task"] for r in results if not r["rule_le_best_adamw"]]
    lines.append(
        f"- final loss ≤ best AdamW's on every task: **{'yes' if not not_le else 'no'}** "
        f"({len(results) - len(not_le)}/{len(results)}{'; not on ' + ', '.join(not_le) if not_le else ''}); "
        f"≤ best Muon's on {sum(r['rule_le_best_muon'] for r in results)}/{len(results)}"
    )
    with_default = [r for r in results if r["beats_default_lr"] is not None]
    lines += [
        f"- beats AdamW lr 1e-3 (lower final loss) on **{sum(r['beats_default_lr'] for r in with_default)}/{len(with_default)}**"
        f" tasks that sweep it; diverged on {sum(r['diverged'] for r in results)}",
        "",
        f"![curves]({with_ext(stem, '.png').name})",
    ]
    with_ext(stem, ".md").write_text("\n".join(lines) + "\n")
    plot(results, with_ext(stem, ".png"), lr_is_adamw=getattr(config, "format_version", 1) >= 2)
    print("\n".join(lines))


def plot(results, path: Path, lr_is_adamw: bool = True) -> None:
    """Per task: mean eval-loss curves of the rule, best AdamW and best Muon, with the [min, max] band over seeds.
    ``lr_is_adamw``: the rule's lr is AdamW's lr (format 2) rather than a multiplier (format 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(results))
    rows = math.ceil(len(results) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax, r in zip(axes.flat, results):
        entries = (
            (f"adamw@{r['best_lr']:g}", f"AdamW best ({r['best_lr']:g})", "--"),
            (f"muon@{r['best_muon_lr']:g}", f"Muon best ({r['best_muon_lr']:g})", ":"),
            ("rule", "rule" + (f" ({'lr' if lr_is_adamw else 'lr ×'} {r['rule_lr']:g})" if r.get("rule_lr") is not None else ""), "-"),
        )
        for key, label, style in entries:
            curves = torch.tensor(r["curves"][key]).clamp(max=1e6)
            ax.plot(r["axis"], curves.mean(0), style, label=label, lw=1.8 if key == "rule" else 1.2)
            ax.fill_between(r["axis"], curves.min(0).values, curves.max(0).values, alpha=0.15)
        ax.set_yscale("log")
        ax.set_title(f"{r['task']} ({r['kind']})", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (eval set)")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(results):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
