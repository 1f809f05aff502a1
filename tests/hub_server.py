"""A local stand-in for the Hugging Face Hub's HTTP API: enough of it for huggingface_hub to create a repo and
commit files (regular files inline, *.safetensors and *.png through the LFS batch API, as the Hub's default
.gitattributes has it), read a repo's visibility and files, create branches and check a card's metadata. Files
are kept per repo, not per branch. It records every request, for tests to assert."""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import yaml

LFS_SUFFIXES = (".safetensors", ".png")


@dataclass
class FakeHub:
    """State of the fake Hub; `refuse` maps a request kind (whoami, create, commit) to the status to answer."""

    token: str
    account: str = "tester"
    refuse: dict[str, int] = field(default_factory=dict)
    requests: list[tuple[str, str, str | None]] = field(default_factory=list)  # method, path, authorization
    repos: dict[str, dict[str, Any]] = field(default_factory=dict)  # repo id -> {"private": bool}
    files: dict[str, dict[str, bytes]] = field(default_factory=dict)  # repo id -> path -> content
    commits: list[dict[str, Any]] = field(default_factory=list)
    lfs_objects: dict[str, bytes] = field(default_factory=dict)  # sha256 -> content
    branches: set[tuple[str, str]] = field(default_factory=set)
    token_role: str = "write"
    cards_checked: int = 0
    url: str = ""

    def request_bodies(self) -> list[str]:
        """Everything clients sent, decoded loosely, for asserting that a secret never left the machine."""
        return [json.dumps(commit) for commit in self.commits] + [
            content.decode("utf-8", "replace") for repo in self.files.values() for content in repo.values()
        ]


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:  # quiet
            pass

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _send(self, status: int, payload: Any = None, headers: dict[str, str] | None = None) -> None:
            body = json.dumps(payload if payload is not None else {}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(body)

        def _error(self, status: int, message: str) -> None:
            self._send(status, {"error": message}, {"X-Error-Message": message})

        def _authorized(self, kind: str) -> bool:
            if self.headers.get("Authorization") != f"Bearer {hub.token}":
                self._error(401, "Invalid credentials in Authorization header")
                return False
            if kind in hub.refuse:
                self._error(hub.refuse[kind], f"You don't have the rights to {kind} here")
                return False
            return True

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            hub.requests.append(("GET", self.path, self.headers.get("Authorization")))
            if self.path == "/api/whoami-v2":
                if self._authorized("whoami"):
                    auth = {"type": "access_token", "accessToken": {"role": hub.token_role}}
                    self._send(200, {"type": "user", "name": hub.account, "orgs": [{"name": "team"}], "auth": auth})
                return
            if self.path.startswith("/api/models/"):
                repo_id = "/".join(self.path.removeprefix("/api/models/").split("/")[:2])
                if repo_id not in hub.repos:
                    self._error(404, "Repository not found")
                    return
                siblings = [{"rfilename": name} for name in hub.files[repo_id]]
                self._send(200, {"id": repo_id, "private": hub.repos[repo_id]["private"], "siblings": siblings})
                return
            self._error(404, f"fake hub: no route GET {self.path}")

        def do_PUT(self) -> None:  # noqa: N802
            hub.requests.append(("PUT", self.path, self.headers.get("Authorization")))
            body = self._body()
            if self.path.startswith("/lfs-upload/"):
                oid = self.path.rsplit("/", 1)[1]
                if hashlib.sha256(body).hexdigest() != oid:
                    self._error(400, "sha256 mismatch")
                    return
                hub.lfs_objects[oid] = body
                self._send(200)
                return
            self._error(404, f"fake hub: no route PUT {self.path}")

        def do_POST(self) -> None:  # noqa: N802
            hub.requests.append(("POST", self.path, self.headers.get("Authorization")))
            body = self._body()
            path = self.path.split("?", 1)[0]
            if path == "/api/validate-yaml":
                self._validate_card(json.loads(body)["content"])
            elif path.startswith("/api/models/") and "/branch/" in path:
                repo_id, branch = path.removeprefix("/api/models/").split("/branch/")
                hub.branches.add((repo_id, branch))
                self._send(200, {})
            elif path == "/api/repos/create":
                self._create(json.loads(body))
            elif path.endswith(".git/info/lfs/objects/batch"):
                self._lfs_batch(json.loads(body))
            elif path.startswith("/api/models/") and "/preupload/" in path:
                files = json.loads(body)["files"]
                modes = [
                    {
                        "path": file["path"],
                        "uploadMode": "lfs" if file["path"].endswith(LFS_SUFFIXES) else "regular",
                        "shouldIgnore": False,
                    }
                    for file in files
                ]
                self._send(200, {"files": modes, "commitOid": "0" * 40})
            elif path.startswith("/api/models/") and "/commit/" in path:
                self._commit(path, body)
            else:
                self._error(404, f"fake hub: no route POST {self.path}")

        def _validate_card(self, content: str) -> None:
            # The Hub's check, roughly: a YAML mapping between --- lines whose tags are a list of strings.
            try:
                metadata = yaml.safe_load(content.split("---\n")[1]) if content.startswith("---\n") else {}
                valid = isinstance(metadata, dict) and all(isinstance(tag, str) for tag in metadata.get("tags", []))
            except yaml.YAMLError:
                valid = False
            hub.cards_checked += 1
            if valid:
                self._send(200, {})
            else:
                self._error(400, "Invalid metadata in README.md")

        def _create(self, payload: dict[str, Any]) -> None:
            if not self._authorized("create"):
                return
            repo_id = f"{payload.get('organization') or hub.account}/{payload['name']}"
            if repo_id in hub.repos:  # the Hub names the existing repo in its 409 answer
                self._send(409, {"error": "You already created this model repo", "url": f"{hub.url}/{repo_id}"})
                return
            # huggingface_hub 2.x sends "visibility"; older clients sent "private".
            private = payload["visibility"] == "private" if "visibility" in payload else payload.get("private")
            hub.repos[repo_id] = {"private": private}
            hub.files[repo_id] = {}
            self._send(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id, "id": repo_id})

        def _lfs_batch(self, payload: dict[str, Any]) -> None:
            objects = []
            for item in payload["objects"]:
                entry = {"oid": item["oid"], "size": item["size"]}
                if item["oid"] not in hub.lfs_objects:
                    entry["actions"] = {"upload": {"href": f"{hub.url}/lfs-upload/{item['oid']}", "header": {}}}
                objects.append(entry)
            self._send(200, {"transfer": "basic", "objects": objects})

        def _commit(self, path: str, body: bytes) -> None:
            if not self._authorized("commit"):
                return
            repo_id = path.removeprefix("/api/models/").split("/commit/")[0]
            if repo_id not in hub.repos:
                self._error(404, "Repository not found")
                return
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            repo_id, revision = repo_id, path.split("/commit/")[1]
            commit: dict[str, Any] = {"repo": repo_id, "revision": revision, "files": [], "deleted": []}
            for line in lines:
                value = line["value"]
                if line["key"] == "header":
                    commit["summary"] = value["summary"]
                elif line["key"] == "file":
                    hub.files[repo_id][value["path"]] = base64.b64decode(value["content"])
                    commit["files"].append(value["path"])
                elif line["key"] == "lfsFile":
                    hub.files[repo_id][value["path"]] = hub.lfs_objects[value["oid"]]
                    commit["files"].append(value["path"])
                elif line["key"] == "deletedFile":
                    hub.files[repo_id].pop(value["path"])
                    commit["deleted"].append(value["path"])
            hub.commits.append(commit)
            oid = hashlib.sha1(body).hexdigest()
            self._send(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{oid}", "commitOid": oid})

    return Handler


class FakeHubServer:
    """Serve a FakeHub on 127.0.0.1 in a thread; use as a context manager."""

    def __init__(self, hub: FakeHub) -> None:
        self.hub = hub
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
        hub.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self.hub

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
