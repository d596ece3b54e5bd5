"""The ``optbundle`` command line: ``push``, ``pull``, ``inspect``, ``env`` (and more subcommands as they are added).

Each subcommand is one function taking the parsed arguments and returning an exit status, registered with
`subcommand` together with a function that declares its arguments::

    def _finetune_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("bundle")

    @subcommand("finetune", help="fine-tune a bundle's model with its learned optimizer", arguments=_finetune_arguments)
    def finetune(args: argparse.Namespace) -> int:
        ...
        return 0

`main` builds one argparse subparser per registered subcommand. Errors end the command with one line on
stderr, no traceback (``--debug`` shows it):

- a `BundleError` (a damaged, altered or missing bundle; the message names the file or repo): exit status 1;
- a user mistake (missing or invalid recipe, YAML, unknown or missing keys, invalid arguments or repo ids:
  `ValueError`, `TypeError`, `KeyError`, `OSError`, YAML errors): exit status 2, like argparse's own errors;
- anything else: exit status 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch
import yaml

from . import __version__
from .apps.finetune import load_recipe, run_recipe
from .apps.refine import load_refine_recipe, run_refine_recipe
from .files import (
    MANIFEST_NAME,
    OPTIMIZER_DIR,
    STATE_JSON_NAME,
    STATE_TENSORS_NAME,
    BundleError,
    read_json_file,
    read_manifest,
    read_safetensors_header,
    verify_manifest,
)
from .meta.scalars import describe as describe_scalars
from .step.rule import RULE_CONFIG_NAME
from .store.hub import download_repo, is_hub_reference, pull_repo, push_directory, push_pretrained, rule_files
from .store.pretrained import shipped_rule_names, shipped_rule_path
from .store.rule import LearnedRule


@dataclass(frozen=True)
class Subcommand:
    name: str
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


#: Registered subcommands by name, in registration order (the order ``optbundle --help`` lists them).
SUBCOMMANDS: dict[str, Subcommand] = {}


def subcommand(
    name: str, *, help: str, arguments: Callable[[argparse.ArgumentParser], None]  # noqa: A002 - argparse's word
) -> Callable[[Callable[[argparse.Namespace], int]], Callable[[argparse.Namespace], int]]:
    """Register ``run(args) -> exit status`` as ``optbundle NAME``; ``arguments(parser)`` declares its arguments."""

    def register(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        if name in SUBCOMMANDS:
            raise ValueError(f"optbundle subcommand {name!r} is registered twice")
        SUBCOMMANDS[name] = Subcommand(name, help, arguments, run)
        return run

    return register


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="optbundle", description="Ship a model together with the learned optimizer that fine-tunes it."
    )
    parser.add_argument("--version", action="version", version=f"optbundle {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what is being done")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for spec in SUBCOMMANDS.values():
        sub = subparsers.add_parser(spec.name, help=spec.help, description=spec.help)
        spec.arguments(sub)
        sub.set_defaults(_run=spec.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``optbundle`` with ``argv`` (default: the process arguments); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s: %(message)s")
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"optbundle {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - one line per error; --debug re-raises
        if args.debug:
            raise
        status = 1 if isinstance(err, BundleError) else (2 if _is_user_mistake(err) else 1)
        print(f"optbundle {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return status


def _is_user_mistake(err: BaseException) -> bool:
    return isinstance(err, (ValueError, TypeError, KeyError, OSError, yaml.YAMLError))


def _one_line(err: BaseException, limit: int = 500) -> str:
    """The error's message on one line (its type added unless it is a `BundleError`), cut to ``limit``."""
    text = " ".join(str(err).split()) or type(err).__name__
    if not isinstance(err, (BundleError, ValueError)):
        text = f"{type(err).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ---- shared options ----------------------------------------------------------------------------------------------


def _hub_download_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--revision", help="branch, tag or commit sha on the Hub (default: main)")
    parser.add_argument("--cache-dir", type=Path, help="Hugging Face cache folder (default: HF_HUB_CACHE)")
    parser.add_argument(
        "--offline", action="store_true", help="use only what is in the cache (like HF_HUB_OFFLINE=1)"
    )
    parser.add_argument("--token", help="Hub token (default: the one huggingface_hub finds, e.g. HF_TOKEN)")


def _download_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "revision": args.revision,
        "cache_dir": args.cache_dir,
        "local_files_only": args.offline,
        "token": args.token,
    }


def _human_size(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


# ---- push --------------------------------------------------------------------------------------------------------


def _push_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", type=Path, metavar="DIR",
                        help="a saved bundle, rule repo or rule folder (`hf upload`'s order REPO_ID DIR works too)")
    parser.add_argument("repo_id", metavar="REPO_ID", help="Hub repo 'namespace/name' (created if missing)")
    parser.add_argument("--revision", help="branch to push to (default: main; created if missing)")
    parser.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing to the branch")
    parser.add_argument("--private", action="store_true", default=None, help="create the repo private")
    parser.add_argument("--commit-message", help="message of the commit (default: says what is uploaded)")
    parser.add_argument("--overwrite-card", action="store_true", help="replace a README.md edited on the Hub")
    parser.add_argument("--token", help="Hub token (default: the one huggingface_hub finds, e.g. HF_TOKEN)")


@subcommand("push", help="publish a bundle (or a rule) folder to the Hub as one commit", arguments=_push_arguments)
def push(args: argparse.Namespace) -> int:
    directory: Path = args.directory
    if not directory.exists() and Path(args.repo_id).is_dir():  # `hf upload REPO_ID PATH` order
        directory, args.repo_id = Path(args.repo_id), str(args.directory)
    options = dict(
        create_pr=args.create_pr,
        revision=args.revision,
        private=args.private,
        commit_message=args.commit_message,
        token=args.token,
        overwrite_card=args.overwrite_card,
    )
    if (directory / MANIFEST_NAME).is_file():
        commit = push_directory(directory, args.repo_id, **options)
    elif (directory / RULE_CONFIG_NAME).is_file():
        # a bare rule folder (no manifest yet): publish it as a rule-only repo, with a manifest and a card
        commit = push_pretrained(LearnedRule.from_directory(directory), args.repo_id, **options)
    else:
        raise BundleError(f"{directory}: has neither {MANIFEST_NAME} (a bundle) nor {RULE_CONFIG_NAME} (a rule)")
    print(f"pushed {directory} to {args.repo_id}@{commit.oid}")
    print(f"commit: {commit.commit_url}")
    if commit.pr_url:
        print(f"pull request: {commit.pr_url} (load it with --revision {commit.pr_revision})")
    return 0


# ---- pull --------------------------------------------------------------------------------------------------------


def _pull_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("repo_id", metavar="REPO_ID", help="Hub repo 'namespace/name'")
    parser.add_argument("directory", type=Path, metavar="DIR", help="where to write the bundle (missing or empty)")
    _hub_download_options(parser)


@subcommand("pull", help="download a bundle or rule repo at one commit into a folder, verified", arguments=_pull_arguments)
def pull(args: argparse.Namespace) -> int:
    snapshot = pull_repo(args.repo_id, args.directory, **_download_kwargs(args))
    count = len(snapshot.manifest["files"]) + 1
    print(f"pulled {args.repo_id}@{snapshot.commit} into {args.directory} ({count} files verified)")
    return 0


# ---- inspect -----------------------------------------------------------------------------------------------------


def _inspect_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("target", metavar="DIR_OR_REPO_ID",
                        help="a bundle or rule folder, a shipped rule name (default, default-v2, ...), or a Hub repo id")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--no-verify", action="store_true", help="skip the size/sha256 check of local files")
    _hub_download_options(parser)


def safetensors_parameter_count(path: Path) -> int:
    """Number of values stored in a safetensors file, read from its checked JSON header only (no tensor is loaded)."""
    total = 0
    for entry in read_safetensors_header(path).values():
        count = 1
        for dim in entry["shape"]:
            count *= dim
        total += count
    return total


def _shipped_rule_dir(name: str) -> Path | None:
    """The folder of the shipped rule ``name`` (``default`` resolves through ``aliases.json``), or None."""
    return shipped_rule_path(name) if name in shipped_rule_names() else None


def _weight_files(manifest: dict[str, Any]) -> list[str]:
    """The model (or adapter) weight files of a bundle: safetensors outside ``optimizer/`` (none in a rule repo)."""
    if manifest.get("kind") == "rule":
        return []
    return sorted(n for n in manifest["files"] if n.endswith(".safetensors") and not n.startswith(f"{OPTIMIZER_DIR}/"))


def describe(
    target: str | Path,
    *,
    verify: bool = True,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
) -> dict[str, Any]:
    """What ``optbundle inspect`` reports, as data: source, manifest, files, rule, provenance, model parameter
    count and optimizer state size. A Hub id fetches only ``bundle.json`` and the optimizer's small files; the
    model's parameter count then comes from the safetensors headers (HTTP range reads)."""
    info: dict[str, Any] = {}
    if is_hub_reference(str(target)):
        state_json = f"{OPTIMIZER_DIR}/{STATE_JSON_NAME}"
        snapshot = download_repo(
            str(target),
            revision=revision,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            token=token,
            select=lambda m: rule_files(m) + ([state_json] if state_json in m["files"] else []),
        )
        directory, manifest = snapshot.directory, snapshot.manifest
        info["source"] = {"repo_id": snapshot.repo_id, "commit": snapshot.commit, "cache": str(directory)}
        verify_names = rule_files(manifest) + ([state_json] if state_json in manifest["files"] else [])
        weights = _remote_parameter_count(snapshot, _weight_files(manifest), token=token, offline=local_files_only)
    else:
        directory = Path(target)
        shipped = _shipped_rule_dir(str(target)) if not directory.exists() else None
        if shipped is not None:
            directory = shipped
        if not directory.is_dir():
            raise BundleError(
                f"{directory}: not a directory, a shipped rule name ({', '.join(shipped_rule_names())}) or a Hub repo id "
                "'namespace/name'"
            )
        manifest = read_manifest(directory) if (directory / MANIFEST_NAME).is_file() else None
        info["source"] = {"directory": str(directory)}
        verify_names = list(manifest["files"]) if manifest else []
        weights = None
        if manifest is not None and _weight_files(manifest):
            names = _weight_files(manifest)
            weights = {"files": names, "count": sum(safetensors_parameter_count(directory / n) for n in names)}
    if manifest is not None and verify:
        verify_manifest(directory, manifest, only=verify_names)
        info["verified"] = len(verify_names)

    if manifest is None:  # a bare rule folder (e.g. a shipped rule): no manifest to report
        rule_dir = directory
        info["manifest"] = None
    else:
        info["manifest"] = {
            "format_version": manifest.get("format_version"),
            "optbundle_version": manifest.get("optbundle_version"),
            "kind": manifest.get("kind"),
            "model_class": manifest.get("model_class"),
            "rule_hash": manifest.get("rule_hash"),
            "files": manifest["files"],
        }
        rule_dir = directory if manifest.get("kind") == "rule" else directory / OPTIMIZER_DIR
    rule = LearnedRule.from_directory(rule_dir)
    config = rule.config
    info["rule"] = {
        "parameters": rule.num_parameters(),
        "inputs": config.num_inputs,
        "hidden_sizes": config.hidden_sizes,
        "activation": config.activation,
        "output": config.output,
        "step_mult": config.step_mult,
        "features": config.features,
        "format_version": config.format_version,
        "content_hash": rule.content_hash(),
    }
    info["provenance"] = rule.provenance
    info["model_parameters"] = weights
    info["optimizer_state"] = _state_summary(rule_dir, manifest)
    return info


def _remote_parameter_count(snapshot: Any, names: list[str], *, token: Any, offline: bool) -> dict[str, Any] | None:
    """Parameter count of weight files at the snapshot's commit: from cached copies, else from the Hub's headers."""
    from huggingface_hub import HfApi, constants  # loaded on first use (`import optbundle` does not need it)

    if not names:
        return None
    total = 0
    for name in names:
        cached = snapshot.directory / name
        if cached.is_file():
            total += safetensors_parameter_count(cached)
        elif offline or constants.is_offline_mode():
            return {"files": names, "count": None, "note": "weights not in the cache (offline)"}
        else:
            try:
                metadata = HfApi(token=token).parse_safetensors_file_metadata(snapshot.repo_id, name, revision=snapshot.commit)
            except Exception as err:  # the count is informative; inspect still reports everything else
                return {"files": names, "count": None, "note": f"could not read the header of {name} ({err})"}
            total += sum(metadata.parameter_count.values())
    return {"files": names, "count": total}


def _state_summary(rule_dir: Path, manifest: dict[str, Any] | None) -> dict[str, Any] | None:
    prefix = "" if manifest is None or manifest.get("kind") == "rule" else f"{OPTIMIZER_DIR}/"
    entry = (manifest or {}).get("files", {}).get(prefix + STATE_TENSORS_NAME)
    info_path = rule_dir / STATE_JSON_NAME
    if entry is None and not info_path.is_file():
        return None
    summary: dict[str, Any] = {"file": prefix + STATE_TENSORS_NAME, "bytes": entry["size"] if entry else None}
    if info_path.is_file():
        state_info = read_json_file(info_path)
        params = state_info.get("params", {}) if isinstance(state_info, dict) else {}
        steps = sorted({p.get("step") for p in params.values() if isinstance(p, dict) and isinstance(p.get("step"), int)})
        summary.update(parameters=len(params), steps=steps, stored_dtype=state_info.get("stored_dtype"))
    return summary


def _print_description(info: dict[str, Any]) -> None:
    source = info["source"]
    if "repo_id" in source:
        print(f"{source['repo_id']} @ {source['commit']}")
    else:
        print(source["directory"])
    manifest = info["manifest"]
    if manifest is None:
        print("  no bundle.json: a bare rule folder")
    else:
        print(
            f"  format version {manifest['format_version']} (written by optbundle {manifest['optbundle_version']}), "
            f"kind {manifest['kind']}" + (f", model class {manifest['model_class']}" if manifest.get("model_class") else "")
        )
        files = manifest["files"]
        total = sum(entry["size"] for entry in files.values())
        print(f"  manifest: {len(files)} files, {_human_size(total)}" + (
            f" ({info['verified']} verified: sizes and sha256 match)" if "verified" in info else " (not verified)"
        ))
        for name, entry in sorted(files.items()):
            print(f"    {_human_size(entry['size']):>10}  {entry['sha256'][:12]}  {name}")
    rule = info["rule"]
    print("rule:")
    print(
        f"  {rule['parameters']} parameters: {rule['inputs']} inputs → {' → '.join(map(str, rule['hidden_sizes']))} → 2 "
        f"({rule['activation']}), output {rule['output']} (step_mult {rule['step_mult']:g})"
    )
    print(f"  features: {', '.join(rule['features'])}")
    print(f"  rule format version {rule['format_version']}, content hash {rule['content_hash'][:16]}")
    print("provenance:")
    if not info["provenance"]:
        print("  (none recorded)")
    for key, value in info["provenance"].items():
        text = json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else str(value)
        print(f"  {key}: {text if len(text) <= 200 else text[:199] + '…'}")
    weights = info["model_parameters"]
    if weights is None:
        print("model parameters: (no model weights: a rule-only repo)")
    elif weights.get("count") is None:
        print(f"model parameters: unknown ({weights.get('note')})")
    else:
        print(f"model parameters: {weights['count']:,} (in {', '.join(weights['files'])})")
    state = info["optimizer_state"]
    if state is None:
        print("optimizer state: none (fine-tuning starts with fresh accumulators)")
    else:
        size = _human_size(state["bytes"]) if state.get("bytes") is not None else "size unknown"
        steps = state.get("steps") or []
        step_text = f", step {steps[0]}" if len(steps) == 1 else (f", steps {steps[0]}–{steps[-1]}" if steps else "")
        print(f"optimizer state: {state.get('parameters', '?')} parameters{step_text}, {size} in {state['file']}")


@subcommand("inspect", help="show a bundle's manifest, rule, provenance, parameter count and state size", arguments=_inspect_arguments)
def inspect(args: argparse.Namespace) -> int:
    info = describe(
        args.target,
        verify=not args.no_verify,
        revision=args.revision,
        cache_dir=args.cache_dir,
        local_files_only=args.offline,
        token=args.token,
    )
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True, default=str))
    else:
        _print_description(info)
    return 0


# ---- env ---------------------------------------------------------------------------------------------------------


#: distributions ``optbundle env`` reports (by distribution name), in order; a missing one prints "not installed"
ENV_PACKAGES = ("torch", "transformers", "peft", "accelerate", "huggingface_hub", "safetensors", "datasets")


def _package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def environment_info() -> dict[str, str]:
    """What ``optbundle env`` prints, as ``{key: value}`` (versions, platform, CUDA, threads), like ``hf env``."""
    info = {
        "optbundle version": __version__,
        "Platform": platform.platform(),
        "Python version": platform.python_version(),
    }
    for name in ENV_PACKAGES:
        info[f"{name} version"] = _package_version(name) or "not installed"
    triton = _package_version("triton")
    if triton is not None:
        info["triton version"] = triton
    cuda = torch.cuda.is_available()
    info["CUDA available"] = (
        f"yes ({torch.cuda.device_count()} device(s), {torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda})"
        if cuda else "no"
    )
    info["torch threads"] = str(torch.get_num_threads())
    info["CPU count"] = str(os.cpu_count())
    info["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS", "not set")
    return info


def _env_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


@subcommand("env", help="print the versions of optbundle, Python, torch and the HF libraries (for bug reports)",
            arguments=_env_arguments)
def env(args: argparse.Namespace) -> int:
    info = environment_info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    print("Copy-and-paste the text below in your GitHub issue.\n")
    for key, value in info.items():
        print(f"- {key}: {value}")
    return 0


# ---- finetune ----------------------------------------------------------------------------------------------------


def _recipe_overrides(items: list[str], command: str) -> dict:
    """``--set KEY=VALUE`` options as a dict of YAML values."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            overrides[key] = yaml.safe_load(value)
        except yaml.YAMLError as err:
            raise ValueError(f"--set {key}: not a YAML value ({' '.join(str(err).split())[:200]})") from err
    return overrides


def _finetune_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="a YAML recipe (path, or the name of one shipped in optbundle.recipes)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe entry (YAML value), e.g. --set max_steps=10 --set seeds=[0,1]")


@subcommand("finetune", help="run a fine-tuning recipe with the learned rule and with AdamW; print the results table",
            arguments=_finetune_arguments)
def finetune(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, _recipe_overrides(args.set, "finetune"))
    run_recipe(recipe, announce=lambda line: print(line, flush=True))
    results = Path(recipe.optim.results_dir)
    print((results / "results.md").read_text())
    print(f"loss curves: {results / 'loss_curves.png'}")
    if recipe.optim.bundle_output:
        print(f"bundle (best learned run): {recipe.optim.bundle_output}")
    return 0


# ---- refine ------------------------------------------------------------------------------------------------------


@subcommand("refine", help="meta-refine a bundle's rule on a model + dataset recipe and save the refined bundle",
            arguments=_finetune_arguments)
def refine(args: argparse.Namespace) -> int:
    recipe = load_refine_recipe(args.recipe, _recipe_overrides(args.set, "refine"))
    result = run_refine_recipe(recipe)
    if result is None:
        print(f"stopped early (max_wall_time_s); run the same command again to resume from {recipe.config.out_dir}")
        return 0
    refined, target = result
    numbers = refined.rule.provenance.get("before_after") or {}
    print(f"refined bundle: {target}")
    provenance = refined.rule.provenance
    how = (f"{provenance['meta_steps']} meta-steps" if "meta_steps" in provenance else
           "scalars " + describe_scalars(provenance.get("scalars", {})))
    print(f"parent rule {provenance['parent_rule'][:12]} -> refined {refined.rule.content_hash()[:12]} "
          f"({how}, {provenance['wall_time_s']:.0f} s)")
    if "budget" in provenance:
        print(f"compute: {provenance['budget']['spent']} of {provenance['budget']['passes']} forward-backward passes "
              f"({provenance['budget']['description']})")
    if numbers:
        print(f"held-out loss after {numbers['steps']} fine-tuning steps: parent {numbers['held_out_loss_parent']:.4f}, "
              f"refined {numbers['held_out_loss_refined']:.4f} (ratio {numbers['ratio']:.3f})")
        print(f"plot: {Path(recipe.config.out_dir) / 'refinement.png'}")
    return 0


if __name__ == "__main__":  # python -m optbundle.cli (after every subcommand above is registered)
    sys.exit(main())
