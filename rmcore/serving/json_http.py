"""What rmcore's HTTP servers share: the standard library's threading server, JSON in and out, and bad requests
answered as 4xx with a JSON message that names the field, never a crash.

Why the standard library and not FastAPI + uvicorn (OpenRLHF's serve_rm): the servers answer one researcher's
loop or a few annotators, where a thread per request is plenty; the model is used by one request at a time anyway
(a lock; rewards must not depend on what else arrived), and no dependency joins the core install.
"""
from __future__ import annotations

import json
import signal
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

MAX_BODY_BYTES = 32 * 2**20


class RequestError(Exception):
    """A request the server cannot answer: an HTTP status (4xx) and a message that names what was wrong."""

    def __init__(self, status: int, message: str, field: str | None = None):
        super().__init__(message)
        self.status, self.message, self.field = status, message, field


class JSONHandler(BaseHTTPRequestHandler):
    """Routes (method, path) -> a method name that takes (query, body) and returns (status, JSON object) or
    (status, bytes, content type). RequestError becomes its 4xx; anything else a 500 naming the exception."""

    routes: dict[tuple[str, str], str] = {}
    quiet = True
    protocol_version = "HTTP/1.1"  # keep-alive: a loop's client reuses its connection

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def _dispatch(self, method: str):
        url = urlparse(self.path)
        try:
            name = self.routes.get((method, url.path))
            if name is None:
                known = ", ".join(f"{m} {p}" for m, p in self.routes)
                if any(p == url.path for _, p in self.routes):
                    raise RequestError(405, f"{method} {url.path}: method not allowed; this server answers {known}")
                raise RequestError(404, f"{method} {url.path}: no such endpoint; this server answers {known}")
            body = self._read_json() if method == "POST" else None
            answer = getattr(self, name)({k: v[-1] for k, v in parse_qs(url.query).items()}, body)
        except RequestError as e:
            self._drain()
            answer = (e.status, {"error": e.message, **({"field": e.field} if e.field else {})})
        except Exception as e:  # a bug or a failing model: the request fails, the server goes on
            print(f"error answering {method} {self.path}: {type(e).__name__}: {e}", file=sys.stderr)
            answer = (500, {"error": f"{type(e).__name__}: {e}"})
        if len(answer) == 3:
            self._send(answer[0], answer[1], answer[2])
        else:
            self._send(answer[0], json.dumps(answer[1]).encode(), "application/json")

    def _read_json(self) -> dict:
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise RequestError(411, "a POST needs a Content-Length header")
        if int(length) > MAX_BODY_BYTES:
            raise RequestError(413, f"request body of {int(length)} bytes; the limit is {MAX_BODY_BYTES}")
        raw = self.rfile.read(int(length))
        self._read = True
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise RequestError(400, f"the body is not JSON: {e}") from None
        if not isinstance(body, dict):
            raise RequestError(400, f"the body must be a JSON object, got {type(body).__name__}")
        return body

    def _drain(self):
        """Read an unread body, so a refused request leaves the connection usable."""
        length = self.headers.get("Content-Length", "")
        if not getattr(self, "_read", False) and length.isdigit() and int(length) <= MAX_BODY_BYTES:
            self.rfile.read(int(length))
        self._read = False

    def _send(self, status: int, body: bytes, content_type: str):
        self._read = False
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):
        if not self.quiet:
            super().log_message(format, *args)


def field(body: dict, name: str, kind: type, what: str):
    """body[name], which must be a `kind` (`what` says so in the 400 that names the field)."""
    if name not in body:
        raise RequestError(400, f"missing field {name!r}: expected {what}", name)
    value = body[name]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise RequestError(400, f"field {name!r} must be {what}, got {type(value).__name__}", name)
    return value


def start(handler: type[JSONHandler], host: str, port: int) -> tuple[ThreadingHTTPServer, threading.Thread]:
    """A threading server for `handler` on host:port (port 0: any free one), serving from a daemon thread."""
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True, name=f"http {host}:{port}")
    thread.start()
    return server, thread


def address(server: ThreadingHTTPServer) -> str:
    host, port = server.server_address[:2]
    return f"http://{host}:{port}"


def serve_until_interrupted(server: ThreadingHTTPServer, thread: threading.Thread, what: str):
    """Serve until Ctrl-C or SIGTERM. Both handlers are set here: a process started in the background by a
    non-interactive shell inherits SIGINT ignored, and a service manager stops a server with SIGTERM."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    print(f"{what} at {address(server)} (Ctrl-C stops it)", flush=True)
    try:
        while thread.is_alive():
            thread.join(0.5)
    except KeyboardInterrupt:
        print("stopped")
    finally:
        server.shutdown()
        server.server_close()
