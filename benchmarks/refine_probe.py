"""Probe single candidates of the scalar refinement on one domain of `benchmarks/refine.py`: the default rule at
given scalars (the refinement's vocabulary: ``lr=0.125``, ``role_lr.head=0.1``, ``adam_form=1``, comma-separated)
and AdamW at given lrs, one seed, each one fine-tuning run of the domain's steps on its batches; validation and
test loss per run. This is how the refinement's settings were chosen (`benchmarks/results/refine.md`).

    python benchmarks/refine_probe.py --domain dev-minilm-full-nyt --seed 21 \\
        --rule lr=1 adam_form=1,lr=0.5 adam_form=1,lr=0.125 --adamw 1e-4 3e-4 --out outputs/probe-nyt.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

import refine as R
from heldout import WEIGHT_DECAY
from optbundle import Bundle, load_rule
from optbundle.meta.refine import adamw_factory, evaluate_loss, finetune_curve
from optbundle.meta.scalars import FORM_SCALAR, scaled_rule


def parse_scalars(text: str) -> dict[str, float]:
    """``"adam_form=1,lr=0.125"`` → the search's values: log-scales, and ``adam_form`` as 0/1."""
    values = {}
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        if not value:
            raise SystemExit(f"--rule: {item!r} is not NAME=VALUE")
        values[name.strip()] = float(value) if name.strip() == FORM_SCALAR else math.log(float(value))
    return values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domain", required=True, choices=list(R.DOMAINS))
    parser.add_argument("--seed", type=int, default=21)
    parser.add_argument("--rule", nargs="*", default=[], help="scalar settings of the default rule, e.g. adam_form=1,lr=0.125")
    parser.add_argument("--adamw", nargs="*", type=float, default=[], help="AdamW lrs")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, help="append one JSON line per run to OUT and the table to OUT with .md")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    spec = R.DOMAINS[args.domain]
    task, _train_rows, _val_rows, train, val, test = R.domain_tensors(args.domain)
    model, default = task.model, load_rule("default")
    runs = [(f"rule {text}", lambda _n, rule=scaled_rule(default, parse_scalars(text)): Bundle(model, rule).build_optimizer(model))
            for text in args.rule]
    runs += [(f"AdamW lr={lr:g}", adamw_factory(lr, WEIGHT_DECAY)) for lr in args.adamw]
    lines = [f"| {args.domain}, seed {args.seed}, {spec['steps']} steps | validation | test |", "|---|---:|---:|"]
    print("\n".join(lines), flush=True)
    for label, make in runs:
        task.reset(args.seed)
        result = finetune_curve(model, make, train, val, spec["steps"], seed=args.seed, batch_size=spec["batch"],
                                eval_every=spec["steps"] + 1, eval_start=False)
        row = {"domain": args.domain, "seed": args.seed, "run": label, "val": result["final"], "test": evaluate_loss(model, test)}
        lines.append(f"| {label} | {row['val']:.4f} | {row['test']:.4f} |")
        print(lines[-1], flush=True)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            with args.out.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
            args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
