"""Where should a format-2 hybrid rule's recommended scratch lr sit? Probe on META-TRAINING tasks only.

    python benchmarks/hybrid_lr_probe.py [--steps 150] [--seeds 2] [--rule RULE] [--out FILE.md]

Runs the zero-φ hybrid rule of `recipes/meta-train-default.yaml` (Muon on hidden matrices, Adam elsewhere,
μP width multipliers: what meta-training starts from) — or ``--rule`` — and AdamW at the same lrs on tasks
drawn from the recipe's own task distribution (never the held-out suite), and prints the final training loss
per lr. Used once to choose ``recommended_lr.scratch`` before meta-training (benchmarks/results/meta-training.md §5).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from optbundle.step import reference
from optbundle.meta import tasks as T
from optbundle.meta import unroll as U
from optbundle.meta.trainer import initial_rule, load_recipe

LRS = [1e-3, 3e-3, 1e-2, 3e-2]


def run_rule(task, rule, lr: float, steps: int, seeds: int) -> float:
    generator = torch.Generator().manual_seed(0)
    params = task.init_params(generator, seeds)
    state = {k: reference.init_state(rule.config, v.shape[1:], batch_shape=(seeds,)) for k, v in params.items()}
    weights = [(w.detach(), b.detach()) for w, b in rule.weights]
    roles = U.task_roles(task, params)
    for _ in range(steps):
        batch = task.sample_batch(generator, seeds)
        names = list(params)
        leaves = [params[k].detach().requires_grad_() for k in names]
        with torch.enable_grad():
            losses = task.loss(dict(zip(names, leaves)), batch)
            grads = torch.autograd.grad(losses.sum(), leaves)
        with torch.no_grad():
            for name, grad in zip(names, grads):
                params[name], state[name] = reference.learned_update(
                    rule.config, weights, params[name], grad, state[name], lr=lr, batch_dims=1, role=roles[name]
                )
    return float(losses.detach().mean())


def run_adamw(task, lr: float, steps: int, seeds: int) -> float:
    generator = torch.Generator().manual_seed(0)
    leaves = {k: v.clone().requires_grad_() for k, v in task.init_params(generator, seeds).items()}
    optimizer = torch.optim.AdamW(leaves.values(), lr=lr, weight_decay=0.0)
    for _ in range(steps):
        batch = task.sample_batch(generator, seeds)
        optimizer.zero_grad(set_to_none=True)
        losses = task.loss(leaves, batch)
        losses.sum().backward()
        optimizer.step()
    return float(losses.detach().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="meta-train-default")
    parser.add_argument("--rule", default=None, help="a rule folder instead of the recipe's zero-φ start")
    parser.add_argument("--tasks", type=int, default=8, help="task specs drawn from the recipe's distribution")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = load_recipe(args.recipe)
    if args.rule:
        from optbundle import load_rule

        rule = load_rule(args.rule)
    else:
        rule = initial_rule(config)
    generator = torch.Generator().manual_seed(1234)  # not the recipe's seed: other draws than meta-training's
    lines = [
        f"Zero-φ start of `{args.recipe}` (or `{args.rule}`) vs AdamW, final training loss (mean of {args.seeds} "
        f"seeds) after {args.steps} steps, tasks drawn from the recipe's distribution. "
        f"Command: `python benchmarks/hybrid_lr_probe.py --steps {args.steps} --seeds {args.seeds}`.",
        "",
        "| task | " + " | ".join(f"rule {lr:g}" for lr in LRS) + " | " + " | ".join(f"AdamW {lr:g}" for lr in LRS) + " |",
        "|---|" + "---:|" * (2 * len(LRS)),
    ]
    best_rule, best_adam = {lr: [] for lr in LRS}, []
    start = time.time()
    for _ in range(args.tasks):
        spec = T.sample_task_spec(config.tasks, generator)
        task = T.build_task(spec)
        rule_losses = [run_rule(task, rule, lr, args.steps, args.seeds) for lr in LRS]
        adam_losses = [run_adamw(task, lr, args.steps, args.seeds) for lr in LRS]
        adam_best = min(x for x in adam_losses if math.isfinite(x))
        best_adam.append(adam_best)
        for lr, loss in zip(LRS, rule_losses):
            best_rule[lr].append(loss / adam_best if math.isfinite(loss) else math.inf)
        label = ", ".join(f"{k}={v}" for k, v in spec.items() if k not in ("family",) and v not in (0.0, 1.0))
        line = f"| {spec['family']}: {label} | " + " | ".join(f"{x:.3f}" for x in rule_losses + adam_losses) + " |"
        lines.append(line)
        print(line, flush=True)
    geo = {lr: math.exp(sum(math.log(max(r, 1e-9)) for r in v) / len(v)) for lr, v in best_rule.items()}
    lines += ["", "Geometric mean over tasks of rule final loss / best-of-sweep AdamW final loss: "
              + ", ".join(f"lr {lr:g}: {g:.3f}" for lr, g in geo.items()) + f" ({(time.time() - start) / 60:.1f} min)."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
