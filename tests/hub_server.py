"""A loopback Hugging Face Hub for tests: real HTTP on 127.0.0.1, a random port, in-memory git-like commits.

It implements only the routes that `huggingface_hub` 2.4 calls when optbundle (and transformers' ``push_to_hub``)
pushes and pulls, with the headers the client reads, so tests exercise the real client code without any network:

==========================================================  =================================================
route                                                       used by
==========================================================  =================================================
``POST /api/repos/create``                                  ``HfApi.create_repo`` (409 + ``url`` if it exists)
``POST /api/validate-yaml``                                 ``create_commit`` with a README.md, ``ModelCard.validate``
``POST /api/models/{repo}/preupload/{rev}``                 ``create_commit`` (always answers ``"regular"``:
                                                            files travel inline, no LFS/Xet server needed)
``POST /api/models/{repo}/commit/{rev}``                    ``create_commit`` (ndjson: header, file, deletedFile;
                                                            ``parentCommit`` checked → 412; ``?create_pr=1``
                                                            commits to a new ``refs/pr/N``)
``POST /api/models/{repo}/branch/{branch}``                 ``HfApi.create_branch``
``GET  /api/models/{repo}[/revision/{rev}]``                ``HfApi.model_info`` / ``resolve_revision`` (``sha``)
``GET  /api/models/{repo}/tree/{rev}?recursive=true``       ``snapshot_download``'s file listing
``HEAD|GET /{repo}/resolve/{rev}/{path}``                   ``hf_hub_download`` (``X-Repo-Commit``, ``ETag`` =
                                                            git blob id, ``Content-Length``; ``Range`` on GET)
==========================================================  =================================================

Every push makes a new commit with a fresh 40-hex id; old commits stay readable by id. Errors carry the
``X-Error-Code`` header (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``) that the client maps to
its exception types. Tests can make the next commit fail (`LoopbackHub.fail_next_commit`), alter a stored
file behind the client's back (`LoopbackHub.tamper`), and read the request log (`LoopbackHub.requests`).

This module is a test fixture, not part of the package.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

COMMIT_ID = re.compile(r"^[0-9a-f]{40}$")


def git_blob_id(data: bytes) -> str:
    """The id git gives a file's content: sha1 over ``b"blob <size>\\0" + data`` (what the Hub uses as ETag)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Commit:
    message: str
    files: dict[str, bytes]


@dataclass
class Repo:
    repo_id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)

    def add_commit(self, branch: str, message: str, files: dict[str, bytes]) -> str:
        oid = secrets.token_hex(20)
        self.commits[oid] = Commit(message, files)
        self.branches[branch] = oid
        return oid


class HubHTTPError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


class LoopbackHub:
    """The server and its in-memory repos. Use as a context manager."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.lock = threading.RLock()
        self.requests: list[tuple[str, str]] = []
        self.unhandled: list[tuple[str, str]] = []
        #: ``"refuse"`` (HTTP 500, nothing applied) or ``"interrupt"`` (connection dropped after half the body)
        #: for the next commit request; reset once used.
        self.fail_next_commit: str | None = None

    def __enter__(self) -> LoopbackHub:
        handler = type("Handler", (_Handler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="loopback-hub", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # ---- inspection and fault injection for tests --------------------------------------------------------
    def head(self, repo_id: str, branch: str = "main") -> str:
        with self.lock:
            return self.repos[repo_id].branches[branch]

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        with self.lock:
            return dict(self._commit(self.repos[repo_id], revision)[1].files)

    def commit_ids(self, repo_id: str) -> list[str]:
        with self.lock:
            return list(self.repos[repo_id].commits)

    def tamper(self, repo_id: str, path: str, data: bytes, revision: str = "main") -> None:
        """Replace a stored file *inside an existing commit* (what a corrupted or malicious server would serve)."""
        with self.lock:
            files = self._commit(self.repos[repo_id], revision)[1].files
            if path not in files:
                raise KeyError(path)
            files[path] = data

    def reset(self) -> None:
        with self.lock:
            self.repos.clear()
            self.requests.clear()
            self.unhandled.clear()
            self.fail_next_commit = None

    # ---- lookups (under the lock) -------------------------------------------------------------------------
    def _repo(self, namespace: str, name: str) -> Repo:
        repo = self.repos.get(f"{namespace}/{name}")
        if repo is None:
            raise HubHTTPError(404, f"Repository {namespace}/{name} not found", "RepoNotFound")
        return repo

    def _commit(self, repo: Repo, revision: str) -> tuple[str, Commit]:
        oid = repo.branches.get(revision) or (revision if COMMIT_ID.fullmatch(revision) else None)
        if oid not in repo.commits:
            raise HubHTTPError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return oid, repo.commits[oid]


def _file_entry(path: str, data: bytes) -> dict[str, Any]:
    return {"type": "file", "oid": git_blob_id(data), "size": len(data), "path": path}


class _Handler(BaseHTTPRequestHandler):
    hub: LoopbackHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    # ---- plumbing ----------------------------------------------------------------------------------------
    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, data: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(data).encode(), headers)

    def _dispatch(self) -> None:
        split = urlsplit(self.path)
        with self.hub.lock:
            self.hub.requests.append((self.command, split.path))
        try:
            for methods, pattern, handler in _ROUTES:
                match = pattern.fullmatch(split.path)
                if match and self.command in methods:
                    with self.hub.lock:
                        return handler(self, parse_qs(split.query), *[unquote(g or "") for g in match.groups()])
            with self.hub.lock:
                self.hub.unhandled.append((self.command, split.path))
            raise HubHTTPError(404, f"no route for {self.command} {split.path}")
        except HubHTTPError as err:
            headers = {"X-Error-Message": err.message, **err.headers, **({"X-Error-Code": err.code} if err.code else {})}
            self._json(err.status, {"error": err.message}, headers)

    do_GET = do_POST = do_HEAD = do_PUT = do_DELETE = _dispatch

    # ---- routes (called under the hub's lock) -------------------------------------------------------------
    def create_repo(self, query: dict) -> None:
        payload = json.loads(self._body() or b"{}")
        repo_id = f"{payload.get('organization')}/{payload.get('name')}"
        if payload.get("type", "model") != "model" or not payload.get("name") or not payload.get("organization"):
            raise HubHTTPError(400, "the loopback hub serves model repos 'namespace/name' only")
        url = f"{self.hub.endpoint}/{repo_id}"
        if repo_id in self.hub.repos:
            return self._json(409, {"error": "You already created this model repo", "url": url})
        repo = self.hub.repos[repo_id] = Repo(repo_id, private=payload.get("visibility") == "private" or bool(payload.get("private")))
        repo.add_commit("main", "initial commit", {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"})
        self._json(200, {"url": url, "name": repo_id})

    def validate_yaml(self, query: dict) -> None:
        errors = validate_card_metadata(json.loads(self._body() or b"{}").get("content", ""))
        self._json(400 if errors else 200, {"errors": [{"message": e} for e in errors], "warnings": []})

    def preupload(self, query: dict, namespace: str, name: str, revision: str) -> None:
        head, commit = self.hub._commit(self.hub._repo(namespace, name), revision)
        entries = json.loads(self._body() or b"{}").get("files", [])
        files = [
            {"path": e["path"], "uploadMode": "regular", "shouldIgnore": False,
             "oid": git_blob_id(commit.files[e["path"]]) if e["path"] in commit.files else None}
            for e in entries
        ]
        self._json(200, {"files": files, "commitOid": head})

    def commit(self, query: dict, namespace: str, name: str, revision: str) -> None:
        """The ndjson commit (header, file, deletedFile); the branch moves only if every operation is valid."""
        failure, self.hub.fail_next_commit = self.hub.fail_next_commit, None
        if failure == "interrupt":
            self.rfile.read(int(self.headers.get("Content-Length") or 0) // 2)
            self.close_connection = True
            self.connection.shutdown(2)  # the client sees the connection drop mid-request, with no response
            return
        body = self._body()
        if failure == "refuse":
            raise HubHTTPError(500, "Internal Error - the loopback hub was told to refuse this commit")
        header, *operations = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = header["value"]
        repo = self.hub._repo(namespace, name)
        head, _ = self.hub._commit(repo, header.get("parentCommit") or revision)
        pr_url = None
        if query.get("create_pr", ["0"])[0] in ("1", "true"):  # a new ref refs/pr/N from the base; the commit goes there
            number = 1 + sum(1 for b in repo.branches if b.startswith("refs/pr/"))
            revision, pr_url = f"refs/pr/{number}", f"{self.hub.endpoint}/{repo.repo_id}/discussions/{number}"
            repo.branches[revision] = head
        elif revision not in repo.branches:
            raise HubHTTPError(404, f"Invalid rev id: {revision} (commits go to a branch)", "RevisionNotFound")
        elif head != repo.branches[revision]:
            raise HubHTTPError(412, f"A commit has happened since {head[:12]}; the head of {revision} is {repo.branches[revision][:12]}")
        files = dict(repo.commits[head].files)
        for line in operations:
            key, path = line["key"], line["value"]["path"]
            if not path or path.startswith("/") or any(part in ("", ".", "..") for part in path.split("/")):
                raise HubHTTPError(400, f"invalid path in repo: {path!r}")
            if key == "file" and line["value"].get("encoding") == "base64":
                files[path] = base64.b64decode(line["value"]["content"], validate=True)
            elif key == "deletedFile" and path in files:
                del files[path]
            else:  # lfsFile, deletedFolder, a missing file, ...: not what optbundle's pushes send
                raise HubHTTPError(400, f"unsupported commit operation {key!r} on {path!r}")
        if not header.get("summary"):
            raise HubHTTPError(400, "commit summary is empty")
        oid = repo.add_commit(revision, header["summary"], files)
        url = f"{self.hub.endpoint}/{repo.repo_id}/commit/{oid}"
        self._json(200, {"commitUrl": url, "commitOid": oid, "pullRequestUrl": pr_url})

    def create_branch(self, query: dict, namespace: str, name: str, branch: str) -> None:
        repo = self.hub._repo(namespace, name)
        if branch in repo.branches:
            raise HubHTTPError(409, f"Reference refs/heads/{branch} already exists")
        start = json.loads(self._body() or b"{}").get("startingPoint") or "main"
        repo.branches[branch] = self.hub._commit(repo, start)[0]
        self._json(200, {})

    def model_info(self, query: dict, namespace: str, name: str, revision: str) -> None:
        repo = self.hub._repo(namespace, name)
        sha, commit = self.hub._commit(repo, revision or "main")
        siblings = [{"rfilename": path} for path in sorted(commit.files)]
        self._json(200, {"id": repo.repo_id, "sha": sha, "private": repo.private, "siblings": siblings})

    def tree(self, query: dict, namespace: str, name: str, revision: str) -> None:
        _, commit = self.hub._commit(self.hub._repo(namespace, name), revision)
        self._json(200, [_file_entry(path, data) for path, data in sorted(commit.files.items())])

    def resolve(self, query: dict, namespace: str, name: str, revision: str, path: str) -> None:
        sha, commit = self.hub._commit(self.hub._repo(namespace, name), revision)
        data = commit.files.get(path)
        if data is None:
            raise HubHTTPError(404, f"{path} does not exist at {sha}", "EntryNotFound", {"X-Repo-Commit": sha})
        headers = {"X-Repo-Commit": sha, "ETag": f'"{git_blob_id(data)}"', "Accept-Ranges": "bytes"}
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", (self.headers.get("Range") or "").strip())
        if self.command == "GET" and match:  # a range read (safetensors headers)
            start = int(match.group(1))
            end = min(int(match.group(2) or len(data) - 1), len(data) - 1)
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            return self._send(206, data[start : end + 1], headers, "application/octet-stream")
        self._send(200, data, headers, "application/octet-stream")


_REPO = r"/([^/]+)/([^/]+)"
_ROUTES = [
    ({"POST"}, re.compile(r"/api/repos/create"), _Handler.create_repo),
    ({"POST"}, re.compile(r"/api/validate-yaml"), _Handler.validate_yaml),
    ({"POST"}, re.compile(rf"/api/models{_REPO}/preupload/([^/]+)"), _Handler.preupload),
    ({"POST"}, re.compile(rf"/api/models{_REPO}/commit/([^/]+)"), _Handler.commit),
    ({"POST"}, re.compile(rf"/api/models{_REPO}/branch/([^/]+)"), _Handler.create_branch),
    ({"GET"}, re.compile(rf"/api/models{_REPO}/tree/([^/]+)"), _Handler.tree),
    ({"GET"}, re.compile(rf"/api/models{_REPO}(?:/revision/([^/]+))?"), _Handler.model_info),
    ({"GET", "HEAD"}, re.compile(rf"{_REPO}/resolve/([^/]+)/(.+)"), _Handler.resolve),
]


def validate_card_metadata(content: str) -> list[str]:
    """A small subset of the Hub's README metadata checks: the YAML block is a mapping, and the fields optbundle
    writes have the types the Hub expects (``base_model`` and ``datasets`` name Hub repos)."""
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, re.DOTALL)
    if not content.startswith("---"):
        return []
    if not match:
        return ["metadata block is not closed by '---'"]
    try:
        data = yaml.safe_load(match.group(1)) or {}
    except yaml.YAMLError as err:
        return [f"metadata is not valid YAML: {err}"]
    if not isinstance(data, dict):
        return ["metadata must be a YAML mapping"]
    errors = ['"library_name" must be a string'] if not isinstance(data.get("library_name", ""), str) else []
    for key in ("tags", "datasets", "base_model", "language", "metrics"):
        values = data.get(key) if isinstance(data.get(key), list) else [data[key]] if data.get(key) is not None else []
        if not all(isinstance(v, str) and v for v in values):
            errors.append(f'"{key}" must be a string or a list of non-empty strings')
        elif key in ("base_model", "datasets") and any(v.startswith(("/", ".")) or v.count("/") > 1 for v in values):
            errors.append(f'"{key}" must name Hub repos, got {values!r}')
    return errors
