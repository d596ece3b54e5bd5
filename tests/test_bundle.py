"""Bundle format v1: round trips, accumulator state by name, manifest verification, atomic writes."""

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification, BertConfig, BertForSequenceClassification

from optbundle import Bundle, BundleError, LearnedOptimizer, load_rule
from optbundle.files import (
    ChecksumError,
    CorruptFileError,
    FormatVersionError,
    MissingFileError,
    StateMismatchError,
    UnsafePathError,
    build_manifest,
    sha256_file,
)


def tiny_bert(seed=0, hidden=32):
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=50, hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=32, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(config)


def train_steps(model, optimizer, steps, seed):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = torch.randint(0, 50, (4, 12), generator=gen)
        labels = (ids[:, 0] > 25).long()
        loss = model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.fixture()
def trained(tmp_path):
    model = tiny_bert()
    bundle = Bundle(model, load_rule("default"))
    optimizer, _ = bundle.optimizer()
    train_steps(model, optimizer, 3, seed=1)
    bundle.set_state(optimizer)
    path = bundle.save_pretrained(tmp_path / "bundle")
    return bundle, optimizer, path


def test_layout_and_round_trip(trained):
    bundle, _, path = trained
    names = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
    assert names == sorted([
        "README.md", "bundle.json", "config.json", "model.safetensors", "optimizer/provenance.json",
        "optimizer/roles.json",  # the default rule is format 2: it routes by parameter role
        "optimizer/rule.safetensors", "optimizer/rule_config.json", "optimizer/state.json",
        "optimizer/state.safetensors",
    ])
    manifest = json.loads((path / "bundle.json").read_text())
    assert manifest["format_version"] == 1 and manifest["kind"] == "transformers"
    for name, entry in manifest["files"].items():
        assert entry["sha256"] == sha256_file(path / name)
        assert entry["size"] == (path / name).stat().st_size
    loaded = Bundle.from_pretrained(path)
    assert loaded.rule.content_hash() == bundle.rule.content_hash()
    for (n1, p1), (n2, p2) in zip(bundle.model.named_parameters(), loaded.model.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)
    # still a valid transformers model folder
    plain = AutoModelForSequenceClassification.from_pretrained(path)
    assert torch.equal(plain.classifier.weight, bundle.model.classifier.weight)
    assert "library_name: optbundle" in (path / "README.md").read_text()


def test_no_pickle_anywhere(trained):
    _, _, path = trained
    for file in path.rglob("*"):
        if file.is_file():
            assert file.suffix in (".json", ".safetensors", ".md"), file
            assert not file.read_bytes().startswith(b"\x80"), f"{file} looks like a pickle"


def test_state_travels_with_the_model_and_training_continues_identically(trained):
    bundle, optimizer, path = trained
    train_steps(bundle.model, optimizer, 3, seed=2)  # uninterrupted continuation
    loaded = Bundle.from_pretrained(path)
    opt2, sched = loaded.optimizer()
    assert isinstance(sched, torch.optim.lr_scheduler.LRScheduler)
    first = next(iter(opt2.state.values()))
    assert int(first["step"]) == 3
    train_steps(loaded.model, opt2, 3, seed=2)
    for p1, p2 in zip(bundle.model.parameters(), loaded.model.parameters()):
        assert torch.equal(p1, p2)


def test_state_can_be_left_out_or_stored_in_bf16(trained, tmp_path):
    bundle, _, path = trained
    lean = bundle.save_pretrained(tmp_path / "lean", save_state=False)
    assert not (lean / "optimizer" / "state.safetensors").exists()
    assert Bundle.from_pretrained(lean).state is None
    half = bundle.save_pretrained(tmp_path / "half", state_dtype=torch.bfloat16)
    full_size = (path / "optimizer" / "state.safetensors").stat().st_size
    assert (half / "optimizer" / "state.safetensors").stat().st_size < 0.6 * full_size
    state = Bundle.from_pretrained(half).state
    name = "classifier.weight"
    assert state[name]["momentum"].dtype == torch.float32
    torch.testing.assert_close(state[name]["momentum"], bundle.state[name]["momentum"], rtol=1e-2, atol=1e-6)


def test_state_shape_mismatch_names_the_parameter(trained, tmp_path):
    bundle, _, _ = trained
    wider = Bundle(tiny_bert(hidden=48), bundle.rule, state=bundle.state)
    with pytest.raises(StateMismatchError, match="embeddings.word_embeddings.weight"):
        wider.optimizer()


def test_parameters_without_saved_state_start_fresh(trained):
    bundle, _, _ = trained
    partial = {k: v for k, v in bundle.state.items() if not k.startswith("classifier")}
    fresh = Bundle(tiny_bert(), bundle.rule, state=partial)
    optimizer, _ = fresh.optimizer()
    assert fresh.model.classifier.weight not in optimizer.state
    assert int(optimizer.state[fresh.model.bert.pooler.dense.weight]["step"]) == 3


def rewrite_manifest(path, mutate):
    manifest = json.loads((path / "bundle.json").read_text())
    mutate(manifest)
    (path / "bundle.json").write_text(json.dumps(manifest))


def test_tampered_file_raises_checksum_error(trained):
    _, _, path = trained
    target = path / "optimizer" / "rule.safetensors"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match="rule.safetensors"):
        Bundle.from_pretrained(path)


def test_missing_file_raises(trained):
    _, _, path = trained
    (path / "model.safetensors").unlink()
    with pytest.raises(MissingFileError, match="model.safetensors"):
        Bundle.from_pretrained(path)


def test_truncated_safetensors_raises_corrupt_file_error(trained):
    _, _, path = trained
    target = path / "optimizer" / "state.safetensors"
    target.write_bytes(target.read_bytes()[:100])
    manifest = build_manifest(path, kind="transformers")  # a consistent manifest around a broken file
    (path / "bundle.json").write_text(json.dumps(manifest))
    with pytest.raises(CorruptFileError, match="state.safetensors"):
        Bundle.from_pretrained(path)


def test_newer_bundle_format_is_refused(trained):
    _, _, path = trained
    rewrite_manifest(path, lambda m: m.update(format_version=7))
    with pytest.raises(FormatVersionError, match="upgrade optbundle"):
        Bundle.from_pretrained(path)


@pytest.mark.parametrize("bad", ["../outside.json", "/etc/passwd.json", "optimizer/../../x.json", "weights.pt"])
def test_manifest_paths_may_not_escape_or_name_pickles(trained, bad):
    _, _, path = trained
    rewrite_manifest(path, lambda m: m["files"].update({bad: {"size": 1, "sha256": "0" * 64}}))
    with pytest.raises(UnsafePathError):
        Bundle.from_pretrained(path)


def test_unlisted_pickle_file_is_refused(trained):
    _, _, path = trained
    (path / "optimizer" / "extra.pt").write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(UnsafePathError, match="extra.pt"):
        Bundle.from_pretrained(path)


def test_errors_are_bundle_errors():
    for cls in (ChecksumError, CorruptFileError, FormatVersionError, MissingFileError, UnsafePathError, StateMismatchError):
        assert issubclass(cls, BundleError)


def test_failed_save_leaves_the_old_bundle_intact(trained, monkeypatch):
    bundle, _, path = trained
    before = {p.relative_to(path): p.read_bytes() for p in path.rglob("*") if p.is_file()}

    def explode(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr("optbundle.store.bundle.write_named_state", explode)
    with pytest.raises(OSError, match="disk full"):
        bundle.save_pretrained(path)
    after = {p.relative_to(path): p.read_bytes() for p in path.rglob("*") if p.is_file()}
    assert after == before
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no staging leftovers
    Bundle.from_pretrained(path)


def test_plain_torch_module_bundle(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    Bundle(model, load_rule("default")).save_pretrained(tmp_path / "b")
    with pytest.raises(ValueError, match="model="):
        Bundle.from_pretrained(tmp_path / "b")
    target = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    loaded = Bundle.from_pretrained(tmp_path / "b", model=target)
    assert torch.equal(loaded.model[0].weight, model[0].weight)
    with pytest.raises(StateMismatchError, match="does not fit"):
        Bundle.from_pretrained(tmp_path / "b", model=torch.nn.Linear(4, 2))


def test_optimizer_factory_builds_over_trainable_parameters(trained):
    bundle, _, _ = trained
    for p in bundle.model.bert.parameters():
        p.requires_grad_(False)
    factory, kwargs = bundle.optimizer_factory(lr=0.5)
    optimizer = factory()(bundle.model, **kwargs)
    assert isinstance(optimizer, LearnedOptimizer)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    assert len(params) == 2 and optimizer.param_groups[0]["lr"] == 0.5
