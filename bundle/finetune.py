"""Fine-tuning recipes: real pretrained models on real data through transformers.Trainer, with a bundle's
learned optimizer and with AdamW side by side, writing a results table, a loss-curve plot and a bundle.

A recipe is one YAML file parsed by `transformers.HfArgumentParser` into `TrainingArguments` plus the three
dataclasses below, so every Trainer option works in a recipe and an unknown key is an error naming it::

    optbundle finetune recipes/minilm-sms-spam.yaml

Comparisons are fair by construction: every run starts from the same weights (same head initialization per
seed), sees the same batches in the same order (Trainer's seed), for the same number of steps; AdamW runs
at each learning rate of the recipe's sweep (HF's default 5e-5 included) and the learned rule at each of its
multipliers. Runs are in-process, one after the other.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import assets
from .bundle import Bundle

logger = logging.getLogger(__name__)

HF_DEFAULT_LR = 5e-5


@dataclass
class ModelArguments:
    model: str = field(metadata={"help": "shipped alias (minilm, smollm2), a local model folder, or a Hub id"})
    task: str = field(default="sequence-classification", metadata={"help": "sequence-classification | causal-lm"})
    num_labels: int = field(default=2, metadata={"help": "classes, for sequence classification"})
    lora_r: int = field(default=0, metadata={"help": "LoRA rank; 0 = full fine-tuning"})
    lora_alpha: int = field(default=16)
    lora_dropout: float = field(default=0.0)
    lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])

    def __post_init__(self) -> None:
        if self.task not in ("sequence-classification", "causal-lm"):
            raise ValueError(f"model task {self.task!r}: expected 'sequence-classification' or 'causal-lm'")


@dataclass
class DataArguments:
    dataset: str = field(metadata={"help": "sms-spam | shakespeare | vader-<tweets|amazonReviewSnippets|nytEditorialSnippets>"})
    max_length: int = field(default=128, metadata={"help": "tokens per example (LM: per chunk)"})
    train_size: int = field(default=800)
    eval_size: int = field(default=400)
    split_seed: int = field(default=0, metadata={"help": "seed of the train/eval split (not of the batch order)"})


@dataclass
class OptimizerArguments:
    rule: str = field(default="default", metadata={"help": "shipped rule name, rule folder, bundle folder or Hub id"})
    rule_default_lr: bool = field(
        default=True, metadata={"help": "run the learned rule at its own recommended lr (bundle.optimizer() with no lr)"}
    )
    rule_lrs: list[float] = field(
        default_factory=list, metadata={"help": "extra learned-rule runs at these lrs (format-1 rules: multipliers)"}
    )
    adamw_lrs: list[float] = field(default_factory=lambda: [HF_DEFAULT_LR], metadata={"help": "AdamW lr sweep"})
    adamw_weight_decay: float = field(default=0.0)
    seeds: list[int] = field(default_factory=lambda: [0])
    results_dir: str = field(default="outputs/finetune")
    bundle_output: str | None = field(default=None, metadata={"help": "write the learned run's bundle here"})
    save_state: bool = field(default=True, metadata={"help": "ship the accumulators in the bundle"})


@dataclass
class Recipe:
    training: Any
    model: ModelArguments
    data: DataArguments
    optim: OptimizerArguments
    name: str


def parse_recipe(path: str | Path, classes: tuple, overrides: dict[str, Any] | None = None,
                 defaults: dict[str, Any] | None = None) -> tuple[Path, tuple]:
    """Read a YAML recipe (a shipped name or a path), apply ``defaults`` then ``overrides``, and parse it with
    `transformers.HfArgumentParser` into ``classes``; an unknown key is an error naming the file."""
    import yaml
    from transformers import HfArgumentParser

    from optbundle.recipes import recipe_path

    import dataclasses

    path = recipe_path(str(path))
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{path}: not a valid YAML recipe ({first[:200]})") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a recipe is a YAML mapping of argument names to values")
    data = {**(defaults or {}), **data, **(overrides or {})}
    required = [
        f.name for cls in classes for f in dataclasses.fields(cls)
        if f.init and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    missing = [name for name in required if name not in data]
    if missing:
        raise ValueError(f"{path}: missing required key(s) {', '.join(missing)}")
    try:
        return path, HfArgumentParser(classes).parse_dict(data, allow_extra_keys=False)
    except (ValueError, TypeError) as err:
        raise ValueError(f"{path}: {str(err)[:500]}") from err


def load_recipe(path: str | Path, overrides: dict[str, Any] | None = None) -> Recipe:
    """Parse a YAML recipe (plus ``overrides``) into TrainingArguments and optbundle's dataclasses."""
    from transformers import TrainingArguments

    path, (training, model, data_args, optim) = parse_recipe(
        path, (TrainingArguments, ModelArguments, DataArguments, OptimizerArguments), overrides,
        defaults={"output_dir": "outputs/finetune/trainer", "report_to": "none"},
    )
    return Recipe(training, model, data_args, optim, name=path.stem)


# ---- data ---------------------------------------------------------------------------------------------


def build_datasets(data: DataArguments, model_args: ModelArguments, tokenizer):
    """``(train, eval)`` tokenized datasets; disjoint splits drawn with ``split_seed``."""
    if model_args.task == "sequence-classification":
        if data.dataset == "sms-spam":
            texts, labels = assets.sms_spam()
        elif data.dataset.startswith("vader-"):
            texts, scores = assets.vader_sentiment(data.dataset.split("-", 1)[1])
            labels = [int(s > 0) for s in scores]
        else:
            raise ValueError(f"dataset {data.dataset!r} does not fit sequence classification (sms-spam, vader-*)")
        generator = torch.Generator().manual_seed(data.split_seed)
        order = torch.randperm(len(texts), generator=generator).tolist()
        needed = data.train_size + data.eval_size
        if needed > len(order):
            raise ValueError(f"dataset {data.dataset!r} has {len(order)} examples; train_size+eval_size = {needed}")
        split = {"train": order[: data.train_size], "eval": order[data.train_size : needed]}
        out = []
        for name in ("train", "eval"):
            ds = assets.text_dataset([texts[i] for i in split[name]], [labels[i] for i in split[name]], label_name="labels")
            ds = ds.map(lambda b: tokenizer(b["text"], truncation=True, max_length=data.max_length), batched=True,
                        remove_columns=["text"])
            out.append(ds)
        return out[0], out[1]
    if data.dataset != "shakespeare":
        raise ValueError(f"dataset {data.dataset!r} does not fit causal-lm (shakespeare)")
    from datasets import Dataset

    plays = assets.shakespeare_plays()
    names = sorted(plays)
    eval_play = names[data.split_seed % len(names)]  # a whole play held out: no overlap with training text
    chunks = {"train": [], "eval": []}
    for name in names:
        split = "eval" if name == eval_play else "train"
        want = data.eval_size if split == "eval" else data.train_size
        if len(chunks[split]) >= want:
            continue
        ids = tokenizer(plays[name])["input_ids"]
        for start in range(0, len(ids) - data.max_length, data.max_length):
            if len(chunks[split]) >= want:
                break
            chunks[split].append(ids[start : start + data.max_length])
    return (Dataset.from_dict({"input_ids": chunks["train"]}), Dataset.from_dict({"input_ids": chunks["eval"]}))


# ---- models -------------------------------------------------------------------------------------------


def load_tokenizer(model_args: ModelArguments):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(assets.resolve_model(model_args.model))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(model_args: ModelArguments, seed: int, tokenizer):
    """The pretrained model (+ a head initialized from ``seed``), wrapped with LoRA when ``lora_r > 0``."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    source = assets.resolve_model(model_args.model)
    torch.manual_seed(seed)
    if model_args.task == "sequence-classification":
        model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=model_args.num_labels)
    else:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    # transformers 5.x scales the loss for gradient accumulation / DDP as if these models normalized by
    # num_items_in_batch; they do not, so that would multiply gradients (see README, "Pitfalls").
    model.accepts_loss_kwargs = False
    if model_args.lora_r > 0:
        from peft import LoraConfig, get_peft_model

        task_type = "SEQ_CLS" if model_args.task == "sequence-classification" else "CAUSAL_LM"
        config = LoraConfig(r=model_args.lora_r, lora_alpha=model_args.lora_alpha, lora_dropout=model_args.lora_dropout,
                            target_modules=list(model_args.lora_target_modules), task_type=task_type)
        torch.manual_seed(seed)
        model = get_peft_model(model, config)
    return model


# ---- runs ---------------------------------------------------------------------------------------------


def _accuracy(eval_pred) -> dict[str, float]:
    logits, labels = eval_pred
    logits = logits[0] if isinstance(logits, tuple) else logits
    return {"accuracy": float((logits.argmax(-1) == labels).mean())}


def run_one(
    recipe: Recipe, optimizer_name: str, lr: float | None, seed: int, train, eval_, tokenizer, rule
) -> dict[str, Any]:
    """One fine-tuning run; returns its row (losses, accuracy, wall time, loss curve). ``lr=None``: the learned
    rule at its recommended lr for the model's regime (what ``bundle.optimizer()`` does with no arguments)."""
    from transformers import DataCollatorForLanguageModeling, DataCollatorWithPadding, Trainer

    model = load_model(recipe.model, seed, tokenizer)
    args = copy.deepcopy(recipe.training)
    lr_tag = "default" if lr is None else f"{lr:g}"
    args.output_dir = str(Path(recipe.optim.results_dir) / "runs" / f"{optimizer_name}-lr{lr_tag}-seed{seed}")
    args.seed = seed
    args.save_strategy = "no"
    classification = recipe.model.task == "sequence-classification"
    collator = DataCollatorWithPadding(tokenizer) if classification else DataCollatorForLanguageModeling(tokenizer, mlm=False)
    kwargs: dict[str, Any] = {}
    bundle = None
    if optimizer_name == "learned":
        bundle = Bundle(model, rule, tokenizer=tokenizer)
        kwargs["optimizers"] = bundle.optimizer() if lr is None else bundle.optimizer(lr=lr)
    else:
        args.learning_rate = lr
        args.weight_decay = recipe.optim.adamw_weight_decay
        args.optim = "adamw_torch"
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=eval_, data_collator=collator,
                      compute_metrics=_accuracy if classification else None, **kwargs)
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    metrics = trainer.evaluate()
    curve = [(h["step"], h["loss"]) for h in trainer.state.log_history if "loss" in h]
    tail = [loss for _, loss in curve[-3:]]
    if lr is None:
        lr = kwargs["optimizers"][0].param_groups[0]["lr"]
        optimizer_name = "learned-default"
    row = {
        "optimizer": optimizer_name, "lr": lr, "seed": seed, "steps": trainer.state.global_step,
        "final_train_loss": sum(tail) / len(tail) if tail else float("nan"),
        "eval_loss": metrics.get("eval_loss", float("nan")), "eval_accuracy": metrics.get("eval_accuracy"),
        "wall_s": wall, "curve": curve,
    }
    if bundle is not None:
        bundle.set_state(trainer.optimizer.optimizer)
        row["_bundle"] = bundle
    return row


def run_recipe(recipe: Recipe) -> list[dict[str, Any]]:
    """All runs of a recipe; writes results.md, results.json, loss_curves.png (and the learned bundle)."""
    from . import load_rule

    results_dir = Path(recipe.optim.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(recipe.model)
    train, eval_ = build_datasets(recipe.data, recipe.model, tokenizer)
    rule = load_rule(recipe.optim.rule)
    plan = [("learned", None)] if recipe.optim.rule_default_lr else []
    plan += [("learned", lr) for lr in recipe.optim.rule_lrs] + [("adamw", lr) for lr in recipe.optim.adamw_lrs]
    rows = []
    best_learned = None
    for seed in recipe.optim.seeds:
        for name, lr in plan:
            logger.info("run %s lr=%s seed=%d", name, "rule default" if lr is None else f"{lr:g}", seed)
            row = run_one(recipe, name, lr, seed, train, eval_, tokenizer, rule)
            bundle = row.pop("_bundle", None)
            if bundle is not None and (best_learned is None or row["eval_loss"] < best_learned[0]):
                best_learned = (row["eval_loss"], bundle)
            rows.append(row)
    if recipe.optim.bundle_output and best_learned is not None:
        best_learned[1].save_pretrained(recipe.optim.bundle_output, save_state=recipe.optim.save_state)
    table = results_table(recipe, rows, rule)
    (results_dir / "results.md").write_text(table)
    (results_dir / "results.json").write_text(json.dumps([{k: v for k, v in r.items()} for r in rows], indent=1))
    plot_curves(rows, results_dir / "loss_curves.png", title=f"{recipe.name}: training loss")
    return rows


def _mean_std(values: list[float]) -> str:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "n/a"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.4f}"
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return f"{mean:.4f} ± {std:.4f}"


def results_table(recipe: Recipe, rows: list[dict[str, Any]], rule) -> str:
    """Markdown table: one line per (optimizer, lr), mean ± std over seeds."""
    lines = [
        f"Recipe `{recipe.name}`: model `{recipe.model.model}` ({'LoRA r=' + str(recipe.model.lora_r) if recipe.model.lora_r else 'full fine-tuning'}), "
        f"data `{recipe.data.dataset}` ({recipe.data.train_size} train / {recipe.data.eval_size} eval), "
        f"{rows[0]['steps'] if rows else 0} steps, batch {recipe.training.per_device_train_batch_size}, "
        f"seeds {recipe.optim.seeds}. Learned rule: `{recipe.optim.rule}` (hash {rule.content_hash()[:12]}, "
        f"{rule.provenance.get('method', 'unknown method')}, meta_trained={rule.provenance.get('meta_trained')}); "
        "the learned rule runs at a constant lr (its own scheduler), AdamW with the recipe's schedule "
        f"(`{recipe.training.lr_scheduler_type.value if hasattr(recipe.training.lr_scheduler_type, 'value') else recipe.training.lr_scheduler_type}`).",
        "",
        "| optimizer | lr | final train loss | eval loss | eval accuracy | wall s/run |",
        "|---|---|---|---|---|---|",
    ]
    keys = []
    for r in rows:
        if (r["optimizer"], r["lr"]) not in keys:
            keys.append((r["optimizer"], r["lr"]))
    for name, lr in keys:
        group = [r for r in rows if (r["optimizer"], r["lr"]) == (name, lr)]
        label = {
            "learned-default": "learned, the rule's default lr",
            "learned": "learned (lr multiplier)" if rule.config.format_version < 2 else "learned",
        }.get(name, "AdamW (HF default)" if lr == HF_DEFAULT_LR else "AdamW")
        acc = [r["eval_accuracy"] for r in group]
        lines.append(
            f"| {label} | {lr:g} | {_mean_std([r['final_train_loss'] for r in group])} | "
            f"{_mean_std([r['eval_loss'] for r in group])} | {_mean_std(acc) if acc[0] is not None else 'n/a'} | "
            f"{sum(r['wall_s'] for r in group) / len(group):.1f} |"
        )
    return "\n".join(lines) + "\n"


def plot_curves(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        if not r["curve"]:
            continue
        steps, losses = zip(*r["curve"])
        style = "-" if r["optimizer"].startswith("learned") else "--"
        ax.plot(steps, losses, style, label=f"{r['optimizer']} lr={r['lr']:g} seed={r['seed']}")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def dataclass_dict(obj: Any) -> dict[str, Any]:
    return dataclasses.asdict(obj)
