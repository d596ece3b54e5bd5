"""Accumulator state in fp32 vs bf16 (``LearnedOptimizer(state_dtype=...)``): size and quality.

    OMP_NUM_THREADS=1 python benchmarks/state_dtype.py --threads 1 --out benchmarks/results/state_dtype_minilm_sms.md

The report goes to ``--out`` (default ``outputs/state_dtype.md``, outside the tracked tree).

- **Size**: state bytes per parameter of the shipped default rule on all-MiniLM-L6-v2's parameters, from the
  optimizer's actual state tensors after one step (accumulators; the int64 ``step``/``skipped_steps`` counters
  per tensor are listed apart).
- **Quality**: `heldout_tasks.MiniLMFullFineTune` on SMS spam (every parameter trains), run as `heldout.py`'s
  `run_module` runs it (``Bundle(model, load_rule("default")).optimizer()``, no lr): the same seeds, so every
  arm starts from the same weights and sees the same batches; final eval loss per arm, mean ± std over seeds.
  Arms: fp32 state, bf16 state (stochastic rounding, the shipped behaviour) and bf16 with round-to-nearest
  (``optimizer.STOCHASTIC_ROUNDING = False``).
- **Slow EMA**: why the rounding matters: a β=0.999 EMA of g² (g ~ N(0, 1), 4096 elements, ``--ema-steps``
  steps) kept in fp32, in bf16 rounded to nearest and in bf16 rounded stochastically (`optimizer.round_to_state_`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from optbundle import Bundle, load_rule
from optbundle.step import optimizer as O

if str(Path(__file__).resolve().parent) not in sys.path:  # run as a script it is already there
    sys.path.append(str(Path(__file__).resolve().parent))
import heldout  # noqa: E402
import heldout_tasks as HT  # noqa: E402
from step_speed import machine_line  # noqa: E402

ARMS = {  # label → (state dtype, stochastic rounding)
    "fp32 state": (torch.float32, True),
    "bf16 state (stochastic rounding)": (torch.bfloat16, True),
    "bf16 state (round to nearest)": (torch.bfloat16, False),
}


def state_size(task: HT.ModuleTask, dtype: torch.dtype) -> tuple[float, int, int]:
    """(accumulator bytes per parameter, counter bytes in all, parameters) after one step of the default rule."""
    task.reset(0)
    opt, _ = Bundle(task.model, load_rule("default")).optimizer(state_dtype=dtype)
    task.loss(task.sample(torch.Generator().manual_seed(0))).backward()
    opt.step()
    params = [p for group in opt.param_groups for p in group["params"]]
    values = [v for p in params for v in opt.state[p].values()]
    accumulators = sum(v.numel() * v.element_size() for v in values if v.is_floating_point())
    counters = sum(v.numel() * v.element_size() for v in values if not v.is_floating_point())
    numel = sum(p.numel() for p in params)
    task.model.zero_grad(set_to_none=True)
    return accumulators / numel, counters, numel


def slow_ema(steps: int, beta: float = 0.999, numel: int = 4096) -> dict[str, float]:
    """Mean of the EMA of g² after ``steps`` steps: fp32, bf16 to nearest, bf16 stochastic."""
    generator = torch.Generator().manual_seed(0)
    exact = torch.zeros(numel)
    states = {False: torch.zeros(numel, dtype=torch.bfloat16), True: torch.zeros(numel, dtype=torch.bfloat16)}
    for step in range(steps):
        g2 = torch.randn(numel, generator=generator).square()
        exact = beta * exact + (1 - beta) * g2
        for stochastic, state in states.items():
            O.STOCHASTIC_ROUNDING = stochastic
            O.round_to_state_(state, beta * state.float() + (1 - beta) * g2, seed=step)
    O.STOCHASTIC_ROUNDING = True
    return {"fp32": float(exact.mean()), "bf16, round to nearest": float(states[False].float().mean()),
            "bf16, stochastic": float(states[True].float().mean())}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--ema-steps", type=int, default=3000)
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--threads", type=int, help="torch intra-op threads; default: torch's")
    parser.add_argument("--out", type=Path, default=Path("outputs/state_dtype.md"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    task = HT.MiniLMFullFineTune("sms-spam", 800)
    lines = [
        "# Learned-optimizer state in fp32 vs bf16", "",
        f"- machine: {machine_line(torch.device('cpu'))}",
        f"- command: `python {' '.join(['benchmarks/state_dtype.py', *sys.argv[1:]])}` (started {started})", "",
        "## Size: the shipped default rule on all-MiniLM-L6-v2 (every parameter trained)", "",
        "| state | accumulator B/param | int64 counters (all tensors) | parameters |", "|---|---|---|---|",
    ]
    for label, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        per_param, counters, numel = state_size(task, dtype)
        lines.append(f"| {label} | {per_param:.2f} | {counters} B | {numel:,} |")
        print(lines[-1], flush=True)
    lines += [
        "", f"## Quality: MiniLM full fine-tune on SMS spam, {args.steps} steps, batch {task.batch_size}, "
        f"{args.seeds} seeds (same data order per seed), shipped default with its recommended lr", "",
        "| state | final eval loss (mean ± std) | per seed | seconds |", "|---|---|---|---|",
    ]
    for label in args.arms:
        dtype, stochastic = ARMS[label]
        O.STOCHASTIC_ROUNDING = stochastic
        start = time.time()
        finals = []
        for seed in range(args.seeds):
            curve, _ = heldout.run_module(task, "rule", load_rule("default"), args.steps, args.steps, seed, dtype)
            finals.append(curve[-1])
        O.STOCHASTIC_ROUNDING = True
        spread = statistics.stdev(finals) if len(finals) > 1 else 0.0
        lines.append(f"| {label} | {statistics.mean(finals):.4f} ± {spread:.4f} | "
                     f"{', '.join(f'{x:.4f}' for x in finals)} | {time.time() - start:.0f} |")
        print(lines[-1], flush=True)
    ema = slow_ema(args.ema_steps)
    lines += ["", f"## Slow EMA: β=0.999 EMA of g² (g ~ N(0, 1), expected mean 1) after {args.ema_steps} steps", "",
              "| kept in | mean | vs fp32 |", "|---|---|---|"]
    lines += [f"| {label} | {value:.4f} | {value / ema['fp32'] - 1:+.1%} |" for label, value in ema.items()]
    print("\n".join(lines[-3:]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
