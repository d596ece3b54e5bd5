"""Untrusted bundles and hostile inputs (issue 14): one test per finding, each failing before the fix.

Bundles here are the fuzzer's tiny GPT-2 (benchmarks/fuzz_bundles.py) with the default rule and state.
"""

import json
import math
import multiprocessing
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import private_tqdm_lock

from optbundle import Bundle, BundleError, LearnedOptimizer, LearnedRule, RuleConfig, load_rule
from optbundle.cli import main
from optbundle.files import (
    MANIFEST_NAME,
    ChecksumError,
    CorruptFileError,
    ModelLoadError,
    RuleConfigError,
    StateMismatchError,
    UnsafePathError,
    build_manifest,
    commit_directory,
    staging_directory,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from fuzz_bundles import make_base_bundle, rewrite_manifest  # noqa: E402

LOADERS = [Bundle.from_pretrained, LearnedRule.from_pretrained, load_rule]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_base_bundle(tmp_path_factory.mktemp("base") / "bundle")


@pytest.fixture()
def bundle_dir(base, tmp_path):
    target = tmp_path / "bundle"
    shutil.copytree(base, target)
    return target


def edit_json(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def assert_all_loaders_raise(directory, error=BundleError, match=None):
    for loader in LOADERS:
        with pytest.raises(error, match=match):
            loader(directory)


# ---- finding 1: rules from bundles are verified ----------------------------------------------------------------


def test_rule_loaders_verify_the_manifest(bundle_dir):
    weights = bundle_dir / "optimizer" / "rule.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 1
    weights.write_bytes(bytes(data))
    assert_all_loaders_raise(bundle_dir, ChecksumError, "rule.safetensors")


def test_bundle_folder_without_manifest_is_refused_for_its_rule(bundle_dir):
    (bundle_dir / MANIFEST_NAME).unlink()
    with pytest.raises(BundleError, match="manifest"):
        LearnedRule.from_pretrained(bundle_dir)


# ---- finding 2: closed lists -----------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["drop entry", "empty files", "duplicate files key"])
def test_files_the_manifest_does_not_list_are_refused(bundle_dir, how):
    path = bundle_dir / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    if how == "drop entry":
        del manifest["files"]["optimizer/rule_config.json"]
        path.write_text(json.dumps(manifest))
    elif how == "empty files":
        manifest["files"] = {}
        path.write_text(json.dumps(manifest))
    else:
        path.write_text(json.dumps(manifest)[:-1] + ', "files": {}}')
    assert_all_loaders_raise(bundle_dir, (UnsafePathError, CorruptFileError))


def test_unlisted_routing_json_is_refused(bundle_dir):
    (bundle_dir / "optimizer" / "routing.json").write_text(
        json.dumps({"format_version": 1, "rules": ["default"], "routes": [{"pattern": "*", "rule": "default"}]})
    )
    assert_all_loaders_raise(bundle_dir, UnsafePathError, "not listed")


def test_symlinks_are_refused(bundle_dir, tmp_path):
    outside = tmp_path / "outside.json"
    shutil.copyfile(bundle_dir / "config.json", outside)
    (bundle_dir / "config.json").unlink()
    os.symlink(outside, bundle_dir / "config.json")
    assert_all_loaders_raise(bundle_dir, UnsafePathError, "symbolic link")


@pytest.mark.parametrize("version", [0, -1, True, 1.0, "1"])
def test_manifest_format_version_must_be_a_positive_integer(bundle_dir, version):
    edit_json(bundle_dir / MANIFEST_NAME, lambda m: m.update(format_version=version))
    assert_all_loaders_raise(bundle_dir, CorruptFileError, "format_version")


# ---- finding 3: strict weights ---------------------------------------------------------------------------------


def _rewrite_header(path, change):
    raw = path.read_bytes()
    length = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + length])
    change(header)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + length :])


def test_renamed_tensor_is_a_named_error(bundle_dir):
    _rewrite_header(bundle_dir / "model.safetensors", lambda h: h.__setitem__("transformer.ln_g.weight", h.pop("transformer.ln_f.weight")))
    rewrite_manifest(bundle_dir)
    with pytest.raises(ModelLoadError, match="missing: \\['transformer.ln_f.weight'\\]"):
        Bundle.from_pretrained(bundle_dir)


@pytest.mark.parametrize("dtype", ["I32", "U32"])
def test_relabelled_dtype_is_refused(bundle_dir, dtype):
    _rewrite_header(bundle_dir / "model.safetensors", lambda h: h["transformer.ln_f.weight"].__setitem__("dtype", dtype))
    rewrite_manifest(bundle_dir)
    with pytest.raises(ModelLoadError, match=f"stored as {dtype}"):
        Bundle.from_pretrained(bundle_dir)


def test_deleted_config_key_that_changes_the_architecture_is_an_error(bundle_dir):
    edit_json(bundle_dir / "config.json", lambda c: c.pop("n_layer"))
    rewrite_manifest(bundle_dir)
    with pytest.raises(ModelLoadError, match="missing"):
        Bundle.from_pretrained(bundle_dir)


# ---- finding 4: sizes bounded before allocation ----------------------------------------------------------------


@pytest.mark.parametrize("hidden", [[10**8], [8] * 100_000])
def test_huge_rule_widths_fail_fast_with_a_short_message(bundle_dir, hidden):
    edit_json(bundle_dir / "optimizer" / "rule_config.json", lambda c: c.update(hidden_sizes=hidden))
    rewrite_manifest(bundle_dir)
    start = time.perf_counter()
    with pytest.raises(RuleConfigError, match="hidden_sizes") as info:
        LearnedRule.from_pretrained(bundle_dir)
    assert time.perf_counter() - start < 2.0 and len(str(info.value)) < 1000


def test_huge_layer_count_in_config_fails_fast(bundle_dir):
    (bundle_dir / "config.json").write_text((bundle_dir / "config.json").read_text().replace('"n_layer": 1', f'"n_layer": {2**64}'))
    rewrite_manifest(bundle_dir)
    start = time.perf_counter()
    with pytest.raises(CorruptFileError, match="config.json"):
        Bundle.from_pretrained(bundle_dir)
    edit_json(bundle_dir / "config.json", lambda c: c.update(n_layer=10**6))
    rewrite_manifest(bundle_dir)
    with pytest.raises(ModelLoadError, match="n_layer"):
        Bundle.from_pretrained(bundle_dir)
    assert time.perf_counter() - start < 5.0


def test_huge_routing_tables_are_refused(bundle_dir):
    routes = [{"pattern": f"p{i}*", "rule": "default"} for i in range(100_000)]
    (bundle_dir / "optimizer" / "routing.json").write_text(json.dumps({"format_version": 1, "rules": ["default"], "routes": routes}))
    rewrite_manifest(bundle_dir)
    with pytest.raises(CorruptFileError, match="routes"):
        Bundle.from_pretrained(bundle_dir)


# ---- finding 5: one error family -------------------------------------------------------------------------------


@pytest.mark.parametrize("length", [2**63, 2**64 - 1, 0])
def test_safetensors_header_length_is_a_bundle_error(bundle_dir, length):
    path = bundle_dir / "optimizer" / "rule.safetensors"
    path.write_bytes(length.to_bytes(8, "little") + path.read_bytes()[8:])
    rewrite_manifest(bundle_dir)
    assert_all_loaders_raise(bundle_dir, CorruptFileError, "rule.safetensors")


@pytest.mark.parametrize("text", ["[" * 100_000 + "]" * 100_000, "1" + "0" * 5000, '{"a": 1, "a": 2}'])
def test_hostile_json_is_a_bundle_error(bundle_dir, text):
    (bundle_dir / "optimizer" / "rule_config.json").write_text(text)
    rewrite_manifest(bundle_dir)
    assert_all_loaders_raise(bundle_dir, CorruptFileError, "rule_config.json")


def test_errors_are_chained(bundle_dir):
    edit_json(bundle_dir / "config.json", lambda c: c.update(n_head=3))  # 16 is not divisible by 3: GPT-2 raises
    rewrite_manifest(bundle_dir)
    with pytest.raises(BundleError) as info:
        Bundle.from_pretrained(bundle_dir)
    assert "config.json" in str(info.value) and info.value.__cause__ is not None


def test_peft_kind_without_base_model_is_a_bundle_error(bundle_dir):
    edit_json(bundle_dir / MANIFEST_NAME, lambda m: m.update(kind="peft"))
    with pytest.raises(BundleError):
        Bundle.from_pretrained(bundle_dir)


# ---- finding 6: RuleConfig validation --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("adam_eps", float("nan")), ("second_moment_eps", float("inf")), ("normalization_eps", 2**64),
        ("adam_eps", 2**64), ("time_scales", [float("nan")]), ("time_scales", [-1.0]), ("time_scales", [float("inf")]),
        ("adam_momentum_index", True), ("orthogonal_momentum_index", True), ("factored_eps", float("nan")),
        ("step_mult", float("nan")), ("hidden_sizes", [True]), ("momentum_decays", [True]), ("ns_steps", True),
        ("recommended_lr", {"scratch": float("nan"), "finetune": 1.0}), ("time_scales", [1.0] * 1000),
        ("base_fan_in", 2**64), ("features", [["grad"]]),
    ],
)
def test_rule_config_fields_are_validated_at_config_time(field, value):
    with pytest.raises(RuleConfigError, match=field):
        RuleConfig(**{field: value})


# ---- finding 7: saves ------------------------------------------------------------------------------------------


def test_leftover_staging_and_backup_folders_are_cleaned(base, tmp_path):
    target = tmp_path / "b"
    shutil.copytree(base, target)
    staging = staging_directory(target)  # as a save killed before its commit leaves it
    (staging / "x.json").write_text("{}")
    backup = tmp_path / ".b.old-0123456789ab"
    backup.mkdir()
    Bundle.from_pretrained(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def _save_then_die_between_renames(base, target):
    import optbundle.files as fmt

    private_tqdm_lock()
    calls = []
    real_replace = os.replace

    def replace(src, dst):
        calls.append((src, dst))
        real_replace(src, dst)
        if len(calls) == 1 and ".old-" in str(dst):
            os._exit(9)  # a kill between the two renames of commit_directory

    fmt.os.replace = replace
    staging = staging_directory(target)
    shutil.copytree(base, staging, dirs_exist_ok=True)
    commit_directory(staging, target)
    os._exit(0)


@pytest.mark.parametrize("loader", LOADERS)
def test_kill_between_the_two_renames_is_recovered_on_load(base, tmp_path, loader):
    target = tmp_path / "b"
    shutil.copytree(base, target)
    process = multiprocessing.get_context("fork").Process(target=_save_then_die_between_renames, args=(base, target))
    process.start()
    process.join(timeout=120)
    assert process.exitcode == 9 and not target.exists()
    loader(target)  # recovered from the backup
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]
    assert Bundle.from_pretrained(target).state is not None


def _save_forever(base, target):
    private_tqdm_lock()
    bundle = Bundle.from_pretrained(base)
    while True:
        bundle.save_pretrained(target)


def test_kill_during_saves_always_leaves_a_loadable_bundle(base, tmp_path):
    target = tmp_path / "b"
    shutil.copytree(base, target)
    context = multiprocessing.get_context("fork")
    for trial in range(6):
        process = context.Process(target=_save_forever, args=(base, target))
        process.start()
        time.sleep(0.3 + 0.15 * trial)
        os.kill(process.pid, signal.SIGKILL)
        process.join(timeout=60)
        Bundle.from_pretrained(target)
        assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


# ---- finding 8: training never writes what it cannot reload ----------------------------------------------------


def test_huge_finite_gradients_keep_state_finite_and_the_bundle_loadable(base, tmp_path):
    bundle = Bundle.from_pretrained(base)
    optimizer, _ = bundle.optimizer()
    params = [p for _, p in bundle.model.named_parameters()]
    for scale in (1e19, 1e25, 1e30):
        for p in params:
            p.grad = torch.full_like(p, scale)
        optimizer.step()
    for p in params:
        state = optimizer.state[p]
        assert all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point())
        assert int(state["skipped_steps"]) >= 2
    bundle.set_state(optimizer)
    Bundle.from_pretrained(bundle.save_pretrained(tmp_path / "after"))


@pytest.mark.parametrize("param", [torch.zeros(0, 3), torch.zeros(3, dtype=torch.complex64), torch.zeros(3, dtype=torch.int64)])
def test_unsupported_parameters_are_refused_at_construction(param):
    with pytest.raises(ValueError, match="complex|no elements|floating"):
        LearnedOptimizer([torch.nn.Parameter(param, requires_grad=param.is_floating_point() or param.is_complex())], load_rule("default"))


def test_float64_parameters_do_not_change_at_lr_zero():
    param = torch.nn.Parameter(torch.tensor([1.0 + 1e-12, math.pi], dtype=torch.float64))
    before = param.detach().clone()
    optimizer = LearnedOptimizer([param], load_rule("default"), lr=0.0)
    param.grad = torch.ones_like(param)
    optimizer.step()
    assert torch.equal(param.detach(), before)


def _named_optimizer(model, rule=None):
    return LearnedOptimizer(list(model.named_parameters()), rule or load_rule("default"))


def _trained(model, optimizer):
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    optimizer.step()
    return optimizer


def test_load_state_dict_checks_names_shapes_and_rule_before_changing_anything():
    torch.manual_seed(0)
    a = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    b = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Linear(5, 2))  # same names and count, other shapes
    c = torch.nn.Sequential(torch.nn.Linear(4, 3))
    c.add_module("other", torch.nn.Linear(3, 2))  # same shapes, other names
    saved = _trained(a, _named_optimizer(a)).state_dict()
    for model in (b, c):
        optimizer = _trained(model, _named_optimizer(model))
        before = {id(p): {k: v.clone() for k, v in optimizer.state[p].items()} for p in model.parameters()}
        with pytest.raises(StateMismatchError):
            optimizer.load_state_dict(saved)
        for p in model.parameters():
            assert all(torch.equal(optimizer.state[p][k], v) for k, v in before[id(p)].items())
    other_rule = LearnedRule(RuleConfig(hidden_sizes=[4], momentum_decays=[0.9, 0.99], factored_decays=[0.9, 0.99]))
    with pytest.raises(StateMismatchError, match="config"):
        _named_optimizer(a, other_rule).load_state_dict(saved)


def test_step_is_all_or_nothing_and_checks_lr():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    optimizer = _trained(model, _named_optimizer(model))
    before = [p.detach().clone() for p in model.parameters()]
    last = list(model.parameters())[-1]
    optimizer.state[last]["second_moment"] = torch.zeros(7)  # damaged state of the last tensor
    with pytest.raises(StateMismatchError):
        optimizer.step()
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    optimizer.state[last]["second_moment"] = torch.zeros_like(last)
    for lr in (float("nan"), -1.0, float("inf")):
        optimizer.param_groups[0]["lr"] = lr
        with pytest.raises(ValueError, match="lr"):
            optimizer.step()
        assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


# ---- finding 10: CLI -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "recipe, argv_extra, expected",
    [
        (None, [], "no recipe"),
        ("model: [\n", [], "not a valid YAML"),
        ('x: !!python/object/apply:os.system ["echo hi"]\n', [], "not a valid YAML"),
        ("task: causal-lm\ndataset: shakespeare\n", [], "missing required key\\(s\\) model"),
        ("model: minilm\ndataset: sms-spam\nbogus: 1\n", [], "bogus"),
        ("model: minilm\ndataset: sms-spam\n", ["--set", "x"], "KEY=VALUE"),
    ],
)
def test_cli_user_mistakes_give_one_line_and_exit_2(tmp_path, capsys, recipe, argv_extra, expected):
    path = tmp_path / "recipe.yaml"
    if recipe is not None:
        path.write_text(recipe)
    assert main(["finetune", str(path), *argv_extra]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    import re

    assert re.search(expected, err)


def test_cli_invalid_repo_id_exits_2_and_debug_shows_the_traceback(tmp_path, capsys):
    assert main(["pull", "bad//id", str(tmp_path / "out")]) == 2
    assert "repo_id" in capsys.readouterr().err
    with pytest.raises(ValueError):
        main(["--debug", "pull", "bad//id", str(tmp_path / "out")])


def test_adapter_weights_load_strictly(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=32))
    base.save_pretrained(tmp_path / "base")
    base = GPT2LMHeadModel.from_pretrained(tmp_path / "base")
    peft_model = get_peft_model(base, LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    path = Bundle(peft_model, load_rule("default")).save_pretrained(tmp_path / "adapter")
    Bundle.from_pretrained(path)
    weights = path / "adapter_model.safetensors"
    name = next(k for k in json.loads(weights.read_bytes()[8 : 8 + int.from_bytes(weights.read_bytes()[:8], "little")]) if "lora_B" in k)
    _rewrite_header(weights, lambda h: h.__setitem__(name.replace("lora_B", "lora_X"), h.pop(name)))
    rewrite_manifest(path)
    with pytest.raises(ModelLoadError, match="lora_B"):
        Bundle.from_pretrained(path)
