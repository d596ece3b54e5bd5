"""Worker for test_meta_distributed.py: run a tiny recipe under torchrun and save this rank's θ."""

import sys
from pathlib import Path

import torch.distributed as dist

from optbundle.files import atomic_write_bytes, save_safetensors_bytes
from optbundle.meta import load_recipe
from optbundle.meta.trainer import MetaTrainer

recipe, out_dir = sys.argv[1], Path(sys.argv[2])
trainer = MetaTrainer(load_recipe(recipe, out_dir=str(out_dir)))
trainer.train()
atomic_write_bytes(out_dir / f"theta-rank{trainer.rank}.safetensors", save_safetensors_bytes({"theta": trainer.theta}))
dist.barrier()
dist.destroy_process_group()
