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

import contextlib
import copy
import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..meta.refine import EVAL_SPLITS
from ..recipes import recipe_path
from ..store import assets
from ..store.bundle import Bundle
from ..store.rule import load_rule

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
    dataset: str = field(metadata={"help": (
        "built-in: sms-spam | shakespeare | vader-<tweets|amazonReviewSnippets|nytEditorialSnippets>; anything else "
        "is datasets.load_dataset's path: json | csv | parquet | text (with data_files), a local folder or a Hub id"
    )})
    data_files: dict | str | None = field(default=None, metadata={"help": (
        "load_dataset's data_files: a file, or {split: file(s)}; relative paths are tried beside the recipe first"
    )})
    dataset_config: str | None = field(default=None, metadata={"help": "load_dataset's name (a configuration)"})
    train_split: str = field(default="train", metadata={"help": "split to train on (load_dataset data)"})
    eval_split: str | None = field(default=None, metadata={"help": (
        "held-out split (default: validation, eval or test when present, else a split_seed split of train)"
    )})
    text_column: str = field(default="text", metadata={"help": "column holding the text (load_dataset data)"})
    label_column: str = field(default="label", metadata={"help": "column holding the class (classification)"})
    max_length: int = field(default=128, metadata={"help": "tokens per example (LM: per chunk)"})
    train_size: int = field(default=800, metadata={"help": "examples (LM: chunks) to train on, at most"})
    eval_size: int = field(default=400, metadata={"help": "held-out examples (LM: chunks), at most"})
    split_seed: int = field(default=0, metadata={"help": "seed of the train/eval split (not of the batch order)"})
    #: the recipe's folder (set by `load_recipe`): relative ``data_files`` are looked up there first
    recipe_dir: str | None = field(default=None, metadata={"help": "set from the recipe's path; not a recipe key"})

    @property
    def builtin(self) -> bool:
        return self.dataset in ("sms-spam", "shakespeare") or self.dataset.startswith("vader-")


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
    from transformers import TrainingArguments  # heavy: loaded on first use

    path, (training, model, data_args, optim) = parse_recipe(
        path, (TrainingArguments, ModelArguments, DataArguments, OptimizerArguments), overrides,
        defaults={"output_dir": "outputs/finetune/trainer", "report_to": "none"},
    )
    data_args.recipe_dir = str(path.parent)
    return Recipe(training, model, data_args, optim, name=path.stem)


# ---- data ---------------------------------------------------------------------------------------------


def _resolve_data_files(data_files: Any, base: str | None) -> Any:
    """``data_files`` with relative paths that exist beside the recipe made absolute (others left for load_dataset)."""
    if data_files is None or base is None:
        return data_files
    if isinstance(data_files, dict):
        return {k: _resolve_data_files(v, base) for k, v in data_files.items()}
    if isinstance(data_files, (list, tuple)):
        return [_resolve_data_files(v, base) for v in data_files]
    candidate = Path(base) / str(data_files)
    return str(candidate) if not Path(str(data_files)).is_absolute() and candidate.exists() else data_files


def load_named_dataset(data: DataArguments) -> tuple[Any, Any]:
    """``(train, eval)`` untokenized splits of ``datasets.load_dataset(data.dataset, data.dataset_config,
    data_files=...)``: ``train_split``, and ``eval_split`` (or the first of validation/eval/test present, or a
    ``split_seed`` split of train), each shuffled with ``split_seed`` and cut to ``train_size`` / ``eval_size``."""
    from datasets import load_dataset  # heavy: loaded on first use

    loaded = load_dataset(data.dataset, data.dataset_config, data_files=_resolve_data_files(data.data_files, data.recipe_dir))
    if data.train_split not in loaded:
        raise ValueError(f"dataset {data.dataset!r}: no split {data.train_split!r}; it has {list(loaded)}")
    train = loaded[data.train_split].shuffle(seed=data.split_seed)
    names = [data.eval_split] if data.eval_split else [n for n in EVAL_SPLITS if n in loaded]
    if data.eval_split and data.eval_split not in loaded:
        raise ValueError(f"dataset {data.dataset!r}: no split {data.eval_split!r}; it has {list(loaded)}")
    if names:
        eval_ = loaded[names[0]].shuffle(seed=data.split_seed)
    else:  # hold out a part of train, in the recipe's proportions
        held = min(data.eval_size, max(1, len(train) * data.eval_size // (data.train_size + data.eval_size)))
        if held >= len(train):
            raise ValueError(f"dataset {data.dataset!r}: {len(train)} examples are too few to hold {held} out")
        eval_, train = train.select(range(held)), train.select(range(held, len(train)))
    return train, eval_


def _tokenized_named_dataset(data: DataArguments, model_args: ModelArguments, tokenizer) -> tuple[Any, Any]:
    """`load_named_dataset`'s splits, tokenized: classification keeps ``label_column`` as ``labels`` (string
    classes numbered in sorted order); causal-lm concatenates ``text_column`` and cuts ``max_length`` chunks."""
    from datasets import Dataset  # heavy: loaded on first use

    train, eval_ = load_named_dataset(data)
    for split in (train, eval_):
        if data.text_column not in split.column_names:
            raise ValueError(f"dataset {data.dataset!r}: no text column {data.text_column!r}; columns {split.column_names}")
    if model_args.task == "causal-lm":
        out = []
        for split, want in ((train, data.train_size), (eval_, data.eval_size)):
            ids = tokenizer("\n\n".join(list(split[data.text_column])))["input_ids"]
            chunks = [ids[i : i + data.max_length] for i in range(0, len(ids) - data.max_length + 1, data.max_length)]
            if not chunks:
                raise ValueError(f"dataset {data.dataset!r}: fewer than max_length={data.max_length} tokens in a split")
            out.append(Dataset.from_dict({"input_ids": chunks[:want]}))
        return out[0], out[1]
    if data.label_column not in train.column_names:
        raise ValueError(f"dataset {data.dataset!r}: no label column {data.label_column!r}; columns {train.column_names}")
    classes = sorted({*list(train[data.label_column]), *list(eval_[data.label_column])}, key=str)
    numbered = {c: i for i, c in enumerate(classes)} if any(isinstance(c, str) for c in classes) else None
    if len(classes) > model_args.num_labels or (numbered is None and max(classes) >= model_args.num_labels):
        raise ValueError(f"dataset {data.dataset!r}: classes {classes[:10]} do not fit num_labels={model_args.num_labels}")
    out = []
    for split, want in ((train, data.train_size), (eval_, data.eval_size)):
        split = split.select(range(min(want, len(split))))
        labels = [numbered[v] if numbered else int(v) for v in list(split[data.label_column])]
        encoded = tokenizer(list(split[data.text_column]), truncation=True, max_length=data.max_length)
        out.append(Dataset.from_dict({**{k: encoded[k] for k in encoded}, "labels": labels}))
    return out[0], out[1]


def build_datasets(data: DataArguments, model_args: ModelArguments, tokenizer):
    """``(train, eval)`` tokenized datasets; disjoint splits drawn with ``split_seed``."""
    if not data.builtin:
        return _tokenized_named_dataset(data, model_args, tokenizer)
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
    from datasets import Dataset  # heavy: loaded on first use

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
    from transformers import AutoTokenizer  # heavy: loaded on first use

    tokenizer = AutoTokenizer.from_pretrained(assets.resolve_model(model_args.model))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(model_args: ModelArguments, seed: int, tokenizer):
    """The pretrained model (+ a head initialized from ``seed``), wrapped with LoRA when ``lora_r > 0``."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification  # heavy: loaded on first use

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
        from peft import LoraConfig, get_peft_model  # heavy: loaded on first use

        task_type = "SEQ_CLS" if model_args.task == "sequence-classification" else "CAUSAL_LM"
        config = LoraConfig(r=model_args.lora_r, lora_alpha=model_args.lora_alpha, lora_dropout=model_args.lora_dropout,
                            target_modules=list(model_args.lora_target_modules), task_type=task_type)
        torch.manual_seed(seed)
        model = get_peft_model(model, config)
    return model


class _RepeatedLoadReportFilter(logging.Filter):
    """Drops a transformers "LOAD REPORT" (e.g. ``classifier.* MISSING``) identical to one already let through;
    every other record passes."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a malformed record is not ours to drop
            return True
        if "LOAD REPORT" not in message:
            return True
        if message in self.seen:
            return False
        self.seen.add(message)
        return True


@contextlib.contextmanager
def load_reports_once() -> Iterator[None]:
    """Within the block, transformers' load report of a model (``classifier.* MISSING``: a new head) prints
    once, not once per `from_pretrained` of the same model; other warnings are untouched."""
    loader_logger = logging.getLogger("transformers.modeling_utils")
    once = _RepeatedLoadReportFilter()
    loader_logger.addFilter(once)
    try:
        yield
    finally:
        loader_logger.removeFilter(once)


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
    from transformers import DataCollatorForLanguageModeling, DataCollatorWithPadding, Trainer  # heavy: loaded on first use

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


def run_recipe(recipe: Recipe, announce: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """All runs of a recipe; writes results.md, results.json, loss_curves.png (and the learned bundle).

    ``announce`` (e.g. ``print``; the CLI passes it) receives one line naming each run before it starts, so a log
    says which run it belongs to. A tqdm bar counts the runs (off with the recipe's ``disable_tqdm: true``);
    transformers' load report of the model (a new head's ``classifier.* MISSING``) prints once, not per run."""
    with load_reports_once():
        return _run_recipe(recipe, announce)


def _run_recipe(recipe: Recipe, announce: Callable[[str], None] | None) -> list[dict[str, Any]]:
    from tqdm.auto import tqdm  # loaded on first use

    results_dir = Path(recipe.optim.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(recipe.model)
    train, eval_ = build_datasets(recipe.data, recipe.model, tokenizer)
    rule = load_rule(recipe.optim.rule)
    plan = [("learned", None)] if recipe.optim.rule_default_lr else []
    plan += [("learned", lr) for lr in recipe.optim.rule_lrs] + [("adamw", lr) for lr in recipe.optim.adamw_lrs]
    rows = []
    best_learned = None
    total = len(recipe.optim.seeds) * len(plan)
    index = 0
    bar = tqdm(total=total, desc=f"{recipe.name}: runs", unit="run", disable=bool(recipe.training.disable_tqdm))
    for seed in recipe.optim.seeds:
        for name, lr in plan:
            index += 1
            line = (f"run {index}/{total}: {'learned rule ' + repr(recipe.optim.rule) if name == 'learned' else 'AdamW'}, "
                    f"lr {'(the rule default)' if lr is None else f'{lr:g}'}, seed {seed}")
            logger.info(line)
            if announce is not None:
                with tqdm.external_write_mode():  # the line above the bars, not through them
                    announce(line)
            row = run_one(recipe, name, lr, seed, train, eval_, tokenizer, rule)
            bundle = row.pop("_bundle", None)
            if bundle is not None and (best_learned is None or row["eval_loss"] < best_learned[0]):
                best_learned = (row["eval_loss"], bundle)
            rows.append(row)
            bar.update(1)
    bar.close()
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
        "the learned rule runs at its own lr and schedule (`Bundle.optimizer()`: the rule's own decay, if any), AdamW with the recipe's schedule "
        f"(`{recipe.training.lr_scheduler_type.value if hasattr(recipe.training.lr_scheduler_type, 'value') else recipe.training.lr_scheduler_type}`).",
        "",
        "| optimizer | lr | final train loss (mean of the last 3 logged) | eval loss | eval accuracy | wall s/run |",
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
    import matplotlib  # heavy: only for the plot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # heavy: only for the plot

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
    if ax.lines:  # no curve when a run logged no loss (max_steps < logging_steps)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
