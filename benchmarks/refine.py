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

Budgeted scalar refinement (``--domains``; issue 16): "I would otherwise sweep AdamW's lr over 5 values on my
task. If I spend the same compute refining the bundle's optimizer, do I end up better?"

    python benchmarks/refine.py --domains minilm-lora-tweets          # one domain, 3 seeds: refine-<domain>.{json,png}
    python benchmarks/refine.py --domains minilm-lora-tweets --seeds 22 --out outputs/s22   # seeds side by side, then
    python benchmarks/refine.py --merge A.json B.json                 # one domain's JSON over disjoint seeds
    python benchmarks/refine.py --table                               # benchmarks/results/refine.md from the domains' JSON
    python benchmarks/refine.py --domains minilm-lora-tweets --significance 1 --reuse R/refine-minilm-lora-tweets.json
                                      # a variant of the search (--starts, --scalar-step, --significance): only it
                                      # and the refined rule run, the other rows reused

Domains (`heldout_tasks` models, data outside the rule's meta-training): ``minilm-lora-tweets`` (MiniLM-L6 +
LoRA r=8 + new head, VADER tweets), ``minilm-full-amazon`` (MiniLM-L6 full fine-tuning, VADER Amazon snippets),
``smollm2-lora-tragedies`` (SmolLM2-135M + LoRA r=8, Shakespeare tragedies); ``minilm-lora-tweets-val512`` is the
tweets domain with a 4× larger validation split (what selection noise costs), ``dev-minilm-full-nyt`` a development
domain for choosing the search's settings (`benchmarks/refine_probe.py`; no rows in refine.md). Each domain's data is cut once into
train / validation / test (disjoint). Per seed (the seed draws the new head / LoRA A and the batch order; every
optimizer of a seed sees the same batches for ``steps`` steps), what a user would do:

- **refined**: ``Bundle(model, default).refine(train, validation, adapt="scalars", horizon=steps, budget="sweep5")``
  (the search trains only on train and picks by validation loss), then one fine-tune with the refined rule;
- **unrefined**: the default rule as shipped;
- **AdamW / Muon best-of-5**: a 5-point lr sweep, the lr picked by validation loss (the user's choice) — and,
  reported beside it, the oracle lr with the lowest mean *test* loss (a bound no user has);

and all report the loss on the test split, which neither refinement nor any sweep saw. Cost: forward-backward
passes (a held-out evaluation batch counts as one pass), refinement's counted by `optbundle.meta.scalars`.

Online refinement (``--online``; issue 16, deliverable 4): the shipped default rule fine-tunes under a real
`transformers.Trainer` with `OnlineRefinementCallback` (antithetic ES probes on φ's last layer during the run,
settings `ONLINE`), fed the unrefined arm's batches of each seed in its eval mode without gradient clipping
(`finetune_online`: with ``outer_lr=0`` it is the unrefined run). Reported: test loss, the probes' share of the
training wall time and the passes they spent. With ``--reuse`` only the online arm runs, the other rows are kept:

    python benchmarks/refine.py --domains minilm-lora-tweets --online \
        --reuse benchmarks/results/refine-minilm-lora-tweets.json --out outputs/online  # refine-<domain>.json + online rows
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from optbundle import Bundle, load_rule
from optbundle.store import assets
from optbundle.apps.finetune import build_datasets, load_model, load_tokenizer
from optbundle.apps.refine import load_refine_recipe, run_refine_recipe
from optbundle.meta.scalars import describe as describe_scalars
from optbundle.meta.refine import (
    adamw_factory,
    RefineConfig,
    TokenData,
    finetune_curve,
    learned_optimizer_factory,
    token_data,
    with_lr_folded,
)

import results_json  # benchmarks/, the script's folder

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


# ---- budgeted scalar refinement on held-out domains (--domains) -------------------------------------------

#: one domain: a `heldout_tasks` model, its split sizes, horizon, batch and the baselines' lr sweep (sizes cut in
#: session 7 to fit a shared CPU: ≈ 12 s per held-out evaluation of 512 MiniLM examples, ≈ 2 s per SmolLM2 step at
#: 64 tokens; even so, on a loaded 2-core machine a seed took 7 min (MiniLM LoRA), ≈ 13 min (SmolLM2) and 31 min
#: (MiniLM full fine-tuning: the learned rule's step over 22.7M parameters): see each result's ``wall_s``)
DOMAINS = {
    "minilm-lora-tweets": dict(task="lora", data="vader-tweets", count=4200, max_length=32, train=2400, val=128,
                               test=256, steps=40, batch=8, lrs=[1e-4, 3e-4, 1e-3, 3e-3, 1e-2]),
    "minilm-full-amazon": dict(task="full", data="vader-amazonReviewSnippets", count=3708, max_length=32, train=2400,
                               val=128, test=256, steps=20, batch=8, lrs=[1e-5, 3e-5, 1e-4, 3e-4, 1e-3]),
    "smollm2-lora-tragedies": dict(task="smollm2", context=32, val=16, test=32, steps=16, batch=2,
                                   lrs=[1e-4, 3e-4, 1e-3, 3e-3, 1e-2]),
    # a development domain (the data of the dev suite's full fine-tuning task), for choosing refinement
    # settings; never a row of the evidence
    "dev-minilm-full-nyt": dict(task="full", data="vader-nytEditorialSnippets", count=5190, max_length=32,
                                train=2400, val=128, test=256, steps=20, batch=8, lrs=[1e-5, 3e-5, 1e-4, 3e-4, 1e-3]),
    # the tweets domain with 4x the validation split (and 2x the test split): what the selection noise of the
    # 128-example split (0.043, refine.md) costs the search and the sweeps' picks
    "minilm-lora-tweets-val512": dict(task="lora", data="vader-tweets", count=4200, max_length=32, train=2400,
                                      val=512, test=512, steps=40, batch=8, lrs=[1e-4, 3e-4, 1e-3, 3e-3, 1e-2]),
}
DOMAIN_SEEDS = [21, 22, 23]
SWEEP_POINTS = 5


def domain_data(name: str) -> tuple[Any, list[dict], list[dict], list[dict]]:
    """``(task, train, validation, test)``: the `heldout_tasks` task (model loaded) and three disjoint lists of
    tokenized examples. Classification: one fixed permutation of the corpus; language modelling: the token
    stream cut 80/10/10 into train / validation / test, windows of ``context`` tokens."""
    import heldout_tasks as HT

    spec = DOMAINS[name]
    if spec["task"] in ("lora", "full"):
        task = (HT.MiniLMLoRA if spec["task"] == "lora" else HT.MiniLMFullFineTune)(spec["data"], spec["count"])
        task.max_length = spec["max_length"]
        task.ensure_loaded()
        n = task.labels.numel()
        order = torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()
        rows = [{"input_ids": task.input_ids[i][task.attention_mask[i].bool()].tolist(), "labels": int(task.labels[i])}
                for i in order]
        cut1, cut2 = spec["train"], spec["train"] + spec["val"]
        if cut2 + spec["test"] > n:
            raise ValueError(f"{name}: {n} examples, fewer than train+val+test")
        return task, rows[:cut1], rows[cut1:cut2], rows[cut2:cut2 + spec["test"]]
    task = HT.SmolLM2LoRA(context=spec["context"], batch_size=spec["batch"])
    task.ensure_loaded()
    tokens, ctx = task.tokens, spec["context"]
    cut1, cut2 = int(0.8 * tokens.numel()), int(0.9 * tokens.numel())

    def windows(part: torch.Tensor, limit: int | None = None) -> list[dict]:
        out = [{"input_ids": part[s:s + ctx].tolist()} for s in range(0, part.numel() - ctx, ctx)]
        return out[:limit] if limit else out

    return task, windows(tokens[:cut1]), windows(tokens[cut1:cut2], spec["val"]), windows(tokens[cut2:], spec["test"])


def domain_tensors(name: str) -> tuple[Any, list[dict], list[dict], TokenData, TokenData, TokenData]:
    """``(task, train_rows, val_rows, train, val, test)``: `domain_data` with the splits as `TokenData`."""
    task, train_rows, val_rows, test_rows = domain_data(name)
    pad = getattr(task.model.config, "pad_token_id", None) or 0
    train, val, test = (token_data(r, pad, 512, what) for r, what in ((train_rows, "train"), (val_rows, "val"), (test_rows, "test")))
    return task, train_rows, val_rows, train, val, test


def run_domain(name: str, threads: int, seeds: list[int], out_dir: Path, save=None,
               refine_options: dict[str, Any] | None = None, reuse: dict[str, Any] | None = None) -> dict[str, Any]:
    """All rows of one domain (see the module docstring); ``save(result)`` is called after every seed with
    the seeds done so far (a long run killed midway keeps its finished seeds). ``refine_options``: extra
    `Bundle.refine` keywords (a variant of the search, e.g. ``starts``). ``reuse``: an earlier result of the same
    domain whose unrefined / AdamW / Muon rows are taken as they are (they do not depend on refinement; runs are
    deterministic per seed), so a variant of refinement costs only its search and one run per seed. A refined
    rule equal to its parent is not run again: its row is the unrefined one (the same run)."""
    from heldout import MUON_ROLES, WEIGHT_DECAY
    from muon_baseline import MuonAdamW
    from optbundle.meta.refine import evaluate_loss
    from optbundle.meta.scalars import eval_passes
    from optbundle.store.bundle import model_roles

    torch.set_num_threads(threads)
    spec = DOMAINS[name]
    task, train_rows, val_rows, train, val, test = domain_tensors(name)
    model = task.model
    steps, batch = spec["steps"], spec["batch"]
    default = load_rule("default")

    def muon_factory(lr: float):
        def make(named):
            roles = model_roles(model)
            to_muon = [roles[n] in MUON_ROLES and p.dim() == 2 for n, p in named]
            return MuonAdamW([p for (_, p), m in zip(named, to_muon) if m], [p for (_, p), m in zip(named, to_muon) if not m], lr)
        return make

    def run(label: str, lr: float | None, make, seed: int) -> dict[str, Any]:
        task.reset(seed)
        result = finetune_curve(model, make, train, val, steps, seed=seed, batch_size=batch, eval_every=steps + 1,
                                eval_start=False)
        row = {"optimizer": label, "lr": lr, "seed": seed, "val": result["final"], "test": evaluate_loss(model, test),
               "diverged": result["diverged"], "wall_s": result["wall_s"], "passes": result["passes"]}
        print(f"{name} seed {seed}: {label} lr={lr}: val {row['val']:.4f} test {row['test']:.4f} "
              f"({row['wall_s']:.0f} s)", flush=True)
        return row

    if reuse is not None and (reuse["domain"] != name or reuse["spec"] != spec or not set(seeds) <= set(reuse["seeds"])):
        raise SystemExit(f"--reuse: not a run of {name} with these settings and seeds {seeds}")
    defaults = RefineConfig()
    options = {"adapt": "scalars", "horizon": steps, "budget": "sweep5", "significance": defaults.significance,
               "adam_form_lr": defaults.adam_form_lr, **(refine_options or {})}  # the effective search settings
    rows, refinements = [], []
    start = time.perf_counter()
    for seed in seeds:
        task.reset(seed)
        bundle = Bundle(model, default)
        t0 = time.perf_counter()
        tag = "".join(f"-{k}{v}" for k, v in sorted((refine_options or {}).items()))
        refined = bundle.refine(train_rows, val_rows, dataset_name=name, batch_size=batch, seed=seed, max_tokens=512,
                                progress=False, out_dir=str(out_dir / f"{name}{tag}" / f"seed{seed}"), **options)
        prov = refined.rule.provenance
        refinements.append({"seed": seed, "wall_s": time.perf_counter() - t0, "budget": prov["budget"],
                            "scalars": prov["scalars"], "search": prov["search"], "before_after": prov["before_after"]})
        print(f"{name} seed {seed}: refined {prov['scalars']} spent {prov['budget']['spent']}/{prov['budget']['passes']}"
              f" passes, val {prov['before_after']['held_out_loss_parent']:.4f} -> {prov['before_after']['held_out_loss_refined']:.4f}", flush=True)
        def rule_row(label: str, rule) -> dict[str, Any]:
            return run(label, None, lambda _n: Bundle(model, rule).build_optimizer(model), seed)

        if reuse is not None:
            kept = [r for r in reuse["rows"] if r["seed"] == seed and r["optimizer"] not in ("refined rule", ONLINE_LABEL)]
        else:
            kept = [rule_row("unrefined rule", default)]
            kept += [run("AdamW", lr, adamw_factory(lr, WEIGHT_DECAY), seed) for lr in spec["lrs"]]
            kept += [run("Muon", lr, muon_factory(lr), seed) for lr in spec["lrs"]]
        if refined.rule.content_hash() == default.content_hash():
            same = next(r for r in kept if r["optimizer"] == "unrefined rule")
            rows += kept + [{**same, "optimizer": "refined rule", "wall_s": 0.0, "same_as_parent": True}]
        else:
            rows += kept + [rule_row("refined rule", refined.rule)]
        result = {"domain": name, "spec": spec, "seeds": [r["seed"] for r in refinements], "steps": steps,
                  "batch_size": batch, "rows": rows, "refinements": refinements,
                  "sweep_passes": SWEEP_POINTS * (steps + eval_passes(len(val))), "wall_s": time.perf_counter() - start,
                  "sizes": {"train": len(train), "val": len(val), "test": len(test)}, "threads": threads,
                  "parent_hash": default.content_hash(), "refine_options": options,
                  "reused_rows_from": reuse.get("source") if reuse is not None else None}
        if save is not None:
            save(result)
    return result


#: the online arm's `OnlineRefinementCallback` settings: a probe every 4 steps, 2 antithetic pairs sharing the
#: probe's batches (variance control), 4-step truncations; the callback's defaults otherwise (σ 0.01, outer AdamW
#: lr 1e-3, φ's last layer). Cost 2 · 2 · 4 = 16 passes per probe: 10 probes (160 passes) over MiniLM's 40 steps,
#: 4 (64) over SmolLM2's 16, below the scalar refinement's sweep5 budget (210 / 85 passes)
ONLINE = dict(every=4, probe_steps=4, pairs=2)
ONLINE_LABEL = "online rule"


def index_loader(train: TokenData, **loader_options: Any) -> torch.utils.data.DataLoader:
    """A loader over ``train``'s example indices, batches collated as `TokenData.gather` (trimmed padding).
    `OnlineRefinementCallback` builds its probe loader from this dataset, collator and batch size."""
    def collate(index: list[int]) -> dict[str, torch.Tensor]:
        ids, mask, labels = train.gather(torch.tensor(index))
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    return torch.utils.data.DataLoader(list(range(len(train))), collate_fn=collate, **loader_options)


def finetune_online(model: torch.nn.Module, rule: Any, train: TokenData, steps: int, seed: int, batch_size: int,
                    out_dir: Path, callback_seed: int | None = None, **callback_options: Any) -> dict[str, Any]:
    """Fine-tune ``model`` in place with a copy of ``rule`` under a real `transformers.Trainer` with
    `OnlineRefinementCallback(**callback_options)`, on `finetune_curve`'s batches of ``seed`` (`batch_order`),
    in eval mode (dropout off, probes too) and without gradient clipping, as `finetune_curve` steps: with
    ``outer_lr=0`` the run equals `finetune_curve`'s; ``callback_seed`` (default ``seed``) seeds the probes'
    perturbations and data order. Returns the callback's probe count, seconds and history,
    the probes' share of the training wall time, the passes they spent, and how far φ moved (‖Δφ‖/‖φ‖ on the
    refined part)."""
    import copy

    from transformers import Trainer, TrainingArguments
    from optbundle.meta.online import OnlineRefinementCallback
    from optbundle.meta.refine import batch_order
    from optbundle.meta.unroll import flatten_rule, parameter_mask
    from optbundle.step.optimizer import constant_schedule

    rule = copy.deepcopy(rule)  # the callback refines the rule object the optimizer holds
    before = flatten_rule(rule)
    optimizer = Bundle(model, rule).build_optimizer(model)
    loader = index_loader(train, batch_sampler=[i.tolist() for i in batch_order(len(train), steps, batch_size, seed)])

    class EvalModeTrainer(Trainer):
        def get_train_dataloader(self):
            return loader

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            model.eval()  # the protocol's mode (dropout off); training_step set train mode
            outputs = model(**inputs)
            return (outputs.loss, outputs) if return_outputs else outputs.loss

    callback = OnlineRefinementCallback(**{"train_mode": False, **callback_options},
                                        seed=seed if callback_seed is None else callback_seed)
    args = TrainingArguments(output_dir=str(out_dir), max_steps=steps, per_device_train_batch_size=batch_size,
                             max_grad_norm=0.0, report_to="none", use_cpu=True, disable_tqdm=True, save_strategy="no",
                             logging_steps=steps, seed=seed)
    trainer = EvalModeTrainer(model=model, args=args, optimizers=(optimizer, constant_schedule(optimizer)),
                              callbacks=[callback])
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    after = flatten_rule(callback.refined_rule())
    mask = parameter_mask(rule.config, callback.trainable).to(before.device).bool()
    return {"wall_s": wall, "probes": callback.probes, "probe_seconds": callback.probe_seconds,
            "probe_share": callback.probe_seconds / wall,
            "probe_passes": callback.probes * 2 * callback.pairs * callback.probe_steps,
            "phi_change": float((after - before)[mask].norm() / before[mask].norm()),
            "history": callback.history, "options": {k: getattr(callback, k) for k in (
                "every", "probe_steps", "pairs", "sigma", "outer_lr", "trainable", "seed", "train_mode")}}


def base_rule_name(base: dict[str, Any]) -> str:
    """The shipped name of a domain result's unrefined rule: ``default``, or the ``default-vN`` it was when the
    result was measured (the alias has moved since)."""
    from optbundle.store.rule import shipped_rule_names

    names = ["default"] + [n for n in shipped_rule_names() if n.startswith("default-")]
    name = next((n for n in names if load_rule(n).content_hash() == base["parent_hash"]), None)
    if name is None:
        raise SystemExit(f"the base result's unrefined rule {base['parent_hash']} is none of the shipped {names}")
    return name


def probe_noise(name: str, threads: int, base: dict[str, Any], seed: int, out_dir: Path, directions: int = 4,
                batch_sets: int = 4, **settings: Any) -> dict[str, Any]:
    """What one online probe measures: φ's meta-gradient or its batches. The base's unrefined rule trains
    ``seed``'s batches (`finetune_curve`) up to each probe point (the online arm's first, middle and last but
    one probe); there, for ``directions`` perturbations ε (callback ``seed``) × ``batch_sets`` probe data orders
    (``data_seed``), one antithetic probe with outer lr 0 (the state is restored) gives Δ = ℓ⁺ − ℓ⁻ ≈ 2 ε·∇ℓ
    on its batches. Per point: ``signal`` = SD over directions of the batch-set mean of Δ (the gradient along
    random directions), ``noise`` = the within-direction SD over batch sets, ``noise_of_mean`` = noise / √batch_sets
    (what the signal SD would be with no gradient at all)."""
    from transformers import TrainerControl, TrainerState, TrainingArguments
    from optbundle.meta.online import OnlineRefinementCallback

    torch.set_num_threads(threads)
    spec = DOMAINS[name]
    task, _, _, train, val, _ = domain_tensors(name)
    rule_name = base_rule_name(base)
    rule, model = load_rule(rule_name), task.model
    settings = {**ONLINE, **settings, "pairs": 1, "outer_lr": 0.0, "train_mode": False, "log": False}
    every, steps = settings["every"], spec["steps"]
    args = TrainingArguments(output_dir=str(out_dir / f"{name}-probe-noise"), max_grad_norm=0.0, report_to="none",
                             use_cpu=True, per_device_train_batch_size=spec["batch"])
    loader = index_loader(train, batch_size=spec["batch"])
    points = []
    for at in sorted({every, every * (steps // every // 2), steps - every}):
        task.reset(seed)
        made: list[torch.optim.Optimizer] = []

        def make(_named, made=made):
            made.append(Bundle(model, rule).build_optimizer(model))
            return made[-1]

        finetune_curve(model, make, train, val, at, seed=seed, batch_size=spec["batch"], eval_every=at + 1, eval_start=False)
        deltas = []
        for k in range(directions):
            row = []
            for b in range(batch_sets):
                callback = OnlineRefinementCallback(**{**settings, "every": at, "seed": 1 + k, "data_seed": 100 + b})
                callback.on_step_end(args, TrainerState(global_step=at), TrainerControl(), model=model,
                                     optimizer=made[0], train_dataloader=loader)
                row.append(callback.history[-1]["meta_loss_plus"] - callback.history[-1]["meta_loss_minus"])
            deltas.append(row)
        means = [sum(r) / batch_sets for r in deltas]
        signal = _stats(means)[1]
        noise = math.sqrt(sum(_stats(r)[1] ** 2 for r in deltas) / directions)
        points.append({"step": at, "deltas": deltas, "signal": signal, "noise": noise,
                       "noise_of_mean": noise / math.sqrt(batch_sets)})
        print(f"{name} seed {seed} step {at}: Δ signal SD {signal:.2g}, batch noise SD {noise:.2g} "
              f"(of a {batch_sets}-set mean {noise / math.sqrt(batch_sets):.2g})", flush=True)
    return {"seed": seed, "rule": rule_name, "directions": directions, "batch_sets": batch_sets,
            "settings": {k: v for k, v in settings.items() if k != "log"}, "points": points}


def run_online(name: str, threads: int, base: dict[str, Any], seeds: list[int], out_dir: Path, save=None,
               options: dict[str, Any] | None = None) -> dict[str, Any]:
    """``base`` (a `run_domain` result of ``name``) with the online arm's row added for each of ``seeds``: per seed
    the base's unrefined rule (the shipped ``default`` or the ``default-vN`` it was when ``base`` ran) fine-tunes with `finetune_online` (the `ONLINE` settings updated by ``options``) on the
    unrefined arm's batches, then validation and test loss as in `run_domain`; ``save(result)`` after every seed."""
    from optbundle.meta.refine import evaluate_loss
    from optbundle.meta.scalars import eval_passes

    torch.set_num_threads(threads)
    spec = DOMAINS[name]
    if base["domain"] != name or base["spec"] != spec or not set(seeds) <= set(base["seeds"]):
        raise SystemExit(f"--online: the base result is not a run of {name} with these settings and seeds {seeds}")
    rule_name = base_rule_name(base)
    default = load_rule(rule_name)
    task, _, _, train, val, test = domain_tensors(name)
    settings = {**ONLINE, **(options or {})}
    result = {k: v for k, v in base.items() if k != "source"}
    result["rows"] = [r for r in base["rows"] if r["optimizer"] != ONLINE_LABEL or r["seed"] not in seeds]
    start = time.perf_counter()
    for seed in seeds:
        task.reset(seed)
        online = finetune_online(task.model, default, train, spec["steps"], seed, spec["batch"],
                                 out_dir / f"{name}-online" / f"seed{seed}", **settings)
        row = {"optimizer": ONLINE_LABEL, "lr": None, "seed": seed, "val": evaluate_loss(task.model, val),
               "test": evaluate_loss(task.model, test), **online}
        row["diverged"] = not (math.isfinite(row["val"]) and math.isfinite(row["test"]))
        row["passes"] = spec["steps"] + eval_passes(len(val)) + online["probe_passes"]
        print(f"{name} seed {seed}: online val {row['val']:.4f} test {row['test']:.4f} ({row['wall_s']:.0f} s, "
              f"probes {100 * row['probe_share']:.0f}% of it, {row['probe_passes']} passes, ‖Δφ‖/‖φ‖ "
              f"{row['phi_change']:.2g})", flush=True)
        result["rows"].append(row)
        result["online"] = {"options": online["options"], "wall_s": time.perf_counter() - start, "threads": threads,
                            "base": base.get("source"), "rule": rule_name}
        if save is not None:
            save(result)
    return result


def _mean_se(values: list[float]) -> tuple[float, float]:
    mean, std = _stats(values)
    return mean, std / math.sqrt(len(values)) if len(values) > 1 else 0.0


def domain_summary(result: dict[str, Any]) -> dict[str, Any]:
    """Per-seed test losses of each row of the table (the user's val-picked sweep choice and the oracle lr)."""
    rows, seeds = result["rows"], result["seeds"]
    by = lambda label, seed: [r for r in rows if r["optimizer"] == label and r["seed"] == seed]  # noqa: E731
    out: dict[str, list[float]] = {}
    for label in ("unrefined rule", "refined rule"):
        out[label] = [by(label, s)[0]["test"] for s in seeds]
    online_seeds = [s for s in seeds if by(ONLINE_LABEL, s)]
    if online_seeds:
        out[f"{ONLINE_LABEL} (seeds {online_seeds})" if online_seeds != seeds else ONLINE_LABEL] = [
            by(ONLINE_LABEL, s)[0]["test"] for s in online_seeds]
    for base in ("AdamW", "Muon"):
        picked = [min(by(base, s), key=lambda r: r["val"]) for s in seeds]
        out[f"{base} best-of-5 (picked by validation)"] = [r["test"] for r in picked]
        lrs = sorted({r["lr"] for r in rows if r["optimizer"] == base})
        mean_test = {lr: sum(r["test"] for r in rows if r["optimizer"] == base and r["lr"] == lr) / len(seeds) for lr in lrs}
        oracle = min(mean_test, key=mean_test.get)
        out[f"{base} oracle lr {oracle:g} (best mean test)"] = [r["test"] for s in seeds for r in by(base, s) if r["lr"] == oracle]
        out[f"_{base}_picked_lrs"] = [r["lr"] for r in picked]
    return out


def search_variant(result: dict[str, Any]) -> dict[str, Any]:
    """The search settings of ``result`` that differ from what `Bundle.refine` ships now. A result recorded
    without ``significance`` ran before the gate existed (= 0); without ``adam_form_lr``, with the default."""
    recorded = {"significance": 0.0, **(result.get("refine_options") or {})}
    defaults = dataclasses.asdict(RefineConfig())
    return {k: v for k, v in recorded.items() if k not in ("adapt", "horizon", "budget") and v != defaults.get(k)}


def domain_table(result: dict[str, Any], stem: str | None = None) -> str:
    """One domain's section of refine.md; ``stem``: the file name of its JSON/PNG without suffix."""
    stem = stem or f"refine-{result['domain']}"
    summary = domain_summary(result)
    options = search_variant(result)
    spent = [r["budget"]["spent"] for r in result["refinements"]]
    unref, ref = summary["unrefined rule"], summary["refined rule"]
    diffs = [u - r for u, r in zip(unref, ref)]
    d_mean, d_se = _mean_se(diffs)
    adamw_pick = summary["AdamW best-of-5 (picked by validation)"]
    adamw_oracle = next(v for k, v in summary.items() if k.startswith("AdamW oracle"))
    lines = [
        f"### {result['domain']}" + (f" — refinement variant {options}" if options else ""),
        "",
        *([f"Unrefined / AdamW / Muon rows of seeds {reused_seeds(result)} reused from an earlier run of the same "
           "seeds and batches (`reused_rows_from` in the JSON); only the refinement and the refined rule were run "
           "for them.", ""] if reused_seeds(result) else []),
        f"{result['steps']} steps at batch {result['batch_size']}; seeds {result['seeds']}; train/validation/test "
        f"{result['sizes']['train']}/{result['sizes']['val']}/{result['sizes']['test']} examples; "
        f"{result['wall_s'] / 60:.0f} min on {result['threads']} thread(s)"
        + (f" (summed over {len(result['merged_from'])} processes run side by side on a shared machine)."
           if len(result.get("merged_from") or []) > 1 else "."),
        "",
        "| optimizer | test loss, mean ± SE | per seed |",
        "|---|---:|---|",
    ]
    for label, values in summary.items():
        if label.startswith("_"):
            continue
        mean, se = _mean_se(values)
        lines.append(f"| {label} | {mean:.4f} ± {se:.4f} | {', '.join(f'{v:.4f}' for v in values)} |")
    per_seed_val = [(r["before_after"]["held_out_loss_parent"], r["before_after"]["held_out_loss_refined"]) for r in result["refinements"]]
    noise, pairs = selection_noise(result)
    lines += [
        "",
        f"- refined vs unrefined (paired over seeds): test loss lower by **{d_mean:.4f} ± {d_se:.4f}** (SE)"
        + (f" = {d_mean / d_se:.1f} SE" if d_se else " (one seed: no SE)")
        + f"; refined/unrefined ratio {_stats(ref)[0] / _stats(unref)[0]:.3f}",
        f"- refined vs AdamW best-of-5 (validation pick): ratio **{_stats(ref)[0] / _stats(adamw_pick)[0]:.3f}**;"
        f" vs AdamW at the oracle lr: {_stats(ref)[0] / _stats(adamw_oracle)[0]:.3f}; vs Muon best-of-5 (validation"
        f" pick): {_stats(ref)[0] / _stats(summary['Muon best-of-5 (picked by validation)'])[0]:.3f};"
        f" lrs picked per seed: AdamW {summary['_AdamW_picked_lrs']}, Muon {summary['_Muon_picked_lrs']}",
        f"- refinement cost: {', '.join(map(str, spent))} passes per seed vs the 5-point sweep's {result['sweep_passes']}"
        f" (5 × ({result['steps']} steps + held-out evaluation))",
        "- chosen scalars per seed: " + "; ".join(
            describe_scalars(r["scalars"])
            for r in result["refinements"]),
        "- validation loss parent → refined (inside the search): " + ", ".join(f"{a:.4f} → {b:.4f}" for a, b in per_seed_val),
        f"- selection noise: between two runs of one seed, the test-loss difference departs from the validation-loss"
        f" difference by **{noise:.4f}** (SD over {pairs} pairs of runs within {NOISE_WINDOW} on validation): a"
        f" validation gain below that is not a test gain",
        *online_lines(result),
        *noise_lines(result),
        "",
        f"![{result['domain']}]({stem}.png)",
        "",
    ]
    return "\n".join(lines)


def online_lines(result: dict[str, Any]) -> list[str]:
    """The online arm's bullets of a domain's section (none without online rows): online vs unrefined paired
    over the seeds both have, the probes' wall-time share and passes, and what the probes saw: the antithetic
    meta-loss differences ℓ⁺ − ℓ⁻ (mean over a probe's pairs) and how far φ moved."""
    online = {r["seed"]: r for r in result["rows"] if r["optimizer"] == ONLINE_LABEL}
    if not online:
        return []
    unref = {r["seed"]: r["test"] for r in result["rows"] if r["optimizer"] == "unrefined rule"}
    seeds = [s for s in result["seeds"] if s in online]
    d_mean, d_se = _mean_se([unref[s] - online[s]["test"] for s in seeds])
    rows = [online[s] for s in seeds]
    diffs = [h["meta_loss_plus"] - h["meta_loss_minus"] for r in rows for h in r["history"]]
    levels = [(h["meta_loss_plus"] + h["meta_loss_minus"]) / 2 for r in rows for h in r["history"]]
    rms = math.sqrt(sum(d * d for d in diffs) / len(diffs)) if diffs else float("nan")
    spent = [r["budget"]["spent"] for r in result["refinements"] if r["seed"] in online]
    opts = result["online"]["options"]
    shares = ", ".join(f"{100 * r['probe_share']:.0f}%" for r in rows)
    seconds = ", ".join(f"{r['probe_seconds']:.0f}/{r['wall_s']:.0f} s" for r in rows)
    moved = ", ".join(f"{r['phi_change']:.2g}" for r in rows)
    return [
        f"- **online refinement** of `{result['online']['rule']}` (`OnlineRefinementCallback` in `transformers.Trainer`:"
        f" a probe every {opts['every']}"
        f" steps, {opts['pairs']} antithetic pair(s) × {opts['probe_steps']} steps, σ {opts['sigma']:g}, outer lr"
        f" {opts['outer_lr']:g}, φ `{opts['trainable']}`; seeds {seeds}; {result['online']['wall_s'] / 60:.0f} min): test"
        f" loss lower than unrefined by"
        f" **{d_mean:.4f} ± {d_se:.4f}** (SE, paired)" + (f" = {d_mean / d_se:.1f} SE" if d_se else " (one seed: no SE)"),
        f"- online cost: probes took **{shares}** of the training wall time ({seconds}); "
        f"{', '.join(str(r['probe_passes']) for r in rows)} probe passes per seed ({rows[0]['probes']} probes) on top of"
        f" the {result['steps']} training steps, vs the scalar refinement's {', '.join(map(str, spent))} and the"
        f" sweep's {result['sweep_passes']}",
        f"- what the probes saw: meta-loss ℓ (mean log loss ratio over a probe) {min(levels):.3f} … {max(levels):.3f},"
        f" antithetic differences ℓ⁺ − ℓ⁻ RMS {rms:.2g} (max |·| {max(map(abs, diffs)):.2g}, {len(diffs)} probes);"
        f" φ moved ‖Δφ‖/‖φ‖ = {moved} on its refined part",
    ]


def noise_lines(result: dict[str, Any]) -> list[str]:
    """The `probe_noise` bullet of a domain's section (none without it)."""
    noise = result.get("probe_noise")
    if not noise:
        return []
    def snr(p: dict[str, Any]) -> float:  # the signal SD less the noise its batch-set means carry, per probe's noise
        return math.sqrt(max(p["signal"] ** 2 - p["noise_of_mean"] ** 2, 0.0)) / p["noise"] if p["noise"] else float("nan")

    points = "; ".join(f"step {p['step']}: signal {p['signal']:.2g}, noise {p['noise']:.2g} (of the mean"
                       f" {p['noise_of_mean']:.2g}), one probe's SNR **{snr(p):.1f}**" for p in noise["points"])
    return [f"- probe noise (`--probe-noise`, seed {noise['seed']}, {noise['directions']} directions ε ×"
            f" {noise['batch_sets']} probe batch sets, one pair, outer lr 0): SD of ℓ⁺ − ℓ⁻ over directions of its"
            f" batch-set mean (signal) vs within a direction over batch sets (noise); SNR = √(signal² − noise of the"
            f" mean²) / noise: {points}"]


#: pairs of runs whose validation losses differ by less than this enter `selection_noise` (near-ties: what the
#: search has to tell apart)
NOISE_WINDOW = 0.15


def selection_noise(result: dict[str, Any]) -> tuple[float, int]:
    """How far a validation-loss difference between two runs of one seed is from their test-loss difference:
    the SD of ``(test_a − test_b) − (val_a − val_b)`` over all pairs of a seed's runs (unrefined, AdamW, Muon)
    whose validation losses are within `NOISE_WINDOW`, and the number of pairs. The same runs are scored on
    both splits, so this is the held-out sampling noise of the comparisons a search on validation makes."""
    gaps = []
    for seed in result["seeds"]:
        rows = [r for r in result["rows"] if r["seed"] == seed and r["optimizer"] not in ("refined rule", ONLINE_LABEL)]
        for i, a in enumerate(rows):
            for b in rows[i + 1:]:
                if abs(a["val"] - b["val"]) < NOISE_WINDOW:
                    gaps.append((a["test"] - b["test"]) - (a["val"] - b["val"]))
    if len(gaps) < 2:
        return float("nan"), len(gaps)
    mean = sum(gaps) / len(gaps)
    return math.sqrt(sum((g - mean) ** 2 for g in gaps) / (len(gaps) - 1)), len(gaps)


def domain_plot(result: dict[str, Any], path: Path) -> None:
    """Test loss vs lr of the AdamW and Muon sweeps (mean ± SE over seeds) with the unrefined and refined
    rule as horizontal bands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, seeds = result["rows"], result["seeds"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for base, color in (("AdamW", "tab:blue"), ("Muon", "tab:orange")):
        lrs = sorted({r["lr"] for r in rows if r["optimizer"] == base})
        stats = [_mean_se([r["test"] for r in rows if r["optimizer"] == base and r["lr"] == lr]) for lr in lrs]
        ax.errorbar(lrs, [m for m, _ in stats], yerr=[e for _, e in stats], marker="o", color=color, label=f"{base} sweep")
    summary = domain_summary(result)
    bands = [("unrefined rule", "tab:gray"), ("refined rule", "tab:red")]
    bands += [(label, "tab:green") for label in summary if label.startswith(ONLINE_LABEL)]
    for label, color in bands:
        mean, se = _mean_se(summary[label])
        ax.axhline(mean, color=color, label=f"{label} {mean:.4f} ± {se:.4f}")
        ax.axhspan(mean - se, mean + se, color=color, alpha=0.15)
    ax.set_xscale("log")
    ax.set_xlabel("lr of the baseline")
    ax.set_ylabel(f"test loss after {result['steps']} steps (mean ± SE, {len(seeds)} seeds)")
    ax.set_title(f"{result['domain']}: refinement (≤ sweep5 compute) vs lr sweeps")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def reused_seeds(result: dict[str, Any]) -> list[int]:
    """The seeds whose unrefined / AdamW / Muon rows came from an earlier run (``--reuse``), merged files included."""
    sources = result.get("reused_rows_from")
    if isinstance(sources, list):  # a merge: one entry per merged file, in its seeds' order
        return [seed for source, seeds in zip(sources, result["seeds_per_file"]) if source for seed in seeds]
    return list(result["seeds"]) if sources else []


def merge_domain_results(paths: list[Path]) -> dict[str, Any]:
    """One domain's result from runs over disjoint seeds (``--seeds`` in separate processes): rows, refinements
    and seeds concatenated; the wall time is the sum (CPU-time-like: the processes ran side by side)."""
    results = [json.loads(Path(p).read_text()) for p in paths]
    first = results[0]
    if any(r["domain"] != first["domain"] or r["spec"] != first["spec"] for r in results):
        raise SystemExit("--merge: the files are not runs of the same domain and settings")
    if any(r["parent_hash"] != first["parent_hash"] for r in results):
        raise SystemExit("--merge: the files' unrefined rules differ (the default alias moved between the runs)")
    seeds = [s for r in results for s in r["seeds"]]
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"--merge: seeds overlap: {seeds}")
    merged = dict(first)
    merged.update(seeds=seeds, rows=[row for r in results for row in r["rows"]],
                  reused_rows_from=[r.get("reused_rows_from") for r in results], seeds_per_file=[r["seeds"] for r in results],
                  refinements=[x for r in results for x in r["refinements"]], wall_s=sum(r["wall_s"] for r in results),
                  merged_from=[str(p) for p in paths])
    return merged


def write_domain_table() -> Path:
    parts = []
    evidence = [name for name in DOMAINS if not name.startswith("dev-")]  # dev domains choose settings: no rows here
    for name in evidence:
        variants = [p for p in sorted(RESULTS.glob(f"refine-{name}-*.json"))
                    if not any(p.stem.startswith(f"refine-{other}") for other in DOMAINS if other.startswith(f"{name}-"))]
        for path in [RESULTS / f"refine-{name}.json", *variants]:
            if path.exists():
                parts.append(domain_table(json.loads(path.read_text()), path.stem))
    missing = [name for name in evidence if not (RESULTS / f"refine-{name}.json").exists()]
    if missing:
        parts.append(f"Not measured (no `refine-NAME.json` yet): {', '.join(missing)}.\n")
    probes = sorted(RESULTS.glob("refine-probe-*.md"))
    if probes:
        parts.append("### Single candidates (`benchmarks/refine_probe.py`)\n\nSingle candidates of the search and "
                     "AdamW, one seed, the command in each table's file: how the search's settings were chosen (dev "
                     "domains) and what the search could not reach (evidence domains, a seed the table above already "
                     "reports).\n\n"
                     + "\n".join(p.read_text() for p in probes))
    target = RESULTS / "refine.md"
    head = ("# Budgeted scalar refinement vs lr sweeps\n\nCommands: `python benchmarks/refine.py --domains NAME` "
            "per domain (writes `refine-NAME.json/.png`; a variant of the search: `--starts N` / `--scalar-step X` "
            "/ `--significance Z` with `--reuse refine-NAME.json`, writing `refine-NAME-VARIANT.json`), then `python benchmarks/refine.py "
            "--table`. The online arm: `--domains NAME --online --reuse benchmarks/results/refine-NAME.json --out DIR` "
            "(adds its rows to `DIR/refine-NAME.json`; its probe noise: `--domains NAME --probe-noise --seeds 21 --reuse "
            "DIR/refine-NAME.json --out DIR`), the result copied here. Protocol: see the docstring of "
            "`benchmarks/refine.py`. A section's heading names the search settings that differ from what "
            "`Bundle.refine` ships (`significance` 0: a run from before the gate); no settings: the search as it "
            "ships.\n\n")
    target.write_text(head + "\n".join(parts))
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--fresh", action="store_true", help="refine again even if the recipe's bundle exists")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--domains", nargs="*", choices=list(DOMAINS),
                        help="run the budgeted scalar-refinement protocol on these domains instead of --settings")
    parser.add_argument("--seeds", nargs="*", type=int, default=DOMAIN_SEEDS)
    parser.add_argument("--out", default=str(RESULTS), help="folder of the domains' JSON/PNG (default: benchmarks/results)")
    parser.add_argument("--table", action="store_true", help="write benchmarks/results/refine.md from the domains' JSON")
    parser.add_argument("--starts", type=int, help="a refinement variant: batch orders averaged per candidate")
    parser.add_argument("--scalar-step", type=float, help="a refinement variant: factor of one step of the search")
    parser.add_argument("--significance", type=float, help="a refinement variant: the search's significance gate "
                        "(standard errors a candidate must beat the best by, paired over held-out chunks)")
    parser.add_argument("--reuse", type=Path, help="a domain's earlier JSON: reuse its unrefined/AdamW/Muon rows, "
                        "run only the (variant) refinement and the refined rule; writes refine-<domain>-<variant>.json")
    parser.add_argument("--online", action="store_true", help="add the online-refinement arm (OnlineRefinementCallback "
                        "in transformers.Trainer); with --reuse only it runs, into refine-<domain>.json under --out")
    parser.add_argument("--online-outer-lr", type=float, help="the online arm's outer AdamW lr on φ (default: the callback's)")
    parser.add_argument("--online-seed", type=int, help="the online arm's callback seed (perturbations, probe batches; "
                        "default: each run's seed)")
    parser.add_argument("--probe-noise", action="store_true", help="with --reuse: add the meta-gradient noise of "
                        "the online probes (probe_noise, first of --seeds) to the domain's JSON under --out")
    parser.add_argument("--merge", nargs="+", type=Path,
                        help="merge one domain's JSON files over disjoint seeds into --out/<first file's name> (+ plot)")
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.domains or args.table or args.merge:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        if args.merge:
            merged = merge_domain_results(args.merge)
            stem = args.merge[0].stem  # refine-<domain>[-<variant>]
            (out / f"{stem}.json").write_text(results_json.dumps(merged, default=str))
            domain_plot(merged, out / f"{stem}.png")
            print(domain_table(merged, stem))
        variant = {k: v for k, v in (("starts", args.starts), ("scalar_step", args.scalar_step),
                                     ("significance", args.significance)) if v is not None}
        suffix = "".join(f"-{k.replace('_', '')}{v:g}" for k, v in sorted(variant.items()))
        for name in args.domains or []:
            reuse = None
            if args.reuse:
                reuse = {**json.loads(args.reuse.read_text()), "source": str(args.reuse)}

            def save(result: dict[str, Any], name: str = name) -> None:
                stem = f"refine-{name}{suffix}"
                (out / f"{stem}.json").write_text(results_json.dumps(result, default=str))
                domain_plot(result, out / f"{stem}.png")
                print(domain_table(result, stem), flush=True)

            work = ROOT / "outputs" / "refine-domains"
            if args.probe_noise:
                if reuse is None:
                    raise SystemExit("--probe-noise adds to a domain's JSON: give it with --reuse")
                result = {k: v for k, v in reuse.items() if k != "source"}
                result["probe_noise"] = probe_noise(name, args.threads, reuse, args.seeds[0], work)
                save(result)
            elif args.online:
                online = {k: v for k, v in (("outer_lr", args.online_outer_lr), ("callback_seed", args.online_seed)) if v is not None}
                base = reuse if reuse is not None and not variant else run_domain(name, args.threads, args.seeds, work,
                                                                                   None, variant, reuse)
                run_online(name, args.threads, base, args.seeds, work, save, online)
            else:
                run_domain(name, args.threads, args.seeds, work, save, variant, reuse)
        if args.table:
            print(f"wrote {write_domain_table()}")
        return
    for name in args.settings:
        result = run_setting(name, args.quick, args.fresh, args.threads)
        stem = RESULTS / f"refine-{name}{'-quick' if args.quick else ''}"
        text = (f"# Refinement benchmark\n\nCommand: `python benchmarks/refine.py --settings {name}"
                f"{' --quick' if args.quick else ''}`.\n\n" + table(result) + f"\n![curves]({stem.name}.png)\n")
        stem.with_suffix(".md").write_text(text)
        stem.with_suffix(".json").write_text(results_json.dumps(result, default=str))
        plot(result, stem.with_suffix(".png"))
        print(text)


if __name__ == "__main__":
    main()
