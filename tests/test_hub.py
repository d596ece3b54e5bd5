"""Bundles and rules on the Hub, through the real huggingface_hub client and a loopback Hub (tests/hub_server.py).

No network: the loopback server listens on 127.0.0.1 (random port) for this test session only.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, ModelCard, constants
from transformers import BertConfig, BertForSequenceClassification

from optbundle import Bundle, BundleError, LearnedRule, load_rule
from optbundle.store.card import REPO_PLACEHOLDER, card_for_repo, is_generated_card, seal_card
from optbundle.cli import main
from optbundle.files import MANIFEST_NAME, ChecksumError, MissingFileError, read_json_file
from optbundle.store.hub import HubError, cached_commit, pull_repo


# ---- fixtures --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The models here are tiny: a second intra-op thread only adds contention (10-100x slower on a busy 2-core box)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=2,
    )
    return BertForSequenceClassification(config)


def batches(count, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randint(0, 100, (4, 12), generator=gen), torch.randint(0, 2, (4,), generator=gen)) for _ in range(count)
    ]


def train(model, optimizer, data):
    losses = []
    for input_ids, labels in data:
        loss = model(input_ids=input_ids, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


def trained_bundle(seed=0, steps=2, provenance=None):
    """A tiny BERT after a few learned steps, bundled with its rule and the optimizer's accumulators."""
    model = tiny_model(seed)
    rule = load_rule("adam-init")
    if provenance:
        rule.provenance.update(provenance)
    bundle = Bundle(model, rule)
    optimizer, _ = bundle.optimizer(lr=5.0)
    train(model, optimizer, batches(steps, seed=seed + 10))
    return Bundle(model, rule, state=optimizer)


def tree_bytes(directory):
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(Path(directory).rglob("*")) if p.is_file()}


def parameters(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


# ---- push → pull ---------------------------------------------------------------------------------------------------


def test_push_pull_round_trip_is_byte_identical_and_trains_identically(hub, tmp_path):
    bundle = trained_bundle()
    local = bundle.save_pretrained(tmp_path / "local")

    commit = bundle.push_to_hub("alice/tiny-bert")

    # one repo, one commit (after the repo's initial commit) holding the whole bundle
    assert hub.head("alice/tiny-bert") == commit.oid
    assert len(hub.commit_ids("alice/tiny-bert")) == 2
    remote = hub.files("alice/tiny-bert")
    local_files = tree_bytes(local)
    assert set(remote) == set(local_files) | {".gitattributes"}
    for name, data in local_files.items():
        if name != "README.md":
            assert remote[name] == data, name
    assert remote["README.md"].decode() == card_for_repo(local_files["README.md"].decode(), "alice/tiny-bert")

    # saving is deterministic, so pushing the same bundle again changes nothing and makes no commit
    assert bundle.push_to_hub("alice/tiny-bert").oid == commit.oid
    assert len(hub.commit_ids("alice/tiny-bert")) == 2

    pulled = tmp_path / "pulled"
    snapshot = pull_repo("alice/tiny-bert", pulled)
    assert snapshot.commit == commit.oid
    assert tree_bytes(pulled) == {name: remote[name] for name in remote if name != ".gitattributes"}
    assert not any(p.is_symlink() for p in pulled.rglob("*"))

    loaded = Bundle.from_pretrained("alice/tiny-bert")
    assert type(loaded.model) is BertForSequenceClassification
    assert loaded.rule.content_hash() == bundle.rule.content_hash()
    assert loaded.state.keys() == bundle.state.keys()
    before = parameters(bundle.model)
    assert all(torch.equal(before[n], p) for n, p in parameters(loaded.model).items())

    # the loaded bundle (weights + rule + accumulators) continues training exactly like the original
    data = batches(3, seed=99)
    original_optimizer, _ = bundle.optimizer(lr=5.0)
    loaded_optimizer, _ = loaded.optimizer(lr=5.0)
    original_losses = train(bundle.model, original_optimizer, data)
    loaded_losses = train(loaded.model, loaded_optimizer, data)
    assert original_losses == loaded_losses
    after = parameters(bundle.model)
    for name, param in parameters(loaded.model).items():
        assert torch.equal(after[name], param), name
    assert any(not torch.equal(before[n], after[n]) for n in before), "training did not move the parameters"


def test_push_uploads_nothing_but_the_bundle(hub, tmp_path):
    bundle = trained_bundle()
    folder = bundle.save_pretrained(tmp_path / "b")
    (folder / "notes.txt").write_text("scratch")  # not in the manifest: not published
    from optbundle.store.hub import push_directory

    push_directory(folder, "alice/only-manifest")
    assert "notes.txt" not in hub.files("alice/only-manifest")


def test_push_refuses_a_damaged_local_bundle(hub, tmp_path):
    folder = trained_bundle().save_pretrained(tmp_path / "b")
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    from optbundle.store.hub import push_directory

    with pytest.raises(ChecksumError, match="model.safetensors"):
        push_directory(folder, "alice/damaged")
    assert "alice/damaged" not in hub.repos  # nothing was sent


# ---- revisions -------------------------------------------------------------------------------------------------------


def test_revision_pinning_gets_the_old_version_exactly(hub, tmp_path):
    v1 = trained_bundle(seed=0, steps=2)
    first = v1.push_to_hub("alice/pinned")
    v1_params = parameters(v1.model)

    v2 = trained_bundle(seed=1, steps=3)
    second = v2.push_to_hub("alice/pinned", save_state=False, commit_message="v2 without state")
    assert second.oid != first.oid
    assert "optimizer/state.safetensors" not in hub.files("alice/pinned")  # stale file of v1 removed
    assert "optimizer/state.safetensors" in hub.files("alice/pinned", first.oid)  # v1 still readable

    old = Bundle.from_pretrained("alice/pinned", revision=first.oid)
    for name, param in parameters(old.model).items():
        assert torch.equal(v1_params[name], param), name
    assert old.state is not None and old.state.keys() == v1.state.keys()
    for name, entry in v1.state.items():
        for key, value in entry.items():
            assert torch.equal(old.state[name][key], value), (name, key)

    new = Bundle.from_pretrained("alice/pinned")
    v2_params = parameters(v2.model)
    assert all(torch.equal(v2_params[n], p) for n, p in parameters(new.model).items())
    assert new.state is None

    pulled_v1 = tmp_path / "v1"
    pull_repo("alice/pinned", pulled_v1, revision=first.oid)
    assert read_json_file(pulled_v1 / MANIFEST_NAME) == json.loads(hub.files("alice/pinned", first.oid)[MANIFEST_NAME])


def test_files_are_fetched_at_the_one_resolved_commit(hub, monkeypatch):
    """A push landing between resolving the revision and fetching the files must not mix versions."""
    trained_bundle(seed=0).push_to_hub("alice/race")
    first = hub.head("alice/race")
    import huggingface_hub

    real_download = huggingface_hub.hf_hub_download
    pushed = []

    def download_then_push(*args, **kwargs):
        if not pushed:  # right after the revision was resolved, someone pushes v2
            pushed.append(trained_bundle(seed=1).push_to_hub("alice/race").oid)
        return real_download(*args, **kwargs)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download_then_push)
    loaded = Bundle.from_pretrained("alice/race")
    assert hub.head("alice/race") == pushed[0] != first
    v1_model = trained_bundle(seed=0).model
    assert all(torch.equal(p, q) for p, q in zip(v1_model.parameters(), loaded.model.parameters()))


def test_push_to_a_branch(hub):
    bundle = trained_bundle()
    bundle.push_to_hub("alice/branches", private=True)
    assert hub.repos["alice/branches"].private
    main_head = hub.head("alice/branches")
    commit = trained_bundle(seed=3).push_to_hub("alice/branches", revision="experiment")
    assert hub.head("alice/branches") == main_head
    assert hub.head("alice/branches", "experiment") == commit.oid
    loaded = Bundle.from_pretrained("alice/branches", revision="experiment")
    expected = trained_bundle(seed=3).model
    assert all(torch.equal(p, q) for p, q in zip(expected.parameters(), loaded.model.parameters()))


# ---- integrity -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["optimizer/rule.safetensors", "model.safetensors", "optimizer/rule_config.json"])
def test_a_file_altered_on_the_server_fails_the_checksum(hub, name):
    bundle = trained_bundle()
    bundle.push_to_hub("alice/tampered")
    data = bytearray(hub.files("alice/tampered")[name])
    if name.endswith(".json"):
        data += b" "  # still valid JSON, other size
    else:
        data[len(data) // 2] ^= 0x01  # same size, other content
    hub.tamper("alice/tampered", name, bytes(data))

    with pytest.raises(ChecksumError) as caught:
        Bundle.from_pretrained("alice/tampered")
    message = str(caught.value)
    assert name in message and "alice/tampered@" in message
    assert isinstance(caught.value, BundleError)
    if name.startswith("optimizer/rule"):
        with pytest.raises(ChecksumError, match=name.split("/")[-1]):
            load_rule("alice/tampered")


def test_missing_repo_revision_and_non_bundle_repo_are_clear_errors(hub):
    with pytest.raises(MissingFileError, match="alice/nothing-here"):
        Bundle.from_pretrained("alice/nothing-here")
    trained_bundle().push_to_hub("alice/exists")
    with pytest.raises(MissingFileError, match="no revision 'nope'"):
        Bundle.from_pretrained("alice/exists", revision="nope")
    HfApi().create_repo("alice/plain-model")
    HfApi().upload_file(repo_id="alice/plain-model", path_in_repo="config.json", path_or_fileobj=b"{}")
    with pytest.raises(MissingFileError, match="bundle.json"):
        Bundle.from_pretrained("alice/plain-model")


def test_a_manifest_path_escaping_the_repo_is_refused_before_download(hub):
    trained_bundle().push_to_hub("alice/evil")
    manifest = json.loads(hub.files("alice/evil")[MANIFEST_NAME])
    manifest["files"]["../../outside.json"] = {"size": 2, "sha256": "0" * 64}
    hub.tamper("alice/evil", MANIFEST_NAME, json.dumps(manifest).encode())
    from optbundle.files import UnsafePathError

    with pytest.raises(UnsafePathError, match="outside.json"):
        Bundle.from_pretrained("alice/evil")
    assert not any("outside.json" in path for _, path in hub.requests)


# ---- failed commits --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("failure", ["refuse", "interrupt"])
def test_a_failed_commit_leaves_the_remote_repo_unchanged(hub, failure):
    trained_bundle(seed=0).push_to_hub("alice/fragile")
    head, files, commits = hub.head("alice/fragile"), hub.files("alice/fragile"), hub.commit_ids("alice/fragile")

    hub.fail_next_commit = failure
    with pytest.raises(HubError, match="unchanged"):
        trained_bundle(seed=1, steps=3).push_to_hub("alice/fragile")

    assert hub.head("alice/fragile") == head
    assert hub.files("alice/fragile") == files
    assert hub.commit_ids("alice/fragile") == commits
    loaded = Bundle.from_pretrained("alice/fragile")
    v1 = trained_bundle(seed=0).model
    assert all(torch.equal(p, q) for p, q in zip(v1.parameters(), loaded.model.parameters()))


def test_a_push_racing_another_push_is_refused(hub, monkeypatch):
    """The commit names the head it was prepared against; if the branch moved meanwhile, nothing is mixed."""
    from huggingface_hub import CommitOperationAdd

    trained_bundle(seed=0).push_to_hub("alice/contended")
    v1_manifest = hub.files("alice/contended")[MANIFEST_NAME]
    real_create_commit = HfApi.create_commit
    other = []

    def someone_else_commits_first(self, repo_id, operations, **kwargs):
        if not other:
            add = CommitOperationAdd(path_in_repo="other.json", path_or_fileobj=b"{}")
            other.append(real_create_commit(self, repo_id, [add], commit_message="someone else").oid)
        return real_create_commit(self, repo_id, operations, **kwargs)

    monkeypatch.setattr(HfApi, "create_commit", someone_else_commits_first)
    with pytest.raises(HubError, match="moved"):
        trained_bundle(seed=1).push_to_hub("alice/contended")
    assert hub.head("alice/contended") == other[0]
    assert hub.files("alice/contended")[MANIFEST_NAME] == v1_manifest


# ---- rule-only repos -----------------------------------------------------------------------------------------------


def perturbed_rule():
    rule = load_rule("adam-init")
    with torch.no_grad():
        for param in rule.parameters():
            param.add_(0.01)
    rule.provenance = {"method": "test perturbation", "meta_trained": False, "parent_rule": "adam-init"}
    return rule


def test_rule_only_repo_round_trip(hub):
    rule = perturbed_rule()
    commit = rule.push_to_hub("alice/my-rule")
    files = hub.files("alice/my-rule")
    assert set(files) == {".gitattributes", "README.md", MANIFEST_NAME, "rule_config.json", "rule.safetensors", "provenance.json"}
    manifest = json.loads(files[MANIFEST_NAME])
    assert manifest["kind"] == "rule" and set(manifest["files"]) == {"rule_config.json", "rule.safetensors", "provenance.json"}

    for loaded in (LearnedRule.from_pretrained("alice/my-rule"), load_rule("alice/my-rule", revision=commit.oid)):
        assert loaded.config == rule.config
        assert loaded.provenance == rule.provenance
        assert loaded.content_hash() == rule.content_hash()

    with pytest.raises(BundleError, match="rule-only"):
        Bundle.from_pretrained("alice/my-rule")

    card = ModelCard(files["README.md"].decode())
    assert card.data.library_name == "optbundle" and "learned-optimizer" in card.data.tags
    assert 'load_rule("alice/my-rule")' in card.text


def test_load_rule_from_a_bundle_repo_fetches_only_the_rule(hub):
    bundle = trained_bundle()
    bundle.push_to_hub("alice/with-rule")
    hub.requests.clear()
    rule = load_rule("alice/with-rule")
    assert rule.content_hash() == bundle.rule.content_hash()
    fetched = [path for method, path in hub.requests if "/resolve/" in path]
    assert fetched and not any(path.endswith(("model.safetensors", "state.safetensors")) for path in fetched)


def test_load_rule_keeps_typos_of_shipped_names_local(hub):
    with pytest.raises(BundleError, match="shipped rule"):
        load_rule("adam-inti")
    assert hub.requests == []


# ---- offline -------------------------------------------------------------------------------------------------------


def test_offline_reload_from_the_cache(hub, monkeypatch):
    v1 = trained_bundle(seed=0)
    first = v1.push_to_hub("alice/offline")
    rule_commit = perturbed_rule().push_to_hub("alice/offline-rule")
    online = Bundle.from_pretrained("alice/offline")
    load_rule("alice/offline-rule")
    assert cached_commit("alice/offline") == first.oid

    trained_bundle(seed=1).push_to_hub("alice/offline")  # the Hub moves on; the cache still knows v1
    hub.requests.clear()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    offline = Bundle.from_pretrained("alice/offline")
    assert all(torch.equal(p, q) for p, q in zip(online.model.parameters(), offline.model.parameters()))
    assert load_rule("alice/offline-rule").content_hash() == perturbed_rule().content_hash()
    pinned = Bundle.from_pretrained("alice/offline", revision=first.oid)
    assert all(torch.equal(p, q) for p, q in zip(v1.model.parameters(), pinned.model.parameters()))
    assert hub.requests == [], "offline mode made requests"

    with pytest.raises(MissingFileError, match="cache"):
        Bundle.from_pretrained("alice/never-fetched")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    # local_files_only does the same without the environment switch
    hub.requests.clear()
    again = Bundle.from_pretrained("alice/offline", local_files_only=True)
    assert all(torch.equal(p, q) for p, q in zip(v1.model.parameters(), again.model.parameters()))
    assert LearnedRule.from_pretrained("alice/offline-rule", revision=rule_commit.oid, local_files_only=True)
    assert hub.requests == []


# ---- model cards ---------------------------------------------------------------------------------------------------


def test_pushed_card_has_the_hub_metadata_and_validates(hub):
    bundle = trained_bundle(
        provenance={
            "base_model": "google-bert/bert-base-uncased",
            "datasets": ["nyu-mll/glue"],
            "tasks": ["mlp-digits", "mlp-mnist"],
            "estimator": "antithetic PES",
            "meta_steps": 1200,
            "results": [
                {"optimizer": "learned", "final_loss": 0.31, "steps_to_target": 120},
                {"optimizer": "AdamW (best lr)", "final_loss": 0.35, "steps_to_target": 260},
            ],
            "plots": ["plots/loss.png"],
        }
    )
    bundle.push_to_hub("alice/carded")
    text = hub.files("alice/carded")["README.md"].decode()
    card = ModelCard(text)
    assert card.data.library_name == "optbundle"
    assert {"learned-optimizer", "optbundle"} <= set(card.data.tags)
    assert card.data.base_model == "google-bert/bert-base-uncased"
    assert card.data.datasets == ["nyu-mll/glue"]
    card.validate()  # the Hub's validate-yaml route (here: the loopback's subset of its checks)
    body = card.text
    assert "39 inputs" in body and "parameters" in body and "small_fc_lopt" in body
    assert "antithetic PES" in body and "1200" in body and "adam-imitation regression" in body
    assert "| optimizer | final_loss | steps_to_target |" in body and "| AdamW (best lr) | 0.35 | 260 |" in body
    assert "![loss](plots/loss.png)" in body
    assert "accumulators for" in body
    usage = body.split("```python\n", 1)[1].split("```", 1)[0].strip().splitlines()
    assert len(usage) == 5 and 'Bundle.from_pretrained("alice/carded")' in usage[2]
    assert REPO_PLACEHOLDER not in text
    assert is_generated_card(text)


def test_card_seal_detects_edits():
    card = seal_card("---\nlibrary_name: optbundle\n---\n\n# title\n")
    assert is_generated_card(card)
    assert is_generated_card(card.replace("\n", "\r\n") + "\n\n")  # line endings / trailing blank lines do not count
    assert not is_generated_card(card.replace("# title", "# my title"))
    assert not is_generated_card("# a card someone wrote\n")
    assert card_for_repo("# a card someone wrote\n", "a/b") == "# a card someone wrote\n"
    usage = seal_card(f'x = Bundle.from_pretrained("{REPO_PLACEHOLDER}")\n')
    moved = card_for_repo(card_for_repo(usage, "a/first"), "b/second")  # re-pushing a pulled bundle elsewhere
    assert 'Bundle.from_pretrained("b/second")' in moved and is_generated_card(moved)


def test_a_card_edited_on_the_hub_is_kept_unless_overwrite(hub):
    trained_bundle(seed=0).push_to_hub("alice/edited")
    v1_manifest = hub.files("alice/edited")[MANIFEST_NAME]
    edited = "---\nlibrary_name: optbundle\ntags:\n- learned-optimizer\n---\n\n# My notes about this bundle\n"
    HfApi().upload_file(repo_id="alice/edited", path_in_repo="README.md", path_or_fileobj=edited.encode())

    trained_bundle(seed=1).push_to_hub("alice/edited")
    files = hub.files("alice/edited")
    assert files["README.md"].decode() == edited
    assert files[MANIFEST_NAME] != v1_manifest  # the bundle itself was updated
    Bundle.from_pretrained("alice/edited")  # an edited card never breaks loading: it is not in the manifest

    trained_bundle(seed=2).push_to_hub("alice/edited", overwrite_card=True)
    assert is_generated_card(hub.files("alice/edited")["README.md"].decode())


def test_a_generated_card_is_refreshed_on_re_push(hub):
    trained_bundle(seed=0).push_to_hub("alice/refresh")
    first_card = hub.files("alice/refresh")["README.md"]
    trained_bundle(seed=0, provenance={"meta_steps": 77}).push_to_hub("alice/refresh")
    second_card = hub.files("alice/refresh")["README.md"].decode()
    assert second_card.encode() != first_card and "77" in second_card and is_generated_card(second_card)


# ---- CLI -------------------------------------------------------------------------------------------------------------


def test_cli_push_pull_inspect(hub, tmp_path, capsys):
    bundle = trained_bundle()
    folder = bundle.save_pretrained(tmp_path / "bundle")

    assert main(["inspect", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "format version 1" in out and "kind transformers" in out
    assert f"{bundle.rule.num_parameters()} parameters" in out
    assert "method: adam-imitation regression" in out
    n_params = sum(p.numel() for p in bundle.model.parameters())
    assert f"model parameters: {n_params:,}" in out
    assert "optimizer state: " in out and "step 2" in out

    assert main(["push", str(folder), "alice/cli"]) == 0
    assert "alice/cli@" + hub.head("alice/cli") in capsys.readouterr().out

    pulled = tmp_path / "pulled"
    assert main(["pull", "alice/cli", str(pulled)]) == 0
    assert "files verified" in capsys.readouterr().out
    local, remote = tree_bytes(folder), tree_bytes(pulled)
    assert {k: v for k, v in local.items() if k != "README.md"} == {k: v for k, v in remote.items() if k != "README.md"}

    hub.requests.clear()
    fresh_cache = tmp_path / "inspect-cache"
    assert main(["inspect", "--json", "--cache-dir", str(fresh_cache), "alice/cli"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["source"]["commit"] == hub.head("alice/cli")
    assert info["manifest"]["format_version"] == 1
    assert info["model_parameters"]["count"] == n_params
    assert info["rule"]["parameters"] == bundle.rule.num_parameters()
    assert info["optimizer_state"]["parameters"] == len(bundle.state)
    # inspecting a repo reads the weights' headers (range reads), it does not download the model
    assert ("GET", "/alice/cli/resolve/" + hub.head("alice/cli") + "/model.safetensors") in hub.requests
    assert not fresh_cache.joinpath("models--alice--cli", "snapshots", hub.head("alice/cli"), "model.safetensors").exists()

    assert main(["inspect", str(tmp_path / "missing")]) == 1
    assert "missing" in capsys.readouterr().err

    rule_folder = tmp_path / "rule"
    perturbed_rule().save_pretrained(rule_folder)
    assert main(["push", str(rule_folder), "alice/cli-rule"]) == 0
    assert json.loads(hub.files("alice/cli-rule")[MANIFEST_NAME])["kind"] == "rule"


def test_cli_runs_as_a_program_against_hf_endpoint(hub, tmp_path):
    """The console entry point, configured only by the environment variables a user would set."""
    trained_bundle().push_to_hub("alice/env")
    env = {
        **os.environ,
        "HF_ENDPOINT": hub.endpoint,
        "HF_HUB_CACHE": str(tmp_path / "proc-cache"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_TOKEN_PATH": str(tmp_path / "no-token"),
    }
    env.pop("HF_TOKEN", None)
    command = [sys.executable, "-m", "optbundle.cli"]
    pulled = tmp_path / "pulled"
    result = subprocess.run([*command, "pull", "alice/env", str(pulled)], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert (pulled / MANIFEST_NAME).is_file()

    offline = subprocess.run(
        [*command, "inspect", "alice/env"], env={**env, "HF_HUB_OFFLINE": "1"}, capture_output=True, text=True, timeout=120
    )
    assert offline.returncode == 0, offline.stderr
    assert "format version 1" in offline.stdout and "provenance:" in offline.stdout


# ---- the loopback Hub itself -------------------------------------------------------------------------------------------


def test_loopback_hub_serves_the_listing_and_snapshot_routes(hub, tmp_path):
    """The fixture answers the other read routes the client uses, so other tests can rely on them."""
    from huggingface_hub import snapshot_download

    commit = trained_bundle().push_to_hub("alice/listing")
    api = HfApi()
    files = set(hub.files("alice/listing"))
    assert set(api.list_repo_files("alice/listing")) == files
    tree = list(api.list_repo_tree("alice/listing", recursive=True))
    assert {entry.path for entry in tree} == files | {"optimizer"}
    info = api.get_paths_info("alice/listing", ["bundle.json", "optimizer"], revision=commit.oid)
    assert [type(e).__name__ for e in info] == ["RepoFile", "RepoFolder"]
    assert info[0].size == len(hub.files("alice/listing")["bundle.json"])
    assert api.file_exists("alice/listing", "optimizer/rule.safetensors")
    assert not api.file_exists("alice/listing", "pytorch_model.bin")
    assert [b.target_commit for b in api.list_repo_refs("alice/listing").branches] == [commit.oid]
    folder = Path(snapshot_download("alice/listing", revision=commit.oid, cache_dir=tmp_path / "snap"))
    assert {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()} == files
