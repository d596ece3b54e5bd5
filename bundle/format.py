"""Bundle format v1 on disk: error types, the ``bundle.json`` manifest, safe readers and atomic writers.

Only JSON and safetensors are ever read. Every file in the manifest carries its size and sha256 and is
verified before anything is loaded from it. Manifest paths are relative and may not leave the bundle.
Writes go to a temporary sibling and are renamed into place, so a crash never leaves half a file or half a
bundle behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import torch

BUNDLE_FORMAT_VERSION = 1
MANIFEST_NAME = "bundle.json"
# The model card is documentation that users edit on the Hub; it is never read to load anything, so the
# manifest leaves it out (an edited card must not make a bundle fail its checksums).
CARD_NAME = "README.md"
OPTIMIZER_DIR = "optimizer"
STATE_TENSORS_NAME = "state.safetensors"
STATE_JSON_NAME = "state.json"

# Suffixes a bundle may contain. Anything else (pickles above all) is refused on save and on load.
ALLOWED_SUFFIXES = (".json", ".safetensors", ".md", ".txt", ".png", ".model", ".jinja")


class BundleError(Exception):
    """Base class of every error about a bundle, a rule file or optimizer state."""


class MissingFileError(BundleError, FileNotFoundError):
    """A file the bundle needs (or that its manifest lists) is not there."""


class ChecksumError(BundleError):
    """A file's size or sha256 differs from the manifest: the bundle was altered or damaged."""


class CorruptFileError(BundleError):
    """A file cannot be parsed: truncated safetensors, invalid JSON, wrong types."""


class FormatVersionError(BundleError):
    """The bundle or rule was written by a newer format version than this optbundle reads."""


class UnsafePathError(BundleError):
    """A manifest path is absolute, escapes the bundle directory, or names a file type a bundle may not hold."""


class RuleConfigError(BundleError, ValueError):
    """A `RuleConfig` field is unknown, missing or invalid."""


class StateMismatchError(BundleError, ValueError):
    """Saved optimizer state does not fit the parameters it is loaded into."""


# ---- hashing and atomic writes ------------------------------------------------------------------------

_UMASK = os.umask(0)
os.umask(_UMASK)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary sibling + rename (readers never see a partial file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o644 & ~_UMASK)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def staging_directory(target: Path) -> Path:
    """A fresh temporary sibling of ``target`` to build a whole directory in before `commit_directory`."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.staging-{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    return staging


@contextlib.contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield a fresh staging sibling of ``target`` to write a whole folder into; on success it replaces
    ``target`` (`commit_directory`), on any error it is removed and ``target`` is left as it was."""
    staging = staging_directory(target)
    try:
        yield staging
        commit_directory(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def write_card_and_manifest(directory: Path, card: str, *, kind: str, extra: dict[str, Any] | None = None) -> None:
    """Finish a staged folder: its README.md card, then the ``bundle.json`` manifest of every other file."""
    (directory / CARD_NAME).write_text(card, encoding="utf-8")
    atomic_write_json(directory / MANIFEST_NAME, build_manifest(directory, kind=kind, extra=extra))


def commit_directory(staging: Path, target: Path) -> None:
    """Move a fully written ``staging`` directory to ``target``, replacing an existing one.

    The old directory is renamed aside first and removed only after the new one is in place, so at every
    moment ``target`` is either the complete old bundle or the complete new one (a crash between the two
    renames leaves the old bundle in the ``.old-*`` sibling).
    """
    target = Path(target)
    if target.exists():
        if not target.is_dir():
            raise BundleError(f"{target}: exists and is not a directory")
        aside = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:12]}"
        os.replace(target, aside)
        try:
            os.replace(staging, target)
        except BaseException:
            os.replace(aside, target)
            raise
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(staging, target)


# ---- safe readers -------------------------------------------------------------------------------------


def read_json_file(path: Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: file not found")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptFileError(f"{path}: not valid JSON ({err})") from None


def save_safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """safetensors bytes that depend only on ``tensors`` and ``metadata`` (the same input gives the same bytes)."""
    from safetensors.torch import save

    return _canonical_safetensors_header(save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata))


def _canonical_safetensors_header(data: bytes) -> bytes:
    """Sort the header's ``__metadata__`` keys: safetensors writes them in hash-map order, which changes from one
    process to the next, so saving the same rule twice would give different bytes (and sha256s, and Hub commits).
    The header keeps its length (same JSON, reordered; the padding is unchanged)."""
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    metadata = header.pop("__metadata__", None)
    if not metadata or len(metadata) < 2:
        return data
    ordered = {"__metadata__": dict(sorted(metadata.items())), **header}
    text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) > length:  # not the compact JSON safetensors writes: leave the file as it is
        return data
    return data[:8] + text + b" " * (length - len(text)) + data[8 + length :]


def load_safetensors_file(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file into CPU tensors, turning any parse failure into `CorruptFileError`."""
    from safetensors.torch import load

    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: file not found")
    data = path.read_bytes()
    try:
        return load(data)
    except Exception as err:  # safetensors raises SafetensorError / ValueError / OSError variants
        raise CorruptFileError(f"{path}: not a valid safetensors file ({err})") from None


def safetensors_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            return dict(handle.metadata() or {})
    except Exception as err:
        raise CorruptFileError(f"{path}: not a valid safetensors file ({err})") from None


# ---- manifest -----------------------------------------------------------------------------------------


def check_relative_path(name: str, *, source: str) -> PurePosixPath:
    """Refuse manifest paths that are absolute, contain '..', or have a suffix a bundle may not hold."""
    if not isinstance(name, str) or not name:
        raise UnsafePathError(f"{source}: file entry {name!r} is not a non-empty string")
    pure = PurePosixPath(name)
    if pure.is_absolute() or "\\" in name or any(part in ("..", "") for part in name.split("/")) or ":" in pure.parts[0]:
        raise UnsafePathError(f"{source}: path {name!r} escapes the bundle directory")
    if pure.suffix not in ALLOWED_SUFFIXES:
        raise UnsafePathError(
            f"{source}: file {name!r} has a type a bundle may not hold (allowed: {', '.join(ALLOWED_SUFFIXES)})"
        )
    return pure


def build_manifest(directory: Path, *, kind: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """List every file under ``directory`` (except the manifest) with its size and sha256."""
    from . import __version__

    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        rel = path.relative_to(directory).as_posix()
        if rel in (MANIFEST_NAME, CARD_NAME):
            continue
        check_relative_path(rel, source=f"{directory}")
        files[rel] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    manifest = {
        "format": "optbundle",
        "format_version": BUNDLE_FORMAT_VERSION,
        "optbundle_version": __version__,
        "kind": kind,
        "files": files,
    }
    if extra:
        manifest.update(extra)
    return manifest


def read_manifest(directory: Path) -> dict[str, Any]:
    path = Path(directory) / MANIFEST_NAME
    manifest = read_json_file(path)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise CorruptFileError(f"{path}: expected an object with a 'files' table")
    version = manifest.get("format_version")
    if not isinstance(version, int):
        raise CorruptFileError(f"{path}: 'format_version' is missing or not an integer")
    if version > BUNDLE_FORMAT_VERSION:
        raise FormatVersionError(
            f"{path}: bundle format_version {version} is newer than the {BUNDLE_FORMAT_VERSION} this optbundle "
            "reads; upgrade optbundle to load this bundle"
        )
    return manifest


#: Files `transformers.Trainer` writes beside the model in a checkpoint (or output) folder. They are pickles
#: that only Trainer's resume reads; transformers' and PEFT's ``from_pretrained`` and optbundle never open them,
#: so a Trainer checkpoint that is also a bundle (`optbundle.trainer.BundleCallback`) may hold them.
TRAINER_FILES = ("optimizer.pt", "scheduler.pt", "scaler.pt", "training_args.bin", "rng_state.pth", "rng_state_*.pth")


def is_trainer_file(name: str) -> bool:
    import fnmatch

    return any(fnmatch.fnmatchcase(name, pattern) for pattern in TRAINER_FILES)


def verify_manifest(directory: Path, manifest: dict[str, Any]) -> None:
    """Check that every listed file exists with the listed size and sha256, and that no pickle is present."""
    directory = Path(directory)
    source = str(directory / MANIFEST_NAME)
    for name, entry in manifest["files"].items():
        check_relative_path(name, source=source)
        path = directory / name
        if not isinstance(entry, dict) or not isinstance(entry.get("size"), int) or not isinstance(entry.get("sha256"), str):
            raise CorruptFileError(f"{source}: entry for {name!r} needs an integer 'size' and a string 'sha256'")
        if not path.is_file():
            raise MissingFileError(f"{path}: listed in {MANIFEST_NAME} but missing")
        size = path.stat().st_size
        if size != entry["size"]:
            raise ChecksumError(f"{path}: size is {size} bytes, {MANIFEST_NAME} says {entry['size']}")
        digest = sha256_file(path)
        if digest != entry["sha256"]:
            raise ChecksumError(f"{path}: sha256 {digest[:16]}… does not match {MANIFEST_NAME} ({entry['sha256'][:16]}…)")
    for path in directory.rglob("*"):
        in_trainer_folder = path.parent == directory or (
            path.parent.parent == directory and path.parent.name.startswith("checkpoint-")
        )
        if in_trainer_folder and is_trainer_file(path.name) and path.relative_to(directory).as_posix() not in manifest["files"]:
            continue  # Trainer's own resume files (output dir, checkpoint-N/): never read by a bundle loader
        if path.is_file() and path.suffix in (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt"):
            raise UnsafePathError(f"{path}: bundles hold only safetensors and JSON; refusing a possibly pickled file")
