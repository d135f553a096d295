"""`saelab serve SITE`: the dashboard over HTTP on 127.0.0.1 only, with the live prompt view.

The standard library's threading HTTP server serves the site's files read-only and answers one JSON endpoint,
`POST /api/analyze {"text": ...}`, with `PromptAnalyzer.analyze`. Every response carries a strict Content Security
Policy (`default-src 'self'`, no inline script or style), so even a token that somehow became markup could not run.
Requests must name this server in `Host` (no DNS rebinding) and, for the API, send JSON from this origin.

Another page open in the same browser (any other origin, including another port on localhost, which browsers
count as the same *site*) cannot read the data either: every response says `Cross-Origin-Resource-Policy:
same-origin`, and a file requested by another origin or site as a subresource (`Sec-Fetch-Site` other than
`same-origin`/`none`, outside a navigation) is refused, so `<script src=".../data/latents/0.js">` on an attacker's
page gets a 403. Every response, errors included, carries the same security headers; a malformed request (an
undecodable path, a body that is not the JSON asked for, nested too deep, …) gets a 400 with a JSON error, and an
unexpected failure a 500 with one line, never a dropped connection. Sockets time out, so stalled clients cannot
hold threads. `site.json` (machine-specific paths for the live view) is never served.
"""

from __future__ import annotations

import contextlib
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
MAX_PROMPT_CHARS = 4096
SOCKET_TIMEOUT = 10.0  # seconds a client may stall mid-request
PRIVATE_FILES = ("site.json",)  # read by the server itself; never sent
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
        self.socket_timeout = SOCKET_TIMEOUT
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
    protocol_version = "HTTP/1.0"

    def setup(self) -> None:
        self.timeout = self.server.socket_timeout  # a client stalled mid-request is dropped after this long
        super().setup()

    def log_message(self, format: str, *args: Any) -> None:  # quiet: the CLI prints the URL once
        pass

    def _headers(self, status: int, content_type: str, length: int) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(length))
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("Cross-Origin-Resource-Policy", "same-origin")
        self.send_header("Cross-Origin-Opener-Policy", "same-origin")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("X-Frame-Options", "DENY")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()

    def _send(self, status: int, body: bytes, content_type: str, head: bool = False) -> None:
        self._headers(status, content_type, len(body))
        if not head:
            self.wfile.write(body)

    def _json(self, status: int, data: Any, head: bool = False) -> None:
        body = json.dumps(data, allow_nan=False, ensure_ascii=True).encode()
        self._send(status, body, "application/json; charset=utf-8", head)

    def _error(self, status: int, message: str, head: bool = False) -> None:
        self._json(status, {"error": message}, head)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The standard library's own errors (a malformed request line or header) get our headers and JSON too."""
        self.close_connection = True
        self.request_version = "HTTP/1.0"  # a garbled request line parses as HTTP/0.9, which has no headers
        with contextlib.suppress(OSError):
            self._error(code, message or HTTPStatus(code).phrase)

    def _host_ok(self) -> bool:
        port = self.server.server_address[1]
        return self.headers.get("Host") in (f"{HOST}:{port}", f"localhost:{port}")

    def _cross_site_subresource(self) -> bool:
        """A request another origin's page made for one of its elements (script, image, fetch, …)."""
        site = self.headers.get("Sec-Fetch-Site")
        return site not in (None, "same-origin", "none") and self.headers.get("Sec-Fetch-Mode") != "navigate"

    def _guarded(self, handler: Callable[[], None], head: bool = False) -> None:
        try:
            handler()
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True
        except Exception as err:  # a bug must not drop the connection or print a traceback
            self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error ({type(err).__name__})", head)

    def do_GET(self, head: bool = False) -> None:
        self._guarded(lambda: self._get(head), head)

    def do_HEAD(self) -> None:
        self.do_GET(head=True)

    def do_POST(self) -> None:
        self._guarded(self._post)

    def _get(self, head: bool) -> None:
        if not self._host_ok():
            return self._error(HTTPStatus.MISDIRECTED_REQUEST, "unknown host", head)
        if self._cross_site_subresource():
            return self._error(HTTPStatus.FORBIDDEN, "cross-origin requests are refused", head)
        try:
            path = unquote(urlsplit(self.path).path, errors="strict")
            path.encode("utf-8")
        except (UnicodeError, ValueError):
            return self._error(HTTPStatus.BAD_REQUEST, "the path is not valid UTF-8", head)
        if "\x00" in path or "\\" in path:
            return self._error(HTTPStatus.BAD_REQUEST, "the path holds a forbidden character", head)
        if path.endswith("/"):
            path += "index.html"
        site = self.server.site
        file = (site / path.lstrip("/")).resolve()
        if (
            not file.is_relative_to(site)
            or not file.is_file()
            or any(p.startswith(".") for p in file.relative_to(site).parts)
            or file.relative_to(site).as_posix() in PRIVATE_FILES
        ):
            return self._error(HTTPStatus.NOT_FOUND, "not found", head)
        content_type = TYPES.get(file.suffix) or mimetypes.guess_type(file.name)[0] or "application/octet-stream"
        self._send(HTTPStatus.OK, file.read_bytes(), content_type, head)

    def _post(self) -> None:
        if not self._host_ok():
            return self._error(HTTPStatus.MISDIRECTED_REQUEST, "unknown host")
        if urlsplit(self.path).path != "/api/analyze":
            return self._error(HTTPStatus.NOT_FOUND, "no such endpoint")
        port = self.server.server_address[1]
        if self.headers.get("Origin") not in (None, f"http://{HOST}:{port}", f"http://localhost:{port}"):
            return self._error(HTTPStatus.FORBIDDEN, "cross-origin requests are refused")
        if self._cross_site_subresource():
            return self._error(HTTPStatus.FORBIDDEN, "cross-origin requests are refused")
        if not (self.headers.get("Content-Type") or "").startswith("application/json"):
            return self._error(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, "send the prompt as application/json")
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 < length <= MAX_BODY:
            return self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"the request body must be 1..{MAX_BODY} bytes")
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw)
            text = body["text"] if isinstance(body, dict) else None
            if not isinstance(text, str):
                raise TypeError
            text.encode("utf-8")  # a lone surrogate ("\ud800") is valid JSON but not text
        except (ValueError, UnicodeError, KeyError, TypeError, RecursionError):
            return self._error(HTTPStatus.BAD_REQUEST, 'send {"text": "..."} as JSON, with valid UTF-8 text')
        if not text.strip() or len(text) > MAX_PROMPT_CHARS:
            return self._error(HTTPStatus.BAD_REQUEST, f"the prompt must be 1..{MAX_PROMPT_CHARS} characters")
        try:
            result = self.server.analyze(text)
        except SaelabError as err:
            return self._error(HTTPStatus.BAD_REQUEST, str(err))
        self._json(HTTPStatus.OK, result)


def make_server(site: Path | str, port: int = 8000, analyzer: Callable[[], Any] | Any | None = None) -> DashboardServer:
    """A server for `site` on 127.0.0.1:port (0 picks a free port); call `serve_forever()` to run it."""
    from saelab.dashboard.site import read_site

    read_site(site)
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise SaelabError(f"--port must be 0..65535 (0 picks a free port), got {port!r}")
    try:
        return DashboardServer(Path(site), port, analyzer)
    except OSError as err:
        raise SaelabError(f"cannot listen on {HOST}:{port} ({err.strerror}); pick another --port") from None
