"""A local stand-in for the Hugging Face Hub: the parts of its HTTP API that huggingface_hub uses to fetch and
to publish, served on 127.0.0.1 for the real client (``HF_ENDPOINT``).

It keeps model and dataset repositories with branches, tags and commits; files are stored by content in a
temporary folder. What it speaks, as huggingface_hub parses it (file_download.py, hf_api.py, _commit_api.py,
lfs.py, utils/_http.py):

- ``GET /api/{models,datasets}/{repo}[/revision/{rev}]``: repository info (``sha``, ``siblings``, ``gated``,
  ``private``); ``GET .../tree/{rev}[/{path}]`` and ``POST .../paths-info/{rev}``: the file listing;
  ``GET .../refs``: branches and tags; ``GET /api/whoami-v2``.
- ``HEAD`` and ``GET /[datasets/]{repo}/resolve/{rev}/{path}``: a regular file answers with its git ETag,
  ``X-Repo-Commit`` and ``Content-Length`` and honours ``Range``; a large (LFS) file redirects to a "CDN" URL on
  another host name (``localhost`` instead of ``127.0.0.1``, so the client drops its token as it does for the
  real CDN) with ``X-Linked-Etag`` (its sha256) and ``X-Linked-Size``. No Xet headers: downloads are plain HTTP.
- ``POST /api/repos/create``, ``POST .../branch/{name}``, ``POST /api/validate-yaml``,
  ``POST .../preupload/{rev}`` (each file's upload mode and the oid of what is there now, so an unchanged file is
  left out of the commit), ``POST .../commit/{rev}`` (NDJSON: header, base64 files, LFS files, deletions).
- The LFS batch API (``POST /{repo}.git/info/lfs/objects/batch``, "basic" transfer) and the PUT upload and
  verify URLs it hands out. huggingface_hub uploads through Xet unless ``HF_HUB_DISABLE_XET=1``, so files are
  "regular" (base64 in the commit) unless ``lfs_threshold`` is set, for tests that take the large-file path.

Auth as the Hub does it: a token is ``Authorization: Bearer <token>``; an unknown token is a 401 "Invalid
credentials"; a private repository is a 404 ``RepoNotFound`` to anyone but its owner; a gated repository lists its
files to anyone and serves them only to users it approved (401 ``GatedRepo`` without a token, 403 with one).
Faults for tests: ``drop_once[path] = n`` cuts the connection after n bytes of the next download of a file;
``refuse_commits = (status, message)`` refuses commits (a quota, say). Every request is logged in ``requests``.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

KINDS = {"models": "model", "datasets": "dataset"}


def git_oid(data: bytes) -> str:
    """git's blob id of the content (what the Hub calls a regular file's oid)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass(frozen=True)
class Blob:
    sha256: str
    size: int
    oid: str          # git blob id of the content (regular) or of the LFS pointer (lfs)
    lfs: bool


@dataclass
class Commit:
    oid: str
    parent: str | None
    message: str
    files: dict[str, Blob]


@dataclass
class Repo:
    repo_id: str
    kind: str                       # "model" or "dataset"
    owner: str
    private: bool = False
    gated: str | bool = False        # False, "auto" or "manual"
    approved: set[str] = field(default_factory=set)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)

    def resolve(self, revision: str) -> Commit | None:
        oid = self.branches.get(revision) or self.tags.get(revision)
        if oid is None and revision in self.commits:
            oid = revision
        return self.commits.get(oid) if oid else None


class HubState:
    """Repositories, users and files, shared by the handler threads (one lock around every change)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        self.lock = threading.RLock()
        self.repos: dict[tuple[str, str], Repo] = {}
        self.tokens: dict[str, str] = {}                  # token -> user name
        self.orgs: dict[str, set[str]] = {}               # user -> organisations they may write to
        self.lfs_threshold: int | None = None              # files this big or bigger are preuploaded as LFS
        self.drop_once: dict[str, int] = {}                # file path -> bytes sent before the connection drops
        self.refuse_commits: tuple[int, str] | None = None
        self.requests: list[dict[str, Any]] = []
        self.url = ""                                      # set by HubServer
        self._counter = 0

    # -- users and repositories -------------------------------------------------
    def add_user(self, name: str, token: str, orgs: tuple[str, ...] = ()) -> None:
        self.tokens[token] = name
        self.orgs[name] = set(orgs)

    def store(self, data: bytes, lfs: bool) -> Blob:
        sha = hashlib.sha256(data).hexdigest()
        path = self.root / "blobs" / sha
        if not path.exists():
            path.write_bytes(data)
        oid = git_oid(lfs_pointer(sha, len(data)) if lfs else data)
        return Blob(sha, len(data), oid, lfs)

    def read(self, blob: Blob) -> bytes:
        return (self.root / "blobs" / blob.sha256).read_bytes()

    def create_repo(self, repo_id: str, kind: str = "model", owner: str | None = None, private: bool = False,
                    gated: str | bool = False) -> Repo:
        with self.lock:
            repo = Repo(repo_id, kind, owner or repo_id.split("/")[0], private, gated)
            self.repos[(kind, repo_id)] = repo
            attributes = self.store(b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"
                                    b"*.gguf filter=lfs diff=lfs merge=lfs -text\n", lfs=False)
            self.commit(repo, "main", "initial commit", {".gitattributes": attributes})
            return repo

    def commit(self, repo: Repo, branch: str, message: str, changes: dict[str, Blob | None]) -> Commit:
        with self.lock:
            parent = repo.branches.get(branch)
            files = dict(repo.commits[parent].files) if parent else {}
            for path, blob in changes.items():
                if blob is None:
                    files = {p: b for p, b in files.items() if p != path and not p.startswith(path.rstrip("/") + "/")}
                else:
                    files[path] = blob
            self._counter += 1
            oid = hashlib.sha1(f"{repo.repo_id}:{parent}:{message}:{self._counter}:{time.time()}".encode()).hexdigest()
            commit = Commit(oid, parent, message, files)
            repo.commits[oid] = commit
            repo.branches[branch] = oid
            return commit

    def add_folder(self, repo_id: str, folder: Path, kind: str = "model", lfs: tuple[str, ...] = ("*.safetensors",),
                   message: str = "add files", branch: str = "main", **repo_options: Any) -> Commit:
        """Put a local folder's files into a repository (created when missing) as one commit; ``lfs``: patterns
        of files stored as large files (served through the CDN redirect)."""
        repo = self.repos.get((kind, repo_id)) or self.create_repo(repo_id, kind, **repo_options)
        changes = {}
        for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
            name = path.relative_to(folder).as_posix()
            changes[name] = self.store(path.read_bytes(), any(fnmatch.fnmatch(name, pat) for pat in lfs))
        return self.commit(repo, branch, message, changes)

    def head(self, repo_id: str, revision: str = "main", kind: str = "model") -> Commit:
        return self.repos[(kind, repo_id)].resolve(revision)

    def file(self, repo_id: str, path: str, revision: str = "main", kind: str = "model") -> bytes:
        return self.read(self.head(repo_id, revision, kind).files[path])

    def paths(self, method: str | None = None) -> list[str]:
        """Paths of the logged requests (of one method)."""
        return [r["path"] for r in self.requests if method is None or r["method"] == method]


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


class HubError(Exception):
    def __init__(self, status: int, code: str | None, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    state: HubState

    def log_message(self, *args: Any) -> None:   # quiet
        pass

    # -- plumbing -----------------------------------------------------------------
    def _dispatch(self) -> None:
        url = urlsplit(self.path)
        self.query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        self.segments = [s for s in url.path.split("/") if s]   # still percent-encoded
        length = int(self.headers.get("Content-Length") or 0)
        self.body = self.rfile.read(length) if length else b""
        self.state.requests.append({"method": self.command, "path": unquote(url.path), "host": self.headers.get("Host"),
                                    "range": self.headers.get("Range"), "auth": "Authorization" in self.headers})
        try:
            self.route()
        except HubError as err:
            headers = {"X-Error-Message": err.message}
            if err.code:
                headers["X-Error-Code"] = err.code
            self.send_json({"error": err.message}, err.status, headers)

    do_GET = do_HEAD = do_POST = do_PUT = _dispatch

    def send_json(self, data: Any, status: int = 200, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def user(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        if not auth:
            return None
        token = auth.removeprefix("Bearer ").strip()
        name = self.state.tokens.get(token)
        if name is None:
            raise HubError(401, None, "Invalid credentials in Authorization header")
        return name

    def repo(self, kind: str, repo_id: str, write: bool = False) -> Repo:
        user = self.user()
        repo = self.state.repos.get((kind, repo_id))
        visible = repo is not None and (not repo.private or user == repo.owner or repo.owner in self.state.orgs.get(user, ()))
        if not visible:
            raise HubError(404, "RepoNotFound", "Repository not found")
        if write and not self.may_write(user, repo.owner):
            raise HubError(403, None, f"You don't have the rights to write to {repo_id}")
        return repo

    def may_write(self, user: str | None, namespace: str) -> bool:
        return user is not None and (namespace == user or namespace in self.state.orgs.get(user, ()))

    def commit_at(self, repo: Repo, revision: str) -> Commit:
        commit = repo.resolve(revision)
        if commit is None:
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return commit

    def check_gate(self, repo: Repo) -> None:
        if not repo.gated:
            return
        user = self.user()
        name = f"{repo.kind} {repo.repo_id}"
        if user is None:
            raise HubError(401, "GatedRepo", f"Access to {name} is restricted. You must have access to it and be "
                                             f"authenticated to access it. Please log in.")
        if user not in repo.approved and user != repo.owner:
            raise HubError(403, "GatedRepo", f"Access to {name} is restricted and you are not in the authorized "
                                             f"list. Visit {self.base()}/{repo.repo_id} to ask for access.")

    def base(self, host: str | None = None) -> str:
        port = self.server.server_address[1]
        return f"http://{host or '127.0.0.1'}:{port}"

    # -- routes -------------------------------------------------------------------
    def route(self) -> None:
        s, m = self.segments, self.command
        if s[:1] == ["api"]:
            return self.route_api(s[1:], m)
        if s[:1] == ["cdn"] and len(s) == 2:
            return self.serve_bytes(self.state.read(self.blob_by_sha(s[1])), s[1], {})
        if s[:1] == ["lfs-upload"] and m == "PUT":
            return self.lfs_put(s[1])
        if s[:1] == ["lfs-verify"] and m == "POST":
            return self.send_json({"success": True})
        kind, rest = ("dataset", s[1:]) if s[:1] == ["datasets"] else ("model", s)
        if len(rest) == 6 and rest[-1] == "batch" and rest[1].endswith(".git"):   # {ns}/{name}.git/info/lfs/objects/batch
            return self.lfs_batch(kind, f"{rest[0]}/{rest[1][:-4]}")
        if len(rest) >= 5 and rest[2] == "resolve" and m in ("GET", "HEAD"):
            return self.resolve(kind, f"{rest[0]}/{rest[1]}", unquote(rest[3]), unquote("/".join(rest[4:])))
        raise HubError(404, None, f"no route for {m} {self.path}")

    def route_api(self, s: list[str], m: str) -> None:
        if s == ["whoami-v2"]:
            user = self.user()
            if user is None:
                raise HubError(401, None, "Invalid credentials in Authorization header")
            return self.send_json({"type": "user", "name": user, "orgs": [{"name": o} for o in self.state.orgs[user]],
                                   "auth": {"type": "access_token", "accessToken": {"role": "write"}}})
        if s == ["validate-yaml"]:
            return self.send_json({"errors": [], "warnings": []})
        if s == ["repos", "create"] and m == "POST":
            return self.create_repo(json.loads(self.body or b"{}"))
        if len(s) < 3 or s[0] not in KINDS:
            raise HubError(404, None, f"no route for {m} {self.path}")
        kind, repo_id, rest = KINDS[s[0]], f"{s[1]}/{s[2]}", s[3:]
        action = rest[0] if rest else None
        if m == "GET" and action in (None, "revision"):
            return self.info(self.repo(kind, repo_id), unquote(rest[1]) if action else "main")
        if m == "GET" and action == "tree":
            return self.tree(self.repo(kind, repo_id), unquote(rest[1]), unquote("/".join(rest[2:])))
        if m == "POST" and action == "paths-info":
            return self.paths_info(self.repo(kind, repo_id), unquote(rest[1]))
        if m == "GET" and action == "refs":
            repo = self.repo(kind, repo_id)
            return self.send_json({"branches": [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": c}
                                                for b, c in repo.branches.items()],
                                   "tags": [{"name": t, "ref": f"refs/tags/{t}", "targetCommit": c}
                                            for t, c in repo.tags.items()], "converts": []})
        if m == "POST" and action == "branch":
            return self.create_branch(self.repo(kind, repo_id, write=True), unquote(rest[1]))
        if m == "POST" and action == "preupload":
            return self.preupload(self.repo(kind, repo_id, write=True), unquote(rest[1]))
        if m == "POST" and action == "commit":
            return self.commit(self.repo(kind, repo_id, write=True), unquote(rest[1]))
        raise HubError(404, None, f"no route for {m} {self.path}")

    # -- reading ------------------------------------------------------------------
    def info(self, repo: Repo, revision: str) -> None:
        commit = self.commit_at(repo, revision)
        blobs = self.query.get("blobs") in ("True", "true", "1")
        siblings = [{"rfilename": p, **({"size": b.size, "blobId": b.oid} if blobs else {})}
                    for p, b in sorted(commit.files.items())]
        self.send_json({"id": repo.repo_id, "_id": repo.repo_id, "author": repo.owner, "sha": commit.oid,
                        "private": repo.private, "gated": repo.gated, "disabled": False, "tags": [],
                        "lastModified": "2026-01-01T00:00:00.000Z", "siblings": siblings})

    def entry(self, path: str, blob: Blob) -> dict[str, Any]:
        item = {"type": "file", "path": path, "size": blob.size, "oid": blob.oid}
        if blob.lfs:
            item["lfs"] = {"oid": blob.sha256, "size": blob.size, "pointerSize": len(lfs_pointer(blob.sha256, blob.size))}
        return item

    def listing(self, commit: Commit, under: str, recursive: bool) -> list[dict[str, Any]]:
        prefix = under.strip("/") + "/" if under.strip("/") else ""
        files, folders = [], set()
        for path, blob in sorted(commit.files.items()):
            if not path.startswith(prefix):
                continue
            rest = path[len(prefix):].split("/")
            for depth in range(1, len(rest)):
                if recursive or depth == 1:
                    folders.add(prefix + "/".join(rest[:depth]))
            if recursive or len(rest) == 1:
                files.append(self.entry(path, blob))
        dirs = [{"type": "directory", "path": d, "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0}
                for d in sorted(folders)]
        return dirs + files

    def tree(self, repo: Repo, revision: str, under: str) -> None:
        commit = self.commit_at(repo, revision)
        if under and not any(p == under or p.startswith(under.rstrip("/") + "/") for p in commit.files):
            raise HubError(404, "EntryNotFound", f"{under} does not exist on {revision}")
        self.send_json(self.listing(commit, under, self.query.get("recursive") in ("True", "true", "1")))

    def paths_info(self, repo: Repo, revision: str) -> None:
        commit = self.commit_at(repo, revision)
        ctype = self.headers.get("Content-Type", "")
        if "json" in ctype:
            wanted = json.loads(self.body or b"{}").get("paths", [])
        else:
            wanted = parse_qs(self.body.decode()).get("paths", [])
        out = []
        for path in wanted:
            path = path.strip("/")
            if path in commit.files:
                out.append(self.entry(path, commit.files[path]))
            elif any(p.startswith(path + "/") for p in commit.files) or path == "":
                out.append({"type": "directory", "path": path, "oid": hashlib.sha1(path.encode()).hexdigest(), "size": 0})
        self.send_json(out)

    def resolve(self, kind: str, repo_id: str, revision: str, path: str) -> None:
        repo = self.repo(kind, repo_id)
        commit = self.commit_at(repo, revision)
        self.check_gate(repo)   # as on the Hub: a gated repository's files, present or not, are behind the gate
        blob = commit.files.get(path)
        if blob is None:
            raise HubError(404, "EntryNotFound", f"{path} does not exist on {revision}")
        headers = {"X-Repo-Commit": commit.oid}
        if blob.lfs:
            headers.update({"X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": str(blob.size),
                            "ETag": f'"{blob.oid}"', "Location": f"{self.base('localhost')}/cdn/{blob.sha256}"})
            self.send_response(302)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.serve_bytes(self.state.read(blob), path, {**headers, "ETag": f'"{blob.oid}"'})

    def blob_by_sha(self, sha: str) -> Blob:
        for repo in self.state.repos.values():
            for commit in repo.commits.values():
                for blob in commit.files.values():
                    if blob.sha256 == sha:
                        return blob
        raise HubError(404, None, "no such object")

    def serve_bytes(self, data: bytes, name: str, headers: dict[str, str]) -> None:
        """The content, or the part a ``Range: bytes=N-`` asks for; a planned fault cuts it short once."""
        start = 0
        wanted = self.headers.get("Range", "")
        if wanted.startswith("bytes="):
            start = int(wanted[6:].split("-")[0] or 0)
        part = data[start:]
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(part)))
        self.send_header("Accept-Ranges", "bytes")
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command == "HEAD":
            return
        cut = self.state.drop_once.pop(name, None) if self.command == "GET" else None
        if cut is not None:
            self.wfile.write(part[:cut])
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)   # the peer sees the body end early, as on a dropped connection
            return
        self.wfile.write(part)

    # -- writing ------------------------------------------------------------------
    def create_repo(self, payload: dict[str, Any]) -> None:
        user = self.user()
        namespace = payload.get("organization") or user
        repo_id = f"{namespace}/{payload['name']}"
        kind = payload.get("type") or "model"
        if not self.may_write(user, namespace):
            raise HubError(403 if user else 401, None, f"You don't have the rights to create a repo under {namespace}")
        prefix = "" if kind == "model" else f"{kind}s/"
        url = f"{self.base()}/{prefix}{repo_id}"
        if (kind, repo_id) in self.state.repos:   # the Hub answers 409 with the repository's url
            message = "You already created this model repo"
            return self.send_json({"error": message, "url": url}, 409, {"X-Error-Message": message})
        private = payload.get("visibility", "private" if payload.get("private") else "public") == "private"
        self.state.create_repo(repo_id, kind, owner=namespace, private=private)
        self.send_json({"url": url, "name": repo_id, "id": repo_id})

    def create_branch(self, repo: Repo, branch: str) -> None:
        if branch in repo.branches:
            raise HubError(409, None, f"Branch {branch} already exists")
        start = json.loads(self.body or b"{}").get("startingPoint") or "main"
        with self.state.lock:
            repo.branches[branch] = self.commit_at(repo, start).oid
        self.send_json({})

    def preupload(self, repo: Repo, revision: str) -> None:
        files = json.loads(self.body)["files"]
        commit = repo.resolve(revision)
        threshold = self.state.lfs_threshold
        out = []
        for f in files:
            lfs = threshold is not None and f["size"] >= threshold
            there = commit.files.get(f["path"]) if commit else None
            oid = None if there is None else (there.sha256 if there.lfs else there.oid)
            out.append({"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                        "oid": oid})
        self.send_json({"files": out, "commitOid": commit.oid if commit else None})

    def commit(self, repo: Repo, revision: str) -> None:
        if self.state.refuse_commits is not None:
            status, message = self.state.refuse_commits
            raise HubError(status, None, message)
        lines = [json.loads(line) for line in self.body.splitlines() if line.strip()]
        header = next(x["value"] for x in lines if x["key"] == "header")
        changes: dict[str, Blob | None] = {}
        for item in lines:
            key, value = item["key"], item["value"]
            if key == "file":
                changes[value["path"]] = self.state.store(base64.b64decode(value["content"]), lfs=False)
            elif key == "lfsFile":
                path = self.state.root / "blobs" / value["oid"]
                if not path.exists():
                    raise HubError(400, None, f"LFS object {value['oid']} was never uploaded")
                changes[value["path"]] = self.state.store(path.read_bytes(), lfs=True)
            elif key in ("deletedFile", "deletedFolder"):
                changes[value["path"]] = None
        if revision not in repo.branches:
            raise HubError(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        commit = self.state.commit(repo, revision, header["summary"], changes)
        prefix = "" if repo.kind == "model" else f"{repo.kind}s/"
        self.send_json({"success": True, "commitOid": commit.oid,
                        "commitUrl": f"{self.base()}/{prefix}{repo.repo_id}/commit/{commit.oid}"})

    def lfs_batch(self, kind: str, repo_id: str) -> None:
        self.repo(kind, repo_id, write=True)
        request = json.loads(self.body)
        objects = []
        for obj in request["objects"]:
            item = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
            if not (self.state.root / "blobs" / obj["oid"]).exists():
                item["actions"] = {"upload": {"href": f"{self.base()}/lfs-upload/{obj['oid']}"},
                                   "verify": {"href": f"{self.base()}/lfs-verify/{obj['oid']}"}}
            objects.append(item)
        self.send_json({"transfer": "basic", "objects": objects})

    def lfs_put(self, oid: str) -> None:
        if hashlib.sha256(self.body).hexdigest() != oid:
            raise HubError(400, None, "content does not match its oid")
        (self.state.root / "blobs" / oid).write_bytes(self.body)
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()


class HubServer:
    """``with HubServer(folder) as hub: hub.url ...``: a local Hub on 127.0.0.1, on a free port."""

    def __init__(self, root: Path) -> None:
        self.state = HubState(root)
        handler = type("BoundHandler", (Handler,), {"state": self.state})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.url = self.state.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> HubState:
        self.thread.start()
        return self.state

    def __exit__(self, *exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


# -- pointing the real client at it --------------------------------------------------------------

TOKEN = "hf_alice_write_token_do_not_print"   # alice's token: she writes to alice/* and acme/*


def client_settings(url: str, home: Path, offline: bool = False) -> dict[str, str]:
    """The environment a process needs to use this Hub with its own cache (for a subprocess)."""
    return {"HF_ENDPOINT": url, "HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"),
            "HF_HUB_OFFLINE": "1" if offline else "0", "HF_DATASETS_OFFLINE": "1" if offline else "0",
            "HF_HUB_DISABLE_TELEMETRY": "1"}


def patch_client(monkeypatch: Any, url: str, home: Path, offline: bool = False) -> None:
    """Point this process's huggingface_hub and datasets at ``url`` with the cache in ``home``.

    Both libraries read their HF_* settings once, when imported; a test process imported them long before,
    so the values they read are patched here (and the environment set too, for code that reads it later).
    """
    import datasets
    from huggingface_hub import constants

    for key, value in client_settings(url, home, offline).items():
        monkeypatch.setenv(key, value)
    values = {"ENDPOINT": url, "HUGGINGFACE_CO_URL_TEMPLATE": url + "/{repo_id}/resolve/{revision}/{filename}",
              "HF_HUB_OFFLINE": offline, "HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub"),
              "HUGGINGFACE_HUB_CACHE": str(home / "hub"), "HF_ASSETS_CACHE": str(home / "assets"),
              "HF_TOKEN_PATH": str(home / "token"), "HF_STORED_TOKENS_PATH": str(home / "stored_tokens")}
    for key, value in values.items():
        monkeypatch.setattr(constants, key, value)
    from huggingface_hub import hf_api

    monkeypatch.setattr(hf_api.api, "endpoint", url)   # the instance behind huggingface_hub.file_exists & co.
    cache = home / "datasets"
    for key, value in {"HF_ENDPOINT": url, "HUB_DATASETS_URL": url + "/datasets/{repo_id}/resolve/{revision}/{path}",
                       "HF_HUB_OFFLINE": offline, "HF_DATASETS_OFFLINE": offline, "HF_CACHE_HOME": str(home),
                       "HF_DATASETS_CACHE": cache, "DOWNLOADED_DATASETS_PATH": cache / "downloads",
                       "EXTRACTED_DATASETS_PATH": cache / "downloads" / "extracted",
                       "HF_MODULES_CACHE": home / "modules"}.items():
        monkeypatch.setattr(datasets.config, key, value)
