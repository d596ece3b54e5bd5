"""Fit the shipped "adam-init" rule: a small_fc_lopt-shaped φ regressed to imitate Adam (lr 1e-3).

Not meta-training: φ is fitted by regression so that, on synthetic gradient streams, its step matches
Adam's step ``1e-3 · m̂/(√v̂ + 1e-8)``. The result is a sane starting point for meta-training and the
``"default"`` rule until a meta-trained one ships. Its provenance says so.

    python -m optbundle.recipes.fit_adam_init --out bundle/pretrained/adam-init --seed 0

Everything runs through `optbundle.step.reference` (the same math as `LearnedOptimizer`). Deterministic for a
fixed seed on CPU.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from optbundle.step import reference
from optbundle.step.rule import SMALL_FC_LOPT_FEATURES, RuleConfig
from optbundle.store.rule import LearnedRule

ADAM_LR = 1e-3
SAMPLE_STEPS = (1, 2, 3, 5, 8, 13, 20, 35, 60, 100, 170, 300, 500, 900, 1500)


def adam_init_config() -> RuleConfig:
    """small_fc_lopt's 39 features and output form; ``second_moment_eps`` is tiny so that the
    ``m·rsqrt(v + eps)`` feature is Adam's direction up to a per-tensor factor."""
    return RuleConfig(
        features=list(SMALL_FC_LOPT_FEATURES),
        hidden_sizes=[8, 8],
        second_moment_eps=1e-12,
        output="small_fc_lopt",
        exp_mult=0.001,
        step_mult=ADAM_LR,
    )


def random_shape(generator: torch.Generator) -> tuple[int, ...]:
    kind = int(torch.randint(0, 4, (), generator=generator))
    size = lambda lo, hi: int(torch.randint(lo, hi, (), generator=generator))  # noqa: E731
    if kind == 0:
        return (size(4, 200),)
    if kind == 1:
        return (size(2, 64), size(2, 64))
    if kind == 2:
        return (size(2, 16), size(2, 16), 3, 3)
    return (size(1, 8), size(8, 128))


def gradient_stream(shape, copies: int, steps: int, generator: torch.Generator):
    """Yield ``steps`` gradients of shape ``(copies, *shape)``: a drifting mean plus noise, with per-copy
    scale log-uniform in [1e-3, 10], per-row/column heterogeneity and a random signal-to-noise ratio."""
    full = (copies, *shape)
    scale = torch.exp(torch.empty(copies).uniform_(math.log(1e-3), math.log(10.0), generator=generator))
    scale = scale.view(copies, *([1] * len(shape)))
    hetero = torch.exp(0.5 * torch.randn(full, generator=generator))
    if len(shape) >= 2:
        hetero = hetero * torch.exp(torch.randn(copies, *shape[:-1], 1, generator=generator))
    snr = torch.exp(torch.empty(copies).uniform_(math.log(0.05), math.log(5.0), generator=generator))
    mean = torch.randn(full, generator=generator) * snr.view(copies, *([1] * len(shape)))
    for _ in range(steps):
        mean = 0.999 * mean + 0.045 * torch.randn(full, generator=generator)
        yield scale * hetero * (mean + torch.randn(full, generator=generator))


def collect_samples(config: RuleConfig, problems: int, copies: int, generator: torch.Generator):
    """Features (normalized), time features and Adam's step along synthetic gradient streams."""
    samples = []
    for _ in range(problems):
        shape = random_shape(generator)
        param = torch.randn(copies, *shape, generator=generator)
        state = reference.init_state(config, shape, batch_shape=(copies,))
        wanted = set(SAMPLE_STEPS)
        for t, grad in enumerate(gradient_stream(shape, copies, max(SAMPLE_STEPS), generator), start=1):
            time_step = state["step"]
            state = reference.update_accumulators(config, grad, state, batch_dims=1)
            state["step"] = time_step + 1
            if t in wanted:
                feats = reference.compute_features(config, param, grad, state, batch_dims=1)
                target = reference.adam_direction(config, state, batch_dims=1).reshape(copies, -1)
                samples.append(
                    (feats, reference.feature_normalizers(config, feats), reference.time_features(config, time_step), target)
                )
    return samples


def rule_direction(config: RuleConfig, rule: LearnedRule, sample) -> torch.Tensor:
    feats, norms, time_feats, _ = sample
    out = reference.apply_network(config, rule.weights, feats, norms, time_feats)
    # step = d·exp(a·exp_mult)·step_mult with step_mult = Adam's lr: compare with Adam's direction
    return out[:, 0] * torch.exp(out[:, 1] * config.exp_mult)


def per_tensor_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-12)


def fit(seed: int = 0, iterations: int = 3000, problems: int = 60, copies: int = 8, log_every: int = 250) -> LearnedRule:
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    config = adam_init_config()
    rule = LearnedRule(config)
    train = collect_samples(config, problems, copies, generator)
    held_out = collect_samples(config, problems // 3, copies, generator)
    optimizer = torch.optim.Adam(rule.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, iterations)
    start = time.time()
    for it in range(iterations):
        batch = [train[int(i)] for i in torch.randint(0, len(train), (16,), generator=generator)]
        loss = 0.0
        for sample in batch:
            target = sample[3]
            pred = rule_direction(config, rule, sample)
            # Direction first (1 − cosine per tensor copy); magnitude second: the per-tensor normalization of the
            # features hides Adam's absolute scale, so only a typical scale can be learned (log-ratio penalty).
            cosine = per_tensor_cosine(pred, target)
            log_ratio = torch.log(pred.norm(dim=-1).clamp_min(1e-12) / target.norm(dim=-1).clamp_min(1e-12))
            loss = loss + (1 - cosine).mean() + 0.01 * (log_ratio**2).mean()
        loss = loss / len(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if log_every and (it % log_every == 0 or it == iterations - 1):
            print(f"iter {it:5d}  loss {loss.item():.4f}  ({time.time() - start:.0f}s)")
    with torch.no_grad():
        cos = torch.cat([per_tensor_cosine(rule_direction(config, rule, s), s[3]) for s in held_out])
        ratio = torch.cat([rule_direction(config, rule, s).norm(dim=-1) / s[3].norm(dim=-1) for s in held_out])
    print(f"held-out cosine with Adam: mean {cos.mean():.4f}, min {cos.min():.4f}, 5th pct {cos.quantile(0.05):.4f}")
    print(f"held-out step norm / Adam's: median {ratio.median():.3f}, 5th-95th pct {ratio.quantile(0.05):.3f}-{ratio.quantile(0.95):.3f}")
    rule.provenance = {
        "method": "adam-imitation regression",
        "meta_trained": False,
        "description": (
            "NOT meta-trained. φ was fitted by regression so that the rule's step imitates Adam (lr 1e-3) on "
            "synthetic gradient streams; it is a starting point for meta-training."
        ),
        "recipe": "python -m optbundle.recipes.fit_adam_init",
        "seed": seed,
        "iterations": iterations,
        "training_problems": problems * copies,
        "held_out_cosine_mean": round(float(cos.mean()), 5),
        "held_out_cosine_min": round(float(cos.min()), 5),
        "held_out_norm_ratio_median": round(float(ratio.median()), 4),
        "wall_time_s": round(time.time() - start, 1),
        "parent_rule": None,
    }
    return rule


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("bundle/pretrained/adam-init"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--iterations", type=int, default=3000)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rule = fit(seed=args.seed, iterations=args.iterations)
    rule.save_pretrained(args.out)
    print(f"saved {args.out} (hash {rule.content_hash()[:12]})")


if __name__ == "__main__":
    main()
