"""Bundles and rules on the Hugging Face Hub: push as one commit, load at one pinned commit.

Pushing (`push_directory`, used by `Bundle.push_to_hub` and `LearnedRule.push_to_hub`): ``create_repo``
(``exist_ok``) and then ONE ``create_commit`` holding every file of ``bundle.json``, ``bundle.json`` itself and
``README.md``, and deleting the files the previous version's manifest listed that this one does not. The commit
names the head it was prepared against (``parent_commit``), so a push that raced another one is refused
instead of mixing the two. A README.md edited on the Hub (its generated-card seal is gone, see `card.py`) is
kept unless ``overwrite_card=True``.

Loading (`download_repo`, used by ``from_pretrained`` and `optbundle.load_rule` for Hub ids): the revision is
resolved once to a commit sha (``HfApi.resolve_revision``; offline, from the cache's ``refs/``), then
``snapshot_download`` fetches ``bundle.json`` and exactly the files it lists (``allow_patterns``) at that sha, so
a push in between can never mix files of two versions. The cached snapshot folder is then loaded by the
ordinary local-directory path, which verifies every file's size and sha256 against ``bundle.json``. Anything
fetched before loads offline (``HF_HUB_OFFLINE=1`` or ``local_files_only=True``) from the cache.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import huggingface_hub
from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, constants
from huggingface_hub.errors import (
    HFValidationError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
    RevisionResolutionError,
)
from huggingface_hub.utils import validate_repo_id

from ..files import (
    CARD_NAME,
    MANIFEST_NAME,
    OPTIMIZER_DIR,
    BundleError,
    MissingFileError,
    atomic_directory,
    check_relative_path,
    commit_directory,
    recover_directory,
    read_manifest,
    staging_directory,
    verify_manifest,
    write_card_and_manifest,
)
from ..step.rule import PROVENANCE_NAME, RULE_CONFIG_NAME, RULE_WEIGHTS_NAME
from .card import card_for_repo, is_generated_card, rule_card

if TYPE_CHECKING:  # pragma: no cover
    from huggingface_hub import CommitInfo

    from .rule import LearnedRule

logger = logging.getLogger(__name__)

#: ``kind`` in the manifest of an optimizer-only repo (rule_config.json, rule.safetensors, provenance.json).
RULE_REPO_KIND = "rule"
DEFAULT_BRANCH = "main"

_COMMIT_SHA = re.compile(r"[0-9a-f]{40}")
# Hub ids as optbundle accepts them: "namespace/name" (un-namespaced legacy ids are never optbundle repos, and
# treating every bare word as a Hub id would send typos of shipped rule names to the network).
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")


class HubError(BundleError):
    """A Hub request failed: the repo could not be created, a commit was refused or interrupted, the Hub answered
    with an error or could not be reached."""


# ---- Hub ids vs. local paths ------------------------------------------------------------------------------


def is_hub_reference(name: Any) -> bool:
    """True for a string that is not an existing local path and reads as a Hub repo id ``namespace/name``."""
    if not isinstance(name, str) or Path(name).exists() or not _REPO_ID.fullmatch(name):
        return False

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _check_repo_id(repo_id: str) -> None:
    if not isinstance(repo_id, str) or not _REPO_ID.fullmatch(repo_id):
        raise ValueError(f"repo_id {repo_id!r}: expected a Hub repo id 'namespace/name'")


def _network_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "no answer from the Hub" (not an HTTP error status) for this huggingface_hub."""
    errors: list[type[BaseException]] = [OfflineModeIsEnabled, ConnectionError, TimeoutError]
    for module_name in ("httpx2", "httpx"):
        try:
            module = __import__(module_name)
        except ImportError:
            continue
        transport_error = getattr(module, "TransportError", None)
        if isinstance(transport_error, type):
            errors.append(transport_error)
    return tuple(errors)


# ---- resolving and fetching ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def _download_errors(repo_id: str, revision: str | None, cache_dir: str | Path | None) -> Iterator[None]:
    """huggingface_hub's download errors as `MissingFileError` / `HubError` naming the repo and revision."""
    ref = revision or DEFAULT_BRANCH
    with _hub_call(f"{repo_id}@{ref}: downloading"):
        try:
            yield
        except RepositoryNotFoundError:
            raise MissingFileError(
                f"{repo_id}: no such local directory, and no such repo on the Hub ({constants.ENDPOINT}); "
                "for a private repo pass token="
            ) from None
        except RevisionNotFoundError:
            raise MissingFileError(f"{repo_id}: the Hub repo has no revision {ref!r}") from None
        except (RevisionResolutionError, LocalEntryNotFoundError) as err:
            raise MissingFileError(
                f"{repo_id}@{ref}: not in the local cache ({cache_dir or constants.HF_HUB_CACHE}), and the Hub is not "
                f"used or not reachable ({_first_line(err)})"
            ) from None


def cached_commit(repo_id: str, revision: str | None = None, *, cache_dir: str | Path | None = None) -> str | None:
    """The commit sha the local cache records for ``revision`` (a branch or tag) of ``repo_id``, if any."""
    try:
        return HfApi().resolve_revision(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=True).resolved
    except RevisionResolutionError:
        return None


@dataclass(frozen=True)
class HubSnapshot:
    """Files of one commit of a Hub repo, fetched into the cache's snapshot folder of that commit."""

    repo_id: str
    commit: str
    directory: Path
    manifest: dict[str, Any]

    @property
    def where(self) -> str:
        return f"{self.repo_id}@{self.commit[:12]}"


def download_repo(
    repo_id: str,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
    endpoint: str | None = None,
    select: Callable[[dict[str, Any]], list[str]] | None = None,
    include_card: bool = False,
) -> HubSnapshot:
    """Resolve ``revision`` to one commit (``HfApi.resolve_revision``: the Hub, or the cache's ``refs/`` when
    offline), then ``snapshot_download`` ``bundle.json`` and the files it lists at that sha.

    ``select(manifest)`` narrows the files to fetch (default: all the manifest lists). Files are not verified
    here; the caller verifies the ones it loads. ``include_card`` also fetches README.md when the repo has one.
    """
    _check_repo_id(repo_id)
    offline = local_files_only or constants.is_offline_mode()
    with _download_errors(repo_id, revision, cache_dir):
        resolved = HfApi(endpoint=endpoint, token=token).resolve_revision(
            repo_id, revision=revision, cache_dir=cache_dir, local_files_only=offline
        )
    commit = resolved.resolved
    if not _COMMIT_SHA.fullmatch(commit):
        raise HubError(f"{repo_id}: the Hub did not say which commit {revision or DEFAULT_BRANCH!r} is (got {commit!r})")

    def fetch(names: list[str]) -> Path:
        with _download_errors(repo_id, commit, cache_dir):
            folder = huggingface_hub.snapshot_download(
                repo_id, revision=commit, cache_dir=cache_dir, local_files_only=offline, token=token,
                endpoint=endpoint, allow_patterns=[glob.escape(name) for name in names],
            )
        return Path(folder)

    where = f"{repo_id}@{commit[:12]}"
    directory = fetch([MANIFEST_NAME])
    if not (directory / MANIFEST_NAME).is_file():
        raise MissingFileError(
            f"{where}: the repo has no file {MANIFEST_NAME}; an optbundle repo always has one (was this repo pushed by "
            "optbundle?)"
        )
    manifest = read_manifest(directory)
    for name in manifest["files"]:  # every path, before any path from the Hub touches the disk
        check_relative_path(name, source=f"{where}/{MANIFEST_NAME}")
    names = select(manifest) if select is not None else list(manifest["files"])
    fetch(names)
    for name in names:
        if not (directory / name).is_file():
            raise MissingFileError(f"{where}: the repo has no file {name} (listed in {MANIFEST_NAME})")
    if include_card:  # optional: a repo may have none, an offline cache may lack it
        with contextlib.suppress(MissingFileError):
            fetch([CARD_NAME])
    return HubSnapshot(repo_id=repo_id, commit=commit, directory=directory, manifest=manifest)


@contextlib.contextmanager
def _located(snapshot: HubSnapshot) -> Iterator[None]:
    """Prefix bundle errors raised while loading a snapshot with ``repo@sha`` (same exception type)."""
    try:
        yield
    except BundleError as err:
        try:
            located = type(err)(f"{snapshot.where}: {err}")
        except Exception:  # an error type with another constructor: keep it as it is
            raise err from None
        raise located from err


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return (text.splitlines()[0] if text else type(err).__name__)[:300]


# ---- loading and pushing Bundle / LearnedRule ----------------------------------------------------------------------


def load_pretrained(
    cls: Any,
    path: str | Path,
    hub_kwargs: dict[str, Any],
    *,
    select: Callable[[dict[str, Any]], list[str]] | None = None,
    **load_kwargs: Any,
) -> Any:
    """``from_pretrained`` of `Bundle` and `LearnedRule`: a local folder (an interrupted save recovered first) is
    loaded by ``cls._from_local(path, **load_kwargs)``; a Hub id ``namespace/name`` is fetched at one commit
    (`download_repo` with ``hub_kwargs``: ``revision``, ``cache_dir``, ``local_files_only``, ``token``; only the
    files ``select(manifest)`` names) and loaded by ``cls._from_snapshot(snapshot, **load_kwargs)``, its errors
    prefixed with ``repo@sha``."""
    local = recover_directory(Path(path))
    if local.exists() or not is_hub_reference(str(path)):
        return cls._from_local(local, **load_kwargs)
    snapshot = download_repo(str(path), select=select, **hub_kwargs)
    with _located(snapshot):
        return cls._from_snapshot(snapshot, **load_kwargs)


def push_pretrained(obj: Any, repo_id: str, save_kwargs: dict[str, Any] | None = None, **push_kwargs: Any) -> CommitInfo:
    """``push_to_hub`` of `Bundle` and `LearnedRule`: ``obj._save_repo(folder, **save_kwargs)`` writes the repo
    folder into a temporary directory, which is pushed as one commit (see `push_directory`)."""
    with tempfile.TemporaryDirectory(prefix="optbundle-push-") as scratch:
        folder = obj._save_repo(Path(scratch) / "repo", **(save_kwargs or {}))
        return push_directory(folder, repo_id, **push_kwargs)


def rule_files(manifest: dict[str, Any]) -> list[str]:
    """The manifest paths of a repo's rule: at the root of a rule-only repo, under ``optimizer/`` in a bundle."""
    prefix = "" if manifest.get("kind") == RULE_REPO_KIND else f"{OPTIMIZER_DIR}/"
    names = [prefix + name for name in (RULE_CONFIG_NAME, RULE_WEIGHTS_NAME, PROVENANCE_NAME)]
    return [name for name in names if name in manifest["files"]]


def pull_repo(
    repo_id: str,
    directory: str | Path,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
    endpoint: str | None = None,
) -> HubSnapshot:
    """Copy one commit of a bundle or rule repo into ``directory`` (plain files), verified, written atomically.

    ``directory`` must be missing, empty, or an earlier bundle (it is replaced as a whole).
    """
    target = Path(directory)
    if target.exists():
        if not target.is_dir():
            raise BundleError(f"{target}: exists and is not a directory")
        if any(target.iterdir()) and not (target / MANIFEST_NAME).is_file():
            raise BundleError(f"{target}: is neither empty nor a bundle; refusing to replace its contents")
    snapshot = download_repo(
        repo_id, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token,
        endpoint=endpoint, include_card=True,
    )
    staging = staging_directory(target)
    try:
        names = [*snapshot.manifest["files"], MANIFEST_NAME, CARD_NAME]
        for name in names:
            source = snapshot.directory / name
            if name == CARD_NAME and not source.is_file():
                continue
            destination = staging / name
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, destination)  # follows the cache's symlinks: plain files in the copy
        with _located(snapshot):
            verify_manifest(staging, snapshot.manifest)
        commit_directory(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return snapshot


# ---- pushing -------------------------------------------------------------------------------------------------------


def save_rule_repo(rule: LearnedRule, directory: str | Path) -> Path:
    """Write an optimizer-only repo folder: the rule's files, a README.md card and a ``bundle.json`` manifest
    (kind ``"rule"``), atomically."""
    target = Path(directory)
    with atomic_directory(target) as staging:
        rule.save_pretrained(staging)
        write_card_and_manifest(staging, rule_card(rule), kind=RULE_REPO_KIND, extra={"rule_hash": rule.content_hash()})
    return target


@contextlib.contextmanager
def _hub_call(what: str) -> Iterator[None]:

    try:
        yield
    except HfHubHTTPError as err:
        raise HubError(f"{what} failed ({_first_line(err)})") from err
    except _network_errors() as err:
        raise HubError(f"{what} failed, the Hub could not be reached ({_first_line(err)})") from err


def _read_remote_text(api: Any, repo_id: str, name: str, commit: str, cache: Path) -> str | None:
    with _hub_call(f"{repo_id}: reading {name} at {commit[:12]}"):
        path = api.hf_hub_download(repo_id, name, revision=commit, cache_dir=cache)
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return None


def push_directory(
    directory: str | Path, repo_id: str, *, revision: str | None = None, private: bool | None = None,
    commit_message: str | None = None, commit_description: str | None = None, token: str | bool | None = None,
    create_pr: bool = False, overwrite_card: bool = False, endpoint: str | None = None,
) -> CommitInfo:
    """Push a saved bundle or rule-repo folder to ``repo_id`` as one commit; returns the `CommitInfo`
    (``.oid`` is the new commit's sha, ``.commit_url`` its page; it is a ``str`` of the commit URL, as
    transformers' ``push_to_hub`` returns).

    The folder is verified against its ``bundle.json`` first; only the files the manifest lists, ``bundle.json``
    and ``README.md`` are uploaded. ``revision`` names the branch (created from ``main`` if missing);
    ``create_pr=True`` opens a pull request against it instead (``.pr_url``, ``.pr_revision`` to load it).
    """

    directory = Path(directory)
    _check_repo_id(repo_id)
    branch = revision or DEFAULT_BRANCH
    if _COMMIT_SHA.fullmatch(branch):
        raise ValueError(f"revision={branch!r}: a push goes to a branch; a commit sha cannot be pushed to")
    manifest = read_manifest(directory)
    # never publish a damaged or altered bundle (files the manifest does not list stay local)
    verify_manifest(directory, manifest, closed=False)

    api = HfApi(endpoint=endpoint, token=token)
    with _hub_call(f"{repo_id}: creating the repo"):
        api.create_repo(repo_id, private=private, exist_ok=True)
        if branch != DEFAULT_BRANCH:
            api.create_branch(repo_id, branch=branch, exist_ok=True)
    with _hub_call(f"{repo_id}: reading branch {branch!r}"):
        info = api.model_info(repo_id, revision=branch)
    head = info.sha
    remote_files = {sibling.rfilename for sibling in info.siblings or []}

    local_card_path = directory / CARD_NAME
    with tempfile.TemporaryDirectory(prefix="optbundle-push-") as scratch:
        scratch_cache = Path(scratch)
        remote_manifest_text = (
            _read_remote_text(api, repo_id, MANIFEST_NAME, head, scratch_cache) if MANIFEST_NAME in remote_files else None
        )
        remote_card = (
            _read_remote_text(api, repo_id, CARD_NAME, head, scratch_cache)
            if CARD_NAME in remote_files and local_card_path.is_file()
            else None
        )

    card_bytes = None
    if local_card_path.is_file():
        card = card_for_repo(local_card_path.read_text(encoding="utf-8"), repo_id)
        if remote_card is not None and remote_card != card and not overwrite_card and not is_generated_card(remote_card):
            logger.warning(
                "%s: README.md on the Hub was edited (its generated-card seal is missing or does not match); keeping "
                "it. Pass overwrite_card=True to replace it with the generated card.",
                repo_id,
            )
        else:
            card_bytes = card.encode("utf-8")

    previous_files: set[str] = set()
    if remote_manifest_text is not None:
        try:
            previous_files = set(json.loads(remote_manifest_text).get("files") or {})
        except (json.JSONDecodeError, AttributeError):
            logger.warning("%s: the Hub's %s is not a valid manifest; no stale files will be removed", repo_id, MANIFEST_NAME)
    new_files = set(manifest["files"])
    stale = sorted((previous_files - new_files - {MANIFEST_NAME, CARD_NAME}) & remote_files)

    operations: list[Any] = [
        CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(directory / name))
        for name in [*sorted(new_files), MANIFEST_NAME]
    ]
    if card_bytes is not None:
        operations.append(CommitOperationAdd(path_in_repo=CARD_NAME, path_or_fileobj=card_bytes))
    operations += [CommitOperationDelete(path_in_repo=name) for name in stale]

    if commit_message is None:
        rule_hash = manifest.get("rule_hash")
        commit_message = f"Upload optbundle {manifest.get('kind', 'bundle')}" + (f" (rule {rule_hash[:12]})" if rule_hash else "")
    try:
        commit = api.create_commit(
            repo_id,
            operations=operations,
            commit_message=commit_message,
            commit_description=commit_description,
            revision=branch,
            parent_commit=head,
            create_pr=create_pr,
        )
    except Exception as err:

        if not isinstance(err, (HfHubHTTPError, *_network_errors())):
            raise
        raise HubError(f"{repo_id}: the commit to {branch!r} failed ({_first_line(err)}); {_head_report(api, repo_id, branch, head)}") from err
    logger.info("pushed %s to %s@%s (%s)", directory, repo_id, commit.oid[:12], branch)
    return commit


def _head_report(api: Any, repo_id: str, branch: str, head: str) -> str:
    """Say whether the branch still points where it did before the failed commit."""
    try:
        now = api.model_info(repo_id, revision=branch).sha
    except Exception:  # the Hub is unreachable: we cannot tell
        return f"the branch was at {head[:12]} before; its state now is unknown"
    if now == head:
        return f"the repo is unchanged (branch still at {head[:12]})"
    return f"the branch moved from {head[:12]} to {now[:12]} (another push?)"
