"""Fuzz the bundle loaders with malformed bundles and classify what happens (issue 14).

    python benchmarks/fuzz_bundles.py --cases 10000 --seed 0          # the reliability table in README.md
    python benchmarks/fuzz_bundles.py --cases 300 --in-process         # quick look, no isolation

A tiny GPT-2 bundle (1 layer, width 16) with the default rule and one step of optimizer state is saved once;
each case copies it, applies one mutation and loads the copy with ``Bundle.from_pretrained`` and with
``LearnedRule.from_pretrained`` (= ``load_rule(path)``). Mutations, chosen by ``(seed, case)``:

- ``bitflip`` / ``truncate``: flip 1–8 bits in, or cut, any file (bundle.json included);
- ``json``: delete a key, set one to a hostile value (NaN, inf, ±huge ints, bools, strings, deep nesting,
  100k-element lists), duplicate a key, nest the document 10^5 deep, in any JSON file;
- ``safetensors``: change the header length, a dtype (F32 → I32/U32/F16/BF16), a shape, the offsets, a tensor
  name, the metadata, or drop/add an entry, in any safetensors file;
- ``manifest``: path tricks (``..``, absolute, Windows drive, pickle suffix), dropped entries, ``"files": {}``,
  a duplicate ``"files"`` key, symlinks to files or folders out of the bundle, unlisted extra files;
- ``rule``: hostile RuleConfig fields (widths 10^8, 10^5 layers, NaN/huge eps, NaN/negative time scales,
  bool indices) and 100k-route routing tables;
- ``state``: inf/NaN accumulators, counters of the wrong dtype.

Half of the content mutations (all ``rule`` ones) rewrite ``bundle.json`` to match the damaged files, as an
attacker would; the others leave it untouched. Outcomes per loader: ``BundleError`` (wanted), ``other
exception``, ``hang > 10 s``, ``> 2 GB`` (peak RSS of the worker, or an allocation failure), ``loaded corrupted
content`` (the load succeeded although a file changed and bundle.json is untouched: must never happen), and
``loaded`` (bundle.json rewritten consistently and the content is valid: fine). Each case runs in a forked
worker with a 10 s limit and a 4 GB address-space cap; ``--in-process`` skips the isolation (the test uses it).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import resource
import shutil
import struct
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

HANG_SECONDS = 10.0
MEMORY_LIMIT_BYTES = 2 * 1024**3
LOADERS = ("Bundle.from_pretrained", "LearnedRule.from_pretrained")
OUTCOMES = ("BundleError", "other exception", "hang > 10 s", "> 2 GB memory", "loaded corrupted content", "loaded")
KINDS = ("bitflip", "truncate", "json", "safetensors", "manifest", "rule", "state")


# ---- the bundle under test ---------------------------------------------------------------------------------------


def make_base_bundle(directory: Path) -> Path:
    """Save the tiny GPT-2 bundle (default rule, one step of state) that every case starts from."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from optbundle import Bundle, load_rule

    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=64, n_positions=32, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    bundle = Bundle(model, load_rule("default"))
    optimizer, _ = bundle.optimizer()
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    bundle.set_state(optimizer)
    return bundle.save_pretrained(directory)


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file (and symlink target) of a folder, to tell whether a mutation changed anything."""
    out = {}
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory).as_posix()
        if path.is_symlink():
            out[rel] = b"->" + os.readlink(path).encode()
        elif path.is_file():
            out[rel] = path.read_bytes()
        elif path.is_dir():
            out[rel + "/"] = b""
    return out


def rewrite_manifest(directory: Path) -> None:
    """Make bundle.json match the (damaged) files, as an attacker who edits a bundle would."""
    from optbundle.files import MANIFEST_NAME, build_manifest

    try:
        old = json.loads((directory / MANIFEST_NAME).read_text())
    except Exception:  # noqa: BLE001
        old = {"kind": "transformers"}
    extra = {k: v for k, v in old.items() if k not in ("files", "format", "format_version", "optbundle_version", "kind")}
    try:
        manifest = build_manifest(directory, kind=old.get("kind", "transformers"), extra=extra)
    except Exception:  # noqa: BLE001 - e.g. a symlink loop; leave the manifest as it is
        return
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))


# ---- mutations ---------------------------------------------------------------------------------------------------

HOSTILE_VALUES: list[Any] = [
    None, True, False, 0, -1, 1, 2**31, 2**63, 2**64, -(2**64), 10**30, 1e308, float("nan"), float("inf"), -float("inf"),
    "", "x", "../../etc/passwd", [], {}, [8] * 100_000, "A" * 1_000_000, [[[[[]]]]], {"a": {"b": {"c": 1}}}, 1e-300, -0.0,
]


def _files(directory: Path, suffix: str | None = None) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name != "README.md" and (suffix is None or p.suffix == suffix))


def _dump(value: Any) -> str:
    return json.dumps(value, allow_nan=True)


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def mutate_json(rng: random.Random, path: Path) -> str:
    text = path.read_text()
    data = json.loads(text)
    choice = rng.randrange(8)
    if choice == 0:
        path.write_text(_nested(rng.choice([100, 1000, 100_000])))
        return "deep nesting"
    if choice == 1:
        path.write_text(rng.choice([str(2**64), "1" + "0" * 5000, "-1" + "0" * 400, "1e999"]))
        return "huge integer document"
    if not isinstance(data, dict) or not data:
        path.write_text(_dump(rng.choice(HOSTILE_VALUES)))
        return "replaced document"
    keys = list(data)
    key = rng.choice(keys)
    # one level down for tables (bundle.json files, state.json params, roles)
    if isinstance(data[key], dict) and data[key] and rng.random() < 0.5:
        inner = rng.choice(list(data[key]))
        target, name, where = data[key], inner, f"{key}.{inner}"
    else:
        target, name, where = data, key, key
    if choice == 2:
        del target[name]
        path.write_text(_dump(data))
        return f"deleted {where[:60]}"
    if choice == 3:  # a duplicate key: the second one wins in json.loads
        body = _dump(data)
        dup = _dump({name: rng.choice(HOSTILE_VALUES)})[1:-1]
        path.write_text(body[:-1] + ("," if len(body) > 2 else "") + dup + "}" if target is data else body)
        return f"duplicate key {where[:60]}"
    if choice == 4 and isinstance(target[name], list) and target[name]:
        target[name] = target[name] * rng.choice([2, 1000, 100_000])
        path.write_text(_dump(data))
        return f"repeated list {where[:60]}"
    if choice == 5:
        target[rng.choice(["extra", "__proto__", "files", "format_version", "kind"])] = rng.choice(HOSTILE_VALUES)
        path.write_text(_dump(data))
        return "added key"
    value = rng.choice(HOSTILE_VALUES)
    target[name] = value
    path.write_text(_dump(data))
    return f"set {where[:60]} = {repr(value)[:30]}"


def mutate_safetensors(rng: random.Random, path: Path) -> str:
    raw = path.read_bytes()
    length = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + length])
    body = raw[8 + length :]
    names = [k for k in header if k != "__metadata__"]
    choice = rng.randrange(9)
    if choice == 0:
        new_length = rng.choice([0, 1, length - 1, length + 1, len(raw), 2**32, 2**63, 2**64 - 1])
        path.write_bytes(struct.pack("<Q", new_length) + raw[8:])
        return f"header length {new_length}"
    name = rng.choice(names) if names else "__metadata__"
    entry = header.get(name)
    if choice == 1 and isinstance(entry, dict):
        entry["dtype"] = rng.choice(["I32", "U32", "F16", "BF16", "F64", "I64", "BOOL", "U8", "X9", 5])
        what = f"dtype of {name} → {entry['dtype']}"
    elif choice == 2 and isinstance(entry, dict):
        shape = list(entry["shape"])
        entry["shape"] = rng.choice([shape[::-1], [*shape, 1], shape[:-1], [-1], [2**40, 2**40], [0], [1.5]])
        what = f"shape of {name}"
    elif choice == 3 and isinstance(entry, dict):
        begin, end = entry["data_offsets"]
        entry["data_offsets"] = rng.choice([[begin, end + 4], [begin + 4, end], [end, begin], [0, len(body) * 4], [-4, end]])
        what = f"offsets of {name}"
    elif choice == 4 and isinstance(entry, dict):
        header[name + rng.choice(["x", ".weight", "_"])] = header.pop(name)
        what = f"renamed {name}"
    elif choice == 5 and isinstance(entry, dict):
        del header[name]
        what = f"dropped {name}"
    elif choice == 6:
        header["extra.tensor"] = {"dtype": "F32", "shape": [0], "data_offsets": [len(body), len(body)]}
        what = "added an empty tensor"
    elif choice == 7:
        header["__metadata__"] = rng.choice([{"format": 5}, [], "x", {"a" * 10: "b" * 100_000}])
        what = "metadata"
    else:
        extra = b"\x00" * rng.choice([4, 400, 4096])
        path.write_bytes(raw + extra if rng.random() < 0.5 else raw[: len(raw) - 4])
        return "data section resized"
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + body)
    return what


def mutate_manifest(rng: random.Random, directory: Path) -> tuple[str, bool]:
    """Returns (description, manifest_touched)."""
    manifest_path = directory / "bundle.json"
    manifest = json.loads(manifest_path.read_text())
    files = manifest["files"]
    names = sorted(files)
    choice = rng.randrange(11)
    if choice == 0:
        trick = rng.choice(["../outside.json", "/etc/passwd.json", "a/../../b.json", "C:evil.json", "model.pt",
                            "optimizer/../../x.json", "\\..\\x.json", "", "./config.json", "optimizer//rule.json"])
        files[trick] = {"size": 2, "sha256": "0" * 64}
        manifest_path.write_text(json.dumps(manifest))
        return f"manifest path {trick!r}", True
    if choice == 1:
        del files[rng.choice(names)]
        manifest_path.write_text(json.dumps(manifest))
        return "dropped a manifest entry", True
    if choice == 2:
        manifest["files"] = {}
        manifest_path.write_text(json.dumps(manifest))
        return '"files": {}', True
    if choice == 3:
        text = json.dumps(manifest)
        manifest_path.write_text(text[:-1] + ', "files": {}}')
        return 'duplicate "files" key', True
    if choice == 4:  # a listed file replaced by a symlink to an identical copy outside the bundle
        name = rng.choice(names)
        outside = directory.parent / f"outside-{rng.randrange(10**9)}"
        shutil.copyfile(directory / name, outside)
        (directory / name).unlink()
        os.symlink(outside, directory / name)
        return f"symlink {name} → outside", False
    if choice == 5:
        target = rng.choice(["/etc/hostname", "/dev/zero", "/proc/self/environ", str(directory.parent)])
        os.symlink(target, directory / rng.choice(["optimizer/routing.json", "extra.json", "tokenizer_config.json"]))
        return f"unlisted symlink → {target}", False
    if choice == 6:
        extra = rng.choice(["optimizer/routing.json", "optimizer/roles.json", "tokenizer_config.json",
                            "model-00002.safetensors", "optimizer/rules/x/rule_config.json", "adapter_config.json"])
        if (directory / extra).exists():
            (directory / extra).unlink()  # listed in the manifest but removed: the load must notice
            return f"deleted listed {extra}", False
        (directory / extra).parent.mkdir(parents=True, exist_ok=True)
        (directory / extra).write_text(json.dumps({"format_version": 1, "rules": ["default"], "routes": []}))
        return f"unlisted {extra}", False
    if choice == 7:
        (directory / rng.choice(["weights.bin", "optimizer/state.pt", "x.pkl"])).write_bytes(b"\x80\x04K\x01.")
        return "a pickle file", False
    if choice == 8:
        manifest["format_version"] = rng.choice([0, -1, True, False, 1.0, "1", None, 2, 2**64])
        manifest_path.write_text(json.dumps(manifest))
        return f"format_version {manifest['format_version']!r}", True
    if choice == 9:
        manifest["kind"] = rng.choice(["peft", "torch", "rule", "unknown", 5, None, ["transformers"]])
        manifest_path.write_text(json.dumps(manifest))
        return f"kind {manifest['kind']!r}", True
    name = rng.choice(names)
    files[name] = rng.choice([{"size": -1, "sha256": files[name]["sha256"]}, {"size": True, "sha256": "x"}, [], "x",
                              {"size": files[name]["size"]}])
    manifest_path.write_text(json.dumps(manifest))
    return f"bad entry for {name}", True


HOSTILE_RULE_FIELDS: list[tuple[str, Any]] = [
    ("hidden_sizes", [10**8]), ("hidden_sizes", [8] * 100_000), ("hidden_sizes", [0]), ("hidden_sizes", [True]),
    ("hidden_sizes", [2**64]), ("hidden_sizes", "8"), ("adam_eps", float("nan")), ("adam_eps", 2**64),
    ("second_moment_eps", float("inf")), ("normalization_eps", -1.0), ("factored_eps", float("nan")),
    ("time_scales", [float("nan")]), ("time_scales", [-1.0]), ("time_scales", [1.0] * 100_000),
    ("adam_momentum_index", True), ("adam_momentum_index", 5), ("momentum_decays", [1.0]),
    ("momentum_decays", [float("nan")]), ("momentum_decays", [0.9] * 100_000), ("features", ["grad"] * 100_000),
    ("features", [["grad"]]), ("activation", ["relu"]), ("output", {"a": 1}), ("step_mult", float("nan")),
    ("step_mult", 1e300), ("exp_mult", -1.0), ("magnitude_bound", float("inf")), ("param_scale", 1),
    ("recommended_lr", {"scratch": float("nan"), "finetune": 1.0}), ("role_lr", {}), ("ns_steps", True),
    ("ns_steps", 10**9), ("ns_coefficients", [float("nan")] * 3), ("matrix_rms", 0), ("base_fan_in", 2**64),
    ("format_version", True), ("format_version", 0), ("format_version", 3), ("orthogonal_roles", ["matrix"] * 1000),
    ("width_scaling", None), ("schedule", 5), ("second_moment_decay", True), ("factored_dims", ["last_two"]),
]


def mutate_rule(rng: random.Random, directory: Path) -> str:
    if rng.random() < 0.15:  # a routing table with very many routes
        count = rng.choice([2000, 100_000])
        routing = {"format_version": 1, "rules": ["default"], "routes": [{"pattern": f"p{i}*", "rule": "default"} for i in range(count)]}
        (directory / "optimizer" / "routing.json").write_text(json.dumps(routing))
        return f"{count} routes"
    path = directory / "optimizer" / "rule_config.json"
    config = json.loads(path.read_text())
    name, value = rng.choice(HOSTILE_RULE_FIELDS)
    config[name] = value
    path.write_text(_dump(config))
    return f"rule {name} = {repr(value)[:30]}"


def mutate_state(rng: random.Random, directory: Path) -> str:
    import torch
    from safetensors.torch import load_file, save_file

    path = directory / "optimizer" / "state.safetensors"
    tensors = load_file(str(path))
    key = rng.choice(sorted(tensors))
    choice = rng.randrange(4)
    if choice == 0 and tensors[key].is_floating_point() and tensors[key].numel():
        tensors[key].view(-1)[0] = rng.choice([float("inf"), float("nan")])
        what = f"non-finite {key}"
    elif choice == 1:
        tensors[key] = tensors[key].to(rng.choice([torch.float64, torch.int32, torch.float16, torch.uint8]))
        what = f"dtype of {key}"
    elif choice == 2:
        tensors[key] = torch.zeros(3, 3)
        what = f"shape of {key}"
    else:
        del tensors[key]
        what = f"dropped {key}"
    save_file(tensors, str(path), metadata={"format": "pt"})
    return what


def mutate(rng: random.Random, directory: Path) -> tuple[str, str]:
    """Apply one random mutation to ``directory``; returns (kind, description)."""
    kind = rng.choice(KINDS)
    if kind in ("bitflip", "truncate"):
        path = rng.choice(_files(directory))
        data = bytearray(path.read_bytes())
        if kind == "bitflip" and data:
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        else:
            data = data[: rng.randrange(len(data))] if data else data
        path.write_bytes(bytes(data))
        description = f"{kind} {path.relative_to(directory)}"
        rewrite = path.name != "bundle.json" and rng.random() < 0.5
    elif kind == "json":
        path = rng.choice(_files(directory, ".json"))
        description = f"json {path.relative_to(directory)}: {mutate_json(rng, path)}"
        rewrite = path.name != "bundle.json" and rng.random() < 0.5
    elif kind == "safetensors":
        path = rng.choice(_files(directory, ".safetensors"))
        description = f"safetensors {path.relative_to(directory)}: {mutate_safetensors(rng, path)}"
        rewrite = rng.random() < 0.5
    elif kind == "manifest":
        description, _ = mutate_manifest(rng, directory)
        rewrite = False
    elif kind == "rule":
        description, rewrite = mutate_rule(rng, directory), True
    else:
        description, rewrite = mutate_state(rng, directory), rng.random() < 0.5
    if rewrite:
        rewrite_manifest(directory)
        description += " (manifest rewritten)"
    return kind, description


# ---- running one case --------------------------------------------------------------------------------------------


def _loaders() -> dict[str, Callable[[Path], Any]]:
    from optbundle import Bundle, LearnedRule

    return {"Bundle.from_pretrained": Bundle.from_pretrained, "LearnedRule.from_pretrained": LearnedRule.from_pretrained}


def run_case(base: Path, work: Path, seed: int, index: int, loader_name: str) -> dict[str, Any]:
    """Mutate a copy of ``base`` for case ``(seed, index)`` and load it with one loader; returns the outcome."""
    from optbundle import BundleError

    rng = random.Random(seed * 1_000_003 + index)
    case_dir = work / f"case-{index}"
    shutil.rmtree(case_dir, ignore_errors=True)
    case_dir.mkdir(parents=True)
    directory = case_dir / "bundle"
    shutil.copytree(base, directory, symlinks=True)
    original = snapshot(directory)
    kind, description = mutate(rng, directory)
    mutated = snapshot(directory)
    manifest_untouched = mutated.get("bundle.json") == original["bundle.json"]
    changed = mutated != original
    result = {"index": index, "kind": kind, "mutation": description, "loader": loader_name}
    start = time.perf_counter()
    try:
        _loaders()[loader_name](directory)
    except BundleError as err:
        result["outcome"] = "BundleError"
        result["error"] = f"{type(err).__name__}: {str(err)[:200]}"
        result["message_chars"] = len(str(err))
    except (MemoryError,) as err:
        result["outcome"] = "> 2 GB memory"
        result["error"] = f"{type(err).__name__}: {str(err)[:200]}"
    except Exception as err:  # noqa: BLE001 - the point is to count these
        text = str(err)
        result["outcome"] = "> 2 GB memory" if "alloc" in text.lower() and "memory" in text.lower() else "other exception"
        result["error"] = f"{type(err).__name__}: {text[:200]}"
    else:
        result["outcome"] = "loaded corrupted content" if changed and manifest_untouched else "loaded"
    result["seconds"] = round(time.perf_counter() - start, 3)
    if result["seconds"] > HANG_SECONDS:  # slower than the limit, though it ended before the worker was killed
        result["outcome"] = "hang > 10 s"
    shutil.rmtree(case_dir, ignore_errors=True)
    return result


def _worker(connection: Any, base: str, work: str, seed: int) -> None:
    import logging

    if str(Path(__file__).resolve().parents[1] / "tests") not in sys.path:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from helpers import private_tqdm_lock

    private_tqdm_lock()  # a worker killed while holding tqdm's shared lock would deadlock every later worker
    logging.disable(logging.CRITICAL)
    with contextlib.suppress(Exception):
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    # cap the address space a little above what is mapped now, so a huge allocation fails instead of swapping
    with open("/proc/self/status") as status:
        vm = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (vm + 4 * 1024**3, resource.RLIM_INFINITY))
    while True:
        job = connection.recv()
        if job is None:
            return
        index, loader_name = job
        result = run_case(Path(base), Path(work), seed, index, loader_name)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        if peak > MEMORY_LIMIT_BYTES:
            result["outcome"], result["peak_rss"] = "> 2 GB memory", peak
        connection.send(result)
        if peak > MEMORY_LIMIT_BYTES:
            return  # a fresh worker for the next case


class Worker:
    def __init__(self, base: Path, work: Path, seed: int) -> None:
        import multiprocessing

        context = multiprocessing.get_context("fork")
        self.connection, child = context.Pipe()
        self.process = context.Process(target=_worker, args=(child, str(base), str(work), seed), daemon=True)
        self.process.start()

    def run(self, index: int, loader_name: str) -> dict[str, Any]:
        self.connection.send((index, loader_name))
        if self.connection.poll(HANG_SECONDS + 5.0):  # + the copy and mutation of the case
            return self.connection.recv()
        self.process.kill()
        self.process.join()
        return {"index": index, "loader": loader_name, "outcome": "hang > 10 s", "mutation": "?", "kind": "?"}

    def alive(self) -> bool:
        return self.process.is_alive()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.connection.send(None)
        self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.kill()


def fuzz(cases: int, seed: int, *, in_process: bool = False, work: Path | None = None,
         progress: Callable[[int], None] | None = None) -> list[dict[str, Any]]:
    """Run ``cases`` mutated bundles through every loader; returns one result per (case, loader)."""
    owned = work is None
    work = Path(tempfile.mkdtemp(prefix="optbundle-fuzz-")) if work is None else Path(work)
    results = []
    try:
        base = make_base_bundle(work / "base")
        worker = None
        for index in range(cases):
            for loader_name in LOADERS:
                if in_process:
                    results.append(run_case(base, work, seed, index, loader_name))
                    continue
                if worker is None or not worker.alive():
                    worker = Worker(base, work, seed)
                results.append(worker.run(index, loader_name))
            if progress is not None:
                progress(index)
        if worker is not None:
            worker.close()
    finally:
        if owned:
            shutil.rmtree(work, ignore_errors=True)
    return results


def table(results: list[dict[str, Any]]) -> str:
    counts = {name: Counter(r["outcome"] for r in results if r["loader"] == name) for name in LOADERS}
    lines = ["| loader | " + " | ".join(OUTCOMES) + " |", "|---" * (len(OUTCOMES) + 1) + "|"]
    for name in LOADERS:
        lines.append(f"| `{name}` | " + " | ".join(f"{counts[name][o]:,}" for o in OUTCOMES) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--in-process", action="store_true", help="no worker process (no hang/memory isolation)")
    parser.add_argument("--jsonl", type=Path, help="write every result as one JSON line here")
    args = parser.parse_args()
    started = time.time()

    def progress(index: int) -> None:
        if (index + 1) % 500 == 0:
            print(f"  {index + 1} cases, {time.time() - started:.0f} s", file=sys.stderr, flush=True)

    results = fuzz(args.cases, args.seed, in_process=args.in_process, progress=progress)
    if args.jsonl:
        args.jsonl.write_text("".join(json.dumps(r) + "\n" for r in results))
    print(f"{args.cases:,} malformed bundles (seed {args.seed}), {time.time() - started:.0f} s\n")
    print(table(results))
    by_kind = Counter(r["kind"] for r in results if r["loader"] == LOADERS[0])
    print("\nmutation kinds: " + ", ".join(f"{k} {v}" for k, v in sorted(by_kind.items())))
    longest = max((r.get("message_chars", 0) for r in results), default=0)
    slowest = max((r.get("seconds", 0.0) for r in results), default=0.0)
    print(f"longest error message: {longest} characters; slowest load: {slowest:.2f} s")
    bad = [r for r in results if r["outcome"] not in ("BundleError", "loaded")]
    for r in bad[:40]:
        print(f"- case {r['index']} {r['loader']}: {r['outcome']}: {r['mutation']} → {r.get('error', '')}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
