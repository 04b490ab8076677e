"""A stand-in for the Hugging Face Hub on 127.0.0.1, for the tests only: it answers the endpoints huggingface_hub
calls to download a snapshot (repo info, the recursive tree listing, HEAD and GET of resolve/), with the Hub's
error codes, so rmcore's own download path runs unchanged against it (HF_ENDPOINT points here).

    hub = HubServer().start()
    commit = hub.add("org/name", {"config.json": b"...", ...})        # a model repo; kind="dataset" for datasets
    hub.broken.add(("org/name", "model.safetensors"))                # its body is cut off mid-download
"""
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse


class HubServer:
    def __init__(self):
        self.repos: dict[tuple[str, str], dict] = {}  # (kind, repo id) -> {"refs": {}, "commits": {}, "gated": bool}
        self.broken: set[tuple[str, str]] = set()     # (repo id, path) whose download fails half way
        self.token = "hf_test_token"                  # what a gated repo accepts
        self.requests: list[str] = []
        self._server = None

    def add(self, repo: str, files: dict[str, bytes], *, kind: str = "model", ref: str = "main",
            gated: bool = False) -> str:
        """A new commit of `repo` holding `files`, which `ref` now names; returns its hash."""
        entry = self.repos.setdefault((kind, repo), {"refs": {}, "commits": {}, "gated": gated})
        digest = hashlib.sha1(repr((repo, len(entry["commits"]), sorted(
            (p, hashlib.sha1(b).hexdigest()) for p, b in files.items()))).encode()).hexdigest()
        entry["commits"][digest] = dict(files)
        entry["refs"][ref] = digest
        return digest

    def start(self) -> "HubServer":
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def stop(self):
        self._server.shutdown()
        self._server.server_close()


def _handler(hub: HubServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        def do_HEAD(self):
            self._serve(body=False)

        def do_GET(self):
            self._serve(body=True)

        def _serve(self, body: bool):
            hub.requests.append(f"{self.command} {self.path}")
            parts = [unquote(p) for p in urlparse(self.path).path.strip("/").split("/")]
            if parts[0] == "api" and len(parts) >= 6 and parts[4] in ("revision", "tree"):
                kind = {"models": "model", "datasets": "dataset"}.get(parts[1])
                return self._api(kind, f"{parts[2]}/{parts[3]}", parts[4], parts[5], body)
            kind = "model"
            if parts[0] == "datasets":
                kind, parts = "dataset", parts[1:]
            if len(parts) >= 5 and parts[2] == "resolve":
                return self._file(kind, f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]), body)
            self._error(404, "RepoNotFound", "not an endpoint of this stand-in", body)

        def _lookup(self, kind, repo, revision, body):
            """(repo entry, commit hash), or None after answering with the Hub's error."""
            entry = hub.repos.get((kind, repo))
            if entry is None:
                return self._error(404, "RepoNotFound", f"Repository not found: {repo}", body)
            if entry["gated"] and self.headers.get("Authorization") != f"Bearer {hub.token}":
                return self._error(401, "GatedRepo", f"Access to model {repo} is restricted", body)
            commit = entry["refs"].get(revision, revision if revision in entry["commits"] else None)
            if commit is None:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}", body)
            return entry, commit

        def _api(self, kind, repo, what, revision, body):
            found = self._lookup(kind, repo, revision, body)
            if found is None:
                return
            entry, commit = found
            files = entry["commits"][commit]
            if what == "revision":
                payload = {"id": repo, "sha": commit, "private": False, "gated": entry["gated"],
                           "siblings": [{"rfilename": p} for p in sorted(files)]}
            else:
                payload = [{"type": "file", "path": p, "size": len(b), "oid": hashlib.sha1(b).hexdigest()}
                           for p, b in sorted(files.items())]
            self._send(200, json.dumps(payload).encode(), {"Content-Type": "application/json"}, body)

        def _file(self, kind, repo, revision, path, body):
            found = self._lookup(kind, repo, revision, body)
            if found is None:
                return
            entry, commit = found
            data = entry["commits"][commit].get(path)
            if data is None:
                return self._error(404, "EntryNotFound", f"{path} does not exist at {revision}", body)
            headers = {"X-Repo-Commit": commit, "ETag": f'"{hashlib.sha1(data).hexdigest()}"',
                       "Content-Type": "application/octet-stream"}
            if (repo, path) in hub.broken and body:
                if self.headers.get("Range"):  # the resumed download finds the server still failing
                    return self._error(503, None, "Service unavailable", body)
                self.send_response(200)
                for k, v in {**headers, "Content-Length": str(len(data))}.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(data[:len(data) // 2])  # half the body, then the connection drops
                self.wfile.flush()
                self.close_connection = True
                return
            start = int(self.headers["Range"].split("=")[1].split("-")[0]) if self.headers.get("Range") else 0
            status = 206 if start else 200
            self._send(status, data[start:], headers, body, size=len(data) - start)

        def _error(self, status, code, message, body):
            headers = {"X-Error-Message": message, "Content-Type": "application/json"}
            if code:
                headers["X-Error-Code"] = code
            self._send(status, json.dumps({"error": message}).encode(), headers, body)

        def _send(self, status, data, headers, body, size=None):
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(data) if size is None else size))
            self.end_headers()
            if body:
                self.wfile.write(data)

    return Handler
