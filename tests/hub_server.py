"""A loopback Hugging Face Hub for tests: real HTTP on 127.0.0.1, a random port, in-memory git-like commits.

It implements the routes that `huggingface_hub` 2.4 really calls to push and pull a model repo, with the
headers the client reads, so tests exercise the real client code paths without any network:

==========================================================  =================================================
route                                                       used by
==========================================================  =================================================
``POST /api/repos/create``                                  ``HfApi.create_repo`` (409 + ``url`` if it exists)
``POST /api/validate-yaml``                                 ``create_commit`` with a README.md, ``ModelCard.validate``
``POST /api/models/{repo}/preupload/{rev}``                 ``create_commit`` (always answers ``"regular"``:
                                                            files travel inline, no LFS/Xet server needed)
``POST /api/models/{repo}/commit/{rev}``                    ``create_commit`` (ndjson: header, file, deletedFile,
                                                            deletedFolder; ``parentCommit`` checked → 412;
                                                            ``?create_pr=1`` commits to a new ``refs/pr/N``)
``POST /api/models/{repo}/branch/{branch}``                 ``HfApi.create_branch``
``GET  /api/models/{repo}[/revision/{rev}]``                ``HfApi.model_info`` / ``repo_info`` (``sha``)
``GET  /api/models/{repo}/refs``                            ``HfApi.list_repo_refs``
``GET  /api/models/{repo}/tree/{rev}[/{path}]``             ``HfApi.list_repo_tree`` / ``list_repo_files``
``POST /api/models/{repo}/paths-info/{rev}``                ``HfApi.get_paths_info``
``HEAD|GET /{repo}/resolve/{rev}/{path}``                   ``hf_hub_download`` (``X-Repo-Commit``, ``ETag`` =
                                                            git blob id, ``Content-Length``; ``Range`` on GET)
``GET  /api/agent-harnesses``                               the client's user-agent probe (empty registry)
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
import threading
import time
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
    oid: str
    parent: str | None
    message: str
    files: dict[str, bytes]
    date: str


@dataclass
class Repo:
    repo_id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)


class HubHTTPError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


class LoopbackHub:
    """The server and its in-memory repos. Use as a context manager, or `start` / `stop`."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.lock = threading.RLock()
        self.requests: list[tuple[str, str]] = []
        self.unhandled: list[tuple[str, str]] = []
        #: ``"refuse"`` (HTTP 500, nothing applied) or ``"interrupt"`` (connection dropped after half the body)
        #: for the next commit request; reset once used.
        self.fail_next_commit: str | None = None
        self._counter = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle -------------------------------------------------------------------------------------
    def start(self) -> LoopbackHub:
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="loopback-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = self._thread = None

    def __enter__(self) -> LoopbackHub:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

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
            repo = self.repos[repo_id]
            return dict(repo.commits[self._resolve(repo, revision)].files)

    def commit_ids(self, repo_id: str) -> list[str]:
        with self.lock:
            return list(self.repos[repo_id].commits)

    def tamper(self, repo_id: str, path: str, data: bytes, revision: str = "main") -> None:
        """Replace a stored file *inside an existing commit* (what a corrupted or malicious server would serve)."""
        with self.lock:
            repo = self.repos[repo_id]
            commit = repo.commits[self._resolve(repo, revision)]
            if path not in commit.files:
                raise KeyError(path)
            commit.files[path] = data

    def reset(self) -> None:
        with self.lock:
            self.repos.clear()
            self.requests.clear()
            self.unhandled.clear()
            self.fail_next_commit = None

    # ---- store operations (called by the handler under the lock) ----------------------------------------
    def _new_commit_id(self, parent: str | None, files: dict[str, bytes], message: str) -> str:
        self._counter += 1
        digest = hashlib.sha1(f"{parent}\n{message}\n{self._counter}\n{time.time_ns()}".encode())
        for path in sorted(files):
            digest.update(path.encode() + b"\0" + git_blob_id(files[path]).encode())
        return digest.hexdigest()

    def _repo(self, namespace: str, name: str) -> Repo:
        repo = self.repos.get(f"{namespace}/{name}")
        if repo is None:
            raise HubHTTPError(404, f"Repository {namespace}/{name} not found", "RepoNotFound")
        return repo

    def _resolve(self, repo: Repo, revision: str) -> str:
        if revision in repo.branches:
            return repo.branches[revision]
        if COMMIT_ID.fullmatch(revision) and revision in repo.commits:
            return revision
        raise HubHTTPError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def create_repo(self, payload: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if payload.get("type", "model") != "model":
            raise HubHTTPError(400, "the loopback hub only serves model repos")
        name, organization = payload.get("name"), payload.get("organization")
        if not name or not organization:
            raise HubHTTPError(400, "repo name and organization (namespace) are required")
        repo_id = f"{organization}/{name}"
        url = f"{self.endpoint}/{repo_id}"
        if repo_id in self.repos:
            return 409, {"error": "You already created this model repo", "url": url}
        repo = Repo(repo_id, private=payload.get("visibility") == "private" or bool(payload.get("private")))
        files = {".gitattributes": b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"}
        oid = self._new_commit_id(None, files, "initial commit")
        repo.commits[oid] = Commit(oid, None, "initial commit", files, _now())
        repo.branches["main"] = oid
        self.repos[repo_id] = repo
        return 200, {"url": url, "name": repo_id}

    def apply_commit(self, repo: Repo, revision: str, lines: list[dict[str, Any]]) -> Commit:
        """Build the new tree from the ndjson operations; the branch moves only if every operation is valid."""
        if revision not in repo.branches:
            raise HubHTTPError(404, f"Invalid rev id: {revision} (commits go to a branch)", "RevisionNotFound")
        if not lines or lines[0].get("key") != "header":
            raise HubHTTPError(400, "the first ndjson line must be the commit header")
        header = lines[0]["value"]
        head = repo.branches[revision]
        parent_commit = header.get("parentCommit")
        if parent_commit is not None and parent_commit != head:
            raise HubHTTPError(412, f"A commit has happened since {parent_commit[:12]}; the head of {revision} is {head[:12]}")
        files = dict(repo.commits[head].files)
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value") or {}
            path = value.get("path", "")
            _check_path(path)
            if key == "file":
                if value.get("encoding") != "base64":
                    raise HubHTTPError(400, f"{path}: unsupported encoding {value.get('encoding')!r}")
                files[path] = base64.b64decode(value["content"], validate=True)
            elif key == "deletedFile":
                if path not in files:
                    raise HubHTTPError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                del files[path]
            elif key == "deletedFolder":
                prefix = path.rstrip("/") + "/"
                for name in [n for n in files if n.startswith(prefix)]:
                    del files[name]
            elif key in ("lfsFile", "deletedEntries"):
                raise HubHTTPError(400, f"{path}: the loopback hub takes regular (inline) files only")
            else:
                raise HubHTTPError(400, f"unknown commit operation {key!r}")
        message = header.get("summary") or ""
        if not message:
            raise HubHTTPError(400, "commit summary is empty")
        oid = self._new_commit_id(head, files, message)
        commit = Commit(oid, head, message, files, _now())
        repo.commits[oid] = commit
        repo.branches[revision] = oid
        return commit


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())


def _check_path(path: str) -> None:
    if not path or path.startswith("/") or any(part in ("", ".", "..") for part in path.split("/")):
        raise HubHTTPError(400, f"invalid path in repo: {path!r}")


def _tree_entries(files: dict[str, bytes], prefix: str, recursive: bool) -> list[dict[str, Any]]:
    """Files and folders under ``prefix`` in the Hub's tree format (folders first, like the Hub)."""
    prefix = prefix.strip("/")
    base = prefix + "/" if prefix else ""
    folders: dict[str, None] = {}
    entries = []
    for path in sorted(files):
        if not path.startswith(base):
            continue
        rest = path[len(base):]
        parts = rest.split("/")
        for depth in range(1, len(parts)):
            if recursive or depth == 1:
                folders[base + "/".join(parts[:depth])] = None
        if recursive or len(parts) == 1:
            entries.append(_file_entry(path, files[path]))
    folder_entries = [
        {"type": "directory", "oid": hashlib.sha1(path.encode()).hexdigest(), "size": 0, "path": path} for path in folders
    ]
    return folder_entries + entries


def _file_entry(path: str, data: bytes) -> dict[str, Any]:
    return {"type": "file", "oid": git_blob_id(data), "size": len(data), "path": path}


class _Handler(BaseHTTPRequestHandler):
    hub: LoopbackHub
    protocol_version = "HTTP/1.1"
    server_version = "LoopbackHub/1.0"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    # ---- plumbing ----------------------------------------------------------------------------------------
    def _body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None, content_type: str = "application/json") -> None:
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
        hub = self.hub
        split = urlsplit(self.path)
        raw_path, query = split.path, parse_qs(split.query)
        with hub.lock:
            hub.requests.append((self.command, raw_path))
        try:
            for method, pattern, handler in _ROUTES:
                match = pattern.fullmatch(raw_path)
                if match and self.command in method:
                    args = [unquote(g) if g is not None else None for g in match.groups()]
                    handler(self, query, *args)
                    return
            with hub.lock:
                hub.unhandled.append((self.command, raw_path))
            raise HubHTTPError(404, f"no route for {self.command} {raw_path}")
        except HubHTTPError as err:
            headers = {"X-Error-Message": err.message, **err.headers}
            if err.code:
                headers["X-Error-Code"] = err.code
            self._json(err.status, {"error": err.message}, headers)

    do_GET = do_POST = do_HEAD = do_PUT = do_DELETE = _dispatch

    # ---- routes ------------------------------------------------------------------------------------------
    def agent_harnesses(self, query: dict) -> None:
        self._json(200, {"standardEnvVars": [], "harnesses": {}})

    def create_repo(self, query: dict) -> None:
        payload = json.loads(self._body() or b"{}")
        with self.hub.lock:
            status, data = self.hub.create_repo(payload)
        self._json(status, data)

    def validate_yaml(self, query: dict) -> None:
        payload = json.loads(self._body() or b"{}")
        errors = validate_card_metadata(payload.get("content", ""))
        self._json(400 if errors else 200, {"errors": [{"message": e} for e in errors], "warnings": []})

    def preupload(self, query: dict, namespace: str, name: str, revision: str) -> None:
        payload = json.loads(self._body() or b"{}")
        with self.hub.lock:
            repo = self.hub._repo(namespace, name)
            head = self.hub._resolve(repo, revision)
            existing = repo.commits[head].files
            files = [
                {
                    "path": entry["path"],
                    "uploadMode": "regular",
                    "shouldIgnore": False,
                    "oid": git_blob_id(existing[entry["path"]]) if entry["path"] in existing else None,
                }
                for entry in payload.get("files", [])
            ]
        self._json(200, {"files": files, "commitOid": head})

    def commit(self, query: dict, namespace: str, name: str, revision: str) -> None:
        with self.hub.lock:
            failure, self.hub.fail_next_commit = self.hub.fail_next_commit, None
        if failure == "interrupt":
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(length // 2)
            self.close_connection = True
            self.connection.shutdown(2)  # the client sees the connection drop mid-request, with no response
            return
        body = self._body()
        if failure == "refuse":
            raise HubHTTPError(500, "Internal Error - the loopback hub was told to refuse this commit")
        try:
            lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        except json.JSONDecodeError as err:
            raise HubHTTPError(400, f"commit payload is not ndjson: {err}") from None
        pr_url = None
        with self.hub.lock:
            repo = self.hub._repo(namespace, name)
            if query.get("create_pr", ["0"])[0] in ("1", "true"):
                # a pull request: a new ref refs/pr/N from the base branch (or parentCommit), the commit goes there
                number = 1 + sum(1 for b in repo.branches if b.startswith("refs/pr/"))
                base = self.hub._resolve(repo, revision)
                if lines and lines[0].get("key") == "header" and lines[0]["value"].get("parentCommit"):
                    base = self.hub._resolve(repo, lines[0]["value"]["parentCommit"])
                    lines[0]["value"]["parentCommit"] = None
                revision = f"refs/pr/{number}"
                repo.branches[revision] = base
                pr_url = f"{self.hub.endpoint}/{repo.repo_id}/discussions/{number}"
            commit = self.hub.apply_commit(repo, revision, lines)
        url = f"{self.hub.endpoint}/{repo.repo_id}/commit/{commit.oid}"
        self._json(200, {"commitUrl": url, "commitOid": commit.oid, "pullRequestUrl": pr_url})

    def create_branch(self, query: dict, namespace: str, name: str, branch: str) -> None:
        payload = json.loads(self._body() or b"{}")
        with self.hub.lock:
            repo = self.hub._repo(namespace, name)
            if branch in repo.branches:
                raise HubHTTPError(409, f"Reference refs/heads/{branch} already exists")
            if COMMIT_ID.fullmatch(branch) or branch.startswith("refs/"):
                raise HubHTTPError(400, f"Invalid reference for a branch: {branch}")
            repo.branches[branch] = self.hub._resolve(repo, payload.get("startingPoint") or "main")
        self._json(200, {})

    def model_info(self, query: dict, namespace: str, name: str, revision: str | None) -> None:
        with self.hub.lock:
            repo = self.hub._repo(namespace, name)
            sha = self.hub._resolve(repo, revision or "main")
            commit = repo.commits[sha]
            with_blobs = query.get("blobs", ["false"])[0].lower() in ("1", "true")
            siblings = []
            for path in sorted(commit.files):
                sibling: dict[str, Any] = {"rfilename": path}
                if with_blobs:
                    sibling.update(size=len(commit.files[path]), blobId=git_blob_id(commit.files[path]))
                siblings.append(sibling)
            data = {
                "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
                "id": repo.repo_id,
                "modelId": repo.repo_id,
                "author": namespace,
                "sha": sha,
                "lastModified": commit.date,
                "private": repo.private,
                "disabled": False,
                "gated": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "siblings": siblings,
            }
        self._json(200, data)

    def refs(self, query: dict, namespace: str, name: str) -> None:
        with self.hub.lock:
            repo = self.hub._repo(namespace, name)
            branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": oid} for b, oid in repo.branches.items()]
        self._json(200, {"branches": branches, "converts": [], "tags": []})

    def tree(self, query: dict, namespace: str, name: str, revision: str, path: str | None) -> None:
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        with self.hub.lock:
            repo = self.hub._repo(namespace, name)
            files = repo.commits[self.hub._resolve(repo, revision)].files
            prefix = (path or "").strip("/")
            if prefix and not any(p.startswith(prefix + "/") for p in files):
                raise HubHTTPError(404, f"{prefix} does not exist on {revision}", "EntryNotFound")
            entries = _tree_entries(files, prefix, recursive)
        self._json(200, entries)

    def paths_info(self, query: dict, namespace: str, name: str, revision: str) -> None:
        body = self._body().decode()
        form = parse_qs(body) if "application/x-www-form-urlencoded" in (self.headers.get("Content-Type") or "") else json.loads(body or "{}")
        paths = form.get("paths", [])
        with self.hub.lock:
            repo = self.hub._repo(namespace, name)
            files = repo.commits[self.hub._resolve(repo, revision)].files
            entries = []
            for path in paths:
                path = path.strip("/")
                if path in files:
                    entries.append(_file_entry(path, files[path]))
                elif any(p.startswith(path + "/") for p in files):
                    entries.append({"type": "directory", "oid": hashlib.sha1(path.encode()).hexdigest(), "size": 0, "path": path})
        self._json(200, entries)

    def resolve(self, query: dict, namespace: str, name: str, revision: str, path: str) -> None:
        with self.hub.lock:
            repo = self.hub._repo(namespace, name)
            sha = self.hub._resolve(repo, revision)
            data = repo.commits[sha].files.get(path)
        if data is None:
            raise HubHTTPError(404, f"{path} does not exist at {sha}", "EntryNotFound", {"X-Repo-Commit": sha})
        headers = {"X-Repo-Commit": sha, "ETag": f'"{git_blob_id(data)}"', "Accept-Ranges": "bytes"}
        byte_range = self.headers.get("Range")
        if self.command == "GET" and byte_range:
            match = re.fullmatch(r"bytes=(\d+)-(\d*)", byte_range.strip())
            if not match or int(match.group(1)) >= max(len(data), 1):
                raise HubHTTPError(416, f"unsatisfiable range {byte_range!r} for {len(data)} bytes")
            start = int(match.group(1))
            end = min(int(match.group(2)) if match.group(2) else len(data) - 1, len(data) - 1)
            headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
            self._send(206, data[start : end + 1], headers, "application/octet-stream")
            return
        self._send(200, data, headers, "application/octet-stream")


_REPO = r"/([^/]+)/([^/]+)"
_ROUTES = [
    ({"GET"}, re.compile(r"/api/agent-harnesses"), _Handler.agent_harnesses),
    ({"POST"}, re.compile(r"/api/repos/create"), _Handler.create_repo),
    ({"POST"}, re.compile(r"/api/validate-yaml"), _Handler.validate_yaml),
    ({"POST"}, re.compile(rf"/api/models{_REPO}/preupload/([^/]+)"), _Handler.preupload),
    ({"POST"}, re.compile(rf"/api/models{_REPO}/commit/([^/]+)"), _Handler.commit),
    ({"POST"}, re.compile(rf"/api/models{_REPO}/branch/([^/]+)"), _Handler.create_branch),
    ({"GET"}, re.compile(rf"/api/models{_REPO}/refs"), _Handler.refs),
    ({"GET"}, re.compile(rf"/api/models{_REPO}/tree/([^/]+)(/.*)?"), _Handler.tree),
    ({"POST"}, re.compile(rf"/api/models{_REPO}/paths-info/([^/]+)"), _Handler.paths_info),
    ({"GET"}, re.compile(rf"/api/models{_REPO}(?:/revision/([^/]+))?"), _Handler.model_info),
    ({"GET", "HEAD"}, re.compile(rf"{_REPO}/resolve/([^/]+)/(.+)"), _Handler.resolve),
]


def validate_card_metadata(content: str) -> list[str]:
    """A small subset of the Hub's README metadata checks: the YAML block parses to a mapping and the fields
    optbundle writes have the types the Hub expects."""
    if not content.startswith("---"):
        return []
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, re.DOTALL)
    if not match:
        return ["metadata block is not closed by '---'"]
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError as err:
        return [f"metadata is not valid YAML: {err}"]
    if data is None:
        return []
    if not isinstance(data, dict):
        return ["metadata must be a YAML mapping"]
    errors = []
    if "library_name" in data and not isinstance(data["library_name"], str):
        errors.append('"library_name" must be a string')
    for key in ("tags", "datasets", "base_model", "language", "metrics"):
        value = data.get(key)
        if value is None:
            continue
        values = value if isinstance(value, list) else [value]
        if not all(isinstance(v, str) and v for v in values):
            errors.append(f'"{key}" must be a string or a list of non-empty strings')
    for key in ("base_model", "datasets"):
        values = data.get(key)
        for v in values if isinstance(values, list) else [values] if values else []:
            if isinstance(v, str) and (v.startswith(("/", ".")) or v.count("/") > 1):
                errors.append(f'"{key}" must name Hub repos, got {v!r}')
    return errors
