"""Command line: ``python -m optbundle.meta.train RECIPE [--out-dir DIR] [--meta-steps N] [--max-wall-time S]``.

Runs (or resumes, if ``OUT_DIR/checkpoints/latest.json`` exists) the recipe's meta-training; works the same
under ``torchrun --nproc_per_node=N``. With ``--ship NAME`` the finished rule is also copied to
``bundle/pretrained/NAME`` (rank 0 only).
"""

from __future__ import annotations

import argparse
import logging
import shutil

from ..store.pretrained import PRETRAINED_DIR
from .trainer import MetaTrainer, load_recipe


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="meta-train a learned optimizer rule from a YAML recipe")
    parser.add_argument("recipe", help="shipped recipe name (recipes/NAME.yaml) or a YAML path")
    parser.add_argument("--out-dir", default=None)
    parser.add_argument("--meta-steps", type=int, default=None)
    parser.add_argument("--max-wall-time", type=float, default=None, dest="max_wall_time_s")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--init", default=None, help="override the recipe's starting φ (adam-init / scratch / dir)")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--ship", default=None, help="copy the finished rule to optbundle/store/pretrained/NAME")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    config = load_recipe(
        args.recipe,
        out_dir=args.out_dir,
        meta_steps=args.meta_steps,
        max_wall_time_s=args.max_wall_time_s,
        seed=args.seed,
        init=args.init,
    )
    if args.no_progress:
        config.progress = False
    trainer = MetaTrainer(config)
    rule = trainer.train()
    if rule is None:
        print(f"stopped early at meta-step {trainer.meta_step}; run the same command again to resume")
        return 0
    if trainer.rank == 0:
        print(f"rule saved to {trainer.out_dir / 'rule'} (meta-steps {trainer.meta_step}, {trainer.wall_time_s:.0f}s)")
        if args.ship:
            target = PRETRAINED_DIR / args.ship
            shutil.rmtree(target, ignore_errors=True)
            rule.save_pretrained(target)
            print(f"shipped as {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
