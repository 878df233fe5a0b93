"""Models loaded on demand: `load = "on-demand"` and `idle_unload` in [models.NAME], with real
llama-server runtimes behind the gateway."""

from __future__ import annotations

import concurrent.futures as cf
import time
from pathlib import Path

import httpx
import pytest
from tests.conftest import EMBED_MODEL, TINY_MODEL
from tests.helpers import pid_alive, run, wait_for
from tests.test_serve import FAST_SUPERVISION, Stack, free_port, stop_stack

from sovctl import config
from sovctl.errors import ConfigError
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
