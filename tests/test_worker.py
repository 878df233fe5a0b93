"""RPC workers and the [cluster]: address rules, argv, a worker lost while idle (on loopback),
and a fleet simulated in namespaces."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from tests.conftest import CHAT_MODEL
from tests.helpers import SOVCTL, processes, run, wait_for

from sovctl import config
from sovctl.errors import ConfigError, UsageError
from sovctl.home import Home
from sovctl.runtime import cluster, plan
from sovctl.runtime.documents import Status
from sovctl.runtime.ports import free_port

NO_WG: set[str] = set()


def _scope(host: str, allow: bool = False, wg: set[str] = NO_WG) -> str:
    return cluster.bind_scope(host, allow, wireguard=lambda: wg,
                              resolve=lambda h: {"gpu.lan": ["192.168.1.9"],
                                                 "mixed.example": ["10.0.0.1", "8.8.8.8"]}[h])


@pytest.mark.parametrize(("host", "scope"), [
    ("127.0.0.1", "loopback"), ("::1", "loopback"), ("10.99.1.2", "private"),
    ("172.31.0.5", "private"), ("192.168.1.9", "private"), ("fd00::2", "private"),
    ("gpu.lan", "private"),
])
def test_private_addresses_are_allowed(host: str, scope: str) -> None:
    assert _scope(host) == scope


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "8.8.8.8", "100.64.0.1", "mixed.example"])
def test_public_addresses_are_refused_without_the_flag(host: str) -> None:
    with pytest.raises(UsageError, match="unauthenticated") as e:
        _scope(host)
    assert cluster.ACK_FLAG in (e.value.hint or "")
    assert _scope(host, allow=True) == "public"


def test_a_wireguard_address_counts_as_private() -> None:
    # A WireGuard interface may carry any address, CGNAT's 100.64/10 for one (Tailscale).
    assert _scope("100.64.0.1", wg={"100.64.0.1"}) == "wireguard"


def test_devices_and_worker_argv() -> None:
    assert cluster.device_arg("cpu") == "CPU"
    assert cluster.device_arg("cuda:1") == "CUDA1"
    for bad in ("gpu", "cuda:", "cuda:x"):
        with pytest.raises(UsageError):
            cluster.device_arg(bad)
    argv = cluster.worker_argv("/bin/rpc", "10.0.0.2", 50052, "cuda:0", 4, "/h/cache/rpc", {})
    assert argv.args[argv.args.index("--exec") + 1:] == (
        "/bin/rpc", "--host", "10.0.0.2", "--port", "50052", "--device", "CUDA0",
        "--threads", "4", "--cache")
    assert argv.env["LLAMA_CACHE"] == "/h/cache/rpc"


def test_rpc_argv_narrows_to_live_workers() -> None:
    args = ("llama-server", "--rpc", "a:1,b:2", "--n-gpu-layers", "999")
    assert cluster.rpc_argv(args, ["a:1"]) == ("llama-server", "--rpc", "a:1",
                                               "--n-gpu-layers", "999")
    assert cluster.rpc_argv(args, []) == ("llama-server", "--n-gpu-layers", "999")


def test_what_a_runtime_holds_on_each_worker_comes_from_its_load_log() -> None:
    log = """0.00.253 I load_tensors: RPC0[10.0.0.2:50052] model buffer size =    33.82 MiB
0.00.253 I load_tensors: RPC1[10.0.0.3:50052] model buffer size =    58.28 MiB
0.00.253 I load_tensors:   CPU_Mapped model buffer size =    28.12 MiB
0.00.444 I llama_kv_cache: RPC0[10.0.0.2:50052] KV buffer size =     6.00 MiB
0.00.454 I sched_reserve: RPC1[10.0.0.3:50052] compute buffer size =    18.91 MiB
0.00.155 I common_memory_breakdown_print: |   - RPC0 (10.0.0.2:50052) | 24105 = 24105 + (58 |
"""
    assert cluster.held_on_workers(log) == {
        "10.0.0.2:50052": int(33.82 * 2**20) + 6 * 2**20,
        "10.0.0.3:50052": int(58.28 * 2**20) + int(18.91 * 2**20)}


def test_cluster_config(sovctl_home: Path) -> None:
    home = Home(sovctl_home)
    home.root.mkdir(parents=True)
    home.config_path.write_text('[cluster]\nworkers = ["10.0.0.2:50052", "gpu.lan:50053"]\n')
    assert config.load(home).cluster.workers == ("10.0.0.2:50052", "gpu.lan:50053")
    cfg = config.load(home, environ={"SOVCTL_CLUSTER__WORKERS": "10.0.0.3:1, 10.0.0.4:2"})
    assert cfg.cluster.workers == ("10.0.0.3:1", "10.0.0.4:2")
    for bad in ('["10.0.0.2"]', '["fd00::2:50052"]', '["h:0"]', '[5]'):
        home.config_path.write_text(f"[cluster]\nworkers = {bad}\n")
        with pytest.raises(ConfigError):
            config.load(home)


def test_serve_passes_workers_to_the_chat_runtime(sovctl_home: Path, models: Path) -> None:
    home = Home(sovctl_home)
    run(sovctl_home, "pull", str(CHAT_MODEL), "--name", "smol", check=True)
    run(sovctl_home, "pull", str(models / "all-MiniLM-L6-v2-f16.gguf"), "--name", "minilm",
        check=True)
    home.config_path.write_text('[cluster]\nworkers = ["10.0.0.2:50052", "10.0.0.3:50052"]\n')
    p = plan.build(home, config.load(home), chat=["smol"], embedding=["minilm"])
    by_name = {s.name: s for s in p.processes}
    chat, embed = by_name["smol"].argv.args, by_name["minilm"].argv.args
    assert chat[chat.index("--rpc") + 1] == "10.0.0.2:50052,10.0.0.3:50052"
    assert chat[chat.index("--n-gpu-layers") + 1] == str(plan.ALL_LAYERS)
    assert by_name["smol"].workers == ("10.0.0.2:50052", "10.0.0.3:50052")
    assert "--rpc" not in embed and not by_name["minilm"].workers
    assert any("offloaded" in n for n in p.notes)
    assert plan.Plan.from_json(p.to_json()).processes == p.processes
    home.config_path.write_text('[cluster]\nworkers = ["10.0.0.2:50052"]\nmodel = "minilm"\n')
    with pytest.raises(ConfigError, match="not a chat model"):
        plan.build(home, config.load(home), chat=["smol"], embedding=["minilm"])


def test_probe_worker_reads_memory_and_reports_a_dead_one(tmp_path: Path) -> None:
    port = free_port()
    binary = shutil.which(cluster.RPC_WORKER, path=str(Path(sys.executable).parent))
    assert binary, "ggml-rpc-server is built by scripts/setup"
    proc = subprocess.Popen([binary, "--port", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        health = wait_for(lambda: (h := cluster.probe_worker(f"127.0.0.1:{port}", 2)).ok and h,
                          timeout=20, what="the worker")
        assert 0 < health.free <= health.total
    finally:
        proc.kill()
        proc.wait()
    dead = cluster.probe_worker(f"127.0.0.1:{port}", 2)
    assert not dead.ok and dead.reason


def test_connected_workers_sees_the_far_side_close() -> None:
    """What the supervisor watches: a process's connection to a worker's endpoint, established,
    then closed by the far side, as a dying worker's kernel closes it. Here the process is this
    one, and the worker a plain listener."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        endpoint, named = f"127.0.0.1:{port}", f"worker.lan:{port}"
        unused = f"127.0.0.1:{free_port()}"
        client = socket.create_connection(("127.0.0.1", port))
        far, _ = server.accept()
        try:
            assert cluster.connected_workers(os.getpid(), [endpoint, unused]) == {endpoint}
            assert cluster.connected_workers(os.getpid(), [named],
                                             resolve=lambda h: ["127.0.0.1"]) == {named}
            far.close()
            wait_for(lambda: cluster.connected_workers(os.getpid(), [endpoint]) == set(),
                     timeout=5, what="the closed connection no longer counted")
        finally:
            client.close()
    gone = subprocess.Popen(["true"])
    gone.wait()
    assert cluster.connected_workers(gone.pid, [endpoint]) is None


@pytest.mark.parametrize("status", [Status.STARTING, Status.BACKOFF, Status.FAILED])
def test_the_gateway_waits_for_a_restart_within_its_bound(tmp_path: Path,
                                                          status: Status) -> None:
    """A runtime starting or restarting is waited for, up to the queue timeout, and one given
    up on is not; either way a runtime never up gets its 503 with the status in words. (The
    end-to-end test below has the wait end in a 200.)"""
    import asyncio

    from sovctl.gateway.app import create_app
    from sovctl.runtime.documents import Limits, ProcessState, Route, RoutesTable, StackState

    state = tmp_path / "state.json"
    StackState(supervisor_pid=0, started_at=0.0, updated_at=0.0, url="", host="127.0.0.1",
               port=0, api_key_required=False, stopping=False, final=False, events=(),
               processes=(ProcessState(name="smol", kind="runtime", role="chat", model="smol",
                                       sha256="", runtime="llama-server", port=0, pid=None,
                                       status=status, restarts=1, up_since=None,
                                       last_exit=""),)).write(state)
    table = RoutesTable(
        host="127.0.0.1", port=0, auth_required=False, key_file="", state_file=str(state),
        limits=Limits(queue_limit=8, queue_timeout=1, max_body_bytes=1 << 20),
        routes=(Route(model="smol", role="chat", kind="local", process="smol",
                      upstream=f"http://127.0.0.1:{free_port()}", runtime="llama-server",
                      parallel=1, key_file=None),))

    async def ask() -> httpx.Response:
        transport = httpx.ASGITransport(app=create_app(table))
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client:
            return await client.post("/v1/chat/completions", json={
                "model": "smol", "messages": [{"role": "user", "content": "Hi"}]})

    r = asyncio.run(ask())
    assert r.status_code == 503 and f"runtime for 'smol' is {status}" in r.text
    assert ("keeps crashing" in r.text) == (status == Status.FAILED)


def _state(home: Path) -> dict[str, dict[str, object]]:
    """The supervisor's state file as it is now: cheaper to poll than `sovctl status`."""
    doc = json.loads((home / "run" / "state.json").read_text())
    return {p["name"]: p for p in doc["processes"]}


@pytest.mark.slow
def test_a_worker_lost_while_idle(tmp_path: Path, models: Path) -> None:
    """Two ggml-rpc-server workers on loopback, each under its own `sovctl worker`; one dies
    while the head's runtime is idle. The supervisor sees the runtime's connection to it close
    and restarts the runtime without it at once, and a request that arrives during that
    restart waits for it instead of getting a 503."""
    head, workers = tmp_path / "head", [tmp_path / "w1", tmp_path / "w2"]
    ports = [free_port(), free_port()]
    endpoints = [f"127.0.0.1:{p}" for p in ports]
    fast = {"SOVCTL_SERVE__HEALTH_INTERVAL": "0.5", "SOVCTL_SERVE__STOP_TIMEOUT": "5"}
    run(head, "pull", str(CHAT_MODEL), "--name", "smol", check=True)
    (head / "sovctl.toml").write_text(
        "[models.smol]\nrole = \"chat\"\nparallel = 1\nn_ctx = 512\nn_threads = 1\n"
        f"[cluster]\nworkers = {json.dumps(endpoints)}\n")
    port = free_port()
    try:
        for home, worker_port in zip(workers, ports, strict=True):
            run(home, "worker", "--port", str(worker_port), "--threads", "1", "--detach",
                check=True)
        run(head, "serve", "--detach", "--port", str(port), env=fast, check=True)
        assert not _ask(port).startswith("HTTP"), "the fleet answers"
        before = processes(head)["smol"]
        assert [w["status"] for w in before["workers"]] == ["in use", "in use"]

        # The second worker's box dies: its supervisor SIGKILLed, the worker with it.
        os.kill(json.loads((workers[1] / "run" / "state.json").read_text())["supervisor_pid"],
                signal.SIGKILL)
        restarting = wait_for(lambda: (s := _state(head)["smol"])["restarts"]
                              > before["restarts"] and s, timeout=10, interval=0.05,
                              what="the runtime restarted without the lost worker")
        assert restarting["status"] != "up"
        sent = time.time()
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=120,
                       json={"model": "smol", "max_tokens": 8,
                             "messages": [{"role": "user", "content": "Hi"}]})
        assert r.status_code == 200, r.text
        smol = processes(head)["smol"]
        # Sent before the runtime was up again: the gateway waited for it.
        assert smol["status"] == "up" and smol["up_since"] > sent
        assert smol["last_exit"].startswith(f"degraded: started without worker {endpoints[1]}")
        workers_now = {w["endpoint"]: w for w in smol["workers"]}
        assert workers_now[endpoints[0]]["status"] == "in use"
        assert workers_now[endpoints[1]]["status"] == "lost"
        events = (head / "logs" / "supervisor.log").read_text()
        assert f"worker {endpoints[1]} lost: the runtime's connection to it closed" in events
    finally:
        for home in (head, *workers):
            run(home, "stop")


# -- the fleet, on one machine -----------------------------------------------------------------

NS = f"sovh{os.getpid()}", f"sovw1{os.getpid()}", f"sovw2{os.getpid()}"
WORKER_ADDR = "10.99.1.2", "10.99.2.2"


def _sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, timeout=30)


def _in(ns: str, home: Path, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SOVCTL_HOME": str(home)}
    return subprocess.run(["ip", "netns", "exec", ns, *SOVCTL, *args], env=env, text=True,
                          capture_output=True, timeout=timeout)


def _status(ns: str, home: Path) -> dict[str, dict[str, object]]:
    doc = json.loads(_in(ns, home, "--json", "status").stdout)
    return {p["name"]: p for p in doc["data"]["processes"]}


def _ask(port: int, ns: str | None = None) -> str:
    body = json.dumps({"model": "smol", "temperature": 0, "max_tokens": 24, "seed": 1,
                       "messages": [{"role": "user", "content": "Name three colours."}]})
    code = (f"import httpx,sys; r=httpx.post('http://127.0.0.1:{port}/v1/chat/completions', "
            f"content={body!r}, headers={{'content-type': 'application/json'}}, timeout=60); "
            "print(r.status_code); print(r.json()['choices'][0]['message']['content'] "
            "if r.status_code == 200 else r.text)")
    prefix = ["ip", "netns", "exec", ns] if ns else []
    out = subprocess.run([*prefix, sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=90).stdout
    status, _, text = out.partition("\n")
    return text.strip() if status == "200" else f"HTTP {status}: {text.strip()}"


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="veth pairs between namespaces need root "
                    "(CI runs as root, with iproute2 installed by .ci/run)")
def test_fleet_in_namespaces(tmp_path: Path, models: Path) -> None:
    single, head = tmp_path / "single", tmp_path / "head"
    workers = [tmp_path / "w1", tmp_path / "w2"]
    for h in (single, head):
        run(h, "pull", str(CHAT_MODEL), "--name", "smol", check=True)
        (h / "sovctl.toml").write_text(
            "[models.smol]\nrole = \"chat\"\nparallel = 1\nn_ctx = 512\nn_threads = 1\n")
    # One box: the answer the fleet must give.
    port = free_port()
    run(single, "serve", "--detach", "--port", str(port), check=True)
    try:
        expected = _ask(port)
    finally:
        run(single, "stop", check=True)
    assert expected and not expected.startswith("HTTP")

    endpoints = [f"{a}:50052" for a in WORKER_ADDR]
    with (head / "sovctl.toml").open("a") as f:
        f.write(f"[cluster]\nworkers = {json.dumps(endpoints)}\n")
    try:
        for ns in NS:
            _sh("ip", "netns", "add", ns)
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
        for i, (ns, addr) in enumerate(zip(NS[1:], WORKER_ADDR, strict=True), 1):
            # A veth pair per worker: head 10.99.i.1 <-> worker 10.99.i.2, nothing else.
            a, b = f"svh{i}{os.getpid()}"[:15], f"svw{i}{os.getpid()}"[:15]
            _sh("ip", "link", "add", a, "netns", NS[0], "type", "veth", "peer", b, "netns", ns)
            _sh("ip", "-n", NS[0], "addr", "add", f"10.99.{i}.1/24", "dev", a)
            _sh("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", b)
            _sh("ip", "-n", NS[0], "link", "set", a, "up")
            _sh("ip", "-n", ns, "link", "set", b, "up")
        for ns, home, addr in zip(NS[1:], workers, WORKER_ADDR, strict=True):
            r = _in(ns, home, "worker", "--host", addr, "--threads", "1", "--detach")
            assert r.returncode == 0, r.stderr
        # The plan asks each worker for its free memory and predicts llama.cpp's split.
        r = _in(NS[0], head, "--json", "plan", "smol")
        assert r.returncode == 0, r.stdout + r.stderr
        split = json.loads(r.stdout)["data"]["cluster"]["fit"]["split"]
        predicted = {d["label"]: d for d in split["devices"]}
        assert list(predicted) == endpoints
        port = free_port()
        r = _in(NS[0], head, "serve", "--detach", "--port", str(port))
        assert r.returncode == 0, r.stderr

        # Same answer at temperature 0, with the layers split over both workers, as planned.
        assert _ask(port, NS[0]) == expected
        log = (head / "logs" / "smol.log").read_text()
        for endpoint in endpoints:
            for kind, key in (("model", "weights"), ("KV", "kv")):
                m = re.search(rf"RPC\d\[{re.escape(endpoint)}\] {kind} buffer size =\s*([\d.]+) "
                              "MiB", log)
                assert m, log
                assert abs(float(m[1]) - predicted[endpoint][key] / 2**20) < 0.01, (kind, m[0])
        assert "offloaded 31/31 layers" in log

        # A worker box lost mid-run: its supervisor SIGKILLed, its worker dies with it.
        lost = json.loads((workers[1] / "run" / "state.json").read_text())["supervisor_pid"]
        os.kill(lost, signal.SIGKILL)
        answer = _ask(port, NS[0])
        # In flight on the lost worker, the request fails loudly; never a wrong answer.
        assert answer == expected or answer.startswith("HTTP 5"), answer

        def recovered() -> dict[str, object] | None:
            smol = _status(NS[0], head)["smol"]
            return smol if smol["status"] == "up" and smol["restarts"] else None

        smol = wait_for(recovered, timeout=60, interval=1, what="smol restarted")
        assert "degraded" in str(smol["last_exit"]) and endpoints[1] in str(smol["last_exit"])
        assert _ask(port, NS[0]) == expected
        events = (head / "logs" / "supervisor.log").read_text()
        assert f"started without worker {endpoints[1]}" in events
        table = _in(NS[0], head, "status").stdout
        assert re.search(rf"{re.escape(endpoints[1])}\s+smol\s+lost", table), table
        assert re.search(rf"{re.escape(endpoints[0])}\s+smol\s+in use\s+\S+", table), table

        # The worker box comes back: the head takes it again by itself.
        r = _in(NS[2], workers[1], "worker", "--host", WORKER_ADDR[1], "--threads", "1",
                "--detach")
        assert r.returncode == 0, r.stderr

        def rejoined() -> dict[str, object] | None:
            smol = _status(NS[0], head)["smol"]
            used = [w for w in smol["workers"] if w["status"] == "in use"]  # type: ignore[union-attr]
            return smol if smol["status"] == "up" and len(used) == 2 else None

        smol = wait_for(rejoined, timeout=90, interval=1, what="the worker taken back")
        assert "answers again" in str(smol["last_exit"])
        assert all(w["holds"] > 0 for w in smol["workers"])  # type: ignore[union-attr]
        assert _ask(port, NS[0]) == expected
        table = _in(NS[0], head, "status").stdout
        for endpoint in endpoints:
            assert re.search(rf"{re.escape(endpoint)}\s+smol\s+in use\s+.+ of .+MiB", table), \
                table

        # The whole fleet in the blackout: the head's namespace reaches its workers only
        # through the audit's relay, and nothing else leaves it.
        r = _in(NS[0], head, "stop")
        assert r.returncode == 0, r.stderr
        r = _in(NS[0], head, "--json", "audit", "blackout", timeout=600)
        assert r.returncode == 0, r.stdout + r.stderr
        report = json.loads(r.stdout)["data"]
        assert report["passed"], report
        checks = {c["id"]: c for c in report["checks"]}
        assert "the one way out: the audit's relay" in checks[1]["evidence"]
        assert [w["endpoint"] for w in checks[3]["details"]["workers"]] == endpoints
        assert checks[6]["details"]["cluster"] and not checks[6]["details"]["attempts"]
        assert {a["target"] for a in checks[6]["details"]["cluster"]} <= set(endpoints)
        bridged = report["isolation"]["bridged"]
        assert [b["endpoint"] for b in bridged] == endpoints
        assert all(b["connections"] and b["bytes_to_worker"] for b in bridged), bridged
    finally:
        for ns, home in zip(NS, [head, *workers], strict=True):
            if (home / "run").exists():
                subprocess.run(["ip", "netns", "exec", ns, *SOVCTL, "stop"], timeout=60,
                               env={**os.environ, "SOVCTL_HOME": str(home)}, capture_output=True)
        for ns in NS:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


def test_audit_lists_worker_connections_apart(sovctl_home: Path, models: Path) -> None:
    from sovctl.audit.checks import cluster_apart

    home = Home(sovctl_home)
    run(sovctl_home, "pull", str(CHAT_MODEL), "--name", "smol", check=True)
    home.config_path.write_text('[cluster]\nworkers = ["10.0.0.2:50052"]\n')
    p = plan.build(home, config.load(home), chat=["smol"])
    attempts = [{"component": "smol", "target": "10.0.0.2:50052"},
                {"component": "smol", "target": "10.0.0.9:50052"},
                {"component": "gateway", "target": "10.0.0.2:50052"}]
    mine, rest = cluster_apart(p, attempts)
    assert mine == attempts[:1] and rest == attempts[1:]


def test_audit_flags_a_worker_on_a_public_address(sovctl_home: Path, models: Path) -> None:
    from sovctl.audit.checks import _worker_exposure

    home = Home(sovctl_home)
    run(sovctl_home, "pull", str(CHAT_MODEL), "--name", "smol", check=True)
    home.config_path.write_text('[cluster]\nworkers = ["10.0.0.2:50052"]\n')
    assert _worker_exposure(plan.build(home, config.load(home), chat=["smol"])) == (
        [], ["[cluster] workers on private addresses: 10.0.0.2:50052 (private)"])
    # Only planned, never contacted: no packet goes to the public address.
    home.config_path.write_text('[cluster]\nworkers = ["10.0.0.2:50052", "8.8.8.8:50052"]\n')
    problems, _ = _worker_exposure(plan.build(home, config.load(home), chat=["smol"]))
    assert len(problems) == 1 and "8.8.8.8:50052" in problems[0] and "10.0.0.2" not in problems[0]


def test_bridges_resolve_names_outside_and_need_ipv4(tmp_path: Path) -> None:
    from sovctl.audit import bridge

    names = {"gpu.lan": ["fd00::9", "192.168.1.9"], "v6.lan": ["fd00::9"]}
    got = bridge.plan_bridges(["10.0.0.2:50052", "gpu.lan:50053"], tmp_path,
                              resolve=lambda h: names[h])
    assert [(b.endpoint, b.literal) for b in got] == [("10.0.0.2:50052", "10.0.0.2:50052"),
                                                      ("gpu.lan:50053", "192.168.1.9:50053")]
    assert len({b.socket for b in got}) == 2
    with pytest.raises(ConfigError, match="no IPv4 address"):
        bridge.plan_bridges(["v6.lan:50052"], tmp_path, resolve=lambda h: names[h])


def test_the_bridge_relays_to_its_worker_and_counts(tmp_path: Path) -> None:
    """Both halves on loopback in this namespace, relaying to a real ggml-rpc-server: the probe
    the supervisor sends goes through, and what crossed is counted."""
    from sovctl.audit import bridge

    binary = shutil.which(cluster.RPC_WORKER, path=str(Path(sys.executable).parent))
    assert binary, "ggml-rpc-server is built by scripts/setup"
    worker_port, inner_port, closed = free_port(), free_port(), free_port()
    proc = subprocess.Popen([binary, "--port", str(worker_port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: cluster.probe_worker(f"127.0.0.1:{worker_port}", 2).ok, timeout=20,
                 what="the worker")
        # The inner side listens on another port here: this namespace already has the worker's.
        outer_side = bridge.Bridge(f"127.0.0.1:{worker_port}", "127.0.0.1", worker_port,
                                   str(tmp_path / "w0.sock"))
        dead = bridge.Bridge(f"127.0.0.1:{closed}", "127.0.0.1", closed,
                             str(tmp_path / "w1.sock"))
        with bridge.Outer([outer_side, dead]) as relay:
            inner = bridge.open_inner([
                bridge.Bridge("x", "127.0.0.1", inner_port, outer_side.socket),
                bridge.Bridge("y", "127.0.0.1", free_port(), dead.socket)])
            try:
                health = cluster.probe_worker(f"127.0.0.1:{inner_port}", 5)
                lost = cluster.probe_worker(f"127.0.0.1:{inner[1].listener.getsockname()[1]}",
                                            5)
            finally:
                for r in inner:
                    r.close()
            report = {r["endpoint"]: r for r in wait_for(
                lambda: relay.report() if relay.report()[0]["bytes_from_worker"] else None,
                timeout=5, what="the relay's count")}
    finally:
        proc.kill()
        proc.wait()
    assert health.ok and health.total > 0
    assert not lost.ok
    mine = report[outer_side.endpoint]
    # HELLO, DEVICE_COUNT and one GET_DEVICE_MEMORY per device: 9-byte header + payload each.
    assert mine["connections"] == 1
    assert mine["bytes_to_worker"] == (9 + 24) + 9 + 13 * len(health.devices)
    assert mine["bytes_from_worker"] == (8 + 28) + (8 + 4) + 24 * len(health.devices)
    assert report[dead.endpoint]["connections"] == 0
    assert report[dead.endpoint]["failed_connects"] == ["Connection refused"]
    assert not Path(outer_side.socket).exists()
