"""Data as Hugging Face users hold it: `Dataset`, `DatasetDict` (named splits), `IterableDataset`, causal-LM
``labels``, and recipes that name their data by `load_dataset` arguments (a local JSON-lines file)."""

import json

import torch
from datasets import Dataset, DatasetDict
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast, LlamaConfig, LlamaForCausalLM

from helpers import digits_dataset, one_thread  # noqa: F401 (autouse fixture)
from optbundle import Bundle, load_rule
from optbundle.store.assets import minilm_path
from optbundle.cli import main
from optbundle.meta.refine import token_data

SMALL = dict(meta_steps=1, truncation=2, episode_length=[2, 4], pairs=1, batch_size=4, meta_batch_size=8,
             compare_steps=0, checkpoint_every=1, progress=False)


def lm_rows(n, offset=0):
    """Digits as token sequences with causal-LM labels (one per token), as a collator for LM makes them."""
    rows = digits_dataset(n, offset)
    return Dataset.from_dict({"input_ids": rows["input_ids"], "labels": rows["input_ids"]})


def tiny_llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=18, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=72)
    return LlamaForCausalLM(config)


def test_token_data_takes_causal_lm_labels_and_iterable_datasets():
    data = token_data(lm_rows(8), 0, 128)
    assert data.causal_lm and data.labels.shape == data.input_ids.shape
    assert torch.equal(data.labels, data.input_ids)
    streamed = token_data(lm_rows(8).to_iterable_dataset(), 0, 128, limit=5)
    assert len(streamed) == 5 and torch.equal(streamed.input_ids, data.input_ids[:5])
    classes = token_data(digits_dataset(8).to_iterable_dataset(), 0, 128)
    assert classes.labels.dim() == 1 and len(classes) == 8


def test_refine_takes_a_dataset_dict_with_named_splits_and_causal_lm_labels(tmp_path):
    bundle = Bundle(tiny_llama(), load_rule("adam-init"))
    splits = DatasetDict({"train": lm_rows(24), "validation": lm_rows(8, offset=300)})
    refined = bundle.refine(splits, out_dir=str(tmp_path / "refine"), **SMALL)
    data = refined.rule.provenance["data"]
    assert data["task"] == "causal-lm"
    assert data["train_examples"] == 24 and data["held_out_examples"] == 8  # the "validation" split, not a cut
    assert data["held_out_split"] == "eval_dataset"


def tiny_classifier_dir(path):
    """A tiny BERT classifier with MiniLM's tokenizer (both offline), saved as a 'pretrained' model folder."""
    tokenizer = BertTokenizerFast.from_pretrained(minilm_path())
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=64, num_labels=2)
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_a_recipe_fine_tunes_on_a_json_lines_file_named_in_the_yaml(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    model_dir = tiny_classifier_dir(tmp_path / "tiny-bert")
    positive = ["what a lovely day", "great food and friendly people", "i really enjoyed it", "wonderful news"]
    negative = ["this is terrible", "awful service again", "i hated every minute", "the worst film ever"]
    lines = [{"text": t, "label": "positive" if i % 2 == 0 else "negative"}
             for i, t in enumerate(x for pair in zip(positive * 6, negative * 6) for x in pair)]
    (tmp_path / "reviews.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    recipe = tmp_path / "reviews.yaml"
    recipe.write_text(f"""
model: {model_dir}
task: sequence-classification
num_labels: 2
dataset: json
data_files: reviews.jsonl      # beside the recipe
text_column: text
label_column: label
max_length: 16
train_size: 32
eval_size: 16
max_steps: 3
per_device_train_batch_size: 8
logging_steps: 1
use_cpu: true
disable_tqdm: true
output_dir: {tmp_path / 'trainer'}
rule: default
adamw_lrs: [0.001]
seeds: [0]
results_dir: {tmp_path / 'out'}
bundle_output: {tmp_path / 'out' / 'bundle'}
""")
    assert main(["finetune", str(recipe)]) == 0
    printed = capsys.readouterr().out
    assert "run 1/2: learned rule 'default', lr (the rule default), seed 0" in printed  # each run is labelled
    assert "run 2/2: AdamW, lr 0.001, seed 0" in printed
    rows = json.loads((tmp_path / "out" / "results.json").read_text())
    assert {r["optimizer"] for r in rows} == {"learned-default", "adamw"}
    for row in rows:
        assert row["steps"] == 3 and 0 < row["eval_loss"] < 5 and 0 <= row["eval_accuracy"] <= 1
    bundle = Bundle.from_pretrained(tmp_path / "out" / "bundle")
    assert int(bundle.optimizer()[0].state[bundle.model.classifier.weight]["step"]) == 3
