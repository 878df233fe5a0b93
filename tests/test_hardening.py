"""Defects a review found: loopback decisions, side-effect-free planning, taken ports, models in
the wrong role, uptime, the typed process documents, packaged profiles, the models fixture."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.conftest import EMBED_MODEL, ROOT, TINY_MODEL
from tests.helpers import run, run_json

from sovctl.net import is_loopback
from sovctl.runtime.documents import STATE_SCHEMA


# -- one loopback rule, names resolved ----------------------------------------------------------
def _resolver(table: dict[str, list[str]]):  # type: ignore[no-untyped-def]
    def resolve(host: str) -> list[str]:
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return table[host]
    return resolve


@pytest.mark.parametrize(("host", "expected"), [
    ("127.0.0.1", True), ("127.8.9.10", True), ("::1", True), ("[::1]", True),
    ("0.0.0.0", False), ("::", False), ("", False), ("192.0.2.1", False),
    # A name that merely starts like a loopback address is whatever it resolves to.
    ("127.example.org", False),
    ("loopy.test", True),
    ("mixed.test", False),  # one loopback and one public address: not confined
    ("nowhere.test", False),  # does not resolve: cannot be shown to be loopback
])
def test_is_loopback_resolves_names(host: str, expected: bool) -> None:
    table = {"127.example.org": ["93.184.216.34"], "loopy.test": ["127.0.0.1", "::1"],
             "mixed.test": ["127.0.0.1", "192.0.2.7"]}
    assert is_loopback(host, _resolver(table)) is expected


def test_localhost_resolves_through_the_system() -> None:
    # /etc/hosts, not DNS: localhost is on every machine the tests run on.
    assert is_loopback("localhost")


# -- planning has no side effects; the key is created once, after the checks ------------------
@pytest.mark.usefixtures("models")
def test_dry_run_off_loopback_writes_no_secret(tmp_path: Path) -> None:
    home = tmp_path / "home"
    run(home, "pull", str(TINY_MODEL), "--name", "tiny", check=True)
    doc = run_json(home, "serve", "--chat", "tiny", "--host", "0.0.0.0", "--dry-run")
    assert doc["ok"] and doc["data"]["api_key_required"] is True
    assert not (home / "secrets").exists()
    text = run(home, "serve", "--chat", "tiny", "--host", "0.0.0.0", "--dry-run")
    assert "would require the API key" in text.stdout
    assert not (home / "secrets").exists()


@pytest.mark.usefixtures("models")
def test_refused_start_off_loopback_writes_no_secret(tmp_path: Path) -> None:
    home = tmp_path / "home"
    run(home, "pull", str(TINY_MODEL), "--name", "tiny", check=True)
    blob = next((home / "store" / "blobs").iterdir())
    blob.chmod(0o644)
    with blob.open("r+b") as f:
        f.seek(-10, os.SEEK_END)
        f.write(b"\xff" * 10)
    r = run(home, "serve", "--chat", "tiny", "--host", "0.0.0.0", "--detach")
    assert r.returncode == 5
    assert not (home / "secrets").exists()


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


@pytest.mark.usefixtures("models")
def test_plan_and_dry_run_write_nothing(tmp_path: Path) -> None:
    # Not even the GGUF facts cache, which pull fills and planning only reads.
    home = tmp_path / "home"
    run(home, "pull", str(TINY_MODEL), "--name", "tiny", check=True)
    shutil.rmtree(home / "store" / "facts")
    before = _tree(home)
    assert run(home, "plan", "tiny").returncode == 0
    assert run(home, "serve", "--chat", "tiny", "--dry-run").returncode == 0
    assert _tree(home) == before


# -- a taken port is an error, never a success --------------------------------------------------
class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b'{"status": "ok"}'
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def other_server() -> Iterator[int]:
    """Another program's server on a loopback port, answering /health with 200 like ours."""
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield srv.server_address[1]
    srv.shutdown()
    srv.server_close()


@pytest.mark.usefixtures("models")
def test_taken_gateway_port_is_refused_naming_the_holder(tmp_path: Path, other_server: int
                                                         ) -> None:
    home = tmp_path / "home"
    run(home, "pull", str(TINY_MODEL), "--name", "tiny", check=True)
    r = run(home, "serve", "--chat", "tiny", "--port", str(other_server), "--detach")
    assert r.returncode == 9, r.stderr
    line = r.stderr.strip()
    assert f"port {other_server} for the gateway is already in use by" in line
    assert f"pid {os.getpid()}" in line and "Traceback" not in line
    assert not (home / "run" / "state.json").exists()
    assert run(home, "status").stdout.startswith("no stack running")
    # Refused off loopback too, and before the API key is created: no secret left behind.
    r = run(home, "serve", "--chat", "tiny", "--host", "0.0.0.0", "--port", str(other_server),
            "--detach")
    assert r.returncode == 9 and "already in use" in r.stderr
    assert not (home / "secrets").exists()


def test_health_probe_tells_our_child_from_another_server(other_server: int) -> None:
    from sovctl.runtime.supervisor import Probe, _probe

    url = f"http://127.0.0.1:{other_server}/health"
    # The answering socket is this test process's: a probe for it counts; a probe for any
    # other pid (a child that never bound the port) is a foreign answer.
    assert _probe(url, 2.0, os.getpid()) == Probe.OK
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert _probe(url, 2.0, child.pid) == Probe.FOREIGN
    finally:
        child.kill()
        child.wait()
    closed = f"http://127.0.0.1:{_closed_port()}/health"
    assert _probe(closed, 1.0, os.getpid()) == Probe.FAILED


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- models in the wrong role are refused, saying what they are --------------------------------
@pytest.mark.usefixtures("models")
def test_embedding_model_refused_as_chat_and_chat_model_as_embedding(tmp_path: Path) -> None:
    home = tmp_path / "home"
    run(home, "pull", str(EMBED_MODEL), "--name", "minilm", check=True)
    run(home, "pull", str(TINY_MODEL), "--name", "tiny", check=True)
    r = run(home, "serve", "--chat", "minilm", "--dry-run")
    assert r.returncode == 2
    assert "minilm is an embedding model (bert" in r.stderr and "--embedding minilm" in r.stderr
    r = run(home, "serve", "--embedding", "tiny", "--dry-run")
    assert r.returncode == 2
    assert "tiny is a llama text-generation model with no pooling" in r.stderr
    # A base model without a chat template stays allowed as chat.
    assert run(home, "serve", "--chat", "tiny", "--dry-run").returncode == 0


# -- uptime counts from the first healthy check --------------------------------------------------
def test_uptime_counts_from_first_healthy_check() -> None:
    from sovctl.runtime.documents import ProcessState, Status

    def proc(status: Status, up_since: float | None) -> ProcessState:
        return ProcessState(name="m", kind="runtime", role="chat", model="m", sha256="0" * 64,
                            runtime="llama-server", port=1, pid=1, status=status, restarts=0,
                            up_since=up_since, last_exit="")

    now = time.time()
    assert proc(Status.UP, now - 5).uptime(now) == pytest.approx(5)
    assert proc(Status.STARTING, None).uptime(now) == 0
    assert proc(Status.BACKOFF, now - 50).uptime(now) == 0


# -- the process documents are typed and versioned ---------------------------------------------
def test_state_of_another_schema_is_a_clear_error(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / "run").mkdir(parents=True)
    (home / "run" / "state.json").write_text(json.dumps({"version": 1, "processes": []}))
    r = run(home, "status")
    assert r.returncode == 3
    assert f"is not a {STATE_SCHEMA} document" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_stop_takes_down_a_stack_of_another_version(tmp_path: Path) -> None:
    """A stack whose state another sovctl version wrote (here: its schema made another) is
    still stopped, never left running with nothing that owns it."""
    from tests.helpers import pid_alive
    from tests.test_serve import free_port

    home = tmp_path / "home"
    run(home, "pull", str(TINY_MODEL), "--name", "tiny", check=True)
    started = run_json(home, "serve", "--chat", "tiny", "-d", "--port", str(free_port()))
    assert started["_rc"] == 0, started["_stderr"]
    pids = [started["data"]["supervisor_pid"]] + [
        p["pid"] for p in started["data"]["processes"] if p["pid"]]
    state = home / "run" / "state.json"
    doc = json.loads(state.read_text())
    state.write_text(json.dumps({**doc, "schema": "sovctl.state/999"}))
    assert run(home, "status").returncode == 3
    stopped = run(home, "stop")
    assert stopped.returncode == 0, stopped.stderr
    assert not [p for p in pids if pid_alive(p)]


def test_documents_round_trip(tmp_path: Path) -> None:
    from sovctl.runtime.documents import (
        Event,
        Limits,
        ProcessState,
        Route,
        RoutesTable,
        StackState,
        Status,
    )

    st = StackState(supervisor_pid=1, started_at=1.0, updated_at=2.0, url="u", host="h", port=2,
                    api_key_required=False, stopping=False, final=False,
                    processes=(ProcessState("m", "runtime", "chat", "m", "0" * 64,
                                            "llama-server", 3, 4, Status.UP, 1, 5.0, ""),),
                    events=(Event(1.0, "m", "healthy"),))
    st.write(tmp_path / "state.json")
    assert StackState.read(tmp_path / "state.json") == st
    rt = RoutesTable("127.0.0.1", 8088, False, "k", Limits(1, 2.0, 3), "s",
                     (Route("m", "chat", "local", "m", "http://127.0.0.1:3", "llama-server", 4,
                            None),))
    rt.write(tmp_path / "routes.json")
    assert RoutesTable.read(tmp_path / "routes.json") == rt


# -- shipped profiles are package data -----------------------------------------------------------
def test_shipped_profiles_come_from_the_package_not_the_source_tree() -> None:
    import sovctl
    from sovctl import config

    found = config._shipped_profile("cpu-small")
    assert found is not None
    assert Path(str(found)).resolve().is_relative_to(Path(sovctl.__file__).resolve().parent)
    assert {"cpu-small", "gpu-24g"} <= set(config.shipped_profiles())
    # One copy: the top-level folder people know is a link to the packaged one.
    assert (ROOT / "profiles").is_symlink()
    assert (ROOT / "profiles").resolve() == Path(sovctl.__file__).resolve().parent / "profiles"


# -- a missing model fails the tests that need it, and only those -------------------------------
def test_missing_models_fail_only_the_tests_that_use_them(tmp_path: Path) -> None:
    probe = ROOT / "tests" / "test_config.py"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         f"{probe}::test_env_name", f"{Path(__file__)}::test_models_probe"],
        env={**os.environ, "SOVCTL_TEST_MODELS": str(tmp_path / "absent")},
        capture_output=True, text=True, cwd=ROOT, timeout=120)
    # pytest reports a failed fixture as an error: the run fails, nothing is skipped.
    assert proc.returncode == 1 and "1 passed, 1 error" in proc.stdout, proc.stdout
    assert "test models missing" in proc.stdout and "skipped" not in proc.stdout


def test_models_probe(models: Path) -> None:
    """Run by the test above with the models folder missing: it must fail there, not skip."""
    assert (models / TINY_MODEL.name).is_file()


@pytest.mark.usefixtures("models")
def test_refused_up_off_loopback_writes_no_secret(tmp_path: Path, other_server: int) -> None:
    # up starts through the same sequence as serve: every refusal before the key.
    home = tmp_path / "home"
    home.mkdir()
    (home / "sovctl.toml").write_text(f"""
[serve]
runtime = "llama-server"
host = "0.0.0.0"
port = {other_server}
n_ctx = 256
parallel = 1

[pull.tiny]
ref = "{TINY_MODEL}"

[models.tiny]
role = "completion"
""")
    r = run(home, "up")
    assert r.returncode == 9, r.stderr
    assert "already in use" in r.stderr or "held" in r.stderr, r.stderr
    assert not (home / "secrets").exists()
    assert not (home / "run" / "state.json").exists()
