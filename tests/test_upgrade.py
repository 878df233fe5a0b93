"""`sovctl upgrade` and `sovctl rollback`: a model's weights changed on purpose. The two test
models stand in for two checkpoints of one model: "chat" pinned to stories260K, upgraded to
SmolLM2-135M, both imported from local paths, served by real llama-server runtimes."""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import json
import threading
import time
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from tests.conftest import CHAT_MODEL, TINY_MODEL
from tests.helpers import pid_alive, processes, run, run_json, wait_for
from tests.test_serve import FAST_SUPERVISION, free_port

from sovctl import config
from sovctl.errors import ConfigError
from sovctl.home import Home

pytestmark = pytest.mark.usefixtures("models")

ENV = {**FAST_SUPERVISION, "SOVCTL_SERVE__RUNTIME": "llama-server"}
# Small settings: two runtimes at once on a 2-core machine, briefly three during a switch.
CHAT = '[models.chat]\nrole = "chat"\nn_ctx = 512\nparallel = 2\nn_threads = 1\n'
EVALS = """
[eval.says-something]
prompt = "Tell me about the sea."
regex = "\\\\w"
max_tokens = 16

[eval.capital]
prompt = "What is the capital of France? Answer with one word."
exact = "Paris, and nothing else, in exactly these words."
max_tokens = 8
"""


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


TINY, SMOL = sha256(TINY_MODEL), sha256(CHAT_MODEL)


def lock(home: Path) -> dict[str, Any]:
    return tomllib.loads((home / "sovctl.lock").read_text())["models"]["chat"]  # type: ignore[no-any-return]


def baselines(home: Path) -> list[str]:
    d = home / "audit" / "baselines" / "chat"
    return sorted(p.name for p in d.glob("sha256-*.json")) if d.is_dir() else []


def setup_home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    run(home, "pull", str(TINY_MODEL), "--name", "chat", check=True)
    (home / "sovctl.toml").write_text(CHAT + EVALS)
    return home


# -- settings -------------------------------------------------------------------------------------
@pytest.mark.parametrize(("body", "said"), [
    ('prompt = "x"', "needs exactly one expectation"),
    ('prompt = "x"\nregex = "a"\nexact = "a"', "it has exact, regex"),
    ('regex = "a"', "has no prompt"),
    ('prompt = "x"\nregex = "("', "is not a regular expression"),
    ('prompt = "x"\njson_schema = {type = 5}', "is not a JSON Schema"),
    ('prompt = "x"\ntool = {name = "a b"}', "tool must be {name, parameters"),
    ('prompt = "x"\nregex = "a"\nmax_tokens = 0', "max_tokens must be at least 1"),
    ('prompt = "x"\nregex = "a"\nwhy = 1', "why is not a setting of a case"),
])
def test_bad_eval_cases_are_refused(tmp_path: Path, body: str, said: str) -> None:
    home = Home(tmp_path)
    home.config_path.write_text(f"[eval.c]\n{body}\n")
    with pytest.raises(ConfigError, match=said.replace("(", r"\(").replace("{", r"\{")):
        config.load(home, environ={})


def test_a_port_is_retired_only_with_no_request_on_it(tmp_path: Path) -> None:
    """The in-flight locks between the gateway (Ports) and the supervisor (retire_port)."""
    from sovctl.runtime import switch

    switch.prepare(tmp_path)
    switch.open_port(tmp_path, "chat", 1000)
    gateway = switch.Ports(tmp_path, "chat")
    assert gateway.enter(1000) and gateway.enter(1000)  # two requests in flight
    assert not switch.retire_port(tmp_path, "chat", 1000)
    gateway.leave(1000)
    assert not switch.retire_port(tmp_path, "chat", 1000)  # one still is
    gateway.leave(1000)
    assert switch.retire_port(tmp_path, "chat", 1000)
    assert not gateway.enter(1000), "a retired port takes no request"
    assert not gateway.enter(1001), "nor one the supervisor never opened"
    switch.open_port(tmp_path, "chat", 1001)
    assert gateway.enter(1001) and gateway.busy() == {1001}
    # A retired port given to a later runtime is opened anew, and taken again.
    switch.open_port(tmp_path, "chat", 1000)
    assert gateway.enter(1000) and gateway.busy() == {1000, 1001}
    # Without a supervisor's serving folder (a gateway run alone), requests are not held.
    alone = switch.Ports(tmp_path / "elsewhere", "chat")
    assert alone.enter(7) and alone.busy() == {7}


# -- no stack running: compare, apply, rollback ---------------------------------------------------
@pytest.mark.slow
def test_compare_apply_and_rollback(tmp_path: Path) -> None:
    home = setup_home(tmp_path)

    # Nothing to apply yet, nothing to roll back to: both say so, and change nothing.
    refused = run_json(home, "upgrade", "chat", "--apply")
    assert refused["_rc"] == 4 and "has no upgrade candidate" in refused["error"]["message"]
    assert run(home, "rollback", "chat").returncode == 4
    assert run(home, "upgrade", "nope", str(CHAT_MODEL)).returncode == 4
    assert run(home, "upgrade", "chat", str(TINY_MODEL)).returncode == 2  # the very same file

    # The comparison: the candidate beside the pin, nothing served changes.
    doc = run_json(home, "upgrade", "chat", str(CHAT_MODEL), env=ENV, timeout=600)
    assert doc["_rc"] == 0, doc["_stderr"]
    cmp = doc["data"]["comparison"]
    assert doc["data"]["applied"] is None
    assert (cmp["current"]["sha256"], cmp["candidate"]["sha256"]) == (TINY, SMOL)
    pinned = lock(home)
    assert pinned["sha256"] == TINY and pinned["candidate"]["sha256"] == SMOL
    assert "previous" not in pinned
    assert baselines(home) == []  # recorded only on --apply
    # Different checkpoints answer the fixed requests differently.
    changed = {a["request"]: a for a in cmp["answers"] if a["changed"]}
    assert "chat" in changed and changed["chat"]["current"] != changed["chat"]["candidate"]
    # The [eval] cases, reported pass or fail on each side.
    checks = {c["name"]: c for c in cmp["checks"]}
    assert checks["eval says-something"]["kind"] == "regex"
    assert checks["eval says-something"]["current"] and checks["eval says-something"]["candidate"]
    assert checks["eval capital"]["kind"] == "exact"
    assert not checks["eval capital"]["current"] and not checks["eval capital"]["candidate"]
    assert "not 'Paris, and nothing else" in checks["eval capital"]["candidate_detail"]
    assert checks["answers chat"]["current"] and checks["answers chat"]["candidate"]
    for side in ("current", "candidate"):
        s = cmp[side]
        assert s["checks_total"] == len(cmp["checks"]) and s["checks_passed"] >= 1
        assert s["tokens_per_s"] > 0 and s["tokens_per_s_source"].startswith("measured")
        assert s["memory_held"] > 0 and s["memory_estimated"] > 0
    # SmolLM2 holds more than stories260K, as measured and as estimated.
    assert cmp["candidate"]["memory_estimated"] > cmp["current"]["memory_estimated"]
    compared = json.loads((home / "audit" / "upgrade" / "run" / "state.json").read_text())
    assert not [p["pid"] for p in compared["processes"] if p["pid"] and pid_alive(p["pid"])]
    assert not pid_alive(compared["supervisor_pid"]), "the comparison's stack was stopped"

    # A candidate whose bytes changed since is refused (exit 5), and nothing is switched.
    blob = home / "store" / "blobs" / f"sha256-{SMOL}"
    blob.chmod(0o644)
    original = blob.read_bytes()
    blob.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    bad = run_json(home, "upgrade", "chat", "--apply")
    assert bad["_rc"] == 5 and "refusing to switch chat to its candidate" in \
        bad["error"]["message"], bad
    assert lock(home)["sha256"] == TINY
    blob.write_bytes(original)

    # A case the pin passes and the candidate fails (the pin's own answer, exactly): REF with
    # --apply compares again, and refuses to apply a regression (exit 1), showing why.
    said = next(a for a in cmp["answers"] if a["request"] == "eval:says-something")["current"]
    (home / "sovctl.toml").write_text(CHAT + EVALS + "\n[eval.as-before]\nprompt = "
                                      "\"Tell me about the sea.\"\nmax_tokens = 16\n"
                                      f"exact = {json.dumps(said)}\n")
    doc = run_json(home, "upgrade", "chat", str(CHAT_MODEL), "--apply", env=ENV, timeout=600)
    assert doc["_rc"] == 1 and doc["data"]["comparison"]["regressions"] == ["eval as-before"]
    assert "fails 1 check(s) that chat passes now" in doc["error"]["message"]
    assert doc["error"]["hint"].endswith("--force applies it anyway")
    assert lock(home)["sha256"] == TINY

    # --apply: the lock takes the candidate, keeps the previous pin; the baseline is recorded.
    doc = run_json(home, "upgrade", "chat", "--apply", "--force", env=ENV)
    assert doc["_rc"] == 0, doc["_stderr"]
    applied = doc["data"]["applied"]
    assert applied["live"] is False and applied["from_sha256"] == TINY
    pinned = lock(home)
    assert pinned["sha256"] == SMOL and pinned["previous"]["sha256"] == TINY
    assert "candidate" not in pinned
    assert baselines(home) == [f"sha256-{SMOL}.json"]
    recorded = json.loads((home / "audit" / "baselines" / "chat"
                           / f"sha256-{SMOL}.json").read_text())
    assert recorded["model"] == "chat" and recorded["answers"]["chat"]["text"] == \
        changed["chat"]["candidate"]
    assert run(home, "verify", "chat").returncode == 0

    # The next audit report names the change, and the recorded baseline holds in the blackout.
    audit = run_json(home, "audit", "blackout", "--chat", "chat", timeout=600)
    assert audit["_rc"] == 0, audit["_stderr"] + json.dumps(audit["data"]["checks"], indent=1)
    (change,) = audit["data"]["changes"]
    assert change["why"] == "upgrade" and (change["from_sha256"], change["to_sha256"]) == \
        (TINY, SMOL)
    assert change["text"].startswith(f"chat upgraded from sha256 {TINY[:12]} to {SMOL[:12]}")
    assert audit["data"]["baseline"]["recorded_now"] == []

    # rollback: back to the previous pin, which the lock keeps in turn; no baseline recorded.
    doc = run_json(home, "rollback", "chat")
    assert doc["_rc"] == 0, doc["_stderr"]
    assert doc["data"]["to_sha256"] == TINY and doc["data"]["baseline"] == ""
    pinned = lock(home)
    assert pinned["sha256"] == TINY and pinned["previous"]["sha256"] == SMOL
    assert baselines(home) == [f"sha256-{SMOL}.json"]

    # rm takes the previous pin's blob with it.
    run(home, "rm", "chat", check=True)
    assert not list((home / "store" / "blobs").glob("sha256-*"))


# -- a stack serving, under a stream of requests --------------------------------------------------
@dataclass
class Stream:
    """Client threads sending completions, plain and streamed, one after another."""

    base: str
    done: int = 0
    failures: list[str] = field(default_factory=list)
    slowest: float = 0.0
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def client(self, n: int) -> None:
        with httpx.Client(base_url=self.base, timeout=120) as c:
            i = 0
            while not self.stop.is_set():
                i += 1
                body = {"model": "chat", "prompt": f"Once upon a time {i}", "max_tokens": 8,
                        "temperature": 0}
                t0 = time.perf_counter()
                try:
                    if (n + i) % 2:
                        with c.stream("POST", "/v1/completions",
                                      json={**body, "stream": True}) as r:
                            text = "".join(r.iter_text())
                            ok = r.status_code == 200 and "[DONE]" in text and \
                                '"error"' not in text
                            why = f"{r.status_code} {text[-300:]}"
                    else:
                        r = c.post("/v1/completions", json=body)
                        ok = r.status_code == 200 and bool(r.json()["choices"])
                        why = f"{r.status_code} {r.text[:300]}"
                except httpx.HTTPError as e:
                    ok, why = False, f"{type(e).__name__}: {e}"
                with self.lock:
                    self.slowest = max(self.slowest, time.perf_counter() - t0)
                    if ok:
                        self.done += 1
                    else:
                        self.failures.append(why)


@contextmanager
def streaming(base: str, clients: int = 4) -> Iterator[Stream]:
    s = Stream(base)
    threads = [threading.Thread(target=s.client, args=(n,), daemon=True) for n in range(clients)]
    for t in threads:
        t.start()
    try:
        yield s
    finally:
        s.stop.set()
        for t in threads:
            t.join(timeout=120)


def served(home: Path) -> dict[str, Any]:
    return processes(home)["chat"]


@pytest.mark.slow
def test_apply_and_rollback_live_lose_no_request(tmp_path: Path) -> None:
    home = setup_home(tmp_path)
    doc = run_json(home, "upgrade", "chat", str(CHAT_MODEL), env=ENV, timeout=600)
    assert doc["_rc"] == 0, doc["_stderr"]
    port = free_port()
    started = run(home, "serve", "--port", str(port), "-d", env=ENV)
    assert started.returncode == 0, started.stderr
    pids: set[int] = set()
    try:
        before = served(home)
        assert before["sha256"] == TINY
        pids |= {before["pid"], json.loads((home / "run" / "state.json").read_text())[
            "supervisor_pid"]}
        with streaming(f"http://127.0.0.1:{port}") as s:
            wait_for(lambda: s.done >= 8, timeout=60, what="the stream under way")
            doc = run_json(home, "upgrade", "chat", "--apply", env=ENV, timeout=300)
            assert doc["_rc"] == 0, doc["_stderr"]
            applied = doc["data"]["applied"]
            assert applied["live"] and applied["phase"] == "done", applied
            after = served(home)
            assert after["sha256"] == SMOL and after["status"] == "up"
            assert after["pid"] != before["pid"] and after["port"] != before["port"]
            assert not pid_alive(before["pid"]), "the old runtime was stopped"
            pids.add(after["pid"])
            at_apply = s.done
            wait_for(lambda: s.done >= at_apply + 8, timeout=60, what="requests on SmolLM2")

            doc = run_json(home, "rollback", "chat", env=ENV, timeout=300)
            assert doc["_rc"] == 0, doc["_stderr"]
            assert doc["data"]["live"] and doc["data"]["to_sha256"] == TINY
            back = served(home)
            assert back["sha256"] == TINY and back["pid"] not in (before["pid"], after["pid"])
            assert not pid_alive(after["pid"])
            pids.add(back["pid"])
            at_rollback = s.done
            wait_for(lambda: s.done >= at_rollback + 8, timeout=60,
                     what="requests after the rollback")
        assert s.failures == [], s.failures[:5]
        assert s.done >= 24
        # The supervisor says how each switch went.
        state = json.loads((home / "run" / "state.json").read_text())
        (last,) = state["switches"]
        assert (last["why"], last["phase"], last["to_sha256"]) == ("rollback", "done", TINY)
        assert lock(home)["sha256"] == TINY and lock(home)["previous"]["sha256"] == SMOL
        assert baselines(home) == [f"sha256-{SMOL}.json"]  # recorded by --apply alone
        events = (home / "logs" / "supervisor.log").read_text()
        assert "switch to sha256 " + SMOL[:12] + " done" in events
    finally:
        stop = run(home, "stop", env=ENV)
        assert stop.returncode == 0, stop.stderr
    assert not [p for p in pids if pid_alive(p)], "processes left behind after stop"


@pytest.mark.slow
def test_a_candidate_that_cannot_start_switches_nothing(tmp_path: Path) -> None:
    """Weights llama-server cannot load (stories260K naming a tokenizer llama.cpp does not
    know; a well-formed GGUF that sovctl pins): the comparison's stack does not start, so
    `sovctl upgrade` fails (exit 7) and nothing is filed to apply. The CLI never asks a running
    stack to switch to such a candidate; the supervisor is asked here directly, as the CLI asks
    it, to show that it gives such a switch up with the reason while the old runtime serves
    on."""
    home = setup_home(tmp_path)
    bad = tmp_path / "unknown-tokenizer.gguf"
    data = bytearray(TINY_MODEL.read_bytes())
    key = b"tokenizer.ggml.model"
    at = data.index(key) + len(key) + 4  # past the key and the value's type: its length
    size = int.from_bytes(data[at:at + 8], "little")
    data[at + 8:at + 8 + size] = b"x" * size
    bad.write_bytes(data)
    compared = run_json(home, "upgrade", "chat", str(bad), env=ENV, timeout=300)
    assert compared["_rc"] == 7, compared
    assert lock(home)["sha256"] == TINY
    refused = run_json(home, "upgrade", "chat", "--apply")
    assert refused["_rc"] == 4 and "has no comparison on file" in refused["error"]["message"]

    port = free_port()
    assert run(home, "serve", "--port", str(port), "-d", env=ENV).returncode == 0
    try:
        from sovctl.runtime import control
        from sovctl.runtime.switch import SwitchRequest

        before = served(home)
        cut = hashlib.sha256(bad.read_bytes()).hexdigest()
        outcome = control.switch_model(Home(home), SwitchRequest(
            "one", "chat", cut, bad.stat().st_size, str(bad), "upgrade"), timeout=120)
        assert outcome.phase == "failed" and "did not start" in outcome.reason, outcome
        outcome = control.switch_model(Home(home), SwitchRequest(
            "two", "nope", cut, 1, str(bad), "upgrade"), timeout=10)
        assert outcome.phase == "failed" and "serves no model named 'nope'" in outcome.reason
        now = served(home)
        assert (now["pid"], now["sha256"], now["status"]) == (before["pid"], TINY, "up")
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                       json={"model": "chat", "prompt": "Once", "max_tokens": 4})
        assert r.status_code == 200, r.text
    finally:
        assert run(home, "stop", env=ENV).returncode == 0


@pytest.mark.slow
def test_a_request_outlasting_drain_timeout_does_not_keep_the_old_runtime(tmp_path: Path
                                                                         ) -> None:
    """A request in flight on the replaced runtime is waited for up to [serve] drain_timeout,
    then the old runtime is stopped under it: a stream that never ends cannot keep the old
    weights in memory. The request in flight is held here as the gateway holds one (its lease
    on the old port), for longer than the timeout."""
    from sovctl.runtime import switch

    home = setup_home(tmp_path)
    doc = run_json(home, "upgrade", "chat", str(CHAT_MODEL), env=ENV, timeout=600)
    assert doc["_rc"] == 0, doc["_stderr"]
    env = {**ENV, "SOVCTL_SERVE__DRAIN_TIMEOUT": "2"}
    assert run(home, "serve", "--port", str(free_port()), "-d", env=env).returncode == 0
    try:
        before = served(home)
        held = switch.Ports(home / "run", "chat")
        assert held.enter(before["port"])
        t0 = time.monotonic()
        with cf.ThreadPoolExecutor(1) as pool:
            applying = pool.submit(run_json, home, "upgrade", "chat", "--apply", env=env,
                                   timeout=300)
            # Meanwhile `sovctl status` says the switch is under way.
            wait_for(lambda: "chat: switching to sha256 " + SMOL[:12] + " (upgrade): the new "
                     "runtime serves; the old one finishes its requests" in run(
                         home, "status", env={**env, "COLUMNS": "200"}).stdout,
                     timeout=60, what="the switch shown draining")
            doc = applying.result()
        assert doc["_rc"] == 0, doc["_stderr"]
        wait_for(lambda: not pid_alive(before["pid"]), timeout=60,
                 what="the old runtime stopped after drain_timeout")
        assert time.monotonic() - t0 >= 2
        state = json.loads((home / "run" / "state.json").read_text())
        (last,) = state["switches"]
        assert last["phase"] == "done" and "drain_timeout (2s)" in last["reason"], last
        assert served(home)["sha256"] == SMOL
        held.leave(before["port"])
    finally:
        assert run(home, "stop", env=ENV).returncode == 0


def test_a_rerankers_answers_are_compared_by_order_and_scores() -> None:
    """The comparison judges a reranker as the audit's baseline does: the same order of the
    documents, each score within RERANK_TOLERANCE."""
    from sovctl.audit import upgrade
    from sovctl.audit.baseline import Answer

    def ranked(*scores: float) -> Answer:
        return Answer("rr", "rerank", "/v1/rerank", 200, 0.1, scores=list(scores))

    assert not upgrade._differ(ranked(2.0, 1.0, -3.0), ranked(2.00001, 1.0, -3.0))
    assert upgrade._differ(ranked(2.0, 1.0, -3.0), ranked(2.01, 1.0, -3.0))
    assert upgrade._differ(ranked(2.0, 1.0, -3.0), ranked(1.0, 2.0, -3.0))
    assert upgrade._shown(ranked(2.0, 5.0, -3.0)) == "3 documents, best first [1, 0, 2]"
