"""Ship a rule with new shipped settings (recommended lr per regime, role multipliers) and the same φ.

    python benchmarks/ship_settings.py                     # bundle/store/pretrained/default-v4 from default-v3
    python benchmarks/ship_settings.py --variants /tmp/v   # the variants tried on the dev suite, as rule folders

A rule's φ and its shipped settings are separate decisions: φ is meta-trained (recipes/meta-train-default.yaml),
the settings say at which lr it runs by default in each regime. default-v4 keeps default-v3's φ bit for bit and
changes only the settings, chosen on the development suite (`python benchmarks/heldout.py --suite dev`, other
data than the held-out suite; variants and numbers in benchmarks/results/meta-training.md §6):

- ``schedule: inverse_sqrt``, ``schedule_steps: 30`` and ``recommended_lr.scratch`` 1e-2 → 3e-2: the rule's own
  decay ``lr·(1 + t/30)^-½`` (≈ 0.16/√t late). No constant lr suited both the conv net (wants ≥ 2e-2) and the
  MLPs (want ≤ 5e-3) of the dev suite; a large early lr that decays did (geomean loss ratio vs best AdamW
  1.11 → 0.83 on the dev suite's from-scratch tasks);
- ``recommended_lr.finetune`` 3e-4 → 5e-3 (decayed the same way): at 3e-4 (× the μP shrink, × the 0.2 matrix
  RMS) pretrained matrices moved ~10× less per step than AdamW's best does;
- ``role_lr.adapter`` 10 → 1: LoRA matrices at the fine-tuning lr itself;
- ``finetune_head_lr: scratch``: the task head on a pretrained body is a new layer; it trains at the
  scratch lr (× the μP head multiplier).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from optbundle import LearnedRule, load_rule
from optbundle.store.pretrained import PRETRAINED_DIR as PRETRAINED

_V4 = dict(
    recommended_lr={"scratch": 3e-2, "finetune": 5e-3},
    role_lr={"matrix": 1.0, "vector": 1.0, "embedding": 1.0, "head": 1.0, "adapter": 1.0},
    finetune_head_lr="scratch",
    schedule="inverse_sqrt",
    schedule_steps=30.0,
)
#: each tensor's lr multiplier following sign(g·m) (meta-training.md §7)
_GA = dict(
    lr_adaptation="gradient_alignment", lr_adaptation_rate=0.03, lr_adaptation_bounds=[0.01, 10.0],
    lr_adaptation_momentum_index=1,
)
#: default-v6: the per-tensor scale may fall 4x at most (meta-training.md §8)
_V6 = {**_V4, **_GA, "lr_adaptation_bounds": [0.25, 10.0]}
#: default-v7: depth-scaled fine-tuning lr, the per-tensor scale within [0.25, 4] (meta-training.md §9)
_V7 = {**_V6, "lr_adaptation_bounds": [0.25, 4.0], "finetune_depth_matrices": 8, "finetune_depth_exponent": 0.5}
SETTINGS = {
    "default-v4": dict(parent="default-v3", **_V4),
    "default-v5": dict(parent="default-v3", section="§7", **_V4, **_GA),
    # §8: the per-tensor scale may fall 4x at most (not 100x): the greedy alignment signal kept lowering the
    # language models' steps long after that stopped helping
    "default-v6": dict(parent="default-v3", section="§8", **_V6),
    # §9: full fine-tuning of a deep pretrained model steps each pretrained tensor by √(8/n) when the optimizer
    # trains n > 8 hidden matrices (8: the deepest fine-tuning episode of meta-training); the per-tensor scale
    # may rise 4x at most
    "default-v7": dict(parent="default-v3", section="§9", **_V7),
}


_ROLES = {"matrix": 1.0, "vector": 1.0, "embedding": 1.0, "head": 1.0}
#: what was tried on the dev suite before default-v4 (``--variants DIR`` writes them as rule folders for
#: ``heldout.py --suite dev --rule DIR/NAME``); "zero-" variants zero φ (the Muon + Adam start of meta-training)
VARIANTS = {
    "ft1e-3": dict(recommended_lr={"scratch": 1e-2, "finetune": 1e-3}, role_lr={**_ROLES, "adapter": 3.0}),
    "ft3e-3": dict(recommended_lr={"scratch": 1e-2, "finetune": 3e-3}, role_lr={**_ROLES, "adapter": 1.0}),
    "ft1e-2": dict(recommended_lr={"scratch": 1e-2, "finetune": 1e-2}, role_lr={**_ROLES, "adapter": 0.3}),
    "ft3e-3-aux0.3": dict(recommended_lr={"scratch": 1e-2, "finetune": 3e-3},
                          role_lr={"matrix": 1.0, "vector": 0.3, "embedding": 0.3, "head": 0.3, "adapter": 1.0}),
    "zero-ft3e-3": dict(recommended_lr={"scratch": 1e-2, "finetune": 3e-3}, role_lr={**_ROLES, "adapter": 1.0}),
    "zero-ft1e-2": dict(recommended_lr={"scratch": 1e-2, "finetune": 1e-2}, role_lr={**_ROLES, "adapter": 0.3}),
    "zero-ft3e-3-aux0.3": dict(recommended_lr={"scratch": 1e-2, "finetune": 3e-3},
                               role_lr={"matrix": 1.0, "vector": 0.3, "embedding": 0.3, "head": 0.3, "adapter": 1.0}),
    "sc3e-3": dict(recommended_lr={"scratch": 3e-3, "finetune": 3e-3}, role_lr={**_ROLES, "adapter": 1.0}),
    "sc5e-3": dict(recommended_lr={"scratch": 5e-3, "finetune": 3e-3}, role_lr={**_ROLES, "adapter": 1.0}),
    "sc2e-2": dict(recommended_lr={"scratch": 2e-2, "finetune": 3e-3}, role_lr={**_ROLES, "adapter": 1.0}),
    # the rule's own decay lr·(1 + t/τ)^-½ (schedule "inverse_sqrt"), head at the scratch lr when fine-tuning
    **{
        f"sched-lr{lr:g}-t{tau:g}": dict(
            recommended_lr={"scratch": lr, "finetune": 3e-3}, role_lr={**_ROLES, "adapter": 1.0},
            finetune_head_lr="scratch", schedule="inverse_sqrt", schedule_steps=tau,
        )
        for lr, tau in ((1e-2, 100.0), (2e-2, 30.0), (2e-2, 100.0), (2e-2, 300.0), (3e-2, 10.0), (3e-2, 30.0),
                        (3e-2, 100.0), (5e-2, 10.0), (5e-2, 30.0))
    },
    "v4-constant": dict(recommended_lr={"scratch": 1e-2, "finetune": 3e-3}, role_lr={**_ROLES, "adapter": 1.0},
                        finetune_head_lr="scratch"),
    "sched-ft5e-3": dict(recommended_lr={"scratch": 3e-2, "finetune": 5e-3}, role_lr={**_ROLES, "adapter": 1.0},
                         finetune_head_lr="scratch", schedule="inverse_sqrt", schedule_steps=30.0),
    # §7: default-v4's settings, diagnosed (zero φ) and with the per-tensor lr adaptation (gradient_alignment)
    "zero-v4": dict(_V4),
    "zero-v4-constant3e-3": {**_V4, "schedule": "constant", "recommended_lr": {"scratch": 3e-3, "finetune": 5e-3}},
    "v4-ga-rate0.03": {**_V4, **_GA},  # = default-v5
    "v4-ga-rate0.015": {**_V4, **_GA, "lr_adaptation_rate": 0.015},
    "v4-ga-constant": {**_V4, **_GA, "schedule": "constant"},
    "v4-ga-scratch5e-2": {**_V4, **_GA, "recommended_lr": {"scratch": 5e-2, "finetune": 5e-3}},
    "v4-ga-T100": {**_V4, **_GA, "schedule_steps": 100.0},
    # §8: how far the per-tensor scale may fall, and a lower start with it
    **{f"v5-floor{lo:g}": {**_V4, **_GA, "lr_adaptation_bounds": [lo, 10.0]} for lo in (0.1, 0.25, 0.4)},
    "v6-scratch1e-2": {**_V6, "recommended_lr": {"scratch": 1e-2, "finetune": 5e-3}},
    "v6-scratch1e-2-T100": {**_V6, "schedule_steps": 100.0, "recommended_lr": {"scratch": 1e-2, "finetune": 5e-3}},
    # §9: a lower fine-tuning lr for every pretrained tensor, LoRA adapters kept at 5e-3 (default-v7 scales the
    # pretrained tensors' lr by depth instead), and the upper bound of the per-tensor scale
    **{
        f"v6-ft{lr:g}": {**_V6, "recommended_lr": {"scratch": 3e-2, "finetune": lr},
                         "role_lr": {**_V4["role_lr"], "adapter": 5e-3 / lr}}
        for lr in (2e-3, 1e-3, 5e-4)
    },
    "v6-hi4": {**_V6, "lr_adaptation_bounds": [0.25, 4.0]},
}


def derived_rule(parent: LearnedRule, settings: dict, provenance: dict) -> LearnedRule:
    """``parent``'s φ (copied) under ``parent``'s config with ``settings`` replaced."""
    rule = LearnedRule(dataclasses.replace(parent.config, **settings), provenance)
    rule.load_state_dict(parent.state_dict())
    return rule


def write_variants(directory: Path) -> None:
    import torch

    parent = load_rule("default-v3")
    for name, settings in VARIANTS.items():
        rule = derived_rule(parent, settings, {**parent.provenance, "variant": name})
        if name.startswith("zero-"):
            with torch.no_grad():
                for p in rule.parameters():
                    p.zero_()
        rule.save_pretrained(directory / name)
        print(f"{directory / name}: {settings}")


def ship(name: str, out: Path) -> LearnedRule:
    settings = dict(SETTINGS[name])
    parent = load_rule(settings.pop("parent"))
    section = settings.pop("section", "§6")
    provenance = {
        **parent.provenance,
        "method": "shipped settings",
        "settings_parent": parent.provenance.get("recipe"),
        "settings_parent_rule": parent.content_hash(),
        "settings_changed": dict(settings),
        "settings_chosen_on": f"python benchmarks/heldout.py --suite dev (benchmarks/results/meta-training.md {section})",
        "settings_command": f"python benchmarks/ship_settings.py --name {name}",
    }
    rule = derived_rule(parent, settings, provenance)
    rule.save_pretrained(out)
    return rule


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="default-v7", choices=sorted(SETTINGS))
    parser.add_argument("--out", type=Path, default=None, help="default: bundle/store/pretrained/NAME")
    parser.add_argument("--variants", type=Path, default=None, help="write the dev-suite variants here instead")
    args = parser.parse_args()
    if args.variants:
        write_variants(args.variants)
        return
    rule = ship(args.name, args.out or PRETRAINED / args.name)
    print(f"{args.name}: {rule.content_hash()[:16]} ({rule.config.recommended_lr}, head in fine-tuning: "
          f"{rule.config.finetune_head_lr})")


if __name__ == "__main__":
    main()
