"""Model cards (README.md) for bundles and rule-only repos.

A card is YAML metadata the Hub reads (``library_name: optbundle``, tags including ``learned-optimizer``,
``base_model`` and ``datasets`` where known) and a body generated from the rule's config and provenance:
what the rule is, how it was made, results tables and plots when the provenance has them, and a 5-line
usage snippet.

A generated card ends with a seal, an HTML comment holding the sha256 of the text above it. A card whose
seal is missing or no longer matches was edited by someone, and `optbundle.store.hub` does not overwrite it on
re-push unless asked. The card is documentation only: the manifest does not cover it (so editing it on the
Hub never breaks loading), and nothing reads it to load a bundle.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..step.rule import RuleNetwork
from .pretrained import shipped_rule_names, shipped_rule_path

if TYPE_CHECKING:  # pragma: no cover
    from .bundle import Bundle
    from .rule import LearnedRule

#: Stands for the repo id in the usage snippet of a card written to disk; `card_for_repo` fills it in on push.
REPO_PLACEHOLDER = "path/or/repo"
SEAL_PREFIX = "<!-- optbundle:generated-card sha256="
SEAL_SUFFIX = " -->"
BASE_TAGS = ["optbundle", "learned-optimizer"]

OUTPUT_FORMULAS = {
    "small_fc_lopt": "step = step_mult · d · exp(exp_mult · a)",
    "normalized": "step = step_mult · w / RMS(w), w = d · exp(exp_mult · a) (per-tensor unit RMS)",
    "adam_residual": "step = step_mult · exp(magnitude_bound · tanh(a)) · (m̂ / (√v̂ + adam_eps) + d)",
}

PROVENANCE_ORDER = (
    "method", "meta_trained", "description", "recipe", "tasks", "estimator", "meta_steps", "wall_time_s",
    "seed", "parent_rule", "code_version",
)


# ---- the seal that tells generated cards from edited ones -------------------------------------------------


def _normalized(text: str) -> str:
    return text.replace("\r\n", "\n").rstrip() + "\n"


def seal_card(text: str) -> str:
    """Append the generated-card seal: ``<!-- optbundle:generated-card sha256=<sha256 of the text above> -->``."""
    body = _normalized(text)
    return f"{body}\n{SEAL_PREFIX}{hashlib.sha256(body.encode()).hexdigest()}{SEAL_SUFFIX}\n"


def is_generated_card(text: str) -> bool:
    """True when ``text`` ends with a seal that matches it, i.e. nobody edited the card since it was generated.

    Line endings and trailing whitespace are ignored (the Hub's editor may change them).
    """
    lines = _normalized(text).rstrip("\n").split("\n")
    last = lines[-1].strip()
    if not (last.startswith(SEAL_PREFIX) and last.endswith(SEAL_SUFFIX)):
        return False
    digest = last[len(SEAL_PREFIX) : -len(SEAL_SUFFIX)]
    body = _normalized("\n".join(lines[:-1]))
    return hashlib.sha256(body.encode()).hexdigest() == digest


_USAGE_CALL = re.compile(r'((?:Bundle\.from_pretrained|load_rule)\()"[^"\n]*"(\))')


def card_for_repo(text: str, repo_id: str) -> str:
    """A generated card with its usage snippet pointing at ``repo_id`` (whatever repo or placeholder it named
    before); an edited card is returned as is."""
    if not is_generated_card(text):
        return text
    body = "\n".join(_normalized(text).rstrip("\n").split("\n")[:-1])
    return seal_card(_USAGE_CALL.sub(lambda m: f"{m.group(1)}{json.dumps(repo_id)}{m.group(2)}", body))


# ---- pieces of the body ------------------------------------------------------------------------------------


def rule_summary(rule: LearnedRule) -> str:
    """What the rule is: network, features (with their widths), output form and accumulator decays."""
    c = rule.config
    features = ", ".join(f"{name} ({c.feature_width(name)})" if c.feature_width(name) > 1 else name for name in c.features)
    output = OUTPUT_FORMULAS.get(c.output, c.output)
    scale = f"; × max(RMS(p), {c.param_scale_min:g}) (param-scaled)" if c.param_scale else ""
    lines = [
        f"- network: {c.num_inputs} → {' → '.join(str(h) for h in c.hidden_sizes)} → {c.num_outputs} "
        f"({c.activation}), {rule.num_parameters()} parameters",
        f"- features ({c.num_inputs} inputs): {features}",
        f"- output form `{c.output}`: {output}{scale}, with step_mult {c.step_mult:g}, exp_mult {c.exp_mult:g}"
        + (f", magnitude_bound {c.magnitude_bound:g}" if c.output == "adam_residual" else ""),
        f"- momentum decays {c.momentum_decays}, second-moment decay {c.second_moment_decay}, "
        f"factored decays {c.factored_decays}",
        f"- rule format version {c.format_version}, content hash `{rule.content_hash()[:16]}`",
    ]
    return "\n".join(lines)


def _cell(value: Any, limit: int = 300) -> str:
    """One table cell: numbers compact, structures as JSON (shortened to ``limit``), prose in full."""
    if isinstance(value, float):
        text = f"{value:.6g}"
    elif isinstance(value, (dict, list, tuple)):
        text = json.dumps(value, sort_keys=True, default=str)
        if len(text) > limit:
            text = text[: limit - 1] + "…"
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def provenance_summary(provenance: dict[str, Any]) -> str:
    """How the rule was made, as a two-column table (known keys first, then the rest; results go elsewhere)."""
    if not provenance:
        return "No provenance recorded."
    skip = {"results", "plots", "datasets", "base_model", "tags"}
    keys = [k for k in PROVENANCE_ORDER if k in provenance]
    keys += sorted(k for k in provenance if k not in keys and k not in skip)
    if not keys:
        return "See `provenance.json`."
    rows = ["| field | value |", "|---|---|"]
    rows += [f"| {k} | {_cell(provenance[k])} |" for k in keys]
    return "\n".join(rows)


def markdown_table(rows: list[dict[str, Any]], first_column: str | None = None) -> str:
    """A markdown table from a list of row dicts (columns: the union of keys, in first-seen order)."""
    columns: list[str] = [first_column] if first_column else []
    for row in rows:
        columns += [k for k in row if k not in columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def results_section(provenance: dict[str, Any]) -> str:
    """Results tables and plots recorded in the provenance, or ``""`` when there are none.

    ``provenance["results"]`` may be a list of rows (dicts), a ``{name: {metric: value}}`` mapping or a flat
    ``{metric: value}`` mapping; ``provenance["plots"]`` lists image paths relative to the repo root, or
    ``{caption: path}``.
    """
    parts = []
    results = provenance.get("results")
    if isinstance(results, list) and results and all(isinstance(r, dict) for r in results):
        parts.append(markdown_table(results))
    elif isinstance(results, dict) and results:
        if all(isinstance(v, dict) for v in results.values()):
            parts.append(markdown_table([{"run": name, **row} for name, row in results.items()], first_column="run"))
        else:
            parts.append(markdown_table([{"metric": k, "value": v} for k, v in results.items()]))
    plots = provenance.get("plots")
    if isinstance(plots, list):
        plots = {Path(str(p)).stem: p for p in plots}
    if isinstance(plots, dict):
        for caption, path in plots.items():
            if isinstance(path, str) and not path.startswith(("/", "..")):
                parts.append(f"![{caption}]({path})")
    if not parts:
        return ""
    return "## Results\n\n" + "\n\n".join(parts) + "\n"


def _hub_ids(value: Any) -> list[str]:
    """Keep the strings that look like Hub repo ids (``name`` or ``namespace/name``), in order, once."""
    values = value if isinstance(value, (list, tuple)) else [value]
    out = []
    for v in values:
        if isinstance(v, str) and re.fullmatch(r"[\w.-]+(/[\w.-]+)?", v) and not v.startswith(".") and v not in out:
            if not Path(v).exists():  # a local path that happens to look like an id is not a base model
                out.append(v)
    return out


def base_model_of(bundle: Bundle) -> list[str]:
    """The Hub id(s) the bundle's model derives from: provenance ``base_model``, a PEFT adapter's base, or the
    transformers config's ``_name_or_path`` when it is a Hub id."""
    provenance = bundle.rule.provenance
    if provenance.get("base_model"):
        return _hub_ids(provenance["base_model"])
    peft_config = getattr(bundle.model, "peft_config", None)
    if isinstance(peft_config, dict):
        bases = [getattr(c, "base_model_name_or_path", None) for c in peft_config.values()]
        ids = _hub_ids([b for b in bases if b])
        if ids:
            return ids
    name = getattr(getattr(bundle.model, "config", None), "_name_or_path", None)
    if isinstance(name, str) and name.count("/") == 1:
        return _hub_ids(name)
    return []


def card_metadata(
    provenance: dict[str, Any],
    *,
    base_model: list[str] | None = None,
    extra_tags: list[str] = (),
    library_name: str = "optbundle",
    license: str | None = None,
    language: str | list[str] | None = None,
    datasets: list[str] | None = None,
    pipeline_tag: str | None = None,
    model_name: str | None = None,
    eval_results: list[Any] | None = None,
) -> str:
    """The YAML block of a card, built with `huggingface_hub.ModelCardData` so the Hub accepts it (``eval_results``
    become the ``model-index`` the Hub shows as results)."""
    from huggingface_hub import ModelCardData  # loaded on first use (`import optbundle` does not need it)

    tags = list(BASE_TAGS)
    if provenance.get("meta_trained") is False:
        tags.append("not-meta-trained")
    for tag in [*extra_tags, *(provenance.get("tags") or [])]:
        if isinstance(tag, str) and tag and tag not in tags:
            tags.append(tag)
    ids = _hub_ids(provenance.get("datasets")) if provenance.get("datasets") else []
    for dataset in _hub_ids(datasets) if datasets else []:
        if dataset not in ids:
            ids.append(dataset)
    data = ModelCardData(
        library_name=library_name,
        tags=tags,
        license=license or provenance.get("license") or None,
        language=language or None,
        base_model=(base_model[0] if len(base_model) == 1 else base_model) if base_model else None,
        datasets=ids or None,
        pipeline_tag=pipeline_tag,
        model_name=model_name if eval_results else None,
        eval_results=eval_results or None,
    )
    return data.to_yaml()


_TASKS = {
    "ForSequenceClassification": "text-classification",
    "ForCausalLM": "text-generation",
    "ForMaskedLM": "fill-mask",
    "ForTokenClassification": "token-classification",
    "ForQuestionAnswering": "question-answering",
    "ForImageClassification": "image-classification",
}


def task_of(model: Any) -> str | None:
    """The Hub task id of a transformers model (from its class name, through a PEFT wrapper), if known."""
    inner = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    name = type(inner).__name__
    return next((task for suffix, task in _TASKS.items() if name.endswith(suffix)), None)


def eval_results_of(metrics: dict[str, Any], *, task: str | None, dataset: str | None) -> list[Any]:
    """``huggingface_hub.EvalResult`` entries (model-index) for numeric ``metrics`` (e.g. Trainer's eval loss)."""
    from huggingface_hub import EvalResult  # loaded on first use (`import optbundle` does not need it)

    out = []
    for name, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        metric = str(name).strip().lower().replace(" ", "_")
        out.append(EvalResult(
            task_type=task or "other", dataset_type=dataset or "custom", dataset_name=dataset or "custom data",
            metric_type=metric, metric_name=str(name), metric_value=float(value),
        ))
    return out


def shipped_name_of(rule: LearnedRule) -> str | None:
    """The name of the shipped rule (``default-v3``, ...) whose content hash equals ``rule``'s, if any."""
    digest = rule.content_hash()
    matches = []
    for name in shipped_rule_names():
        try:
            if RuleNetwork.from_directory(shipped_rule_path(name)).content_hash() == digest:
                matches.append(name)
        except Exception:  # a broken shipped rule must not break writing a card
            continue
    versioned = [m for m in matches if m != "default"]
    return (f"{versioned[0]} (= default)" if versioned and "default" in matches else (versioned or matches or [None])[0])


def _not_meta_trained_note(provenance: dict[str, Any]) -> str:
    if provenance.get("meta_trained") is False:
        return (
            "> **Not meta-trained.** This rule was made by "
            f"{provenance.get('method', 'a non-meta-training method')}; it is a starting point for meta-training, "
            "not an optimizer that learned to beat a baseline.\n\n"
        )
    return ""


def _layerwise_summary(bundle: Bundle) -> str:
    """For a layer-wise bundle: the extra rules and which parameters each one updates."""
    rules = getattr(bundle, "rules", None) or {}
    routing = getattr(bundle, "routing", None) or []
    extra = {name: rule for name, rule in rules.items() if rule is not bundle.rule}
    if not extra:
        return ""
    lines = ["Layer-wise: parameters matched by a route use their own rule (first match wins), the rest the rule above.", ""]
    lines += [f"- `{pattern}` → `{name}`" for pattern, name in routing]
    lines += [f"- rule `{name}`: {rule.config.num_inputs} inputs, hidden {rule.config.hidden_sizes}, output "
              f"`{rule.config.output}`, {rule.num_parameters()} parameters" for name, rule in extra.items()]
    return "\n".join(lines) + "\n\n"


def _state_summary(bundle: Bundle) -> str:
    if not bundle.state:
        return "This bundle ships no optimizer state: the learned optimizer starts with fresh accumulators."
    steps = sorted({int(entry["step"]) for entry in bundle.state.values() if "step" in entry})
    step_text = f"step {steps[0]}" if len(steps) == 1 else f"steps {steps[0]}–{steps[-1]}"
    return (
        f"This bundle ships the optimizer's accumulators for {len(bundle.state)} parameters ({step_text}) in "
        "`optimizer/state.safetensors`, so fine-tuning resumes where it stopped."
    )


# ---- whole cards -----------------------------------------------------------------------------------------------


def _rule_identity(rule: LearnedRule) -> str:
    """One line naming the rule: its shipped name (when it is one), hash, and how it was made."""
    provenance = rule.provenance
    name = shipped_name_of(rule)
    made = provenance.get("method") or "unknown method"
    if provenance.get("meta_steps"):
        made += f", {provenance['meta_steps']} meta-steps"
    if provenance.get("recipe"):
        made += f", recipe `{provenance['recipe']}`"
    named = f"shipped rule `{name}`" if name else "a custom rule"
    return f"Learned rule: {named}, content hash `{rule.content_hash()[:16]}` ({made}; full provenance below)."


def _training_section(metrics: dict[str, Any] | None, training: dict[str, Any] | None, datasets: Any) -> str:
    rows = []
    if datasets:
        rows.append(("data", ", ".join(datasets) if isinstance(datasets, (list, tuple)) else str(datasets)))
    for key, value in (training or {}).items():
        rows.append((key, value))
    for key, value in (metrics or {}).items():
        rows.append((f"eval {key}", value))
    if not rows:
        return ""
    table = "\n".join(["| | |", "|---|---|", *[f"| {_cell(k)} | {_cell(v)} |" for k, v in rows]])
    return f"## Training and results\n\n{table}\n\n"


def model_card(
    bundle: Bundle,
    *,
    license: str | None = None,
    base_model: str | list[str] | None = None,
    datasets: str | list[str] | None = None,
    metrics: dict[str, Any] | None = None,
    model_name: str | None = None,
    tasks: str | list[str] | None = None,
    language: str | list[str] | None = None,
    tags: list[str] | None = None,
    training: dict[str, Any] | None = None,
) -> str:
    """The README.md of a bundle (sealed; the usage snippet names `REPO_PLACEHOLDER` until pushed).

    ``license``, ``base_model``, ``datasets``, ``language`` and ``tags`` go to the YAML metadata; ``metrics``
    (e.g. Trainer's eval results) become ``model-index`` results and a table with ``training`` (step count,
    lr, schedule). An adapter bundle follows PEFT's card conventions (``library_name: peft``, tags ``lora``,
    ``base_model:adapter:<base>``), with the ``optbundle`` tags.
    """
    provenance = bundle.rule.provenance
    kind_tags = {"peft": ["peft"], "transformers": ["transformers"]}.get(bundle.kind, [])
    bases = _hub_ids(base_model) if base_model else base_model_of(bundle)
    library_name = "optbundle"
    if bundle.kind == "peft":
        library_name = "peft"
        kind_tags = ["peft", "transformers"]
        peft_config = getattr(bundle.model, "active_peft_config", None)
        if str(getattr(getattr(peft_config, "peft_type", None), "value", "")) == "LORA":
            kind_tags.append("lora")
        kind_tags += [f"base_model:adapter:{b}" for b in bases]
    task = tasks[0] if isinstance(tasks, list) and tasks else tasks or task_of(bundle.model)
    dataset_list = [d for d in ([datasets] if isinstance(datasets, str) else list(datasets or [])) if isinstance(d, str) and d]
    dataset_ids = _hub_ids(dataset_list)
    eval_results = eval_results_of(metrics or {}, task=task, dataset=dataset_ids[0] if dataset_ids else None)
    header = card_metadata(
        provenance, base_model=bases, extra_tags=[*kind_tags, *(tags or [])], library_name=library_name,
        license=license, language=language, datasets=dataset_ids, model_name=model_name or type(bundle.model).__name__,
        eval_results=eval_results, pipeline_tag=task if bundle.kind == "peft" and task == "text-generation" else None,
    )
    results = results_section(provenance)
    load = (
        "The adapter also loads with PEFT alone: `PeftModel.from_pretrained(base_model, repo)`."
        if bundle.kind == "peft" else
        "The model also loads with transformers alone: `AutoModel*.from_pretrained(repo)` (the `optimizer/` folder is ignored)."
    )
    body = f"""# {model_name or type(bundle.model).__name__} + learned optimizer

This repository is an [optbundle](https://pypi.org/project/optbundle/) bundle: model weights together with
the learned optimizer that fine-tunes them (`optimizer/`). Every file is listed with its size and sha256 in
`bundle.json` and verified on load; only safetensors and JSON are read.

{_not_meta_trained_note(provenance)}{_training_section(metrics, training, dataset_list)}## The rule

{_rule_identity(bundle.rule)}

{rule_summary(bundle.rule)}

{_layerwise_summary(bundle)}{_state_summary(bundle)}

## How the rule was made

{provenance_summary(provenance)}

{results}## Usage

```python
from optbundle import Bundle
from transformers import Trainer, TrainingArguments
bundle = Bundle.from_pretrained("{REPO_PLACEHOLDER}")  # verifies every file against bundle.json
trainer = Trainer(model=bundle.model, args=TrainingArguments("out"), train_dataset=train_dataset, optimizers=bundle.optimizer())
trainer.train()
```

{load}
"""
    return seal_card(f"---\n{header}\n---\n\n{body}")


def rule_card(rule: LearnedRule) -> str:
    """The README.md of a rule-only repo (one rule serving many models)."""
    provenance = rule.provenance
    header = card_metadata(provenance, base_model=_hub_ids(provenance["base_model"]) if provenance.get("base_model") else None)
    results = results_section(provenance)
    body = f"""# Learned optimizer rule

This repository holds an [optbundle](https://pypi.org/project/optbundle/) learned optimizer rule alone
(`rule_config.json`, `rule.safetensors`, `provenance.json`, listed with sizes and sha256 in `bundle.json`), so
one rule can fine-tune many models.

{_not_meta_trained_note(provenance)}## The rule

{rule_summary(rule)}

## How the rule was made

{provenance_summary(provenance)}

{results}## Usage

```python
from optbundle import Bundle, load_rule
from transformers import Trainer, TrainingArguments
bundle = Bundle(model, load_rule("{REPO_PLACEHOLDER}"))  # your model + this learned optimizer
trainer = Trainer(model=model, args=TrainingArguments("out"), train_dataset=train_dataset, optimizers=bundle.optimizer())
trainer.train()
```
"""
    return seal_card(f"---\n{header}\n---\n\n{body}")
