"""Models loaded on demand: `load = "on-demand"` and `idle_unload` in [models.NAME], with real
llama-server runtimes behind the gateway."""

from __future__ import annotations

import concurrent.futures as cf
import json
import time
from pathlib import Path

import httpx
import pytest
from tests.conftest import CHAT_MODEL, EMBED_MODEL, TINY_MODEL
from tests.helpers import pid_alive, run, wait_for
from tests.test_serve import FAST_SUPERVISION, Stack, free_port, stop_stack

from sovctl import config
from sovctl.errors import ConfigError, ExitCode
from sovctl.home import Home

ON_DEMAND = '[models.tiny]\nrole = "completion"\nload = "on-demand"\nidle_unload = "2s"\n\n' \
            '[models.minilm]\nrole = "embedding"\n'


# -- configuration ----------------------------------------------------------------------------
@pytest.fixture
def home(sovctl_home: Path) -> Home:
    sovctl_home.mkdir(parents=True)
    return Home(sovctl_home)


def test_load_and_idle_unload_settings(home: Home) -> None:
    home.config_path.write_text(ON_DEMAND + '\n[models.smol]\nrole = "chat"\n')
    cfg = config.load(home, environ={})
    assert cfg.models["tiny"].load == "on-demand" and cfg.models["tiny"].idle_unload == "2s"
    assert cfg.models["smol"].load == "always" and cfg.models["smol"].idle_unload == "0"
    assert cfg.serve.load_timeout == 120.0
    assert [config.parse_duration(d) for d in ("0", "90", "90s", "15m", "1.5h", "2 m")] == \
        [0.0, 90.0, 90.0, 900.0, 5400.0, 120.0]
    assert config.parse_duration("15 minutes") is None


@pytest.mark.parametrize(("body", "said"), [
    ('load = "lazy"', "models.tiny.load must be always or on-demand"),
    ('load = "on-demand"\nidle_unload = "soon"', "models.tiny.idle_unload must be a duration"),
    ('idle_unload = 5', "models.tiny.idle_unload must be a str"),
    ('idle_unload = "15m"', "models.tiny.idle_unload needs load = \"on-demand\""),
])
def test_bad_settings_are_refused(home: Home, body: str, said: str) -> None:
    home.config_path.write_text(f"[models.tiny]\n{body}\n")
    with pytest.raises(ConfigError, match=said.replace(".", r"\.")):
        config.load(home, environ={})


@pytest.mark.usefixtures("models")
def test_clustered_model_cannot_be_on_demand(sovctl_home: Path) -> None:
    run(sovctl_home, "pull", str(TINY_MODEL), "--name", "tiny", check=True)
    (sovctl_home / "sovctl.toml").write_text(
        '[cluster]\nworkers = ["127.0.0.1:50052"]\n\n'
        '[models.tiny]\nrole = "chat"\nload = "on-demand"\n')
    r = run(sovctl_home, "serve", "--dry-run", env={"SOVCTL_SERVE__RUNTIME": "llama-server"})
    assert r.returncode != 0
    assert "cannot be loaded on demand" in r.stderr, r.stderr


# -- a real stack -----------------------------------------------------------------------------
def _started(home: Path, name: str) -> int:
    """How many times the supervisor started `name`."""
    log = (home / "logs" / "supervisor.log").read_text()
    return sum(1 for line in log.splitlines() if f" {name}: started pid " in line)


def _complete(stack: Stack) -> httpx.Response:
    return httpx.post(stack.base + "/v1/completions", timeout=120,
                      json={"model": "tiny", "prompt": "Once upon a time", "max_tokens": 8})


@pytest.mark.slow
@pytest.mark.usefixtures("models")
def test_on_demand_model_loads_on_request_and_unloads_idle(tmp_path: Path) -> None:
    from sovctl.runtime.demand import Usage

    home = tmp_path / "home"
    run(home, "pull", str(TINY_MODEL), "--name", "tiny", check=True)
    run(home, "pull", str(EMBED_MODEL), "--name", "minilm", check=True)
    (home / "sovctl.toml").write_text(ON_DEMAND)
    env = {**FAST_SUPERVISION, "SOVCTL_SERVE__RUNTIME": "llama-server"}
    port = free_port()
    started = run(home, "serve", "--port", str(port), "-d", env=env)
    assert started.returncode == 0, started.stderr
    stack = Stack(home, port, env)
    try:
        # Not running after the start; the always model is.
        procs = stack.procs()
        assert procs["tiny"]["status"] == "unloaded" and procs["tiny"]["pid"] is None
        assert procs["minilm"]["status"] == "up"
        minilm_pid = procs["minilm"]["pid"]
        assert _started(home, "tiny") == 0
        status = run(home, "status", env={**env, "COLUMNS": "200"})
        assert "unloaded" in status.stdout
        models = httpx.get(stack.base + "/v1/models").json()["data"]
        assert {m["id"]: m["status"] for m in models} == {"tiny": "unloaded", "minilm": "up"}
        assert httpx.get(stack.base + "/ready").status_code == 200

        # Eight requests at once to the cold model: one load, every one served.
        with cf.ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda _: _complete(stack), range(8)))
        assert [a.status_code for a in answers] == [200] * 8, [a.text for a in answers]
        assert _started(home, "tiny") == 1
        loaded = stack.procs()["tiny"]
        assert loaded["status"] == "up" and pid_alive(loaded["pid"])

        # Idle for longer than idle_unload: stopped, and said so.
        gone = wait_for(lambda: (p := stack.procs()["tiny"])["status"] == "unloaded" and p,
                     timeout=30, what="tiny unloaded")
        assert gone["pid"] is None and gone["last_exit"].startswith("unloaded after")
        assert not pid_alive(loaded["pid"])

        # The next request loads it again.
        assert _complete(stack).status_code == 200
        assert _started(home, "tiny") == 2
        again = stack.procs()["tiny"]
        assert again["status"] == "up" and again["pid"] != loaded["pid"]

        # Never unloaded while a request is in flight (as the gateway counts one).
        busy = Usage(home / "run", "tiny")
        assert busy.enter() is True
        try:
            time.sleep(4)
            assert stack.procs()["tiny"]["status"] == "up"
        finally:
            busy.leave()
        wait_for(lambda: stack.procs()["tiny"]["status"] == "unloaded", timeout=30,
              what="tiny unloaded once idle")

        # The always model was never touched.
        assert stack.procs()["minilm"]["pid"] == minilm_pid
        assert stack.procs()["minilm"]["status"] == "up"
        # Loaded once more, to leave a runtime for the stop to take down.
        assert _complete(stack).status_code == 200
        last = stack.procs()["tiny"]["pid"]
    finally:
        stop_stack(stack)  # asserts that no process of the stack is left
    assert not pid_alive(last)


# -- by memory --------------------------------------------------------------------------------
# The plan's estimates of the test models' runtimes, with 4 slots of 2048 tokens: smol 416 MiB,
# minilm 196 MiB, tiny 136 MiB. Under 620 MiB any two fit together, never all three; under
# 600 MiB, smol and minilm do not.
THREE = ('[models.smol]\nrole = "chat"\nload = "on-demand"\n\n'
         '[models.minilm]\nrole = "embedding"\nload = "on-demand"\n\n'
         '[models.tiny]\nrole = "completion"\nload = "on-demand"\n')


def test_memory_settings(home: Home) -> None:
    home.config_path.write_text('[serve]\nmemory_limit = "600MiB"\n\n'
                                '[models.tiny]\nload = "on-demand"\npin = true\n')
    cfg = config.load(home, environ={})
    assert cfg.serve.memory_limit == "600MiB" and cfg.serve.memory_reserve == "1GiB"
    assert cfg.models["tiny"].pin is True
    home.config_path.write_text('[serve]\nmemory_limit = "lots"\n')
    with pytest.raises(ConfigError, match=r"serve\.memory_limit: cannot read 'lots' as a size"):
        config.load(home, environ={})


def _pull_three(home: Path) -> None:
    for path, name in ((CHAT_MODEL, "smol"), (EMBED_MODEL, "minilm"), (TINY_MODEL, "tiny")):
        run(home, "pull", str(path), "--name", name, check=True)


@pytest.mark.usefixtures("models")
def test_model_too_large_for_the_budget_is_refused(sovctl_home: Path) -> None:
    """Refused before anything starts, by `plan` and by `serve`, with the numbers."""
    run(sovctl_home, "pull", str(CHAT_MODEL), "--name", "smol", check=True)
    (sovctl_home / "sovctl.toml").write_text(
        '[serve]\nmemory_limit = "200MiB"\n\n[models.smol]\nload = "on-demand"\n')
    plan = run(sovctl_home, "plan", "smol")
    assert plan.returncode != 0
    assert "smol does not fit" in plan.stderr and "[serve] memory_limit" in plan.stderr, \
        plan.stderr
    served = run(sovctl_home, "serve", "-d", "--port", str(free_port()))
    assert served.returncode == ExitCode.CONFIG, served.stderr
    assert "smol cannot be loaded: it needs 415.9 MiB, over the memory budget: 200.0 MiB of " \
        "RAM ([serve] memory_limit)" in served.stderr, served.stderr
    assert "Traceback" not in served.stderr
    assert not (sovctl_home / "run" / "state.json").exists()
    # Models loaded always must fit together.
    run(sovctl_home, "pull", str(EMBED_MODEL), "--name", "minilm", check=True)
    (sovctl_home / "sovctl.toml").write_text(
        '[serve]\nmemory_limit = "600MiB"\n\n[models.smol]\n\n'
        '[models.minilm]\nrole = "embedding"\n')
    dry = run(sovctl_home, "serve", "--dry-run")
    assert dry.returncode == ExitCode.CONFIG
    assert "the models loaded always need 611.3 MiB together" in dry.stderr, dry.stderr


def _runtime_rss(supervisor: int) -> int:
    """Resident bytes of every llama-server under the supervisor, measured now."""
    import psutil

    total = 0
    for child in psutil.Process(supervisor).children(recursive=True):
        try:
            if child.name().startswith("llama"):
                total += child.memory_info().rss
        except psutil.Error:
            continue
    return total


class _RssSampler:
    """Samples the runtimes' summed resident set every 50 ms while requests run."""

    def __init__(self, supervisor: int) -> None:
        import threading

        self.supervisor, self.samples = supervisor, [0]
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import psutil

        while not self._done.wait(0.05):
            try:
                self.samples.append(_runtime_rss(self.supervisor))
            except psutil.Error:
                continue

    def stop(self) -> list[int]:
        self._done.set()
        self._thread.join()
        return self.samples


def _ask(stack: Stack, model: str) -> httpx.Response:
    if model == "minilm":
        return httpx.post(stack.base + "/v1/embeddings", timeout=120,
                          json={"model": "minilm", "input": "a cat sits on the mat"})
    return httpx.post(stack.base + "/v1/completions", timeout=120,
                      json={"model": model, "prompt": "Once upon a time", "max_tokens": 4})


@pytest.mark.slow
@pytest.mark.usefixtures("models")
def test_models_alternate_within_the_memory_budget(tmp_path: Path) -> None:
    """Three models whose sum does not fit: requests alternating between them all complete,
    the least recently used unpinned one is unloaded each time, the pinned one never is, and
    the runtimes' summed resident set stays under the budget at every sample."""
    home = tmp_path / "home"
    _pull_three(home)
    (home / "sovctl.toml").write_text('[serve]\nmemory_limit = "620MiB"\n\n'
                                      + THREE + "pin = true\n")
    env = {**FAST_SUPERVISION, "SOVCTL_SERVE__RUNTIME": "llama-server"}
    port = free_port()
    started = run(home, "serve", "--port", str(port), "-d", "--json", env=env)
    assert started.returncode == 0, started.stderr
    stack = Stack(home, port, env)
    sampler = _RssSampler(json.loads(started.stdout)["data"]["supervisor_pid"])
    try:
        order = ["smol", "minilm", "tiny", "smol", "minilm", "tiny", "smol", "minilm"]
        # Which unpinned model each load must evict (none while there is room):
        # least recently used first.
        evicted = [None, None, "smol", "minilm", "smol", None, "minilm", "smol"]
        for model, victim in zip(order, evicted, strict=True):
            before = {n: p["evictions"] for n, p in stack.procs().items() if p["load_state"]}
            answer = _ask(stack, model)
            assert answer.status_code == 200, answer.text
            after = stack.procs()
            gained = [n for n, p in after.items() if p["load_state"]
                      and p["evictions"] > before[n]]
            assert gained == ([victim] if victim else []), (model, gained)
            if victim:
                assert after[victim]["load_state"] == "unloaded"
                assert after[victim]["unload_reason"] == f"evicted to make room for {model}"
        procs = stack.procs()
        assert procs["tiny"]["pinned"] and procs["tiny"]["evictions"] == 0
        assert procs["tiny"]["loads"] == 1 and procs["tiny"]["load_state"] == "idle"
        assert procs["smol"]["loads"] == 3 and procs["smol"]["evictions"] == 3
        loaded = [p for p in procs.values() if p["load_state"] not in ("", "unloaded")]
        assert sum(p["memory_estimated"] for p in loaded) <= 620 << 20
        assert all(p["memory_held"] for p in loaded)
        # What the operator sees, and what /metrics counts.
        shown = run(home, "status", env={**env, "COLUMNS": "200"}).stdout
        assert "620.0 MiB of RAM ([serve] memory_limit)" in shown, shown
        assert "smol: evicted to make room for minilm" in shown, shown
        metrics = httpx.get(stack.base + "/metrics").text
        assert 'sovctl_model_evictions_total{model="smol"} 3' in metrics
        assert 'sovctl_model_loads_total{model="tiny"} 1' in metrics
        models = {m["id"]: m for m in httpx.get(stack.base + "/v1/models").json()["data"]}
        assert models["smol"]["load_state"] == "unloaded"
        assert models["tiny"]["pinned"] is True
    finally:
        samples = sampler.stop()
        stop_stack(stack)
    assert len(samples) > 20
    assert max(samples) <= 620 << 20, f"runtimes held {max(samples) >> 20} MiB"


@pytest.mark.slow
@pytest.mark.usefixtures("models")
def test_request_for_a_model_being_evicted_completes(tmp_path: Path) -> None:
    """Under 600 MiB smol and minilm do not fit together. A request for minilm evicts smol; a
    request for smol arriving while that happens (or while minilm serves) waits and completes:
    minilm, busy, is evicted only once its requests end. With minilm pinned instead, nothing
    can make room: a 503 at once, with Retry-After, naming what holds the memory."""
    home = tmp_path / "home"
    _pull_three(home)
    (home / "sovctl.toml").write_text('[serve]\nmemory_limit = "600MiB"\n\n' + THREE)
    env = {**FAST_SUPERVISION, "SOVCTL_SERVE__RUNTIME": "llama-server"}
    stack = Stack(home, free_port(), env)
    started = run(home, "serve", "--port", str(stack.port), "-d", env=env)
    assert started.returncode == 0, started.stderr
    try:
        with cf.ThreadPoolExecutor(4) as pool:
            for delay in (0.0, 0.05, 0.2, 0.5):
                assert _ask(stack, "smol").status_code == 200
                first = pool.submit(_ask, stack, "minilm")
                time.sleep(delay)
                second = pool.submit(_ask, stack, "smol")
                more = pool.submit(_ask, stack, "minilm")
                for f in (first, second, more):
                    assert f.result().status_code == 200, (delay, f.result().text)
        evictions = stack.procs()
        assert evictions["smol"]["evictions"] >= 4 and evictions["minilm"]["evictions"] >= 4
    finally:
        stop_stack(stack)

    (home / "sovctl.toml").write_text('[serve]\nmemory_limit = "600MiB"\n\n'
                                      + THREE.replace('load = "on-demand"\n\n[models.tiny]',
                                                      'load = "on-demand"\npin = true\n\n'
                                                      '[models.tiny]'))
    started = run(home, "serve", "--port", str(stack.port), "-d", env=env)
    assert started.returncode == 0, started.stderr
    try:
        assert _ask(stack, "minilm").status_code == 200
        t0 = time.monotonic()
        refused = _ask(stack, "smol")
        assert time.monotonic() - t0 < 10  # at once, not after load_timeout
        assert refused.status_code == 503 and refused.headers["retry-after"] == "10"
        message = refused.json()["error"]["message"]
        assert refused.json()["error"]["code"] == "insufficient_memory"
        assert "no memory to load 'smol'" in message and "minilm 195.5 MiB (pinned)" in message
        assert stack.procs()["smol"]["load_state"] == "unloaded"
        assert _ask(stack, "tiny").status_code == 200  # what fits still loads
    finally:
        stop_stack(stack)


def test_vram_budget_and_use_through_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU side of the budget, through NVML. There is no NVIDIA GPU here: NVML is the
    stand-in of tests/test_bench.py (an 80 GB H100 with 77 GB free), with one process on it."""
    import os
    import sys
    import types

    from tests.test_bench import fake_pynvml

    from sovctl.config import ServeSettings
    from sovctl.runtime import memory
    from sovctl.runtime.documents import MemoryBudget
    from sovctl.sizing import runtime_need, shape_of
    from sovctl.store.header import read_local

    nv = fake_pynvml()
    on_gpu = [types.SimpleNamespace(pid=os.getpid(), usedGpuMemory=300 << 20)]
    nv.nvmlDeviceGetComputeRunningProcesses = lambda h: on_gpu  # type: ignore[attr-defined]
    nv.nvmlDeviceGetGraphicsRunningProcesses = lambda h: []  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "pynvml", nv)

    b = memory.budget(ServeSettings(memory_limit="1GiB"))
    assert (b.ram, b.ram_source) == (1 << 30, "[serve] memory_limit")
    assert (b.vram, b.vram_source) == (77 << 30, "free on 1 GPU(s), NVML")
    used = memory.gpu_use()
    assert used == {os.getpid(): 300 << 20}
    rss, vram = memory.held(os.getpid(), used)
    assert rss is not None and rss > 0 and vram == 300 << 20

    # Every layer on the GPU: the weights, KV cache and CUDA overhead are VRAM; a CPU runtime
    # holds none.
    shape = shape_of(read_local(CHAT_MODEL))
    ram, gpu = runtime_need(shape, 2048, 4, -1, gpus=True)
    assert gpu > 512 << 20 and ram < gpu
    assert runtime_need(shape, 2048, 4, -1, gpus=False)[1] == 0
    # A model whose VRAM estimate does not fit is refused like one whose RAM does not.
    with pytest.raises(ConfigError, match=r"smol cannot be loaded: it needs .* of VRAM"):
        memory.admit([memory.Sized("smol", memory.Need(ram, gpu), always=False)],
                     MemoryBudget(1 << 30, "test", 256 << 20, "test"))
