"""Bundle format v1 on disk: error types, the ``bundle.json`` manifest, safe readers and atomic writers.

Only JSON and safetensors are ever read. Every file in the manifest carries its size and sha256 and is
verified before anything is loaded from it. Manifest paths are relative and may not leave the bundle.
Writes go to a temporary sibling and are renamed into place, so a crash never leaves half a file or half a
bundle behind.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import logging
import os
import re
import shutil
import stat
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import safetensors.torch
import torch

logger = logging.getLogger(__name__)

VERSION = "0.1.0"  # optbundle's version (pyproject.toml's), written into every manifest
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


#: Limits checked before anything is allocated from a file's contents (a bundle comes from strangers).
MAX_JSON_BYTES = 64 * 1024 * 1024  # any JSON file of a bundle (config.json, tokenizer.json, state.json, ...)
MAX_JSON_DEPTH = 64  # nesting of JSON arrays/objects (Python's parser would hit RecursionError near 1000)
MAX_JSON_INT_DIGITS = 19  # integers in JSON: |n| < 10**19 (a 2**64 layer count never reaches transformers)
MAX_SAFETENSORS_HEADER = 16 * 1024 * 1024  # bytes of a safetensors JSON header
MAX_MESSAGE_CHARS = 2000  # a BundleError's message is cut to this length (reprs inside are cut much shorter)


def short_repr(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters, for error messages about untrusted input."""
    try:
        text = repr(value)
    except Exception:  # noqa: BLE001 - a hostile object's repr must not mask the error being reported
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 1] + "…"


class BundleError(Exception):
    """Base class of every error about a bundle, a rule file or optimizer state.

    Messages are cut to `MAX_MESSAGE_CHARS` so that hostile input never produces a megabyte error string.
    """

    def __init__(self, *args: Any) -> None:
        if len(args) == 1 and isinstance(args[0], str) and len(args[0]) > MAX_MESSAGE_CHARS:
            args = (args[0][: MAX_MESSAGE_CHARS - 1] + "…",)
        super().__init__(*args)


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


class ModelLoadError(BundleError, ValueError):
    """The bundle's model cannot be built or loaded: config.json invalid or beyond the limits, weights missing,
    extra, or of another shape or dtype than the model declares, or the load arguments do not fit the bundle."""


# ---- hashing and atomic writes ------------------------------------------------------------------------

_UMASK = os.umask(0)
os.umask(_UMASK)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """``write(tmp)`` fills a temporary sibling of ``path``; it is fsynced and renamed over ``path`` (readers never
    see a partial file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.close(fd)
        os.chmod(tmp, 0o644 & ~_UMASK)
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary sibling + rename (readers never see a partial file)."""
    _atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_save_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """`atomic_write_bytes` of `save_safetensors_bytes` (the same file) without holding the file in memory:
    safetensors writes the tensors' memory straight to disk, then the header is made canonical in place."""

    def write(tmp: str) -> None:
        safetensors.torch.save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        with open(tmp, "rb+") as handle:
            head = handle.read(8)
            head += handle.read(int.from_bytes(head, "little"))
            handle.seek(0)
            handle.write(_canonical_safetensors_header(head))

    _atomic_write(path, write)


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def staging_directory(target: Path) -> Path:
    """A fresh temporary sibling of ``target`` to build a whole directory in before `commit_directory`."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(target)
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


def read_json_file(path: Path, *, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """Parse a JSON file within the limits of `parse_json_text`; any failure is a `BundleError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: file not found")
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise CorruptFileError(f"{path}: {size} bytes, more than the {max_bytes} a JSON file of a bundle may have")
        data = path.read_bytes()
    except OSError as err:
        raise MissingFileError(f"{path}: cannot be read ({short_repr(err, 200)})") from err
    text = _decode_utf8(data, path, "not valid UTF-8 JSON ({err.reason} at byte {err.start})")
    return parse_json_text(text, source=str(path))


_JSON_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_JSON_BRACKET = re.compile(r"[\[\]{}]")


def _decode_utf8(data: bytes, path: Path, message: str) -> str:
    """``data`` as UTF-8 text; `CorruptFileError` ``"{path}: {message}"`` otherwise (``message`` may name ``{err}``)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise CorruptFileError(f"{path}: " + message.format(err=err)) from err


def _json_depth(text: str) -> int:
    """Maximum nesting of arrays/objects in ``text`` (strings skipped), found without parsing it."""
    depth = deepest = 0
    for match in _JSON_BRACKET.finditer(_JSON_STRING.sub('""', text)):
        if match.group() in "[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_JSON_INT_DIGITS:
        raise ValueError(f"integer with {len(text.lstrip('-'))} digits (at most {MAX_JSON_INT_DIGITS} allowed)")
    return int(text)


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {short_repr(key)}")
        out[key] = value
    return out


def parse_json_text(text: str, *, source: str) -> Any:
    """``json.loads`` for untrusted text: nesting at most `MAX_JSON_DEPTH`, integers at most
    `MAX_JSON_INT_DIGITS` digits, no duplicate keys (a second ``"files"`` table must not hide the first).
    Every failure is a `CorruptFileError` naming ``source``."""
    depth = _json_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise CorruptFileError(f"{source}: JSON nested {depth} levels deep (at most {MAX_JSON_DEPTH} allowed)")
    try:
        return json.loads(text, parse_int=_bounded_int, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as err:
        raise CorruptFileError(f"{source}: not valid JSON ({err.msg} at line {err.lineno} column {err.colno})") from err
    except (ValueError, RecursionError, TypeError) as err:
        raise CorruptFileError(f"{source}: refused JSON ({short_repr(str(err), 200)})") from err


def save_safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """safetensors bytes that depend only on ``tensors`` and ``metadata`` (the same input gives the same bytes)."""
    return _canonical_safetensors_header(safetensors.torch.save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata))


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


#: safetensors dtype names and their sizes in bytes (the ones torch can hold).
SAFETENSORS_DTYPES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
    "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1,
}


def read_safetensors_header(path: Path) -> dict[str, dict[str, Any]]:
    """The tensor table of a safetensors file (name → dtype, shape, data_offsets), read from its header only and
    checked before anything is allocated: header length within `MAX_SAFETENSORS_HEADER` and the file, known
    dtypes, non-negative shapes whose byte sizes match the offsets, tensors tiling the data without gaps."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"{path}: file not found")
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) != 8:
                raise CorruptFileError(f"{path}: {size} bytes, too short for a safetensors header")
            length = int.from_bytes(prefix, "little")
            if length > min(size - 8, MAX_SAFETENSORS_HEADER):
                raise CorruptFileError(
                    f"{path}: safetensors header length {length} exceeds the file ({size} bytes) or the limit "
                    f"({MAX_SAFETENSORS_HEADER})"
                )
            raw = handle.read(length)
    except OSError as err:
        raise MissingFileError(f"{path}: cannot be read ({short_repr(err, 200)})") from err
    text = _decode_utf8(raw, path, "safetensors header is not UTF-8")
    header = parse_json_text(text, source=f"{path} (safetensors header)")
    if not isinstance(header, dict):
        raise CorruptFileError(f"{path}: safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and (
        not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values())
    ):
        raise CorruptFileError(f"{path}: safetensors __metadata__ must map strings to strings")
    spans = []
    for name, entry in header.items():
        where = f"{path}: tensor {short_repr(name)}"
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise CorruptFileError(f"{where}: header entry needs exactly dtype, shape and data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in SAFETENSORS_DTYPES:
            raise CorruptFileError(f"{where}: unknown dtype {short_repr(dtype)}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
            raise CorruptFileError(f"{where}: shape {short_repr(shape)} is not a list of non-negative integers")
        if (
            not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        ):
            raise CorruptFileError(f"{where}: data_offsets {short_repr(offsets)} is not [begin, end]")
        numel = 1
        for dim in shape:
            numel *= dim
        if offsets[0] < 0 or offsets[1] - offsets[0] != numel * SAFETENSORS_DTYPES[dtype]:
            raise CorruptFileError(f"{where}: data_offsets {offsets} do not hold {dtype} {shape}")
        spans.append((offsets[0], offsets[1]))
    position = 0
    for begin, end in sorted(spans):
        if begin != position:
            raise CorruptFileError(f"{path}: tensor data overlaps or leaves a gap at byte {position}")
        position = end
    if position != size - 8 - length:
        raise CorruptFileError(f"{path}: tensors cover {position} bytes of data, the file holds {size - 8 - length}")
    return header


def load_safetensors_file(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file into CPU tensors after `read_safetensors_header` checked its header; any parse
    failure is a `CorruptFileError` naming the file."""
    path = Path(path)
    read_safetensors_header(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise MissingFileError(f"{path}: cannot be read ({short_repr(err, 200)})") from err
    try:
        return safetensors.torch.load(data)
    except Exception as err:  # safetensors raises SafetensorError / ValueError / OSError variants
        raise CorruptFileError(f"{path}: not a valid safetensors file ({short_repr(str(err), 200)})") from err


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
        "optbundle_version": VERSION,
        "kind": kind,
        "files": files,
    }
    if extra:
        manifest.update(extra)
    return manifest


def read_manifest(directory: Path) -> dict[str, Any]:
    """``bundle.json`` of ``directory``, checked: an object with a ``files`` table of ``{size, sha256}`` entries
    under safe relative paths, and a positive integer ``format_version`` this optbundle reads."""
    path = Path(directory) / MANIFEST_NAME
    manifest = read_json_file(path)
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise CorruptFileError(f"{path}: expected an object with a 'files' table")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise CorruptFileError(f"{path}: 'format_version' must be a positive integer, got {short_repr(version)}")
    if version > BUNDLE_FORMAT_VERSION:
        raise FormatVersionError(
            f"{path}: bundle format_version {version} is newer than the {BUNDLE_FORMAT_VERSION} this optbundle "
            "reads; upgrade optbundle to load this bundle"
        )
    kind = manifest.get("kind")
    if kind is not None and not isinstance(kind, str):
        raise CorruptFileError(f"{path}: 'kind' must be a string, got {short_repr(kind)}")
    for name, entry in manifest["files"].items():
        check_relative_path(name, source=str(path))
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("size"), int) or isinstance(entry.get("size"), bool) or entry["size"] < 0
            or not isinstance(entry.get("sha256"), str) or not _SHA256.fullmatch(entry["sha256"])
        ):
            raise CorruptFileError(f"{path}: entry for {short_repr(name)} needs an integer 'size' and a hex 'sha256'")
    return manifest


#: Files `transformers.Trainer` writes beside the model in a checkpoint (or output) folder. They are pickles
#: that only Trainer's resume reads; transformers' and PEFT's ``from_pretrained`` and optbundle never open them,
#: so a Trainer checkpoint that is also a bundle (`optbundle.store.trainer.BundleCallback`) may hold them.
TRAINER_FILES = (
    "optimizer.pt", "scheduler.pt", "scaler.pt", "training_args.bin", "rng_state.pth", "rng_state_*.pth",
    "trainer_state.json", "*_results.json",
)


def is_trainer_file(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in TRAINER_FILES)


_SHA256 = re.compile(r"[0-9a-f]{64}")
_CHECKPOINT_DIR = re.compile(r"checkpoint-[0-9]+")
_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")


def _hub_cache_blobs(directory: Path) -> Path | None:
    """The ``blobs`` folder of a Hugging Face cache repo when ``directory`` is one of its ``snapshots/<sha>``
    folders (whose files are symlinks into ``blobs``), else None."""
    snapshots = directory.parent
    repo = snapshots.parent
    if snapshots.name == "snapshots" and repo.name.startswith(("models--", "datasets--", "spaces--")):
        blobs = repo / "blobs"
        if blobs.is_dir() and not blobs.is_symlink():
            return blobs.resolve()
    return None


def _unmanaged(rel: str) -> bool:
    """Paths a bundle folder may hold without the manifest listing them: the manifest itself, the model card
    (edited on the Hub), and dot-files/folders (``.git``, ``.gitattributes``, ``.cache``), which no loader reads."""
    return rel in (MANIFEST_NAME, CARD_NAME) or any(part.startswith(".") for part in rel.split("/"))


def _check_regular_file(directory: Path, rel: str, blobs: Path | None, source: str) -> Path:
    """``directory / rel`` after checking that no component of it is a symlink (in a Hub cache snapshot, the
    file itself may be a symlink into the cache's ``blobs``) and that it is a regular file."""
    path = directory
    parts = rel.split("/")
    for index, part in enumerate(parts):
        path = path / part
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            raise MissingFileError(f"{path}: listed in {MANIFEST_NAME} but missing") from None
        except OSError as err:
            raise MissingFileError(f"{path}: cannot be read ({short_repr(err, 200)})") from err
        if stat.S_ISLNK(info.st_mode):
            last = index == len(parts) - 1
            target = path.resolve()
            if not (last and blobs is not None and target.parent == blobs and target.is_file()):
                raise UnsafePathError(f"{source}: {rel!r} is a symbolic link; a bundle holds plain files only")
            return path
    if not stat.S_ISREG(info.st_mode):
        raise UnsafePathError(f"{source}: {rel!r} is not a regular file")
    return path


def verify_manifest(
    directory: Path, manifest: dict[str, Any], *, only: list[str] | None = None, closed: bool = True
) -> None:
    """Check the files of ``directory`` against ``manifest``.

    Listed files (all, or the names in ``only``) must exist as regular files (no symlinks, except a Hub cache's
    own) with the listed size and sha256, and listed JSON files must parse (`parse_json_text`). The list is closed: any other file in the folder (except
    ``bundle.json``, ``README.md`` and dot-files) or any symlink is an `UnsafePathError`, and no pickle may be
    present at all. ``closed=False`` (pushing a folder, which uploads only the listed files) skips the check of
    unlisted files.
    """
    directory = Path(directory)
    source = str(directory / MANIFEST_NAME)
    files = manifest["files"]
    blobs = _hub_cache_blobs(directory)
    for name in files:
        check_relative_path(name, source=source)
    for name in files if only is None else only:
        entry = files[name]
        if not isinstance(entry, dict) or not isinstance(entry.get("size"), int) or not isinstance(entry.get("sha256"), str):
            raise CorruptFileError(f"{source}: entry for {short_repr(name)} needs an integer 'size' and a string 'sha256'")
        path = _check_regular_file(directory, name, blobs, source)
        size = path.stat().st_size
        if size != entry["size"]:
            raise ChecksumError(f"{path}: size is {size} bytes, {MANIFEST_NAME} says {short_repr(entry['size'])}")
        digest = sha256_file(path)
        if digest != entry["sha256"]:
            raise ChecksumError(
                f"{path}: sha256 {digest[:16]}… does not match {MANIFEST_NAME} ({short_repr(entry['sha256'][:16])}…)"
            )
        if path.suffix == ".json":  # every JSON file parses within the limits (transformers skips broken ones)
            read_json_file(path)
    for root, dirs, names in os.walk(directory, followlinks=False):
        root_path = Path(root)
        for name in [*dirs, *names]:
            path = root_path / name
            rel = path.relative_to(directory).as_posix()
            if root_path == directory and name in dirs and _CHECKPOINT_DIR.fullmatch(name):
                continue  # Trainer's checkpoint-N/ inside an output folder: its own bundle, verified when loaded
            if root_path == directory and name in names and is_trainer_file(name) and rel not in files:
                continue  # Trainer's own resume files: never read by a bundle loader
            if path.suffix in _PICKLE_SUFFIXES and not path.is_dir():
                raise UnsafePathError(f"{path}: bundles hold only safetensors and JSON; refusing a possibly pickled file")
            if _unmanaged(rel):
                continue
            if path.is_symlink() and not (blobs is not None and rel in files and path.resolve().parent == blobs):
                raise UnsafePathError(f"{source}: {rel!r} is a symbolic link; a bundle holds plain files only")
            if closed and name in names and rel not in files:
                raise UnsafePathError(f"{path}: not listed in {MANIFEST_NAME}; a bundle's files must all be listed")
        dirs[:] = [d for d in dirs if not d.startswith(".") and not (root_path == directory and _CHECKPOINT_DIR.fullmatch(d))]


def verified_directory(directory: Path) -> dict[str, Any]:
    """Recover an interrupted save of ``directory`` (`recover_directory`), then read and verify its manifest."""
    directory = recover_directory(Path(directory))
    manifest = read_manifest(directory)
    verify_manifest(directory, manifest)
    return manifest


# ---- leftovers of interrupted saves -------------------------------------------------------------------


def _leftovers(target: Path, kind: str) -> list[Path]:
    pattern = re.compile(rf"\.{re.escape(target.name)}\.{kind}-[0-9a-f]{{12}}")
    try:
        siblings = list(target.parent.iterdir())
    except OSError:
        return []
    return sorted(
        (p for p in siblings if pattern.fullmatch(p.name) and p.is_dir() and not p.is_symlink()),
        key=lambda p: p.stat().st_mtime,
    )


def recover_directory(target: Path) -> Path:
    """Finish what an interrupted save of ``target`` left behind, and return ``target``.

    `commit_directory` renames the old folder to ``.NAME.old-*`` and then the staged one to ``NAME``; a kill
    between the two leaves no ``NAME``: the newest backup is renamed back (the old bundle, complete). Backups
    and staging folders (``.NAME.staging-*``: a save killed before its commit) are removed once ``NAME``
    exists. Only exact ``.NAME.staging-<12 hex>`` / ``.NAME.old-<12 hex>`` siblings are touched.
    """
    target = Path(target)
    if not target.name or target.is_symlink():
        return target
    backups = _leftovers(target, "old")
    if not target.exists() and backups:
        os.replace(backups.pop(), target)
        logger.warning("%s: recovered the bundle from the backup of an interrupted save", target)
    if target.exists():
        for leftover in [*backups, *_leftovers(target, "staging")]:
            shutil.rmtree(leftover, ignore_errors=True)
    return target
