"""Run by tests/apps/test_ddp.py, once under `torchrun --nproc_per_node=2` and once as a single process.

Trains a tiny BERT on digits with the bundle's learned optimizer through transformers.Trainer. The dataset
holds exactly one global batch, so every step sees the same examples whatever the number of processes, and
DDP's averaged gradient equals the single process's full-batch gradient. Each rank writes its parameters.
"""

import os
import sys
from pathlib import Path

import torch
from helpers import digits_bert, digits_dataset, trainer_args  # tests/, this script's folder
from safetensors.torch import save_file
from transformers import Trainer

from optbundle import Bundle, load_rule

GLOBAL_BATCH = 16


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    model = digits_bert()
    # BERT's forward takes **kwargs, so transformers 5.x assumes its loss is normalized by num_items_in_batch and
    # multiplies it by the world size under DDP; BERT ignores num_items_in_batch, so that would double the
    # gradients on 2 ranks. bundle.optimizer() declares that the model takes no loss kwargs (keep_loss_scaling),
    # which keeps the plain mean: the script does not set it itself.
    bundle = Bundle(model, load_rule("default"))
    ddp = {"ddp_backend": "gloo", "ddp_find_unused_parameters": False} if world > 1 else {}
    args = trainer_args(out / "trainer", 6, per_device_train_batch_size=GLOBAL_BATCH // world, **ddp)
    trainer = Trainer(model=model, args=args, train_dataset=digits_dataset(GLOBAL_BATCH), optimizers=bundle.optimizer())
    trainer.train()
    params = {n: p.detach().contiguous() for n, p in model.named_parameters()}
    save_file(params, str(out / f"world{world}-rank{rank}.safetensors"))


if __name__ == "__main__":
    main()
