"""Try other signals for the per-tensor lr adaptation on the development suite (meta-training.md §8).

    python benchmarks/adaptation_signals.py --signal cos:3 -- --suite dev --seeds 2 --tasks dev-char-lm-d64-L1-comedies \\
        --baselines benchmarks/results/dev.json --out outputs/signals/cos3

Everything after ``--`` goes to `benchmarks/heldout.py`. The shipped signal (`lr_adaptation: gradient_alignment`)
is ``log s ← clip(log s + rate · sign(Σ g·m))``; ``--signal`` replaces it, for the from-scratch tasks only (they step
through `optbundle.step.reference.learned_update`; module tasks use the optimizer's back ends, which this does
not touch), by a comma-separated mix of:

- ``cos:K`` — ``clip(K · cos(g, m), −1, 1)`` instead of the sign (a continuous step: weak alignments move little);
- ``bias:B`` — ``+ B`` added to the move of every tensor with a non-zero alignment (equilibrium below zero);
- ``precond`` — align ``g`` with ``m/√v`` (Adam's preconditioned momentum) instead of ``m``;
- ``only:2d`` / ``only:1d`` — adapt only tensors of rank ≥ 2 / < 2 (the others keep ``s = 1``);
- ``roles:R1+R2`` — adapt only tensors of those roles (matrix, vector, embedding, head).

``--config JSON`` replaces `RuleConfig` fields of the rule that heldout.py loads (e.g. ``'{"lr_adaptation_bounds":
[0.25, 10.0]}'``). This is a probe for choosing a form; what ships is a `RuleConfig` field.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import runpy
import sys
from pathlib import Path

import torch

import optbundle
from optbundle.step import reference

_role: dict[str, str | None] = {"role": None}


def parse_signal(text: str) -> dict[str, str]:
    options = {}
    for part in filter(None, text.split(",")):
        key, _, value = part.partition(":")
        if key not in ("cos", "bias", "precond", "only", "roles"):
            raise SystemExit(f"--signal: unknown part {part!r} (cos:K, bias:B, precond, only:2d|1d, roles:R1+R2)")
        options[key] = value
    return options


def make_signal(options: dict[str, str]):
    """A replacement for `reference.adapted_lr_log_scale` following ``options``."""

    def adapted(config, grad, state, batch_dims=0):
        momentum = state["momentum"].select(batch_dims, config.lr_adaptation_momentum_index)
        g = grad.to(momentum.dtype)
        if "precond" in options:
            momentum = momentum * torch.rsqrt(state["second_moment"] + 1e-16)
        dims = tuple(range(batch_dims, g.dim()))
        alignment = (g * momentum).sum(dim=dims) if dims else g * momentum
        if "cos" in options:
            norms = (g * g).sum(dim=dims).sqrt() * (momentum * momentum).sum(dim=dims).sqrt() if dims else (g * momentum).abs()
            move = (float(options["cos"]) * alignment / (norms + 1e-30)).clamp(-1.0, 1.0)
        else:
            move = torch.sign(alignment)
        if "bias" in options:
            move = torch.where(alignment != 0, move + float(options["bias"]), move)
        rank = g.dim() - batch_dims
        if options.get("only") == "2d" and rank < 2 or options.get("only") == "1d" and rank >= 2:
            move = torch.zeros_like(move)
        if "roles" in options and _role["role"] not in options["roles"].split("+"):
            move = torch.zeros_like(move)
        lo, hi = config.lr_adaptation_bounds
        return (state["lr_log_scale"] + config.lr_adaptation_rate * move).clamp(math.log(lo), math.log(hi))

    return adapted


def install(options: dict[str, str], config: dict | None) -> None:
    if options:
        reference.adapted_lr_log_scale = make_signal(options)
        plain = reference.learned_update

        def learned_update(*args, **kwargs):
            _role["role"] = kwargs.get("role")
            return plain(*args, **kwargs)

        reference.learned_update = learned_update
    if config:
        load = optbundle.load_rule

        def load_rule(*args, **kwargs):
            rule = load(*args, **kwargs)
            rule.config = dataclasses.replace(rule.config, **config)
            return rule

        optbundle.load_rule = load_rule


def main() -> None:
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--signal", default="", help="cos:K, bias:B, precond, only:2d|1d, roles:R1+R2 (comma-separated)")
    parser.add_argument("--config", default=None, help="JSON object of RuleConfig fields to replace")
    args = parser.parse_args(argv[:split])
    install(parse_signal(args.signal), json.loads(args.config) if args.config else None)
    sys.argv = ["heldout.py", *argv[split + 1:]]
    runpy.run_path(str(Path(__file__).with_name("heldout.py")), run_name="__main__")


if __name__ == "__main__":
    main()
