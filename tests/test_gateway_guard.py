"""What a web page, a hostile body or a slow client can make the gateway do: nothing.

- Host and Origin: a page the operator visits cannot drive the keyless loopback gateway, by a
  `text/plain` POST or by DNS rebinding; a page of an allowed origin can, through CORS.
- Bounds: nesting, images (count, bytes, pixels from the header), model names, ledger rows.
- Connections: a client that never finishes its headers, or streams them without end, is cut
  off; connections beyond the limit get a 503 and the gateway serves again once they go.

Real components throughout: a stack started by `sovctl serve` (llama-server, SmolLM2 with its
projector) on loopback, real HTTP and raw sockets, and a real browser (Debian's chromium,
headless) loading pages from other loopback origins. Nothing leaves loopback: the browser
resolves no name but the one a test maps to 127.0.0.1.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import sqlite3
import struct
import subprocess
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from tests.conftest import CHAT_MODEL, MMPROJ
from tests.helpers import run, wait_for
from tests.test_serve import Stack, start_stack, stop_stack

from sovctl.config import load
from sovctl.errors import ConfigError
from sovctl.gateway import server as gateway_server
from sovctl.gateway.guard import Access, host_name
from sovctl.gateway.images import ImageError, dimensions
from sovctl.gateway.validate import MAX_DEPTH, check, images, too_deep
from sovctl.home import Home
from sovctl.runtime.documents import Limits, RoutesTable
from sovctl.vision.images import tiny_png

CHAT = "/v1/chat/completions"
HEADER_TIMEOUT = 2.0
MAX_CONNECTIONS = 12
EVIL_HOST = "rebind.evil.example"


def ask(content: Any = "hi", **fields: Any) -> dict[str, Any]:
    return {"model": "smol", "temperature": 0, "max_tokens": 2,
            "messages": [{"role": "user", "content": content}], **fields}


def nested(levels: int) -> Any:
    value: Any = 0
    for _ in range(levels):
        value = [value]
    return value


def png_header(width: int, height: int) -> bytes:
    """A PNG's signature and IHDR, declaring any size: a runtime would allocate it whole."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return (b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk
            + struct.pack(">I", zlib.crc32(chunk)) + struct.pack(">I", 0) + b"IEND"
            + struct.pack(">I", zlib.crc32(b"IEND")))


def image(data: bytes, kind: str = "png") -> dict[str, Any]:
    url = f"data:image/{kind};base64," + base64.b64encode(data).decode()
    return {"type": "image_url", "image_url": {"url": url}}


def metric(base: str, name: str, headers: dict[str, str] | None = None) -> int:
    lines = httpx.get(base + "/metrics", headers=headers, timeout=30).text.splitlines()
    return next((int(float(line.split()[-1])) for line in lines
                 if line.startswith(name + " ")), 0)


def refused(reason: str) -> str:
    return f'sovctl_gateway_refused_total{{reason="{reason}"}}'


# -- the pieces --------------------------------------------------------------------------------

@pytest.mark.parametrize(("body", "deep"), [
    (json.dumps(nested(MAX_DEPTH)), False),
    (json.dumps(nested(MAX_DEPTH + 1)), True),
    # Alternating objects and lists count one level each.
    (json.dumps({"a": [{"b": nested(MAX_DEPTH - 3)}]}), False),
    (json.dumps({"a": [{"b": nested(MAX_DEPTH - 2)}]}), True),
    # Brackets inside strings, escaped quotes among them, are text: they neither add depth
    # nor hide it.
    (json.dumps({"t": "[" * 500 + '\\"{' * 100, "u": nested(3)}), False),
    (json.dumps({"t": "]" * 100, "u": nested(MAX_DEPTH)}), True),
    (json.dumps({"t": '\\"]]' * 100, "u": nested(MAX_DEPTH)}), True),
    (json.dumps({"t": '\\"]]' * 100, "u": nested(MAX_DEPTH - 1)}), False),
    # Many shallow containers are not deep.
    (json.dumps([[1, 2]] * 5000), False),
])
def test_depth_is_measured_on_the_bytes(body: str, deep: bool) -> None:
    assert too_deep(body.encode()) is deep


JPEG = (b"\xff\xd8" + b"\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00" + bytes(9)
        + b"\xff\xff\xc0" + struct.pack(">HBHH", 17, 8, 20000, 30000) + bytes(10))


@pytest.mark.parametrize(("data", "expected"), [
    (png_header(16384, 16384), ("png", 16384, 16384)),
    (tiny_png(), ("png", 32, 32)),
    (JPEG, ("jpeg", 30000, 20000)),
    (b"GIF89a" + struct.pack("<HH", 640, 480) + bytes(8), ("gif", 640, 480)),
    (b"RIFF\x00\x00\x00\x00WEBPVP8 " + bytes(4) + b"\x00\x00\x00\x9d\x01\x2a"
     + struct.pack("<HH", 800, 600), ("webp", 800, 600)),
    (b"RIFF\x00\x00\x00\x00WEBPVP8L" + bytes(4) + b"\x2f"
     + struct.pack("<I", (1023) | (767 << 14)), ("webp", 1024, 768)),
    (b"RIFF\x00\x00\x00\x00WEBPVP8X" + bytes(8) + (9999).to_bytes(3, "little")
     + (4999).to_bytes(3, "little"), ("webp", 10000, 5000)),
    (b"BM" + bytes(12) + struct.pack("<Iii", 40, 5000, -4000), ("bmp", 5000, 4000)),
])
def test_image_sizes_come_from_the_header(data: bytes, expected: tuple[str, int, int]) -> None:
    assert dimensions(data) == expected


@pytest.mark.parametrize("data", [b"GGUF\x03\x00\x00\x00", b"", png_header(1, 1)[:20],
                                  b"\xff\xd8\xff\xda\x00\x02", b"\xff\xd8\xff\xe0\x00\x10"])
def test_an_image_whose_size_cannot_be_read_is_refused(data: bytes) -> None:
    with pytest.raises(ImageError):
        dimensions(data)


def test_image_limits() -> None:
    def refusal(parts: list[dict[str, Any]], max_bytes: int = 1 << 20) -> tuple[str, str] | None:
        payload = ask([{"type": "text", "text": "look"}, *parts])
        assert check(CHAT, payload) is None
        bad = images(payload, max_images=2, max_bytes=max_bytes, max_pixels=4096 * 4096)
        return (bad.param, bad.code) if bad else None

    small = image(tiny_png())
    assert refusal([small, small]) is None
    assert refusal([small, small, small]) == ("messages[0].content[3].image_url.url",
                                              "too_many_images")
    assert refusal([image(png_header(4097, 4096))]) == (
        "messages[0].content[1].image_url.url", "image_too_large")
    assert refusal([small], max_bytes=50) == ("messages[0].content[1].image_url.url",
                                              "image_too_large")
    assert refusal([image(b"not an image at all")])[1] == "invalid_image"  # type: ignore[index]
    assert refusal([image(png_header(0, 10))])[1] == "invalid_image"  # type: ignore[index]


def test_a_tool_schema_is_bounded() -> None:
    def tool(parameters: Any) -> dict[str, Any]:
        return ask(tools=[{"type": "function", "function": {"name": "f",
                                                            "parameters": parameters}}])

    assert check(CHAT, tool({"type": "object", "properties": {"a": {"type": "string"}}})) is None
    bad = check(CHAT, tool({"x": nested(40)}))
    assert bad is not None
    assert (bad.param, bad.code) == ("tools[0].function.parameters", "nesting_too_deep")


@pytest.mark.parametrize(("host", "allowed"), [
    ("127.0.0.1:8088", True), ("127.8.9.10", True), ("[::1]:8088", True), ("localhost", True),
    ("LocalHost.:8088", True), ("box.lan:8088", True), ("box.lan", True),
    ("192.168.1.5:8088", True), ("[fd00::5]:8088", True),
    (f"{EVIL_HOST}:8088", False), ("10.0.0.2:8088", False), ("localhost.evil.example", False),
    ("127.0.0.1.nip.io:8088", False), ("[::ffff:a00:2]:8088", False),
])
def test_host_rule(host: str, allowed: bool) -> None:
    access = Access(Limits(1, 1.0, 1, allowed_hosts=("box.lan", "192.168.1.5", "[FD00::5]")),
                    key_required=False)
    assert (access.refusal(host.encode(), None) is None) is allowed
    # Behind a key, the key is the guard: any name.
    assert Access(Limits(1, 1.0, 1), key_required=True).refusal(host.encode(), None) is None


def test_host_name_strips_the_port() -> None:
    assert [host_name(h) for h in ("a:1", "[::1]:2", "[::1]", "a", "a:b")] == [
        "a", "::1", "::1", "a", "a:b"]


@pytest.mark.parametrize(("key", "value"), [
    ("allowed_origins", "*"), ("allowed_origins", "null"),
    ("allowed_origins", "https://app.example/path"), ("allowed_origins", "app.example"),
    ("allowed_hosts", "http://box.lan"), ("allowed_hosts", "box.lan:8088"),
    ("max_connections", "0"), ("header_timeout", "0"), ("max_image_pixels", "0"),
])
def test_bad_gateway_settings_are_config_errors(sovctl_home: Path, key: str, value: str) -> None:
    with pytest.raises(ConfigError, match=f"serve.{key}"):
        load(Home(sovctl_home), environ={f"SOVCTL_SERVE__{key.upper()}": value})


def test_gateway_settings_reach_the_routes_table(sovctl_home: Path, tmp_path: Path) -> None:
    cfg = load(Home(sovctl_home), environ={
        "SOVCTL_SERVE__ALLOWED_ORIGINS": "http://localhost:3000, https://app.example",
        "SOVCTL_SERVE__ALLOWED_HOSTS": "box.lan", "SOVCTL_SERVE__MAX_IMAGES": "3"})
    limits = Limits.from_dict(asdict(cfg.serve))
    assert limits.allowed_origins == ("http://localhost:3000", "https://app.example")
    assert (limits.allowed_hosts, limits.max_images) == (("box.lan",), 3)
    table = RoutesTable("127.0.0.1", 8088, False, "", limits, "state.json", routes=())
    table.write(tmp_path / "routes.json")
    assert RoutesTable.read(tmp_path / "routes.json") == table


# -- a stack on loopback, and web pages of other origins ---------------------------------------

PAGE = b"""<!doctype html><html><body><pre id="out">pending</pre><script>
const q = new URLSearchParams(location.search);
fetch(q.get("gw") + "/v1/chat/completions", {method: "POST",
      headers: {"Content-Type": q.get("type")},
      body: JSON.stringify({model: "smol", max_tokens: 2, temperature: 0,
                            messages: [{role: "user", content: "hi"}]})})
  .then(r => r.json().then(d => { out.textContent = "answered " + r.status + " " +
                                  JSON.stringify(d); }))
  .catch(e => { out.textContent = "blocked " + e.name; });
</script></body></html>"""


class _Page(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("content-type", "text/html; charset=utf-8")
        self.send_header("content-length", str(len(PAGE)))
        self.end_headers()
        self.wfile.write(PAGE)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def pages() -> Iterator[dict[str, str]]:
    """Two web servers on loopback, so two origins: one the stack allows, one it does not."""
    servers = {name: ThreadingHTTPServer(("127.0.0.1", 0), _Page) for name in ("ok", "evil")}
    for s in servers.values():
        threading.Thread(target=s.serve_forever, daemon=True).start()
    yield {name: f"http://127.0.0.1:{s.server_address[1]}" for name, s in servers.items()}
    for s in servers.values():
        s.shutdown()
        s.server_close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, pages: dict[str, str], models: Path
          ) -> Iterator[Stack]:
    home = tmp_path_factory.mktemp("guard")
    run(home, "pull", str(CHAT_MODEL), "--name", "smol", "--mmproj", str(MMPROJ), check=True)
    s = start_stack(home, "--chat", "smol", models=(), env={
        "SOVCTL_SERVE__ALLOWED_ORIGINS": pages["ok"],
        "SOVCTL_SERVE__ALLOWED_HOSTS": "sovctl.test",
        "SOVCTL_SERVE__MAX_IMAGES": "2",
        "SOVCTL_SERVE__HEADER_TIMEOUT": str(HEADER_TIMEOUT),
        "SOVCTL_SERVE__MAX_CONNECTIONS": str(MAX_CONNECTIONS),
        # Probes far enough apart that a burst of refused connections is no hung gateway.
        "SOVCTL_SERVE__HEALTH_INTERVAL": "2", "SOVCTL_SERVE__HEALTH_FAILURES": "3"})
    wait_for(lambda: httpx.get(s.base + "/ready", timeout=10).status_code == 200, timeout=120,
             what="the stack to be ready")
    yield s
    stop_stack(s)


slow = pytest.mark.slow


@slow
def test_a_foreign_host_is_refused_on_every_path(stack: Stack) -> None:
    """DNS rebinding: the browser writes the attacker's name in Host."""
    before = metric(stack.base, refused("host"))
    evil = {"Host": f"{EVIL_HOST}:{stack.port}"}
    asks = [("GET", "/health"), ("GET", "/ready"), ("GET", "/metrics"), ("GET", "/v1/models"),
            ("GET", "/v1/nothing"), ("POST", CHAT), ("POST", "/v1/embeddings"),
            ("OPTIONS", CHAT)]
    for method, path in asks:
        r = httpx.request(method, stack.base + path, headers=evil, timeout=30,
                          json=ask() if method == "POST" else None)
        assert r.status_code == 403, (path, r.text)
        assert r.json()["error"]["code"] == "host_not_allowed"
        assert r.json()["error"]["type"] == "permission_denied"
    assert metric(stack.base, refused("host")) == before + len(asks)
    for host in ("127.0.0.1", "localhost", "LOCALHOST.", "[::1]", "127.0.0.2", "sovctl.test"):
        for value in (host, f"{host}:{stack.port}"):
            r = httpx.get(stack.base + "/v1/models", headers={"Host": value}, timeout=30)
            assert r.status_code == 200, (value, r.text)
    r = httpx.post(stack.base + CHAT, headers={"Host": f"sovctl.test:{stack.port}"}, json=ask(),
                   timeout=120)
    assert r.status_code == 200, r.text


@slow
def test_an_origin_not_allowed_is_refused(stack: Stack, pages: dict[str, str]) -> None:
    """The `text/plain` POST a page sends without a preflight; and clients without Origin."""
    before = metric(stack.base, refused("origin"))
    body = json.dumps(ask()).encode()
    plain = {"Content-Type": "text/plain;charset=UTF-8"}
    r = httpx.post(stack.base + CHAT, content=body, headers={**plain, "Origin": pages["evil"]},
                   timeout=30)
    assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed", r.text
    assert "access-control-allow-origin" not in r.headers
    r = httpx.get(stack.base + "/v1/models", headers={"Origin": "https://evil.example"})
    assert r.status_code == 403
    assert metric(stack.base, refused("origin")) == before + 2
    # No Origin: curl, the SDKs, agents, with any content type or none, as before.
    for headers in (plain, {"Content-Type": "application/json"}, {}):
        r = httpx.post(stack.base + CHAT, content=body, headers=headers, timeout=120)
        assert r.status_code == 200, r.text
        assert "access-control-allow-origin" not in r.headers


@slow
def test_an_allowed_origin_gets_cors(stack: Stack, pages: dict[str, str]) -> None:
    origin = pages["ok"]
    preflight = {"Origin": origin, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "content-type, authorization"}
    r = httpx.options(stack.base + CHAT, headers=preflight)
    assert r.status_code == 204, r.text
    assert r.headers["access-control-allow-origin"] == origin
    assert r.headers["access-control-allow-headers"] == "content-type, authorization"
    assert "POST" in r.headers["access-control-allow-methods"]
    assert r.headers["vary"] == "Origin"
    r = httpx.options(stack.base + CHAT, headers={**preflight, "Origin": pages["evil"]})
    assert r.status_code == 403 and "access-control-allow-origin" not in r.headers
    # Not a preflight: the method is not served, as without an Origin.
    assert httpx.options(stack.base + CHAT).status_code == 405
    for method, path in (("POST", CHAT), ("GET", "/v1/models")):
        r = httpx.request(method, stack.base + path, headers={"Origin": origin}, timeout=120,
                          json=ask() if method == "POST" else None)
        assert r.status_code == 200, r.text
        assert r.headers["access-control-allow-origin"] == origin
        assert r.headers["vary"] == "Origin"


# -- a real browser ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Any:
    found = shutil.which("chromium")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: CI installs it (apt-get install chromium)",
                        pytrace=False)
        pytest.skip("chromium is not installed (apt-get install --no-install-recommends "
                    "chromium)")
    profile = tmp_path_factory.mktemp("chromium")

    def dump_dom(url: str) -> str:
        proc = subprocess.run(
            [found, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             f"--user-data-dir={profile}", "--no-first-run", "--disable-extensions",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             # No name resolves but the rebinding one, which points at loopback: nothing the
             # browser does on its own can leave the machine.
             f"--host-resolver-rules=MAP {EVIL_HOST} 127.0.0.1, MAP * ~NOTFOUND, "
             "EXCLUDE 127.0.0.1",
             "--virtual-time-budget=60000", "--dump-dom", url],
            capture_output=True, text=True, timeout=180)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout

    return dump_dom


def _answered_200(base: str) -> int:
    return metric(base, f'sovctl_requests_total{{model="smol",endpoint="{CHAT}",code="200"}}')


@slow
def test_a_web_page_cannot_drive_the_gateway(stack: Stack, pages: dict[str, str],
                                             browser: Any) -> None:
    """The page POSTs text/plain (no preflight): the browser sends it, the gateway refuses it,
    and the model never runs."""
    refused_before, served_before = metric(stack.base, refused("origin")), _answered_200(
        stack.base)
    dom = browser(f"{pages['evil']}/?gw={stack.base}&type=text/plain;charset=UTF-8")
    assert "blocked TypeError" in dom, dom
    assert metric(stack.base, refused("origin")) == refused_before + 1
    assert _answered_200(stack.base) == served_before


@slow
def test_dns_rebinding_is_refused(stack: Stack, browser: Any) -> None:
    """The browser resolves the attacker's name to 127.0.0.1 and loads the gateway under it:
    the page of that name would be same-origin with it, but Host gives it away."""
    before = metric(stack.base, refused("host"))
    dom = browser(f"http://{EVIL_HOST}:{stack.port}/v1/models")
    assert "host_not_allowed" in dom and '"smol"' not in dom, dom
    # The page, and the favicon the browser asks for with it.
    assert metric(stack.base, refused("host")) >= before + 1


@slow
def test_a_page_of_an_allowed_origin_works(stack: Stack, pages: dict[str, str],
                                           browser: Any) -> None:
    """application/json makes the browser send a preflight first: both are answered."""
    served_before = _answered_200(stack.base)
    dom = browser(f"{pages['ok']}/?gw={stack.base}&type=application/json")
    assert "answered 200" in dom and "chat.completion" in dom, dom
    assert _answered_200(stack.base) == served_before + 1


# -- bounds on a request ---------------------------------------------------------------------------

@slow
def test_deep_nesting_is_a_400(stack: Stack) -> None:
    url = stack.base + CHAT
    for levels in (100_000, MAX_DEPTH):
        body = json.dumps(ask(extra=0)).replace("0}", "[" * levels + "]" * levels + "}", 1)
        r = httpx.post(url, content=body, headers={"Content-Type": "application/json"},
                       timeout=30)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "nesting_too_deep"
        assert str(MAX_DEPTH) in r.json()["error"]["message"]
    # The body's own object and an extension field nested to the limit: served.
    r = httpx.post(url, json=ask(extra=nested(MAX_DEPTH - 1)), timeout=120)
    assert r.status_code == 200, r.text
    tool = {"type": "function", "function": {"name": "f", "parameters": {"x": nested(40)}}}
    r = httpx.post(url, json=ask(tools=[tool]), timeout=30)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "tools[0].function.parameters"


@slow
def test_image_bounds_hold_before_the_runtime(stack: Stack) -> None:
    url = stack.base + CHAT
    text = {"type": "text", "text": "Describe."}

    def post(*parts: dict[str, Any]) -> httpx.Response:
        return httpx.post(url, json=ask([text, *parts]), timeout=120)

    r = post(image(png_header(16384, 16384)))
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert (err["param"], err["code"]) == ("messages[0].content[1].image_url.url",
                                           "image_too_large")
    assert "16384x16384" in err["message"] and "max_image_pixels" in err["message"]
    r = post(*[image(tiny_png())] * 3)
    assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_images", r.text
    r = post(image(b"GGUF\x03\x00\x00\x00" + bytes(64)))
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_image", r.text
    r = post(image(JPEG, "jpeg"))
    assert r.status_code == 400 and "30000x20000" in r.json()["error"]["message"], r.text
    # Within bounds, the runtime reads them.
    r = post(*[image(tiny_png())] * 2)
    assert r.status_code == 200, r.text
    assert httpx.get(stack.base + "/ready", timeout=10).json()["ready"] is True


@slow
def test_model_names_are_bounded(stack: Stack) -> None:
    for model, code in (("x" * 300, "string_above_max_length"),
                        ("frontier/p/" + "x" * 100_000, "string_above_max_length"),
                        (["smol"] * 1000, "invalid_type")):
        r = httpx.post(stack.base + CHAT, json={**ask(), "model": model}, timeout=30)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert (err["param"], err["code"]) == ("model", code)
        assert len(r.content) < 500


# -- slow and idle clients -----------------------------------------------------------------------

def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=HEADER_TIMEOUT + 10)


def _until_closed(sock: socket.socket) -> tuple[bytes, float]:
    """Everything the server sends until it closes, and the seconds that took."""
    started, got = time.monotonic(), b""
    while chunk := sock.recv(65536):
        got += chunk
    return got, time.monotonic() - started


@slow
def test_a_client_that_stalls_its_headers_is_cut_off(stack: Stack) -> None:
    before = metric(stack.base, refused("header_timeout"))
    with _connect(stack.port) as slow_sock, _connect(stack.port) as idle_sock:
        slow_sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Sl")
        # Meanwhile the gateway serves everyone else.
        assert httpx.get(stack.base + "/v1/models", timeout=10).status_code == 200
        answer, waited = _until_closed(slow_sock)
        assert waited < HEADER_TIMEOUT + 1.5
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "header_timeout"
        answer, waited = _until_closed(idle_sock)  # a connection that never sends a byte
        assert answer == b"" and waited < HEADER_TIMEOUT + 1.5
    assert metric(stack.base, refused("header_timeout")) >= before + 2


@slow
def test_endless_headers_are_cut_off(stack: Stack) -> None:
    before = metric(stack.base, refused("headers_too_large"))
    with _connect(stack.port) as sock:
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        try:
            for i in range(10_000):  # 10 MB of headers, far past the bound
                sock.sendall(b"X-Filler-%d: %s\r\n" % (i, b"y" * 1000))
            answer, _ = _until_closed(sock)
        except ConnectionError:
            # Closed while the client still sent: the kernel resets the connection, and the
            # 431 sent before may be lost with it.
            answer = b""
    assert answer.startswith(b"HTTP/1.1 431 ") or answer == b"", answer
    assert metric(stack.base, refused("headers_too_large")) == before + 1
    assert httpx.get(stack.base + "/v1/models", timeout=10).status_code == 200


def _gateway_pid(stack: Stack) -> int:
    state = json.loads((stack.home / "run" / "state.json").read_text())
    return next(p["pid"] for p in state["processes"] if p["name"] == "gateway")


@slow
def test_connections_beyond_the_limit_get_503_until_they_go(stack: Stack) -> None:
    pid = _gateway_pid(stack)
    idle = [_connect(stack.port) for _ in range(MAX_CONNECTIONS)]
    try:
        r = httpx.get(stack.base + "/v1/models", timeout=10)
        assert r.status_code == 503, r.text
        err = r.json()["error"]
        assert err["code"] == "too_many_connections" and "max_connections" in err["message"]
        assert r.headers["retry-after"] == "1"
    finally:
        for sock in idle:
            sock.close()
    wait_for(lambda: httpx.get(stack.base + "/v1/models", timeout=10).status_code == 200,
             timeout=10, what="the gateway to serve again")
    assert metric(stack.base, refused("connections")) >= 1
    assert _gateway_pid(stack) == pid  # held off, not restarted


# -- a gateway behind the key: refusals stay out of the ledger -----------------------------------

@contextmanager
def serving(table: RoutesTable) -> Iterator[str]:
    """The gateway as `python -m sovctl.gateway` runs it (its uvicorn configuration), in a
    thread, on a loopback socket of its own."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(gateway_server.config(table))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started or not thread.is_alive(), timeout=20,
                 what="the gateway to start")
        assert server.started, "the gateway did not start"
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def test_refusals_stay_out_of_the_ledger(tmp_path: Path) -> None:
    key = "k" * 40
    (tmp_path / "api_key").write_text(key + "\n")
    ledger = tmp_path / "ledger.sqlite3"
    app = "http://app.test"
    table = RoutesTable("127.0.0.1", 0, True, str(tmp_path / "api_key"),
                        Limits(4, 10.0, 1 << 20, allowed_origins=(app,)),
                        str(tmp_path / "state.json"), routes=(), ledger=str(ledger))
    authorised = {"Authorization": f"Bearer {key}"}
    with serving(table) as base, httpx.Client(base_url=base, timeout=30) as c:
        for _ in range(50):
            assert c.post(CHAT, json=ask()).status_code == 401
        assert c.get("/v1/models").status_code == 401
        # An allowed page may read why it was refused; the key does not let any other in.
        r = c.post(CHAT, json=ask(), headers={"Origin": app})
        assert r.status_code == 401 and r.headers["access-control-allow-origin"] == app
        r = c.post(CHAT, json=ask(), headers={**authorised, "Origin": "https://evil.example"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed"
        # Behind the key any Host is answered: a LAN client uses the box's address.
        r = c.get("/v1/models", headers={**authorised, "Host": f"{EVIL_HOST}:8088"})
        assert r.status_code == 200, r.text
        long_name = "frontier/p/" + "x" * 100_000
        r = c.post(CHAT, json={**ask(), "model": long_name}, headers=authorised)
        assert r.status_code == 400 and r.json()["error"]["param"] == "model"
        assert c.post(CHAT, json=ask(), headers=authorised).status_code == 404
        assert metric(base, refused("auth"), authorised) == 52
        assert metric(base, refused("origin"), authorised) == 1
    with sqlite3.connect(ledger) as db:
        rows = db.execute("SELECT status, length(model) FROM requests").fetchall()
    assert sorted(rows) == [(400, 1), (404, 1)], rows

