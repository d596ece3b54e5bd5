"""Model cards (README.md) for bundles and rules: YAML metadata the Hub reads, and a body generated from
the rule's config and provenance."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:  # pragma: no cover
    from .bundle import Bundle
    from .rule import LearnedRule


def rule_summary(rule: LearnedRule) -> str:
    c = rule.config
    lines = [
        f"- network: {c.num_inputs} → {' → '.join(str(h) for h in c.hidden_sizes)} → {c.num_outputs} "
        f"({c.activation}), {rule.num_parameters()} parameters",
        f"- features: {', '.join(c.features)}",
        f"- output form: `{c.output}` (step_mult {c.step_mult:g}, exp_mult {c.exp_mult:g}"
        + (", param-scaled" if c.param_scale else "")
        + ")",
        f"- momentum decays {c.momentum_decays}, second-moment decay {c.second_moment_decay}, "
        f"factored decays {c.factored_decays}",
    ]
    return "\n".join(lines)


def provenance_summary(provenance: dict[str, Any]) -> str:
    if not provenance:
        return "No provenance recorded."
    lines = []
    for key in ("method", "meta_trained", "description", "recipe", "tasks", "estimator", "meta_steps",
                "wall_time_s", "seed", "parent_rule", "code_version"):
        if key in provenance:
            lines.append(f"- {key}: {provenance[key]}")
    return "\n".join(lines) or "See optimizer/provenance.json."


def model_card(bundle: Bundle) -> str:
    """The README.md of a bundle directory."""
    metadata: dict[str, Any] = {"library_name": "optbundle", "tags": ["learned-optimizer", "optbundle"]}
    base = getattr(getattr(bundle.model, "config", None), "_name_or_path", None)
    if isinstance(base, str) and base.count("/") == 1 and not base.startswith((".", "/")):
        metadata["base_model"] = base
    header = yaml.safe_dump(metadata, sort_keys=False).strip()
    body = f"""# {type(bundle.model).__name__} + learned optimizer

This repository is an [optbundle](https://pypi.org/project/optbundle/) bundle: model weights together with
the learned optimizer rule that fine-tunes them (`optimizer/`).

## The rule

{rule_summary(bundle.rule)}

## How the rule was made

{provenance_summary(bundle.rule.provenance)}

## Usage

```python
from optbundle import Bundle
from transformers import Trainer, TrainingArguments

bundle = Bundle.from_pretrained("path/or/repo")
trainer = Trainer(model=bundle.model, args=TrainingArguments("out"), train_dataset=ds,
                  optimizers=bundle.optimizer())
trainer.train()
```
"""
    return f"---\n{header}\n---\n\n{body}"
