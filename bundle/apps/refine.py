"""Refinement recipes (``optbundle refine RECIPE.yaml``): the `finetune` model/data keys plus where the bundle
comes from (`RefineSource`) and the `RefineConfig` of `optbundle.meta.refine`."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..meta.refine import RefineConfig
from ..recipes import recipe_path
from ..store.bundle import Bundle
from ..store.rule import load_rule
from .finetune import DataArguments, ModelArguments, build_datasets, load_model, load_tokenizer, parse_recipe


@dataclass
class RefineSource:
    """Where the bundle to refine comes from, and where the refined one goes."""

    bundle: str | None = field(default=None, metadata={"help": "a bundle folder to refine (else model + rule)"})
    rule: str = field(default="default", metadata={"help": "rule for a bundle built from `model` (name, folder, Hub id)"})
    model_seed: int = field(default=0, metadata={"help": "seed of the fresh task head when building from `model`"})
    output_bundle: str | None = field(default=None, metadata={"help": "where to save the refined bundle (default: out_dir/bundle)"})


@dataclass
class RefineRecipe:
    model: Any
    data: Any
    source: RefineSource
    config: RefineConfig


def load_refine_recipe(path: str | Path, overrides: Mapping[str, Any] | None = None) -> RefineRecipe:
    """Parse a refinement recipe: the `finetune` model/data keys, `RefineSource` and `RefineConfig` keys."""
    stem = recipe_path(str(path)).stem
    _, (model, data_args, source, config) = parse_recipe(
        path, (ModelArguments, DataArguments, RefineSource, RefineConfig), dict(overrides or {}), defaults={"name": stem}
    )
    config.max_tokens = data_args.max_length
    return RefineRecipe(model, data_args, source, config)


def run_refine_recipe(recipe: RefineRecipe):
    """Build (or load) the bundle, refine it on the recipe's data, save the refined bundle; returns it."""
    tokenizer = load_tokenizer(recipe.model)
    if recipe.source.bundle:
        bundle = Bundle.from_pretrained(recipe.source.bundle)
        bundle.tokenizer = bundle.tokenizer or tokenizer
    else:
        model = load_model(recipe.model, recipe.source.model_seed, tokenizer)
        bundle = Bundle(model, load_rule(recipe.source.rule), tokenizer=tokenizer)
    train, held_out = build_datasets(recipe.data, recipe.model, tokenizer)
    refined = bundle.refine(train, held_out, dataset_name=recipe.data.dataset, **dataclasses.asdict(recipe.config))
    if refined is None:
        return None
    target = Path(recipe.source.output_bundle or Path(recipe.config.out_dir) / "bundle")
    refined.save_pretrained(target)
    return refined, target
