"""Bundles out of Trainer's own saves and pushes (`BundleCallback`), save/push arguments as in transformers, cards.

Real Trainer, real PEFT, the loopback Hub of tests/hub_server.py; tiny BERT on scikit-learn digits (helpers).
"""

import pytest
import torch
from huggingface_hub import CommitInfo, ModelCard
from transformers import Trainer

from helpers import digits_bert, digits_dataset, params_of, trainer_args, one_thread  # noqa: F401 (autouse fixture)
from optbundle import Bundle, BundleCallback, load_rule
from optbundle.files import MANIFEST_NAME, ChecksumError, read_json_file

LICENSE = "apache-2.0"
BASE = "prajjwal1/bert-tiny"


def make_trainer(out, steps, bundle, callback=True, **args):
    args = trainer_args(out, steps, learning_rate=3e-3, **args)
    callbacks = [BundleCallback(bundle, license=LICENSE, base_model=BASE)] if callback else []
    return Trainer(model=bundle.model, args=args, train_dataset=digits_dataset(256), eval_dataset=digits_dataset(64, 512),
                   optimizers=bundle.optimizer(args=args), callbacks=callbacks)


def step_of(bundle):
    return int(bundle.optimizer()[0].state[bundle.model.classifier.weight]["step"])


@pytest.mark.slow
def test_checkpoints_and_the_final_save_are_bundles_and_resume_stays_exact(tmp_path):
    bundle = Bundle(digits_bert(), load_rule("default"))
    trainer = make_trainer(tmp_path / "run", 6, bundle, save_strategy="steps", save_steps=3)
    trainer.train()
    checkpoint = tmp_path / "run" / "checkpoint-3"
    assert (checkpoint / MANIFEST_NAME).is_file() and (checkpoint / "optimizer.pt").is_file()
    loaded = Bundle.from_pretrained(checkpoint)  # verified against its manifest; Trainer's pickles are not read
    assert step_of(loaded) == 3
    trainer.save_model()  # the final save
    final = Bundle.from_pretrained(tmp_path / "run")
    assert step_of(final) == 6
    for name, value in params_of(bundle.model).items():
        assert torch.equal(value, dict(final.model.named_parameters())[name]), name
    # Trainer's own resume from the bundle checkpoint is exact
    resumed_bundle = Bundle(digits_bert(), load_rule("default"))
    resumed = make_trainer(tmp_path / "resumed", 6, resumed_bundle, save_strategy="steps", save_steps=3)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    for name, value in params_of(bundle.model).items():
        assert torch.equal(value, dict(resumed_bundle.model.named_parameters())[name]), name


@pytest.mark.slow
def test_set_state_unwraps_accelerates_optimizer(tmp_path):
    bundle = Bundle(digits_bert(), load_rule("default"))
    trainer = make_trainer(tmp_path, 2, bundle, callback=False)
    trainer.train()
    assert type(trainer.optimizer).__name__ == "AcceleratedOptimizer"
    bundle.set_state(trainer.optimizer)
    assert int(bundle.state["classifier.weight"]["step"]) == 2


@pytest.mark.slow
def test_trainer_push_to_hub_pushes_a_verified_bundle_with_a_card(hub, tmp_path):
    bundle = Bundle(digits_bert(), load_rule("default"))
    trainer = make_trainer(tmp_path / "out", 4, bundle, hub_model_id="me/digits", eval_strategy="no")
    trainer.train()
    metrics = trainer.evaluate()
    info = trainer.push_to_hub()
    assert isinstance(info, CommitInfo)
    loaded = Bundle.from_pretrained("me/digits")
    assert step_of(loaded) == 4
    card = ModelCard(hub.files("me/digits")["README.md"].decode())
    card.validate()  # the loopback Hub's /api/validate-yaml
    data = card.data.to_dict()
    assert data["library_name"] == "optbundle" and data["license"] == LICENSE and data["base_model"] == BASE
    results = data["model-index"][0]["results"]
    values = {m["type"]: m["value"] for r in results for m in r["metrics"]}
    assert values["loss"] == pytest.approx(metrics["eval_loss"])
    assert "default-v7" in card.text and loaded.rule.content_hash()[:16] in card.text
    assert "ADAMW" not in card.content

    # a plain model pushed on top breaks the manifest: the error says how to recover
    bundle.model.classifier.bias.data += 1.0
    bundle.model.push_to_hub("me/digits")
    with pytest.raises(ChecksumError, match="push_to_hub.*To recover"):
        Bundle.from_pretrained("me/digits")
    # ... and pushing again through the Trainer with the callback makes it a valid bundle again
    trainer.push_to_hub()
    assert torch.equal(Bundle.from_pretrained("me/digits").model.classifier.bias, bundle.model.classifier.bias)


@pytest.mark.slow
def test_save_and_push_take_transformers_arguments(hub, tmp_path):
    bundle = Bundle(digits_bert(), load_rule("default"))
    trainer = make_trainer(tmp_path / "run", 2, bundle, callback=False)
    trainer.train()
    bundle.set_state(trainer.optimizer)
    # is_main_process=False writes nothing (every rank may call it)
    assert not bundle.save_pretrained(tmp_path / "other-rank", is_main_process=False).exists()
    # max_shard_size shards the model and the accumulators, with index files, all verified
    folder = bundle.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    manifest = read_json_file(folder / MANIFEST_NAME)["files"]
    state_shards = [n for n in manifest if n.startswith("optimizer/state-")]
    assert len(state_shards) > 2 and "optimizer/state.safetensors.index.json" in manifest
    assert "model.safetensors.index.json" in manifest
    assert all((folder / n).stat().st_size <= 40_000 or n.endswith(".json") for n in state_shards)
    loaded = Bundle.from_pretrained(folder)
    for name, entry in bundle.state.items():
        for key, value in entry.items():
            assert torch.equal(loaded.state[name][key], value.to(loaded.state[name][key].dtype)), (name, key)
    shard = folder / state_shards[1]
    shard.write_bytes(shard.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(ChecksumError):
        Bundle.from_pretrained(folder)

    # push_to_hub: private, commit_message, token, tags, revision, create_pr; returns CommitInfo (a str URL)
    first = bundle.push_to_hub("me/args", private=True, commit_message="first", token="hf_loopback", tags=["digits"])
    assert isinstance(first, CommitInfo) and isinstance(first, str) and first.oid in first
    assert "digits" in ModelCard(hub.files("me/args")["README.md"].decode()).data.tags
    assert hub.repos["me/args"].private and hub.repos["me/args"].commits[first.oid].message == "first"
    bundle.model.classifier.bias.data += 1.0
    pr = bundle.push_to_hub("me/args", create_pr=True)
    assert pr.pr_revision == "refs/pr/1" and hub.head("me/args") == first.oid  # main untouched
    from_pr = Bundle.from_pretrained("me/args", revision=pr.pr_revision)
    assert torch.equal(from_pr.model.classifier.bias, bundle.model.classifier.bias)
    hub_branch = bundle.push_to_hub("me/args", revision="dev", max_shard_size="40KB")
    assert hub.head("me/args", "dev") == hub_branch.oid
    assert any(n.startswith("optimizer/state-") for n in hub.files("me/args", "dev"))
    assert step_of(Bundle.from_pretrained("me/args", revision="dev")) == 2


def test_a_lora_run_saves_an_adapter_bundle_with_a_peft_style_card(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import BertForSequenceClassification

    base_dir = tmp_path / "base"
    digits_bert().save_pretrained(base_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"],
                        lora_dropout=0.0, task_type="SEQ_CLS")
    model = get_peft_model(BertForSequenceClassification.from_pretrained(base_dir), config)
    bundle = Bundle(model, load_rule("default"))
    trainer = make_trainer(tmp_path / "out", 3, bundle)
    trainer.train()
    trainer.save_model()
    out = tmp_path / "out"
    manifest = read_json_file(out / MANIFEST_NAME)
    assert manifest["kind"] == "peft" and "adapter_model.safetensors" in manifest["files"]
    loaded = Bundle.from_pretrained(out, base_model=str(base_dir))
    lora_name = next(n for n in loaded.state if "lora_A" in n)
    assert int(loaded.state[lora_name]["step"]) == 3
    PeftModel.from_pretrained(BertForSequenceClassification.from_pretrained(base_dir), out)  # PEFT alone loads it
    data = ModelCard.load(out / "README.md").data.to_dict()
    assert data["library_name"] == "peft" and data["base_model"] == BASE and data["license"] == LICENSE
    assert {"lora", "optbundle", "learned-optimizer", f"base_model:adapter:{BASE}"} <= set(data["tags"])


def test_skipped_steps_and_update_rms_reach_trainers_logs(tmp_path, caplog):
    from transformers import TrainerCallback

    class NanGradientAtStep3(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            if state.global_step == 2:  # the third optimizer step
                model.classifier.weight.grad[0, 0] = float("nan")

    bundle = Bundle(digits_bert(), load_rule("default"))
    args = trainer_args(tmp_path, 6, logging_steps=2, learning_rate=3e-3)
    trainer = Trainer(model=bundle.model, args=args, train_dataset=digits_dataset(256),
                      optimizers=bundle.optimizer(args=args), callbacks=[NanGradientAtStep3(), BundleCallback(bundle)])
    with caplog.at_level("WARNING", logger="optbundle"):
        trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["step"] for h in logs] == [2, 4, 6]
    assert [h["optbundle/skipped"] for h in logs] == [0, 1, 0]
    assert all(h["optbundle/update_rms"] > 0 for h in logs)
    assert logs[0]["learning_rate"] == pytest.approx(3e-3 * 5 / 6)  # Trainer's linear decay of the real lr
    assert any("skipped 1 tensor-step" in r.getMessage() for r in caplog.records)


def test_cli_push_takes_hf_uploads_order_and_create_pr(hub, tmp_path, capsys):
    from optbundle.cli import main

    folder = Bundle(digits_bert(), load_rule("default")).save_pretrained(tmp_path / "bundle")
    assert main(["push", "me/cli", str(folder)]) == 0  # `hf upload REPO_ID PATH` order
    head = hub.head("me/cli")
    changed = Bundle(digits_bert(seed=1), load_rule("default")).save_pretrained(tmp_path / "changed")
    assert main(["push", str(changed), "me/cli", "--create-pr", "--commit-message", "proposal"]) == 0
    printed = capsys.readouterr().out
    assert "pull request:" in printed and "refs/pr/1" in printed
    assert hub.head("me/cli") == head and hub.head("me/cli", "refs/pr/1") != head
