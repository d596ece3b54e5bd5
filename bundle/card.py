"""Model cards (README.md) for bundles and rule-only repos.

A card is YAML metadata the Hub reads (``library_name: optbundle``, tags including ``learned-optimizer``,
``base_model`` and ``datasets`` where known) and a body generated from the rule's config and provenance:
what the rule is, how it was made, results tables and plots when the provenance has them, and a 5-line
usage snippet.

A generated card ends with a seal, an HTML comment holding the sha256 of the text above it. A card whose
seal is missing or no longer matches was edited by someone, and `optbundle.hub` does not overwrite it on
re-push unless asked. The card is documentation only: the manifest does not cover it (so editing it on the
Hub never breaks loading), and nothing reads it to load a bundle.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

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


def card_metadata(provenance: dict[str, Any], *, base_model: list[str] | None = None, extra_tags: list[str] = ()) -> str:
    """The YAML block of a card, built with `huggingface_hub.ModelCardData` so the Hub accepts it."""
    from huggingface_hub import ModelCardData

    tags = list(BASE_TAGS)
    if provenance.get("meta_trained") is False:
        tags.append("not-meta-trained")
    for tag in [*extra_tags, *(provenance.get("tags") or [])]:
        if isinstance(tag, str) and tag and tag not in tags:
            tags.append(tag)
    datasets = _hub_ids(provenance.get("datasets")) if provenance.get("datasets") else []
    data = ModelCardData(
        library_name="optbundle",
        tags=tags,
        base_model=(base_model[0] if len(base_model) == 1 else base_model) if base_model else None,
        datasets=datasets or None,
    )
    return data.to_yaml()


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


def model_card(bundle: Bundle) -> str:
    """The README.md of a bundle (sealed; the usage snippet names `REPO_PLACEHOLDER` until pushed)."""
    provenance = bundle.rule.provenance
    kind_tags = {"peft": ["peft"], "transformers": ["transformers"]}.get(bundle.kind, [])
    header = card_metadata(provenance, base_model=base_model_of(bundle), extra_tags=kind_tags)
    results = results_section(provenance)
    body = f"""# {type(bundle.model).__name__} + learned optimizer

This repository is an [optbundle](https://pypi.org/project/optbundle/) bundle: model weights together with
the learned optimizer that fine-tunes them (`optimizer/`). Every file is listed with its size and sha256 in
`bundle.json` and verified on load; only safetensors and JSON are read.

{_not_meta_trained_note(provenance)}## The rule

{rule_summary(bundle.rule)}

{_layerwise_summary(bundle)}{_state_summary(bundle)}

## How the rule was made

{provenance_summary(provenance)}

{results}## Usage

```python
from optbundle import Bundle
from transformers import Trainer, TrainingArguments
bundle = Bundle.from_pretrained("{REPO_PLACEHOLDER}")
trainer = Trainer(model=bundle.model, args=TrainingArguments("out"), train_dataset=train_dataset, optimizers=bundle.optimizer())
trainer.train()
```
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
