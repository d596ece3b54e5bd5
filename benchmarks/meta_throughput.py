"""Meta-training throughput: vectorized truncated unroll vs a plain per-task Python loop on the same work.

    python benchmarks/meta_throughput.py [--tasks 16 64] [--steps 20] [--threads 1] [--profile] [--out FILE]

Work: ``T`` task instances (MLP 64-32-10 on digits 8x8, batch 64) × 2 antithetic copies, each copy with its
own perturbed φ of the default recipe's rule config, advanced ``--steps`` inner steps (loss, gradient,
learned step). "vectorized" advances all copies at once (stacked weights, one `reference.learned_update`
call per parameter tensor with ``batch_dims=1``); "loop" runs the identical math one copy at a time (copy
tensors of leading size 1) in a Python loop. Reports inner copy-steps per second (one copy advanced one
step). "task only" times the loss and gradient of the same stacked copies without the learned step: the part
of a copy-step that a per-task loop pays too. ``--profile`` adds a `torch.profiler` table of the vectorized
path at the first ``--tasks`` value (top ops by self CPU time). The report goes to ``--out`` (default
``outputs/meta_throughput.md``, outside the tracked tree).
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import torch

from optbundle.meta import tasks as T
from optbundle.meta import unroll as U
from optbundle.meta.trainer import initial_rule, load_recipe

SPEC = dict(family="mlp", dataset="digits8", hidden=[32], activation="relu", batch_size=64, input_scale=1.0, label_noise=0.0)


def setup(instances: int):
    config = load_recipe("meta-train-default")
    rule = initial_rule(config)
    theta = U.flatten_rule(rule)
    task = T.build_task(SPEC)
    gen = torch.Generator().manual_seed(0)
    copies = 2 * instances
    params = {k: torch.cat([v, v]) for k, v in task.init_params(gen, instances).items()}
    epsilon = 0.01 * torch.randn(instances, theta.numel(), generator=gen)
    weights = U.unflatten_weights(rule.config, theta + torch.cat([epsilon, -epsilon]))
    from optbundle.step import reference

    state = {k: reference.init_state(rule.config, v.shape[1:], batch_shape=(copies,)) for k, v in params.items()}
    return rule.config, task, gen, params, weights, state


def run_vectorized(instances: int, steps: int) -> float:
    config, task, gen, params, weights, state = setup(instances)
    batches = [tuple(torch.cat([b, b]) for b in task.sample_batch(gen, instances)) for _ in range(steps)]
    start = time.perf_counter()
    for batch in batches:
        _, params, state = U.inner_step(config, weights, task, params, state, batch)
    return 2 * instances * steps / (time.perf_counter() - start)


def run_task_only(instances: int, steps: int) -> float:
    """Copy-steps/s of the loss and gradient alone (the same stacked copies and batches, no learned step)."""
    _, task, gen, params, _, _ = setup(instances)
    batches = [tuple(torch.cat([b, b]) for b in task.sample_batch(gen, instances)) for _ in range(steps)]
    leaves = {k: v.requires_grad_() for k, v in params.items()}
    start = time.perf_counter()
    for batch in batches:
        torch.autograd.grad(task.loss(leaves, batch).sum(), list(leaves.values()))
    return 2 * instances * steps / (time.perf_counter() - start)


def profile_vectorized(instances: int, steps: int, rows: int = 15) -> str:
    """`torch.profiler` table (top ``rows`` ops by self CPU time) of `run_vectorized`'s timed loop."""
    from torch.profiler import ProfilerActivity, profile

    config, task, gen, params, weights, state = setup(instances)
    batches = [tuple(torch.cat([b, b]) for b in task.sample_batch(gen, instances)) for _ in range(steps)]
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for batch in batches:
            _, params, state = U.inner_step(config, weights, task, params, state, batch)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def run_loop(instances: int, steps: int) -> float:
    config, task, gen, params, weights, state = setup(instances)
    copies = 2 * instances
    batches = [tuple(torch.cat([b, b]) for b in task.sample_batch(gen, instances)) for _ in range(steps)]
    per_copy = []
    for c in range(copies):
        per_copy.append(
            (
                {k: v[c : c + 1].clone() for k, v in params.items()},
                {k: {kk: vv[c : c + 1].clone() for kk, vv in s.items()} for k, s in state.items()},
                [(w[c : c + 1].clone(), b[c : c + 1].clone()) for w, b in weights],
            )
        )
    start = time.perf_counter()
    for step, batch in enumerate(batches):
        for c in range(copies):
            p, s, w = per_copy[c]
            _, p, s = U.inner_step(config, w, task, p, s, tuple(b[c : c + 1] for b in batch))
            per_copy[c] = (p, s, w)
    return copies * steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--profile", action="store_true", help="add a torch.profiler table of the vectorized path")
    parser.add_argument("--out", type=Path, default=Path("outputs/meta_throughput.md"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run_vectorized(2, 2)  # warm-up (data loading, allocator)
    rows = []
    for n in args.tasks:
        vectorized = max(run_vectorized(n, args.steps) for _ in range(2))
        loop = run_loop(n, max(2, args.steps // 4))
        task_only = max(run_task_only(n, args.steps) for _ in range(2))
        rows.append((n, 2 * n, vectorized, loop, vectorized / loop, task_only))
        print(f"{n} tasks x 2 copies: vectorized {vectorized:,.0f} copy-steps/s, loop {loop:,.0f} copy-steps/s, "
              f"{vectorized / loop:.1f}x; task only {task_only:,.0f} copy-steps/s")
    lines = [
        "# Meta-training throughput (inner copy-steps per second)",
        "",
        f"`python benchmarks/meta_throughput.py --tasks {' '.join(map(str, args.tasks))} --steps {args.steps} --threads {args.threads}`"
        f" on {platform.machine()} ({torch.get_num_threads()} torch thread(s), machine shared with other jobs), torch {torch.__version__}.",
        "Work: MLP 64-32-10 on digits 8x8, batch 64, default-recipe rule with one perturbed φ per copy; each task has 2"
        " antithetic copies. A copy-step = loss + gradient + learned step of one copy.",
        "",
        "| tasks | copies | vectorized (copy-steps/s) | per-task loop (copy-steps/s) | speed-up | vectorized ms/copy-step | of which task loss+grad |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {n} | {c} | {v:,.0f} | {l:,.0f} | {r:.1f}x | {1e3 / v:.3f} | {1e3 / t:.3f} ({v / t:.0%}) |"
              for n, c, v, l, r, t in rows]
    if args.profile:
        lines += ["", f"Profile of the vectorized path at {args.tasks[0]} tasks, {args.steps} inner steps (self CPU time):",
                  "", "```", profile_vectorized(args.tasks[0], args.steps), "```"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
