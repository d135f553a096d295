"""`saelab serve` under hostile clients: malformed requests get a 400 with a JSON error and the security headers,
stalled clients time out, private files are not served, and (in headless Chromium) a page on another localhost
origin cannot read a served site's data."""

from __future__ import annotations

import http.server
import json
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
import torch
from cli_helpers import one_line_error, saelab
from dashboard_helpers import HOOK, TinySAE, make_model, make_tokenizer, make_tokens

from saelab.dashboard.compute import DashboardConfig, compute_dashboard
from saelab.dashboard.live import PromptAnalyzer
from saelab.dashboard.server import make_server
from saelab.dashboard.site import write_site

SECURITY_HEADERS = {
    "content-security-policy",
    "cross-origin-resource-policy",
    "x-content-type-options",
    "referrer-policy",
    "x-frame-options",
}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch.no_grad():
        tok = make_tokenizer()
        lm, sae = make_model(tok), TinySAE(32, 10, HOOK)
        board = compute_dashboard(lm, sae, make_tokens(tok, n_seq=4, length=16), HOOK, cfg=DashboardConfig())
    root = tmp_path_factory.mktemp("served")
    site = write_site(board, root / "site", {"kind": "lm", "hook": HOOK, "sae_dir": str(root / "sae"), "model": "x"})
    server = make_server(site, 0, PromptAnalyzer(lm, sae))
    server.socket_timeout = 1.0
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield {"server": server, "site": site, "port": server.server_address[1], "root": root}
    server.shutdown()
    server.server_close()
    torch.set_num_threads(before)


def raw(port: int, request: bytes, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """Send `request` bytes as they are; return (status, headers, body) of the reply."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        conn.sendall(request)
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].startswith("HTTP/"), data[:200]
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def get(port: int, path: str, **headers: str) -> tuple[int, dict[str, str], bytes]:
    extra = "".join(f"{k.replace('_', '-')}: {v}\r\n" for k, v in headers.items())
    return raw(port, f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n{extra}\r\n".encode())


def post(port: int, body: bytes, content_type: str = "application/json") -> tuple[int, dict[str, str], bytes]:
    head = f"POST /api/analyze HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {content_type}\r\n"
    return raw(port, head.encode() + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)


def assert_json_error(reply: tuple[int, dict[str, str], bytes], status: int) -> str:
    code, headers, body = reply
    assert code == status, (code, body)
    assert set(headers) >= SECURITY_HEADERS, headers
    assert headers["content-type"].startswith("application/json")
    return json.loads(body)["error"]


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET /%00 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n", 400),
        (b"GET /%ff%fe HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n", 400),
        (b"GET /data/%2e%2e/%2e%2e/etc/passwd HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n", 404),
        (b"GET /site.json HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n", 404),
        (b"GET / HTTP/1.1\r\nHost: evil.example:{port}\r\n\r\n", 421),
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", 414),
        (b"BREW / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n", 501),
    ],
)
def test_malformed_requests_get_a_json_error_with_the_headers(served, request_bytes: bytes, status: int) -> None:
    port = served["port"]
    assert_json_error(raw(port, request_bytes.replace(b"{port}", str(port).encode())), status)


@pytest.mark.parametrize(
    "body",
    [
        b'{"text": "\\ud800"}',  # a lone surrogate: valid JSON, not text
        b"[" * 30000,  # nested past the parser's recursion limit
        b'{"text": 5}',
        b"[]",
        b'{"txt": "a"}',
        b"\xff\xfe",
        b'{"text": "   "}',
        json.dumps({"text": "x" * 5000}).encode(),
    ],
)
def test_malformed_prompts_get_a_400(served, body: bytes) -> None:
    assert_json_error(post(served["port"], body), 400)


def test_a_prompt_still_works_and_every_response_has_the_headers(served) -> None:
    code, headers, body = post(served["port"], json.dumps({"text": "def add(a, b):"}).encode())
    assert code == 200 and set(headers) >= SECURITY_HEADERS
    assert json.loads(body)["tokens"]
    for path in ("/", "/static/dashboard.js", "/data/index.js", "/nowhere"):
        code, headers, _ = get(served["port"], path)
        assert set(headers) >= SECURITY_HEADERS and headers["cross-origin-resource-policy"] == "same-origin"


def test_other_origins_and_sites_cannot_load_data_as_a_subresource(served) -> None:
    port = served["port"]
    for site in ("cross-site", "same-site"):  # another port on localhost is the same *site*, another origin
        for mode in ("no-cors", "cors"):
            reply = get(port, "/data/index.js", Sec_Fetch_Site=site, Sec_Fetch_Mode=mode, Sec_Fetch_Dest="script")
            assert_json_error(reply, 403)
    assert get(port, "/data/index.js", Sec_Fetch_Site="same-origin", Sec_Fetch_Mode="no-cors")[0] == 200
    assert get(port, "/", Sec_Fetch_Site="cross-site", Sec_Fetch_Mode="navigate")[0] == 200  # a link to the site


def test_stalled_clients_time_out(served) -> None:
    port, server = served["port"], served["server"]
    baseline = threading.active_count()
    server.socket_timeout = 4.0
    stalled = [socket.create_connection(("127.0.0.1", port)) for _ in range(30)]
    for conn in stalled:
        conn.sendall(b"POST /api/analyze HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Length: 100\r\n" % port)
    deadline = time.monotonic() + 3
    while threading.active_count() < baseline + 20 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threading.active_count() >= baseline + 20  # each stalled client holds a thread, for now
    server.socket_timeout = 1.0
    deadline = time.monotonic() + 20
    while threading.active_count() > baseline and time.monotonic() < deadline:
        time.sleep(0.1)
    assert threading.active_count() <= baseline  # the server dropped them after its socket timeout
    for conn in stalled:
        conn.close()
    assert get(port, "/")[0] == 200


def test_serve_refuses_bad_ports_and_broken_sites_in_one_line(served, tmp_path: Path) -> None:
    status, _, stderr = saelab("serve", served["site"], "--port", "70000")
    one_line_error(status, stderr, "--port must be 0..65535")
    status, _, stderr = saelab("serve", served["site"], "--port", str(served["port"]))
    one_line_error(status, stderr, f"cannot listen on 127.0.0.1:{served['port']}")
    broken = tmp_path / "site"
    shutil.copytree(served["site"], broken)
    info = json.loads((broken / "site.json").read_text())
    del info["model"]
    (broken / "site.json").write_text(json.dumps(info))
    status, _, stderr = saelab("serve", broken, "--port", "0")
    one_line_error(status, stderr, "site.json lacks 'model'")


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_a_page_on_another_localhost_origin_cannot_read_the_data(served, tmp_path: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    port = served["port"]
    attacker = tmp_path / "attacker"
    attacker.mkdir()
    shutil.copy(served["site"] / "data" / "index.js", attacker / "own.js")  # the same data, from its own origin
    page = """<!doctype html><script>
window.stolen = []; window.SAELAB = {receive: (key, data) => window.stolen.push(key)};
</script>
<script src="own.js"></script>
<script src="http://127.0.0.1:PORT/data/index.js"></script>
<script src="http://localhost:PORT/data/index.js"></script>
<script>
window.fetched = "pending";
fetch("http://127.0.0.1:PORT/data/index.js").then(r => r.text()).then(t => window.fetched = t.length,
                                                                       e => window.fetched = "refused");
</script>"""
    (attacker / "index.html").write_text(page.replace("PORT", str(port)))

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(attacker), **kwargs)

        def log_message(self, *args) -> None:
            pass

    evil = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=evil.serve_forever, daemon=True).start()
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
            tab = browser.new_page()
            tab.goto(f"http://127.0.0.1:{evil.server_address[1]}/index.html")
            tab.wait_for_function("() => window.fetched !== 'pending'", timeout=15000)
            stolen, fetched = tab.evaluate("() => [window.stolen, window.fetched]")
            browser.close()
    finally:
        evil.shutdown()
        evil.server_close()
    assert stolen == ["index"]  # its own copy ran (the attack works in principle); the served data never did
    assert fetched == "refused"
