"""`optbundle finetune RECIPE.yaml`: a real pretrained model (MiniLM) on real data (SMS spam), offline."""

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from optbundle import Bundle, load_rule
from optbundle.cli import main
from optbundle.apps.finetune import load_recipe


def test_minilm_recipe_runs_offline_and_writes_table_plot_and_bundle(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out = tmp_path / "run"
    status = main([
        "finetune", "recipes/minilm-sms-spam.yaml",
        "--set", "max_steps=4", "--set", "train_size=64", "--set", "eval_size=32", "--set", "logging_steps=1",
        "--set", "rule_lrs=[0.0001]", "--set", "adamw_lrs=[0.00005,0.0002]",
        "--set", f"results_dir={out}", "--set", f"bundle_output={out / 'bundle'}",
        "--set", f"output_dir={out / 'trainer'}",
    ])
    assert status == 0
    printed = capsys.readouterr().out
    default_lr = load_rule("default").config.recommended_lr["finetune"]  # MiniLM is pretrained
    assert f"| learned, the rule's default lr | {default_lr:g} |" in printed
    assert "| AdamW (HF default) | 5e-05 |" in printed
    rows = json.loads((out / "results.json").read_text())
    assert {(r["optimizer"], r["lr"]) for r in rows} == {
        ("learned-default", default_lr), ("learned", 0.0001), ("adamw", 5e-05), ("adamw", 0.0002)
    }
    for r in rows:
        assert r["steps"] == 4 and 0 < r["eval_loss"] < 5 and 0 <= r["eval_accuracy"] <= 1
    assert (out / "loss_curves.png").stat().st_size > 1000
    # the learned run's bundle: a valid model folder with the optimizer state of 4 steps
    bundle = Bundle.from_pretrained(out / "bundle")
    opt, _ = bundle.optimizer()
    assert int(opt.state[bundle.model.classifier.weight]["step"]) == 4
    assert bundle.tokenizer is not None
    plain = AutoModelForSequenceClassification.from_pretrained(out / "bundle")
    assert torch.equal(plain.classifier.weight, bundle.model.classifier.weight)


def test_recipe_with_unknown_key_names_it(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: minilm\ndataset: sms-spam\nlearning_rat: 0.1\n")
    with pytest.raises(ValueError, match="learning_rat"):
        load_recipe(bad)


def test_recipe_rejects_a_dataset_that_does_not_fit_the_task(tmp_path):
    from optbundle.apps.finetune import build_datasets, load_tokenizer

    recipe = load_recipe("recipes/minilm-sms-spam.yaml", {"dataset": "shakespeare"})
    with pytest.raises(ValueError, match="shakespeare"):
        build_datasets(recipe.data, recipe.model, load_tokenizer(recipe.model))


@pytest.mark.parametrize("quiet", [False, True])
def test_runs_are_labelled_counted_by_a_bar_and_the_load_report_prints_once(tmp_path, capsys, monkeypatch, quiet):
    import logging

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    reports = []

    class Collect(logging.Handler):
        def emit(self, record):
            if "LOAD REPORT" in record.getMessage():
                reports.append(record.getMessage())

    loader = logging.getLogger("transformers.modeling_utils")
    handler = Collect(level=logging.WARNING)
    loader.addHandler(handler)
    out = tmp_path / "run"
    try:
        status = main([
            "finetune", "recipes/minilm-sms-spam.yaml",
            "--set", "max_steps=1", "--set", "train_size=16", "--set", "eval_size=8", "--set", "adamw_lrs=[0.00005]",
            "--set", "rule_lrs=[]", "--set", "seeds=[0,1]", "--set", f"disable_tqdm={str(quiet).lower()}",
            "--set", f"results_dir={out}", "--set", "bundle_output=null", "--set", f"output_dir={out / 'trainer'}",
        ])
    finally:
        loader.removeHandler(handler)
    assert status == 0
    captured = capsys.readouterr()
    for index, (what, seed) in enumerate([("learned rule 'default'", 0), ("AdamW", 0), ("learned rule 'default'", 1),
                                          ("AdamW", 1)], start=1):
        assert f"run {index}/4: {what}," in captured.out and f"seed {seed}" in captured.out
    # four models built with a new classifier head: the "classifier.* MISSING" report once, not four times
    assert len(reports) == 1 and "MISSING" in reports[0]
    assert ("minilm-sms-spam: runs" in captured.err) != quiet
    if not quiet:
        assert "4/4" in captured.err
    # other warnings of the loader still pass after the run
    seen = []
    handler.emit = lambda record: seen.append(record.getMessage())
    loader.addHandler(handler)
    try:
        loader.warning("another warning")
        loader.warning("another warning")
    finally:
        loader.removeHandler(handler)
    assert seen == ["another warning", "another warning"]
