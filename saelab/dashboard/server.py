"""`saelab serve SITE`: the dashboard over HTTP on 127.0.0.1 only, with the live prompt view.

The standard library's threading HTTP server serves the site's files read-only and answers one JSON endpoint,
`POST /api/analyze {"text": ...}`, with `PromptAnalyzer.analyze`. Every response carries a strict Content Security
Policy (`default-src 'self'`, no inline script or style), so even a token that somehow became markup could not run.
Requests must name this server in `Host` (no DNS rebinding) and, for the API, send JSON from this origin.
"""

from __future__ import annotations

import json
import mimetypes
import threading
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from saelab.errors import SaelabError

HOST = "127.0.0.1"
MAX_BODY = 64 * 1024
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
}


class DashboardServer(ThreadingHTTPServer):
    """Serves one site folder; `analyzer` is built on the first live request (loading a model takes a while)."""

    daemon_threads = True

    def __init__(self, site: Path, port: int, analyzer: Callable[[], Any] | Any | None) -> None:
        super().__init__((HOST, port), _Handler)
        self.site = Path(site).resolve()
        self._analyzer = analyzer
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.server_address[1]}/"

    def analyze(self, text: str) -> dict[str, Any]:
        with self._lock:  # one model, one forward pass at a time
            if self._analyzer is None:
                raise SaelabError("this site has no model attached for the live view; rebuild it with saelab dashboard")
            if callable(self._analyzer) and not hasattr(self._analyzer, "analyze"):
                self._analyzer = self._analyzer()
            return self._analyzer.analyze(text)


class _Handler(BaseHTTPRequestHandler):
    server: DashboardServer
    server_version = "saelab"
    sys_version = ""

    def log_message(self, format: str, *args: Any) -> None:  # quiet: the CLI prints the URL once
        pass

    def _headers(self, status: int, content_type: str, length: int) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(length))
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("X-Frame-Options", "DENY")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()

    def _send(self, status: int, body: bytes, content_type: str, head: bool = False) -> None:
        self._headers(status, content_type, len(body))
        if not head:
            self.wfile.write(body)

    def _json(self, status: int, data: Any) -> None:
        self._send(status, json.dumps(data, allow_nan=False).encode(), "application/json; charset=utf-8")

    def _host_ok(self) -> bool:
        port = self.server.server_address[1]
        return self.headers.get("Host") in (f"{HOST}:{port}", f"localhost:{port}")

    def do_GET(self, head: bool = False) -> None:
        if not self._host_ok():
            return self._send(HTTPStatus.MISDIRECTED_REQUEST, b"unknown host", "text/plain", head)
        path = unquote(urlsplit(self.path).path)
        if path.endswith("/"):
            path += "index.html"
        site = self.server.site
        file = (site / path.lstrip("/")).resolve()
        if (
            not file.is_relative_to(site)
            or not file.is_file()
            or any(p.startswith(".") for p in file.relative_to(site).parts)
        ):
            return self._send(HTTPStatus.NOT_FOUND, b"not found", "text/plain", head)
        content_type = TYPES.get(file.suffix) or mimetypes.guess_type(file.name)[0] or "application/octet-stream"
        self._send(HTTPStatus.OK, file.read_bytes(), content_type, head)

    def do_HEAD(self) -> None:
        self.do_GET(head=True)

    def do_POST(self) -> None:
        if not self._host_ok():
            return self._json(HTTPStatus.MISDIRECTED_REQUEST, {"error": "unknown host"})
        if urlsplit(self.path).path != "/api/analyze":
            return self._json(HTTPStatus.NOT_FOUND, {"error": "no such endpoint"})
        port = self.server.server_address[1]
        if self.headers.get("Origin") not in (None, f"http://{HOST}:{port}", f"http://localhost:{port}"):
            return self._json(HTTPStatus.FORBIDDEN, {"error": "cross-origin requests are refused"})
        if not (self.headers.get("Content-Type") or "").startswith("application/json"):
            return self._json(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, {"error": "send the prompt as application/json"})
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 < length <= MAX_BODY:
            return self._json(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": f"the request body must be 1..{MAX_BODY} bytes"}
            )
        try:
            body = json.loads(self.rfile.read(length))
            text = body["text"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            return self._json(HTTPStatus.BAD_REQUEST, {"error": 'send {"text": "..."} as JSON'})
        try:
            result = self.server.analyze(text)
        except SaelabError as err:
            return self._json(HTTPStatus.BAD_REQUEST, {"error": str(err)})
        self._json(HTTPStatus.OK, result)


def make_server(site: Path | str, port: int = 8000, analyzer: Callable[[], Any] | Any | None = None) -> DashboardServer:
    """A server for `site` on 127.0.0.1:port (0 picks a free port); call `serve_forever()` to run it."""
    from saelab.dashboard.site import read_site

    read_site(site)
    try:
        return DashboardServer(Path(site), port, analyzer)
    except OSError as err:
        raise SaelabError(f"cannot listen on {HOST}:{port} ({err.strerror}); pick another --port") from None
