"""A model hub on loopback that serves local folders as model repos, so that vidsynth's download code runs against a
real HTTP server in tests. It answers the part of the Hugging Face hub's HTTP API that huggingface_hub's
`model_info`, `list_repo_tree` and file downloads use (point huggingface_hub at it with HF_ENDPOINT, read when it is
imported), and the part of the ModelScope hub's that the modelscope client's `snapshot_download` uses: a repo's file
listing and file downloads (MODELSCOPE_ENDPOINT)."""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional
from urllib.parse import parse_qs, unquote, urlsplit


class FakeHub:
    def __init__(self, repos: dict[str, Path]):
        self.repos = {repo_id: Path(folder) for repo_id, folder in repos.items()}
        self.downloads: list[str] = []  # "owner/name/path" of every file body served, in order
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def downloaded(self, repo_id: str) -> set[str]:
        with self.lock:
            return {entry[len(repo_id) + 1:] for entry in self.downloads if entry.startswith(f"{repo_id}/")}

    def __enter__(self) -> "FakeHub":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def files(self, repo_id: str) -> list[str]:
        root = self.repos[repo_id]
        return sorted(path.relative_to(root).as_posix() for path in root.rglob("*") if path.is_file())

    @staticmethod
    def commit(repo_id: str) -> str:
        return hashlib.sha1(repo_id.encode()).hexdigest()

    def _handler(self):
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                self._answer(body=True)

            def do_HEAD(self):
                self._answer(body=False)

            def _answer(self, body: bool):
                url = urlsplit(self.path)
                parts = [unquote(part) for part in url.path.strip("/").split("/")]
                if parts[:3] == ["api", "v1", "models"] and len(parts) >= 6:
                    return self._modelscope("/".join(parts[3:5]), parts[5:], parse_qs(url.query), body)
                if parts[:2] == ["api", "models"] and len(parts) >= 4:
                    repo_id, route = "/".join(parts[2:4]), (parts[4:] or ["revision"])[0]
                    if repo_id not in hub.repos:
                        return self._not_found()
                    if route == "revision":
                        files = hub.files(repo_id)
                        return self._json({"id": repo_id, "modelId": repo_id, "sha": hub.commit(repo_id),
                                           "private": False, "siblings": [{"rfilename": name} for name in files]})
                    if route == "tree":
                        root = hub.repos[repo_id]
                        under = "/".join(parts[6:])
                        entries = [{"type": "file", "path": name, "size": (root / name).stat().st_size,
                                    "oid": hashlib.sha1((root / name).read_bytes()).hexdigest()}
                                   for name in hub.files(repo_id) if name.startswith(under)]
                        return self._json(entries)
                if len(parts) >= 5 and parts[2] == "resolve":
                    repo_id, name = "/".join(parts[:2]), "/".join(parts[4:])
                    if repo_id not in hub.repos or not (hub.repos[repo_id] / name).is_file():
                        return self._not_found()
                    return self._file(repo_id, name, body, {"X-Repo-Commit": hub.commit(repo_id)})
                self._not_found()

            def _modelscope(self, repo_id: str, route: list[str], query: dict, body: bool):
                if repo_id not in hub.repos:
                    return self._not_found()
                root = hub.repos[repo_id]
                if route == ["repo", "files"]:
                    files = [{"Name": name.rsplit("/", 1)[-1], "Path": name, "Type": "blob", "IsLFS": True,
                              "Size": (root / name).stat().st_size, "Revision": hub.commit(repo_id),
                              "Sha256": hashlib.sha256((root / name).read_bytes()).hexdigest()}
                             for name in hub.files(repo_id)]
                    return self._json({"Code": 200, "Success": True, "Data": {"Files": files}})
                name = query.get("FilePath", [""])[0]
                if route == ["repo"] and (root / name).is_file():
                    return self._file(repo_id, name, body)
                self._not_found()

            def _file(self, repo_id: str, name: str, body: bool, headers: Optional[dict] = None):
                data = (hub.repos[repo_id] / name).read_bytes()
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                for key, value in (headers or {}).items():
                    self.send_header(key, value)
                self.end_headers()
                if body:
                    with hub.lock:
                        hub.downloads.append(f"{repo_id}/{name}")
                    self.wfile.write(data)

            def _json(self, value):
                data = json.dumps(value).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _not_found(self):
                data = json.dumps({"error": "Repository not found"}).encode()
                self.send_response(404)
                self.send_header("Content-Type", "application/json")
                self.send_header("X-Error-Code", "RepoNotFound")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

        return Handler
