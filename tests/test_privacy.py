"""Privacy and secrets: no prompt or completion in any log, logs only the operator reads and
rotated while the stack runs, each child given only the environment it needs, credentials sent
only where they belong, and a mirror that neither echoes client text into a header nor can be
held by a client that stalls. Real processes, real sockets, loopback only."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import httpx
import pytest
from tests.conftest import CHAT_MODEL, TINY_MODEL
from tests.helpers import SOVCTL, processes, run, wait_for
from tests.hubserver import COMMIT, REPO, catalog, serve
from tests.test_tunnel import PublicHost

from sovctl import config
from sovctl.errors import UsageError
from sovctl.names import check_name
from sovctl.runtime.plan import Plan
from sovctl.runtime.ports import free_port
from sovctl.runtime.procs import Argv, ProcessSpec
from sovctl.store import hub, refs
from sovctl.store.mirror import MAX_PER_CLIENT, MirrorHandler, make_server

TINY_HF = f"hf://{REPO}/{TINY_MODEL.name}"
FAST = {
    "SOVCTL_SERVE__HEALTH_INTERVAL": "0.5",
    "SOVCTL_SERVE__HEALTH_TIMEOUT": "2",
    "SOVCTL_SERVE__STOP_TIMEOUT": "5",
}
# Secrets of the operator's shell that no child may inherit (the provider key: the gateway's).
SECRETS = {"HF_TOKEN": "hf_secretHubToken", "SOVCTL_MIRROR_TOKEN": "sov-mirror-secret",
           "ACME_KEY": "sk-acme-secret"}


# -- names and references ------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["smol\n", "smol\r\n", "\nsmol", "smol\x00"])
def test_a_name_with_a_line_break_is_refused(name: str) -> None:
    with pytest.raises(UsageError, match="invalid model name"):
        check_name(name)
    assert check_name("smol") == "smol"


@pytest.mark.parametrize("ref", [f"{TINY_HF}\n", "org/repo:Q4_0\n"])
def test_a_reference_with_a_trailing_newline_is_refused(ref: str) -> None:
    with pytest.raises(UsageError):
        refs.parse_ref(ref)


# -- credentials go where they belong ------------------------------------------------------------

@pytest.mark.parametrize(("url", "hub_or_not"), [
    ("https://huggingface.co", True), ("https://hf.co/org/repo", True),
    ("https://cdn-lfs.huggingface.co/x", True), ("http://huggingface.co", False),
    ("https://huggingface.co.evil.example", False), ("https://evil.example/huggingface.co", False),
    ("http://10.0.0.1:8089", False),
])
def test_only_the_hub_is_the_hub(url: str, hub_or_not: bool) -> None:
    assert hub.is_hub(url) is hub_or_not


@pytest.mark.parametrize("endpoint", ["https://huggingface.co", "http://huggingface.co",
                                      "https://huggingface.co.evil.example",
                                      "http://10.0.0.1:8089"])
def test_each_source_sends_the_credential_of_its_endpoint(
        endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The source `pull` picks sends exactly what `hub.credential` allows that endpoint."""
    from sovctl.store.sources import HubSource, MirrorSource, UrlSource, source_for

    monkeypatch.setenv("SOVCTL_MIRROR_TOKEN", SECRETS["SOVCTL_MIRROR_TOKEN"])
    for ref in (TINY_HF, "org/repo:Q4_0"):
        source = source_for(ref, endpoint=endpoint, revision="main",
                            hub_token=SECRETS["HF_TOKEN"])
        assert isinstance(source, HubSource)
        assert source.credential() == hub.credential(endpoint, SECRETS["HF_TOKEN"])
        assert isinstance(source, MirrorSource) is not hub.is_hub(endpoint)
    url = source_for(f"{endpoint}/m.gguf", endpoint=endpoint, revision="main",
                     hub_token=SECRETS["HF_TOKEN"])
    assert isinstance(url, UrlSource) and url.credential() is None


class Recording(MirrorHandler):
    """A mirror that notes the Authorization header of every request."""

    seen: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        self.seen.append(self.headers.get("Authorization", ""))
        super().do_GET()


def test_hf_token_never_goes_to_a_mirror(cli, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A pull from a non-Hub endpoint sends the mirror's token, and never HF_TOKEN."""
    for var, value in SECRETS.items():
        monkeypatch.setenv(var, value)
    Recording.seen = []
    with serve(catalog((TINY_MODEL,)), handler=Recording, token=SECRETS["SOVCTL_MIRROR_TOKEN"]
               ) as mirror:
        r = cli("pull", "--endpoint", mirror.url, TINY_HF)
        assert r.exit_code == 0, r.stderr
        monkeypatch.delenv("SOVCTL_MIRROR_TOKEN")
        other = tmp_path / "other-home"
        r = cli("--home", str(other), "pull", "--endpoint", mirror.url, TINY_HF)
        assert r.exit_code != 0 and "SOVCTL_MIRROR_TOKEN" in r.stderr
    # model info and the file, with the mirror's token; then, without it, nothing at all.
    assert Recording.seen[:2] == [f"Bearer {SECRETS['SOVCTL_MIRROR_TOKEN']}"] * 2
    assert set(Recording.seen[2:]) == {""}
    assert not any(SECRETS["HF_TOKEN"] in s for s in Recording.seen)


# -- the mirror's headers and connections ----------------------------------------------------------

def _raw(port: int, request: bytes, timeout: float = 10) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


@pytest.fixture
def mirror_server() -> Iterator[tuple[int, object]]:
    server = make_server(catalog((TINY_MODEL,)), "127.0.0.1", 0, idle_timeout=2.0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield int(server.server_address[1]), server
    finally:
        server.shutdown()
        server.server_close()


def test_client_text_never_starts_a_header(mirror_server: tuple[int, object]) -> None:
    port, _ = mirror_server
    answer = _raw(port, b"GET /x%0d%0aSet-Cookie:%20pwn=1 HTTP/1.1\r\nHost: m\r\n"
                        b"Connection: close\r\n\r\n")
    head = answer.split(b"\r\n\r\n", 1)[0].decode()
    status, *headers = head.split("\r\n")
    assert status.startswith("HTTP/1.1 404"), head
    names = [h.split(":", 1)[0].lower() for h in headers]
    assert "set-cookie" not in names, head
    [message] = [h for h in headers if h.lower().startswith("x-error-message:")]
    assert "/x%0D%0ASet-Cookie: pwn=1" in message, message


def test_a_stalled_client_cannot_hold_the_mirror(mirror_server: tuple[int, object]) -> None:
    port, _ = mirror_server
    info = f"GET /api/models/{REPO} HTTP/1.1\r\nHost: m\r\nConnection: close\r\n\r\n".encode()
    # Connections that send half a request and stall (slowloris), as many as one client may
    # hold; one more is turned away at once, and the mirror answers others meanwhile.
    stalled = []
    for _ in range(MAX_PER_CLIENT):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(b"GET /api/models/" + REPO.encode() + b" HTTP/1.1\r\nHost: m\r\n")
        stalled.append(s)
    t0 = time.monotonic()
    busy = _raw(port, info)
    assert busy.startswith(b"HTTP/1.1 503") and b"Retry-After: 5" in busy, busy[:200]
    assert time.monotonic() - t0 < 1.5
    try:
        # The idle timeout closes each stalled connection: the server's end reads as EOF.
        for s in stalled:
            assert s.recv(1024) == b""
        assert time.monotonic() - t0 < 6
    finally:
        for s in stalled:
            s.close()
    ok = _raw(port, info)
    assert ok.startswith(b"HTTP/1.1 200") and COMMIT.encode() in ok


# -- logs: rotated while running, only the operator's ---------------------------------------------

CHATTER = """
import http.server, sys, threading, time
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.send_header("Content-Length", "0"); self.end_headers()
    def log_message(self, *args):
        pass
server = http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Health)
threading.Thread(target=server.serve_forever, daemon=True).start()
i = 0
while True:
    print(f"line {i:08d} " + "x" * 100, flush=True)
    i += 1
    time.sleep(0.001)
"""


def _inode(path: Path) -> int | None:
    """None in the moment between a rotation's rename and the new file."""
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


def _numbers(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"^line (\d{8}) x+$", text, re.MULTILINE)]


def test_logs_rotate_while_the_child_runs(sovctl_home: Path) -> None:
    logs, run_dir = sovctl_home / "logs", sovctl_home / "run"
    run_dir.mkdir(parents=True)
    port = free_port()
    limit = 64 * 1024
    spec = ProcessSpec(name="chatter", kind="runtime", port=port, health_path="/health",
                       argv=Argv((sys.executable, "-c", CHATTER, str(port))))
    supervision = config.ServeSettings(health_interval=0.5, log_max_bytes=limit, log_backups=2)
    plan = Plan(host="127.0.0.1", port=port, processes=(spec,), models=(),
                routes_file=str(run_dir / "routes.json"), state_file=str(run_dir / "state.json"),
                egress_log=str(run_dir / "egress.jsonl"), logs_dir=str(logs),
                api_key_required=False, supervision=supervision)
    plan_file = run_dir / "plan.json"
    plan_file.write_text(plan.to_json())
    supervisor = subprocess.Popen([sys.executable, "-m", "sovctl.runtime.supervisor",
                                   str(plan_file)], stderr=subprocess.PIPE)
    log = logs / "chatter.log"
    follow = None
    try:
        wait_for(lambda: log.exists(), timeout=20, what="the child's log")
        follow = subprocess.Popen([*SOVCTL, "logs", "chatter", "--follow", "--lines", "0"],
                                  env={**os.environ, "SOVCTL_HOME": str(sovctl_home)},
                                  stdout=subprocess.PIPE, text=True)
        time.sleep(1.0)  # `sovctl logs` is reading the file it opened
        followed_from = wait_for(lambda: _inode(log), timeout=5, what="the log")
        # Rotated twice while the same child writes on: NAME.log.1 and .2, none over the limit;
        # and once more after `--follow` opened the file, which it follows to the new one.
        wait_for(lambda: (logs / "chatter.log.2").exists()
                 and _inode(log) not in (None, followed_from), timeout=60, what="rotations")
        assert not (logs / "chatter.log.3").exists()
        assert json.loads((run_dir / "state.json").read_text())["processes"][0]["restarts"] == 0
        time.sleep(0.5)
        assert follow.poll() is None
        follow.send_signal(signal.SIGINT)
        followed = _numbers(follow.communicate(timeout=10)[0])
        tail = run(sovctl_home, "logs", "chatter", "--lines", "3", check=True).stdout
        assert len(_numbers(tail)) == 3, tail
    finally:
        if follow is not None and follow.poll() is None:
            follow.kill()
        supervisor.send_signal(signal.SIGTERM)
        supervisor.wait(timeout=30)
    assert supervisor.returncode == 0, supervisor.stderr.read() if supervisor.stderr else ""

    files = [logs / n for n in ("chatter.log.2", "chatter.log.1", "chatter.log")]
    for f in files:
        assert f.stat().st_size <= limit, f
    # Nothing lost, nothing repeated: one count across the files, and across the rotations
    # `sovctl logs --follow` saw.
    kept = [n for f in files for n in _numbers(f.read_text())]
    assert kept == list(range(kept[0], kept[0] + len(kept)))
    assert len(followed) > 100
    assert followed == list(range(followed[0], followed[0] + len(followed)))
    for f in [*files, logs / "supervisor.log"]:
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
    assert stat.S_IMODE(logs.stat().st_mode) == 0o700


# -- a real stack: environments of the children, nothing of a request in any log ------------------

MARKER = "zanzibarquokka"


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(v.split("=", 1) for v in raw.decode(errors="replace").split("\0") if "=" in v)


@pytest.mark.slow
@pytest.mark.usefixtures("models")
def test_children_get_no_secret_and_logs_get_no_request(tmp_path: Path) -> None:
    """A head (a clustered llama-server runtime, a llama-cpp-python one, the gateway with a
    provider, a tunnel) and a worker, all started from a shell holding every kind of secret."""
    head, box = tmp_path / "head", tmp_path / "worker"
    public = PublicHost(tmp_path / "public-host")
    shell = {**FAST, **SECRETS}
    wport, port = free_port(), free_port()
    run(head, "pull", str(CHAT_MODEL), "--name", "smol", check=True)
    run(head, "pull", str(TINY_MODEL), "--name", "tiny", check=True)
    (head / "sovctl.toml").write_text(f"""
[models.smol]
role = "chat"
parallel = 1
n_ctx = 512
n_threads = 1

[models.tiny]
role = "completion"
runtime = "llama-cpp-python"
n_ctx = 256
n_threads = 1

[cluster]
workers = ["127.0.0.1:{wport}"]

[providers.acme]
base_url = "https://api.acme.example/v1"
api_key_env = "ACME_KEY"

[providers.acme.models."acme-1"]
input_per_mtok = 1
output_per_mtok = 2

[tunnel]
via = "{public.via}"
remote_port = {public.remote_port}
identity = "{public.client_key}"
""")
    public.start()
    try:
        run(head, "tunnel", "--pin-only", "--accept-host-key", check=True)
        r = run(box, "worker", "--host", "127.0.0.1", "--port", str(wport), "--threads", "1",
                "--detach", env=shell)
        assert r.returncode == 0, r.stderr
        r = run(head, "serve", "--detach", "--port", str(port), env=shell)
        assert r.returncode == 0, r.stderr
        key = (head / "secrets" / "api_key").read_text().strip()
        procs = processes(head)
        assert {p["status"] for p in procs.values()} == {"up"}, procs
        worker = processes(box)["worker"]

        # What each real child was started with, as the kernel keeps it.
        envs = {name: _environ(p["pid"]) for name, p in procs.items()}
        envs["worker"] = _environ(worker["pid"])
        assert set(envs) == {"smol", "tiny", "gateway", "tunnel", "worker"}
        # The detached supervisor itself holds only what its children may take.
        supervisor = _environ(json.loads((head / "run" / "state.json").read_text())[
            "supervisor_pid"])
        assert {k for k, v in supervisor.items() if any(s in v for s in SECRETS.values())
                } == {"ACME_KEY"}
        for name, env in envs.items():
            assert "PATH" in env and env.get("HF_HUB_OFFLINE") == "1", name
            leaked = {k for k, v in env.items() if any(s in v for s in SECRETS.values())}
            expected = {"ACME_KEY"} if name == "gateway" else set()
            assert leaked == expected, (name, leaked)

        # A request with a marker word, and its answer, through the gateway.
        auth = {"Authorization": f"Bearer {key}"}
        base = f"http://127.0.0.1:{port}/v1"
        chat = httpx.post(f"{base}/chat/completions", headers=auth, timeout=120, json={
            "model": "smol", "temperature": 0, "max_tokens": 24,
            "messages": [{"role": "user", "content": f"Say the word {MARKER} twice."}]})
        assert chat.status_code == 200, chat.text
        done = httpx.post(f"{base}/completions", headers=auth, timeout=120, json={
            "model": "tiny", "temperature": 0, "max_tokens": 24,
            "prompt": f"Once upon a time, {MARKER} the cat"})
        assert done.status_code == 200, done.text
        answers = [chat.json()["choices"][0]["message"]["content"],
                   done.json()["choices"][0]["text"]]
        # The clustered runtime's load log is still read: what it put on the worker.
        held = wait_for(lambda: [w for w in processes(head)["smol"]["workers"] if w["holds"]],
                        timeout=20, what="the worker's share in status")
        assert held[0]["endpoint"] == f"127.0.0.1:{wport}"
    finally:
        run(head, "stop")
        run(box, "stop")
        public.stop()

    logs = [f for home in (head, box) for f in (home / "logs").iterdir()]
    assert {f.name for f in logs} >= {"smol.log", "tiny.log", "gateway.log", "tunnel.log",
                                      "worker.log", "supervisor.log"}
    words = [MARKER] + [a.strip() for a in answers if len(a.strip()) >= 12]
    assert len(words) > 1, answers  # at least one answer long enough to be looked for
    for f in logs:
        text = f.read_text(errors="replace")
        for word in words:
            assert word not in text, f"{f.name} holds {word!r}"
        assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
