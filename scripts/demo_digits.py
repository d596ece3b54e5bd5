"""Interim main job: fine-tune a tiny BERT on scikit-learn's digits (each 8×8 image read as 64 pixel tokens)
through the real transformers.Trainer, once with a bundle's learned optimizer and once with AdamW, and print
both losses. Writes the trained bundle to outputs/digits-bundle.

    python scripts/demo_digits.py [--steps 300]
"""

from __future__ import annotations

import argparse
import time

import torch
from datasets import Dataset
from sklearn.datasets import load_digits
from transformers import BertConfig, BertForSequenceClassification, Trainer, TrainingArguments

from optbundle import Bundle, load_rule


def digits_splits():
    digits = load_digits()
    ids = [[0] + [int(v) + 1 for v in row] for row in digits.data]
    data = Dataset.from_dict({"input_ids": ids, "labels": digits.target.tolist()})
    split = data.train_test_split(test_size=0.2, seed=0)
    return split["train"], split["test"]


def make_model(seed: int) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    return BertForSequenceClassification(
        BertConfig(vocab_size=18, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                   max_position_embeddings=72, num_labels=10)
    )


def accuracy(eval_pred):
    logits, labels = eval_pred
    return {"accuracy": float((logits.argmax(-1) == labels).mean())}


def run(name: str, steps: int, seed: int, **trainer_kwargs):
    train, test = digits_splits()
    model = trainer_kwargs.pop("model")
    args = TrainingArguments(
        output_dir=f"outputs/demo-{name}", max_steps=steps, per_device_train_batch_size=32, learning_rate=1e-3,
        lr_scheduler_type="constant", logging_steps=max(1, steps // 10), report_to="none", use_cpu=True,
        save_strategy="no", seed=seed, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=test, compute_metrics=accuracy,
                      **trainer_kwargs)
    start = time.time()
    trainer.train()
    wall = time.time() - start
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    metrics = trainer.evaluate()
    return {"optimizer": name, "final train loss": losses[-1], "eval loss": metrics["eval_loss"],
            "eval accuracy": metrics["eval_accuracy"], "wall s": wall}, trainer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rows = []
    bundle = Bundle(make_model(args.seed), load_rule("default"))
    row, trainer = run("learned", args.steps, args.seed, model=bundle.model, optimizers=bundle.optimizer())
    rows.append(row)
    bundle.set_state(trainer.optimizer.optimizer)
    bundle.save_pretrained("outputs/digits-bundle")
    row, _ = run("adamw-1e-3", args.steps, args.seed, model=make_model(args.seed))
    rows.append(row)
    print(f"\nrule: {load_rule('default').provenance.get('method', '?')} (default)  steps: {args.steps}\n")
    print("| optimizer | final train loss | eval loss | eval accuracy | wall s |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['optimizer']} | {r['final train loss']:.4f} | {r['eval loss']:.4f} | {r['eval accuracy']:.3f} | {r['wall s']:.1f} |")
    print("\nbundle written to outputs/digits-bundle")


if __name__ == "__main__":
    main()
