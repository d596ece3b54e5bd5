"""Applications on top of the library: fine-tuning recipes (`finetune`)."""
