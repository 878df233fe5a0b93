"""`sovctl serve`: real llama.cpp runtimes behind the gateway, supervised, on loopback."""

from __future__ import annotations

import concurrent.futures as cf
import json
import math
import os
import signal
import stat
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from tests.conftest import CHAT_MODEL, EMBED_MODEL, TINY_MODEL
from tests.helpers import pid_alive, processes, run, run_json, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("models")]

FAST_SUPERVISION = {
    "SOVCTL_SERVE__HEALTH_INTERVAL": "0.5",
    "SOVCTL_SERVE__HEALTH_TIMEOUT": "1",
    "SOVCTL_SERVE__HEALTH_FAILURES": "2",
    "SOVCTL_SERVE__STOP_TIMEOUT": "5",
}


def free_port() -> int:
    from sovctl.runtime.ports import free_port as fp

    return fp()


RUNTIMES = ("llama-server", "llama-cpp-python")


class Stack:
    def __init__(self, home: Path, port: int, env: dict[str, str]) -> None:
        self.home, self.port, self.env = home, port, env
        self.base = f"http://127.0.0.1:{port}"
        self.runtime = env.get("SOVCTL_SERVE__RUNTIME", "llama-server")

    def client(self, key: str = "unused") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base + "/v1", api_key=key, max_retries=0,
                             timeout=120)

    def procs(self) -> dict[str, dict]:
        return processes(self.home)

    def all_pids(self) -> list[int]:
        st = json.loads((self.home / "run" / "state.json").read_text())
        return [st["supervisor_pid"]] + [p["pid"] for p in st["processes"] if p["pid"]]


def start_stack(home: Path, *serve_args: str, env: dict[str, str] | None = None,
                models: tuple[tuple[Path, str], ...] = ((CHAT_MODEL, "smol"),
                                                          (EMBED_MODEL, "minilm"))) -> Stack:
    env = {**FAST_SUPERVISION, **(env or {})}
    for path, name in models:
        run(home, "pull", str(path), "--name", name, check=True)
    port = free_port()
    proc = run(home, "serve", "--port", str(port), "-d", *serve_args, env=env)
    assert proc.returncode == 0, proc.stderr
    return Stack(home, port, env)


def stop_stack(stack: Stack) -> None:
    pids = stack.all_pids()
    result = run(stack.home, "stop", env=stack.env)
    assert result.returncode == 0, result.stderr
    assert not [p for p in pids if pid_alive(p)], "processes left behind after stop"


@pytest.fixture(scope="module", params=RUNTIMES)
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """The same stack on each runtime: every test below passes with both."""
    s = start_stack(tmp_path_factory.mktemp("stack"), "--chat", "smol", "--embedding", "minilm",
                    env={"SOVCTL_SERVE__RUNTIME": request.param})
    yield s
    stop_stack(s)


PARIS = "What is the capital of France? Answer in one word."


def cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def test_openai_client_through_gateway(stack: Stack) -> None:
    c = stack.client()
    assert {m.id for m in c.models.list()} == {"smol", "minilm"}
    r = c.chat.completions.create(
        model="smol", temperature=0, max_tokens=20,
        messages=[{"role": "user", "content": PARIS}],
    )
    assert "Paris" in r.choices[0].message.content
    chunks = list(c.chat.completions.create(
        model="smol", temperature=0, max_tokens=20, stream=True,
        messages=[{"role": "user", "content": PARIS}],
    ))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert "Paris" in text
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    comp = c.completions.create(model="smol", prompt="The capital of France is", max_tokens=8,
                                temperature=0)
    assert comp.choices[0].text.strip()
    emb = c.embeddings.create(model="minilm", input=[
        "A cat sits on the mat", "A kitten is resting on a rug",
        "Quarterly revenue grew by ten percent"])
    vecs = [d.embedding for d in emb.data]
    assert len(vecs[0]) == 384
    assert cosine(vecs[0], vecs[1]) > 0.5 > cosine(vecs[0], vecs[2])


def test_health_ready_metrics(stack: Stack) -> None:
    assert httpx.get(stack.base + "/health").json() == {"status": "ok"}
    ready = httpx.get(stack.base + "/ready")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    stack.client().embeddings.create(model="minilm", input="metrics please")
    text = httpx.get(stack.base + "/metrics").text
    assert 'sovctl_requests_total{model="minilm",endpoint="/v1/embeddings",code="200"}' in text
    assert "sovctl_request_duration_seconds_bucket" in text
    assert 'sovctl_runtime_restarts_total{process="smol"}' in text
    assert 'sovctl_tokens_total{model="minilm",direction="in"}' in text


def test_bad_requests_get_openai_errors_and_service_continues(stack: Stack) -> None:
    url = stack.base + "/v1/chat/completions"
    r = httpx.post(url, json={"model": "nope", "messages": []})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = httpx.post(url, content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = httpx.post(stack.base + "/v1/embeddings", json={"model": "smol", "input": "x"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "model_role_mismatch"
    r = httpx.post(url, content=b"x" * (9 * 1024 * 1024))
    assert r.status_code == 413 and "error" in r.json()
    r = httpx.get(stack.base + "/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    assert stack.client().embeddings.create(model="minilm", input="still here").data


@pytest.mark.parametrize("clients", [4, 8])
def test_concurrent_streams_all_complete(stack: Stack, clients: int) -> None:
    """Every stream completes (llama-cpp-python alone cuts concurrent streams short). On
    llama-server the first four are served side by side: each has its first token before any
    of them ends, so none waits for another's whole answer."""
    c = stack.client()

    def one(i: int) -> tuple[str, str | None, float, float]:
        first = 0.0
        chunks = []
        for ch in c.chat.completions.create(
                model="smol", temperature=0, max_tokens=32, stream=True,
                messages=[{"role": "user", "content": f"List {i + 3} colours."}]):
            if not first and ch.choices and ch.choices[0].delta.content:
                first = time.monotonic()
            chunks.append(ch)
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        finish = next((ch.choices[0].finish_reason for ch in reversed(chunks)
                       if ch.choices and ch.choices[0].finish_reason), None)
        return text, finish, first, time.monotonic()

    with cf.ThreadPoolExecutor(clients) as ex:
        results = list(ex.map(one, range(clients)))
    for text, finish, _, _ in results:
        assert text.strip(), "a stream ended empty"
        assert finish in ("stop", "length")
    if stack.runtime == "llama-server":
        firsts = sorted(r[2] for r in results)
        ends = sorted(r[3] for r in results)
        assert firsts[3] < ends[0], "the first four streams were not served side by side"


def test_runtime_port_refuses_a_client_without_the_internal_key(stack: Stack) -> None:
    """The gateway is the only way in: its key, limits and policy cannot be skipped by
    calling a runtime's loopback port."""
    smol = stack.procs()["smol"]
    body = {"model": "smol", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
    url = f"http://127.0.0.1:{smol['port']}/v1/chat/completions"
    assert httpx.post(url, json=body, timeout=30).status_code == 401
    assert httpx.post(url, json=body, timeout=30,
                      headers={"Authorization": "Bearer guess"}).status_code == 401
    key_file = stack.home / "run" / "keys" / "smol.key"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(key_file.parent.stat().st_mode) == 0o700
    # Never on a command line, which every local user can read.
    key = key_file.read_text().strip()
    cmdline = Path(f"/proc/{smol['pid']}/cmdline").read_bytes().decode()
    assert key not in cmdline and key not in (stack.home / "run" / "plan.json").read_text()
    assert stack.client().chat.completions.create(model="smol", max_tokens=2, messages=[
        {"role": "user", "content": "hi"}]).choices


def test_malformed_request_never_reaches_the_runtime(stack: Stack) -> None:
    r = httpx.post(stack.base + "/v1/chat/completions", timeout=30,
                   json={"model": "smol", "messages": "hi"})
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == "messages"
    assert "Traceback" not in r.text and "/" not in err["message"]


def test_embeddings_not_blocked_by_long_chat(stack: Stack) -> None:
    c = stack.client()
    first_chunk = threading.Event()
    finished = threading.Event()

    def long_chat() -> None:
        for _ in c.chat.completions.create(
                model="smol", temperature=0, max_tokens=200, stream=True,
                messages=[{"role": "user", "content": "Write a long story about a lighthouse."}]):
            first_chunk.set()
        finished.set()

    t = threading.Thread(target=long_chat)
    t.start()
    assert first_chunk.wait(60)
    emb = c.embeddings.create(model="minilm", input="quick embedding")
    assert len(emb.data[0].embedding) == 384
    assert not finished.is_set(), "embedding waited for the whole chat generation"
    t.join(120)


def test_status_and_logs(stack: Stack) -> None:
    doc = run_json(stack.home, "status")
    assert doc["ok"] and doc["data"]["running"] is True
    names = {p["name"]: p for p in doc["data"]["processes"]}
    assert set(names) == {"smol", "minilm", "gateway"}
    assert all(p["status"] == "up" and p["pid"] for p in names.values())
    assert names["smol"]["role"] == "chat" and names["minilm"]["role"] == "embedding"
    logs = run(stack.home, "logs", "gateway")
    assert logs.returncode == 0
    assert "healthy" in run(stack.home, "logs").stdout
    missing = run(stack.home, "logs", "nope")
    assert missing.returncode == 4 and "no log for 'nope'" in missing.stderr


def test_killed_runtime_comes_back(stack: Stack) -> None:
    before = stack.procs()["smol"]
    os.kill(before["pid"], signal.SIGKILL)
    # While it is down a request gets a quick 503 with Retry-After, or is served after restart.
    r = httpx.post(stack.base + "/v1/completions", timeout=60,
                   json={"model": "smol", "prompt": "Hello", "max_tokens": 4})
    assert r.status_code in (200, 503)
    if r.status_code == 503:
        assert r.headers["retry-after"]
    after = wait_for(lambda: (p := stack.procs()["smol"])["status"] == "up"
                     and p["restarts"] > before["restarts"] and p, what="smol restarted")
    assert after["pid"] != before["pid"]
    comp = stack.client().completions.create(model="smol", prompt="Hello", max_tokens=4)
    assert comp.choices[0].text is not None


def test_hung_runtime_is_restarted(stack: Stack) -> None:
    before = stack.procs()["minilm"]
    os.kill(before["pid"], signal.SIGSTOP)
    try:
        wait_for(lambda: stack.procs()["minilm"]["restarts"] > before["restarts"], timeout=30,
                 what="hung minilm restarted")
    finally:
        if pid_alive(before["pid"]):
            os.kill(before["pid"], signal.SIGCONT)
    wait_for(lambda: stack.procs()["minilm"]["status"] == "up", what="minilm up again")
    assert not pid_alive(before["pid"])
    assert stack.client().embeddings.create(model="minilm", input="back").data


def test_crash_loop_marked_failed_others_keep_serving(tmp_path: Path) -> None:
    s = start_stack(tmp_path / "home", "--chat", "tiny", "--embedding", "minilm",
                    env={"SOVCTL_SERVE__MAX_RESTARTS": "2"},
                    models=((TINY_MODEL, "tiny"), (EMBED_MODEL, "minilm")))
    try:
        for _ in range(3):
            p = wait_for(lambda: (q := s.procs()["tiny"])["status"] == "up" and q,
                         what="tiny up")
            os.kill(p["pid"], signal.SIGKILL)
            wait_for(lambda pid=p["pid"]: s.procs()["tiny"]["pid"] != pid, what="tiny reaped")
        wait_for(lambda: s.procs()["tiny"]["status"] == "failed", what="tiny marked failed")
        ready = httpx.get(s.base + "/ready")
        assert ready.status_code == 503 and ready.json()["runtimes"]["tiny"] == "failed"
        t0 = time.monotonic()
        r = httpx.post(s.base + "/v1/completions", json={"model": "tiny", "prompt": "x"})
        assert r.status_code == 503 and r.headers["retry-after"]
        assert time.monotonic() - t0 < 5
        assert s.client().embeddings.create(model="minilm", input="still serving").data
    finally:
        stop_stack(s)


def test_queue_bound_gives_429_never_hangs(tmp_path: Path) -> None:
    # One slot and one place in the queue, the eight requests sent at once: the tiny model
    # answers in milliseconds, so only requests truly in flight together can fill the queue.
    s = start_stack(tmp_path / "home", "--chat", "tiny",
                    env={"SOVCTL_SERVE__QUEUE_LIMIT": "1", "SOVCTL_SERVE__PARALLEL": "1"},
                    models=((TINY_MODEL, "tiny"),))
    together = threading.Barrier(8)
    try:
        def one(_: int) -> int:
            together.wait(timeout=30)
            r = httpx.post(s.base + "/v1/completions", timeout=120,
                           json={"model": "tiny", "prompt": "Once upon a time",
                                 "max_tokens": 200, "temperature": 0})
            if r.status_code == 429:
                assert r.headers["retry-after"] and r.json()["error"]["code"] == "queue_full"
            else:
                assert r.status_code == 200 and r.json()["choices"][0]["text"]
            return r.status_code

        with cf.ThreadPoolExecutor(8) as ex:
            codes = list(ex.map(one, range(8)))
        assert 200 in codes and 429 in codes
    finally:
        stop_stack(s)


def test_supervisor_killed_leaves_no_children(tmp_path: Path) -> None:
    s = start_stack(tmp_path / "home", "--chat", "tiny", models=((TINY_MODEL, "tiny"),))
    pids = s.all_pids()
    os.kill(pids[0], signal.SIGKILL)
    wait_for(lambda: not any(pid_alive(p) for p in pids), timeout=15,
             what="children to die with the supervisor")
    result = run(s.home, "stop")
    assert result.returncode == 0 and "no stack was running" in result.stdout


def test_non_loopback_bind_requires_api_key(tmp_path: Path) -> None:
    home = tmp_path / "home"
    run(home, "pull", str(TINY_MODEL), "--name", "tiny", check=True)
    port = free_port()
    first = run(home, "serve", "--chat", "tiny", "--host", "0.0.0.0", "--port", str(port), "-d",
                env=FAST_SUPERVISION)
    assert first.returncode == 0, first.stderr
    s = Stack(home, port, FAST_SUPERVISION)
    try:
        key_line = next(line for line in first.stdout.splitlines() if "shown once" in line)
        key_file = s.home / "secrets" / "api_key"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        key = key_file.read_text().strip()
        assert key_line.endswith(key)
        r = httpx.get(s.base + "/v1/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = httpx.get(s.base + "/v1/models", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
        assert [m.id for m in s.client(key).models.list()] == ["tiny"]
        # Runtimes never listen beyond loopback.
        for p in s.procs().values():
            if p["kind"] == "runtime":
                assert httpx.get(f"http://127.0.0.1:{p['port']}/health").status_code == 200
        routes = json.loads((s.home / "run" / "routes.json").read_text())
        assert all(r["upstream"].startswith("http://127.0.0.1:") for r in routes["routes"])
    finally:
        stop_stack(s)


def test_altered_blob_refuses_to_start(tmp_path: Path) -> None:
    home = tmp_path / "home"
    run(home, "pull", str(TINY_MODEL), "--name", "tiny", check=True)
    blob = next((home / "store" / "blobs").iterdir())
    blob.chmod(0o644)
    data = bytearray(blob.read_bytes())
    data[-100] ^= 0xFF
    blob.write_bytes(bytes(data))
    result = run(home, "serve", "--chat", "tiny", "--port", str(free_port()), "-d")
    assert result.returncode == 5
    assert "refusing to serve 'tiny'" in result.stderr and "Traceback" not in result.stderr
    assert not (home / "run" / "state.json").exists()


def test_dry_run_prints_argv_and_starts_nothing(tmp_path: Path) -> None:
    home = tmp_path / "home"
    run(home, "pull", str(TINY_MODEL), "--name", "tiny", check=True)
    doc = run_json(home, "serve", "--chat", "tiny", "--dry-run")
    assert doc["ok"]
    procs = {p["name"]: p for p in doc["data"]["processes"]}
    assert set(procs) == {"tiny", "gateway"}
    args = procs["tiny"]["argv"]
    assert procs["tiny"]["runtime"] == "llama-server"
    assert args[4] == "--exec" and Path(args[5]).name == "llama-server"
    assert args[args.index("--host") + 1] == "127.0.0.1"
    # Four slots, each with the context one request may use; the key only as a file's path.
    assert args[args.index("--parallel") + 1] == "4"
    assert args[args.index("--ctx-size") + 1] == str(4 * 2048)
    key_file = args[args.index("--api-key-file") + 1]
    assert key_file == str(home / "run" / "keys" / "tiny.key") and not Path(key_file).exists()
    assert procs["tiny"]["env"]["HF_HUB_OFFLINE"] == "1"
    assert not (home / "run" / "state.json").exists()
    text = run(home, "serve", "--chat", "tiny", "--dry-run")
    assert "llama-server" in text.stdout
    fallback = run_json(home, "serve", "--chat", "tiny", "--dry-run",
                        env={"SOVCTL_SERVE__RUNTIME": "llama-cpp-python"})
    args = fallback["data"]["processes"][0]["argv"]
    assert "llama_cpp.server" in args and args[args.index("--interrupt_requests") + 1] == "False"
    assert fallback["data"]["processes"][0]["env"]["SOVCTL_RUNTIME_KEY_FILE"] == key_file


def test_llama_server_setting_and_fallback(tmp_path: Path) -> None:
    from sovctl.errors import ConfigError
    from sovctl.runtime.plan import _choose_runtime

    home = tmp_path / "home"
    run(home, "pull", str(TINY_MODEL), "--name", "tiny", check=True)
    r = run(home, "serve", "--chat", "tiny", "--dry-run",
            env={"SOVCTL_SERVE__LLAMA_SERVER": str(tmp_path / "no-llama-server")})
    assert r.returncode == 3 and "not an executable file" in r.stderr
    assert "scripts/setup" in r.stderr
    # Where no binary is found at all: auto falls back and says how to get batching; an
    # explicit llama-server is an error, never a silent fallback.
    runtime, note = _choose_runtime("tiny", "auto", None)
    assert runtime == "llama-cpp-python" and note and "scripts/setup" in note
    with pytest.raises(ConfigError, match="no llama-server binary was found"):
        _choose_runtime("tiny", "llama-server", None)
    assert _choose_runtime("tiny", "auto", tmp_path) == ("llama-server", None)


def test_serve_errors(tmp_path: Path) -> None:
    home = tmp_path / "home"
    r = run(home, "serve")
    assert r.returncode == 2 and "no models to serve" in r.stderr
    r = run(home, "serve", "--chat", "ghost")
    assert r.returncode == 4 and "no model named 'ghost'" in r.stderr


def test_service_install_writes_confined_unit(tmp_path: Path) -> None:
    home = tmp_path / "home"
    doc = run_json(home, "service", "install", "--chat", "tiny", "--embedding", "minilm",
                   "--rerank", "rr", "--unit-dir", str(tmp_path))
    assert doc["ok"]
    text = (tmp_path / "sovctl.service").read_text()
    for line in ("Restart=on-failure", "NoNewPrivileges=yes", "ProtectSystem=strict",
                 "PrivateTmp=yes", "IPAddressDeny=any", "IPAddressAllow=localhost"):
        assert line in text
    assert "serve --host 127.0.0.1 --port 8088 --chat tiny --embedding minilm --rerank rr" \
        in text
    assert any("systemctl" in c for c in doc["data"]["commands"])


def test_client_gone_mid_stream_frees_the_runtime(stack: Stack) -> None:
    body = {"model": "smol", "stream": True, "max_tokens": 200,
            "messages": [{"role": "user", "content": "Write a long poem about rivers."}]}
    for _ in range(3):
        with httpx.stream("POST", stack.base + "/v1/chat/completions", json=body,
                          timeout=60) as r:
            assert r.status_code == 200
            next(r.iter_raw())  # one chunk, then hang up
    r = httpx.post(stack.base + "/v1/completions", timeout=60,
                   json={"model": "smol", "prompt": "Hi", "max_tokens": 4})
    assert r.status_code == 200


def test_foreground_serve_stops_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    import subprocess
    import sys

    home = tmp_path / "home"
    run(home, "pull", str(TINY_MODEL), "--name", "tiny", check=True)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "sovctl", "serve", "--chat", "tiny",
                             "--port", str(port)],
                            env={**os.environ, "SOVCTL_HOME": str(home), **FAST_SUPERVISION},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: httpx.get(f"http://127.0.0.1:{port}/ready").status_code == 200
                 if _listening(port) else False, what="foreground stack ready")
        state = json.loads((home / "run" / "state.json").read_text())
        children = [p["pid"] for p in state["processes"]]
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "stopped" in out
    assert not [p for p in children if pid_alive(p)]


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_runtime_that_cannot_start_fails_the_detached_start(tmp_path: Path, runtime: str
                                                            ) -> None:
    home = tmp_path / "home"
    run(home, "pull", str(TINY_MODEL), "--name", "tiny", check=True)
    (home / "sovctl.toml").write_text(
        '[serve]\nmax_restarts = 1\n\n[models.tiny]\nrole = "chat"\n'
        'extra_args = ["--no_such_flag", "1"]\n')
    result = run(home, "serve", "--port", str(free_port()), "-d",
                 env={**FAST_SUPERVISION, "SOVCTL_SERVE__RUNTIME": runtime})
    assert result.returncode == 7, result.stderr
    assert "tiny failed to start" in result.stderr
    said = {"llama-server": "invalid argument: --no-such-flag",
            "llama-cpp-python": "unrecognized arguments: --no_such_flag"}[runtime]
    assert said in run(home, "logs", "tiny").stdout
    state = json.loads((home / "run" / "state.json").read_text())
    assert state["final"] is True
    assert not any(pid_alive(p) for p in [state["supervisor_pid"]])


def test_plan_json_carries_its_schema_and_another_is_refused() -> None:
    """The plan a detached supervisor runs crosses from the CLI as a versioned document."""
    from sovctl.errors import ConfigError
    from sovctl.runtime.documents import PLAN_SCHEMA
    from sovctl.runtime.plan import Plan

    p = Plan(host="127.0.0.1", port=8088, processes=(), models=(), routes_file="routes.json",
             state_file="state.json", egress_log="egress.jsonl", logs_dir="logs",
             api_key_required=False)
    doc = json.loads(p.to_json())
    assert doc["schema"] == PLAN_SCHEMA == "sovctl.plan/3"
    assert Plan.from_json(p.to_json()) == p
    unversioned = {k: v for k, v in doc.items() if k != "schema"}
    for other in ({**doc, "schema": "sovctl.plan/0"}, unversioned):
        with pytest.raises(ConfigError, match=r"run/plan.json is not a sovctl.plan/3 document"):
            Plan.from_json(json.dumps(other), "run/plan.json")
