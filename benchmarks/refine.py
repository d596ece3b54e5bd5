"""Refinement benchmark: AdamW (swept lr) vs the unrefined rule vs the refined rule, on fresh data and seeds.

    python benchmarks/refine.py                       # both settings: writes benchmarks/results/refine-*.{md,json,png}
    python benchmarks/refine.py --settings minilm-vader
    python benchmarks/refine.py --quick               # a few meta-steps / steps, to check the pipeline

Settings (recipes/refine-*.yaml):
- ``minilm-vader``: MiniLM-L6 + LoRA (r=8, query/value) + classification head, VADER Amazon review snippets
  (sentiment > 0), a dataset the default rule never saw;
- ``minilm-vader-default``: the same with the default rule (default-v2) as parent, adapting only its step-size
  output (``trainable: output_scale``);
- ``smollm2-shakespeare``: SmolLM2-135M + LoRA (r=8, q/v), Shakespeare language modelling.

Protocol: the recipe refines the rule (``optbundle refine``; its bundle is reused if it exists, the wall time
comes from its provenance) with model seed 0 and data seeds 0/1 on the recipe's train split (inner steps) and
eval split (meta-objective). The comparison then fine-tunes fresh models with head/LoRA seeds and batch
orders from ``--seeds`` (not used in refinement) for the same number of steps with each optimizer, and
measures the loss on a *test* split that neither refinement nor training touched: VADER examples after the
recipe's train+eval rows of its shuffled order; for Shakespeare a play that is neither the eval play nor one
the training chunks came from. All runs: eval mode (dropout off), same batches per seed for every optimizer,
constant learning rates, LoRA weights and heads trained, base weights frozen.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from optbundle import Bundle, load_rule
from optbundle.store import assets
from optbundle.apps.finetune import build_datasets, load_model, load_tokenizer
from optbundle.meta.refine import (
    adamw_factory,
    finetune_curve,
    learned_optimizer_factory,
    load_refine_recipe,
    run_refine_recipe,
    token_data,
    with_lr_folded,
)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"

SETTINGS = {
    "minilm-vader": dict(recipe="refine-minilm-vader", steps=60, quick_steps=10, seeds=[11, 12, 13],
                         adamw_lrs=[3e-4, 1e-3, 3e-3, 1e-2, 3e-2], test_size=400, eval_every=15),
    "minilm-vader-default": dict(recipe="refine-minilm-vader-default", steps=60, quick_steps=10, seeds=[11, 12, 13],
                                 adamw_lrs=[3e-4, 1e-3, 3e-3, 1e-2, 3e-2], test_size=400, eval_every=15),
    "smollm2-shakespeare": dict(recipe="refine-smollm2-shakespeare", steps=20, quick_steps=4, seeds=[11, 12],
                                adamw_lrs=[3e-4, 1e-3, 3e-3, 1e-2], test_size=64, eval_every=5),
}


def test_split(recipe, tokenizer, size: int):
    """Examples neither refinement (train / meta split) nor the comparison's training ever sees."""
    from datasets import Dataset

    data, model = recipe.data, recipe.model
    if model.task == "sequence-classification":
        texts, scores = assets.vader_sentiment(data.dataset.split("-", 1)[1])
        order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(data.split_seed)).tolist()
        used = data.train_size + data.eval_size
        rows = order[used : used + size]
        if len(rows) < size:
            raise ValueError(f"{data.dataset}: only {len(rows)} unused examples for a test split of {size}")
        ds = Dataset.from_dict({"text": [texts[i] for i in rows], "labels": [int(scores[i] > 0) for i in rows]})
        return ds.map(lambda b: tokenizer(b["text"], truncation=True, max_length=data.max_length), batched=True,
                      remove_columns=["text"])
    plays = assets.shakespeare_plays()
    names = sorted(plays)
    eval_play = names[data.split_seed % len(names)]
    # training chunks fill from the first plays in sorted order; take the last play, checked to be unused
    test_play = names[-1]
    needed_tokens = data.train_size * data.max_length
    seen = 0
    for name in names:
        if name == eval_play:
            continue
        if seen >= needed_tokens:
            break
        if name == test_play:
            raise ValueError("the test play overlaps the training plays")
        seen += len(tokenizer(plays[name])["input_ids"])
    ids = tokenizer(plays[test_play])["input_ids"]
    chunks = [ids[s : s + data.max_length] for s in range(0, len(ids) - data.max_length, data.max_length)][:size]
    return Dataset.from_dict({"input_ids": chunks})


def refined_rule(recipe, fresh: bool) -> tuple[Any, float]:
    """The recipe's refined rule (reusing its saved bundle unless ``fresh``) and the refinement wall time."""
    target = Path(recipe.source.output_bundle or Path(recipe.config.out_dir) / "bundle")
    if fresh or not (target / "optimizer").exists():
        start = time.perf_counter()
        result = run_refine_recipe(recipe)
        if result is None:
            raise SystemExit("refinement stopped early (max_wall_time_s); run again to resume")
        print(f"refined in {time.perf_counter() - start:.0f} s -> {result[1]}")
    rule = Bundle.from_pretrained(target).rule
    return rule, float(rule.provenance.get("wall_time_s", float("nan")))


def _stats(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return mean, std


def run_setting(name: str, quick: bool, fresh: bool, threads: int) -> dict[str, Any]:
    spec = SETTINGS[name]
    overrides = {}
    if quick:
        overrides = {"meta_steps": 2, "out_dir": f"outputs/refine-quick-{name}", "compare_steps": 0}
    recipe = load_refine_recipe(spec["recipe"], overrides)
    recipe.config.threads = threads
    torch.set_num_threads(threads)
    steps = spec["quick_steps"] if quick else spec["steps"]
    seeds = spec["seeds"][:1] if quick else spec["seeds"]
    lrs = spec["adamw_lrs"][1:3] if quick else spec["adamw_lrs"]
    tokenizer = load_tokenizer(recipe.model)
    train, _ = build_datasets(recipe.data, recipe.model, tokenizer)
    test = test_split(recipe, tokenizer, 32 if quick else spec["test_size"])
    pad = tokenizer.pad_token_id
    train_td = token_data(train, pad, recipe.data.max_length, "train")
    test_td = token_data(test, pad, recipe.data.max_length, "test")
    refined, refine_wall = refined_rule(recipe, fresh)
    parent = with_lr_folded(load_rule(recipe.source.rule), recipe.config.lr)
    if refined.provenance.get("parent_rule") != load_rule(recipe.source.rule).content_hash():
        raise SystemExit(f"{name}: the saved refined bundle was refined from another rule; rerun with --fresh")
    plan = [("AdamW", lr, adamw_factory(lr)) for lr in lrs]
    plan += [("unrefined rule", 1.0, None), ("refined rule", 1.0, None)]
    rows = []
    start = time.perf_counter()
    for label, lr, factory in plan:
        for seed in seeds:
            if factory is None:
                factory_ = learned_optimizer_factory(parent if label == "unrefined rule" else refined)
            else:
                factory_ = factory
            model = load_model(recipe.model, seed, tokenizer)
            result = finetune_curve(model, factory_, train_td, test_td, steps, seed=seed,
                                    batch_size=recipe.config.batch_size, eval_every=min(spec["eval_every"], steps))
            rows.append({"optimizer": label, "lr": lr, "seed": seed, **{k: result[k] for k in ("curve", "final", "diverged", "wall_s")}})
            print(f"{name}: {label} lr={lr:g} seed={seed}: test loss {result['final']:.4f} ({result['wall_s']:.0f} s)", flush=True)
            del model
    return {"setting": name, "recipe": spec["recipe"], "steps": steps, "seeds": seeds, "rows": rows,
            "refine_wall_s": refine_wall, "compare_wall_s": time.perf_counter() - start,
            "refined_hash": refined.content_hash(), "parent_hash": parent.content_hash(),
            "refine": {k: refined.provenance.get(k) for k in ("meta_steps", "data", "refine_config", "before_after")},
            "quick": quick, "test_size": len(test_td), "batch_size": recipe.config.batch_size}


def table(result: dict[str, Any]) -> str:
    rows = result["rows"]
    keys = []
    for r in rows:
        if (r["optimizer"], r["lr"]) not in keys:
            keys.append((r["optimizer"], r["lr"]))
    finals = {k: [r["final"] for r in rows if (r["optimizer"], r["lr"]) == k] for k in keys}
    means = {k: _stats(v)[0] for k, v in finals.items()}
    adamw = {k: m for k, m in means.items() if k[0] == "AdamW"}
    best = min(adamw, key=adamw.get)
    unrefined = means[("unrefined rule", 1.0)]
    refined = means[("refined rule", 1.0)]
    cfg = result["refine"]["refine_config"] or {}
    lines = [
        f"## {result['setting']}{' (quick)' if result['quick'] else ''}",
        "",
        f"Recipe `recipes/{result['recipe']}.yaml`; {result['steps']} fine-tuning steps at batch {result['batch_size']}, "
        f"seeds {result['seeds']} (refinement used seed 0), test loss on {result['test_size']} fresh examples. "
        f"Refinement: {result['refine']['meta_steps']} meta-steps of PES (trainable `{cfg.get('trainable')}`, "
        f"{cfg.get('pairs')} antithetic pair(s), truncation {cfg.get('truncation')}), **{result['refine_wall_s']:.0f} s** "
        f"on one CPU thread; the comparison took {result['compare_wall_s']:.0f} s.",
        "",
        "| optimizer | lr | test loss (mean ± std over seeds) | vs best AdamW | diverged |",
        "|---|---:|---:|---:|:--:|",
    ]
    for key in keys:
        mean, std = _stats(finals[key])
        diverged = any(r["diverged"] for r in rows if (r["optimizer"], r["lr"]) == key)
        label = key[0] + (" (best)" if key == best else "")
        lr = f"{key[1]:g}" if key[0] == "AdamW" else "×1 (folded)"
        lines.append(f"| {label} | {lr} | {mean:.4f} ± {std:.4f} | {mean / means[best]:.3f} | {'yes' if diverged else 'no'} |")
    lines += [
        "",
        f"- refined vs unrefined rule: test loss ratio **{refined / unrefined:.3f}** (< 1: refinement helped)",
        f"- refined rule vs best-lr AdamW ({best[1]:g}): ratio **{refined / means[best]:.3f}** (≤ 1: at least as good)",
        "",
    ]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    keys = []
    for r in result["rows"]:
        if (r["optimizer"], r["lr"]) not in keys:
            keys.append((r["optimizer"], r["lr"]))
    for key in keys:
        curves = [r["curve"] for r in result["rows"] if (r["optimizer"], r["lr"]) == key]
        steps = [s for s, _ in curves[0]]
        mean = [sum(c[i][1] for c in curves) / len(curves) for i in range(len(steps))]
        style = "-" if key[0] != "AdamW" else "--"
        ax.plot(steps, mean, style, marker="o", ms=3, label=f"{key[0]}" + (f" lr={key[1]:g}" if key[0] == "AdamW" else ""))
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("test loss (mean over seeds)")
    ax.set_title(result["setting"])
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--fresh", action="store_true", help="refine again even if the recipe's bundle exists")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    for name in args.settings:
        result = run_setting(name, args.quick, args.fresh, args.threads)
        stem = RESULTS / f"refine-{name}{'-quick' if args.quick else ''}"
        text = (f"# Refinement benchmark\n\nCommand: `python benchmarks/refine.py --settings {name}"
                f"{' --quick' if args.quick else ''}`.\n\n" + table(result) + f"\n![curves]({stem.name}.png)\n")
        stem.with_suffix(".md").write_text(text)
        stem.with_suffix(".json").write_text(json.dumps(result, indent=1, default=str))
        plot(result, stem.with_suffix(".png"))
        print(text)


if __name__ == "__main__":
    main()
