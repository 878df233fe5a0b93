"""The money path of exception routes, through real HTTP: the gateway app under uvicorn on
loopback, its providers configured in a real sovctl.toml, and clients using the `openai` SDK
and httpx.

No paid provider can be reached from here, and a test must not spend money on one, so every
provider is a stand-in for a paid OpenAI-compatible API on 127.0.0.1. It answers by the model
asked for: "gpt-test" at once with a usage of 10 prompt and 5 generated tokens; "story" as a
slow stream of 40 one-word events whose usage event would come last; "gated" only once the
test opens its gate (usage 10 and 20); "leaky" with a 400 whose message quotes credentials,
"leaky-auth" with a 401 that does; "broken-stream" as a stream whose middle events are
errors (OpenAI's and Anthropic's shapes) quoting a credential. Asserted: a client that hangs
up mid-stream is recorded as an estimate and brings the cap closer; reservations keep
concurrent requests under the cap, a provider's and an app's; unlisted models,
max_concurrent and max_tokens; credentials redacted from relayed errors, whole or within a
stream; `sovctl ledger` and `sovctl cost` saying which figures are estimated or defaulted; the local
stream path marking counted tokens as estimated; the ledger's size bound.
"""

from __future__ import annotations

import http.server
import json
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any, ClassVar

import httpx
import openai
import pytest
import uvicorn
from tests.helpers import run, run_json, wait_for

from sovctl import config
from sovctl.gateway.app import create_app
from sovctl.gateway.frontier import prompt_tokens
from sovctl.home import Home
from sovctl.ledger import store
from sovctl.runtime.documents import (
    AppLimits,
    Limits,
    ProcessState,
    Route,
    RoutesTable,
    StackState,
    Status,
)
from sovctl.runtime.plan import frontier_routes

KEY = "standin-Zq7rT2x9"  # the stand-in's key: in no file, and shaped like no known key
# Credentials a provider's error could quote, each of a shape the gateway must recognise.
SECRETS = ["sk-ant-api03-Q1w2E3r4T5y6U7i8O9p0", "sk-proj-****************abcd",
           "hf_AbCdEfGhIjKlMnOpQrStUv", "Bearer eyJhbGciOiJIUzI1NiJ9.e30.ZRrHA1JJJW8opsbCGfG",
           "aB3dE5gH7jK9mN1pQ3sT5vW7yZ9bC1eF3hJ5"]
PER_TOKEN = 10_000.0  # per million tokens: a cent a token, so a few tokens move a cap
STORY = [{"role": "user", "content": "Tell me a story"}]
HI = [{"role": "user", "content": "hi"}]


class StandIn(http.server.ThreadingHTTPServer):
    """Stands in for a paid provider's API, on loopback."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.received: list[dict[str, Any]] = []
        self.gate = threading.Event()
        self.cut_short = threading.Event()  # a stream's reader went away before its end


class Handler(http.server.BaseHTTPRequestHandler):
    server: StandIn

    def log_message(self, *args: Any) -> None:
        pass

    def _json(self, status: int, doc: dict[str, Any]) -> None:
        content = json.dumps(doc).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(content)))
        self.end_headers()
        self.wfile.write(content)

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        self.server.received.append({"headers": dict(self.headers), "body": body})
        model = body["model"]
        if model == "leaky":
            self._json(400, {"error": {"message": f"invalid request: we were sent {KEY} and "
                                       + ", ".join(SECRETS) + "; model gpt-4o-mini-2024-07-18 "
                                       "has no such parameter"}})
            return
        if model == "leaky-auth":
            self._json(401, {"error": {"message": f"Incorrect API key provided: {KEY}"}})
            return
        if model == "story":
            self._story()
            return
        if model == "broken-stream":
            self._broken_stream()
            return
        if model == "gated":
            self.server.gate.wait(30)
        completion = 20 if model == "gated" else 5
        self._json(200, {"id": "chatcmpl-standin", "object": "chat.completion", "created": 0,
                         "model": model, "usage": {"prompt_tokens": 10,
                                                   "completion_tokens": completion},
                         "choices": [{"index": 0, "finish_reason": "stop", "message": {
                             "role": "assistant", "content": "Hello from the stand-in"}}]})

    def _story(self) -> None:
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.end_headers()
        chunk = {"id": "chatcmpl-standin", "object": "chat.completion.chunk", "created": 0,
                 "model": "story"}
        try:
            for _ in range(40):
                event = {**chunk, "choices": [{"index": 0, "delta": {"content": "once "}}]}
                self.wfile.write(f"data: {json.dumps(event)}\n\n".encode())
                self.wfile.flush()
                time.sleep(0.05)
            usage = {**chunk, "choices": [], "usage": {"prompt_tokens": 14,
                                                       "completion_tokens": 40}}
            self.wfile.write(f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n".encode())
        except OSError:
            self.server.cut_short.set()


    def _broken_stream(self) -> None:
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.end_headers()
        said = f"data: {json.dumps({'choices': [{'index': 0, 'delta': {'content': 'once '}}]})}"
        errors = [f"data: {json.dumps({'error': {'message': f'upstream saw {SECRETS[0]}'}})}",
                  "event: error\ndata: " + json.dumps({"type": "error", "error": {
                      "type": "overloaded_error", "message": f"retry with {SECRETS[1]}"}})]
        for event in [said, *errors, said, "data: [DONE]"]:
            # Each error event in two writes: the gateway must hold it to its end.
            half = len(event) // 2 if event in errors else len(event)
            for part in (event[:half], event[half:] + "\n\n"):
                self.wfile.write(part.encode())
                self.wfile.flush()
                time.sleep(0.02)


class LocalRuntime(http.server.BaseHTTPRequestHandler):
    """A local runtime that streams without usage, as llama-cpp-python's server does."""

    protocol_version = "HTTP/1.1"
    events: ClassVar[list[bytes]] = [
        b'data: {"choices":[{"index":0,"delta":{"content":"a"}}]}\n\n',
        b'data: {"choices":[{"index":0,"delta":{"content":"b"}}]}\n\n',
        b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n',
        b"data: [DONE]\n\n"]

    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["content-length"]))
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        for e in self.events:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(e), e))
        self.wfile.write(b"0\r\n\r\n")


def serve_in_thread(server: http.server.HTTPServer) -> None:
    threading.Thread(target=server.serve_forever, daemon=True).start()


TOML = """
[providers.hangup]
base_url = "{url}"
api_key_env = "STANDIN_KEY"
daily_cap = 0.7
[providers.hangup.models.story]
input_per_mtok = {per}
output_per_mtok = {per}

[providers.reserve]
base_url = "{url}"
api_key_env = "STANDIN_KEY"
daily_cap = 0.7
max_tokens = 20
models = {{ gated = {{ input_per_mtok = {per}, output_per_mtok = {per} }} }}

[providers.pool]
base_url = "{url}"
api_key_env = "STANDIN_KEY"
max_concurrent = 16
max_tokens = 20
models = {{ gated = {{ input_per_mtok = {per}, output_per_mtok = {per} }} }}

[apps.frugal]
frontier_daily_cap = 1.0

[providers.single]
base_url = "{url}"
api_key_env = "STANDIN_KEY"
max_concurrent = 1
models = {{ gated = {{ input_per_mtok = 1.0, output_per_mtok = 1.0 }} }}

[providers.plain]
base_url = "{url}"
api_key_env = "STANDIN_KEY"
max_tokens = 64
[providers.plain.models.gpt-test]
input_per_mtok = 1.0
output_per_mtok = 2.0
[providers.plain.models.leaky]
input_per_mtok = 1.0
output_per_mtok = 2.0
[providers.plain.models.leaky-auth]
input_per_mtok = 1.0
output_per_mtok = 2.0
[providers.plain.models.broken-stream]
input_per_mtok = 1.0
output_per_mtok = 2.0
"""


def table_for(home: Path, local_upstream: str | None = None) -> RoutesTable:
    """The routing table `sovctl serve` would write for this home's sovctl.toml (its provider
    routes, its ledger and bound), plus a local model when `local_upstream` is given."""
    cfg = config.load(Home(home))
    state = home / "state.json"
    StackState(supervisor_pid=0, started_at=0.0, updated_at=0.0, url="", host="127.0.0.1",
               port=0, api_key_required=False, stopping=False, final=False, events=(),
               processes=(ProcessState(name="counted", kind="runtime", role="chat",
                                       model="counted", sha256="", runtime="llama-cpp-python",
                                       port=0, pid=None, status=Status.UP, restarts=0,
                                       up_since=0.0, last_exit=""),)).write(state)
    local = (Route(model="counted", role="chat", kind="local", process="counted",
                   upstream=local_upstream, runtime="llama-cpp-python", parallel=1,
                   key_file=None),) if local_upstream else ()
    return RoutesTable(
        host="127.0.0.1", port=0, auth_required=False, key_file="",
        limits=Limits(queue_limit=8, queue_timeout=10, max_body_bytes=1 << 20),
        state_file=str(state), routes=local + frontier_routes(cfg),
        ledger=str(store.ledger_path(Home(home))),
        ledger_max_rows=cfg.ledger.max_rows,
        apps=tuple(AppLimits(name, **asdict(a)) for name, a in sorted(cfg.apps.items())))


@contextmanager
def gateway(table: RoutesTable) -> Iterator[str]:
    """The real gateway app on a loopback port; stopping it writes the ledger's last batch."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(table), log_level="warning",
                                           lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    wait_for(lambda: server.started or not thread.is_alive(), 20, what="the gateway")
    assert thread.is_alive()
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def rows(ledger: Path, route: str) -> list[dict[str, Any]]:
    with sqlite3.connect(ledger) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute(
            "SELECT * FROM requests WHERE route = ? ORDER BY time", (route,))]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    home = tmp_path_factory.mktemp("money") / "home"
    home.mkdir()
    standin = StandIn()
    serve_in_thread(standin)
    local = http.server.ThreadingHTTPServer(("127.0.0.1", 0), LocalRuntime)
    serve_in_thread(local)
    (home / "sovctl.toml").write_text(TOML.format(
        url=f"http://127.0.0.1:{standin.server_address[1]}/v1", per=PER_TOKEN))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STANDIN_KEY", KEY)
        table = table_for(home, f"http://127.0.0.1:{local.server_address[1]}")
        with gateway(table) as base:
            yield {"home": home, "base": base, "standin": standin,
                   "ledger": store.ledger_path(Home(home)),
                   "client": openai.OpenAI(base_url=base + "/v1", api_key="unused",
                                           max_retries=0, timeout=30)}
    standin.shutdown()
    local.shutdown()


@pytest.fixture(scope="module")
def hung_up(stack: dict[str, Any]) -> dict[str, Any]:
    """A client reads three events of a stream and hangs up; then it asks again."""
    client: openai.OpenAI = stack["client"]
    events = client.chat.completions.create(model="frontier/hangup/story", messages=STORY,
                                            max_tokens=40, stream=True)
    for _, _event in zip(range(3), events, strict=False):
        pass
    events.close()
    record = wait_for(lambda: rows(stack["ledger"], "hangup"), 10, what="the hang-up's record")
    with pytest.raises(openai.RateLimitError) as again:
        client.chat.completions.create(model="frontier/hangup/story", messages=STORY,
                                       max_tokens=40)
    return {"record": record, "again": again.value}


def test_a_client_hanging_up_is_billed_and_reaches_the_cap(stack: dict[str, Any],
                                                           hung_up: dict[str, Any]) -> None:
    [row] = hung_up["record"]
    assert row["status"] == 499
    # Estimated: the prompt from its size, and at least the three events the client read.
    assert row["tokens_source"] == row["cost_source"] == "estimated"
    assert row["tokens_in"] == prompt_tokens({"messages": STORY}) == 14
    assert 3 <= row["tokens_out"] < 40
    assert row["cost"] == pytest.approx((row["tokens_in"] + row["tokens_out"]) * PER_TOKEN / 1e6)
    assert stack["standin"].cut_short.wait(5)  # the provider's generation stopped
    # 0.18 or more spent of the 0.7 cap: the next request's worst case, 14 + 40 tokens at a
    # cent each, no longer fits.
    refused = hung_up["again"]
    assert refused.status_code == 429 and refused.code == "daily_cap_reached"
    assert "ask for fewer max_tokens" in refused.message
    assert len([r for r in stack["standin"].received if r["body"]["model"] == "story"]) == 1


def test_reservations_keep_concurrent_requests_under_the_cap(stack: dict[str, Any]) -> None:
    client: openai.OpenAI = stack["client"]
    standin: StandIn = stack["standin"]

    def ask() -> Any:
        return client.chat.completions.create(model="frontier/reserve/gated", messages=HI)

    def gated() -> int:
        return len([r for r in standin.received if r["body"]["model"] == "gated"])

    # Each may cost 11 prompt tokens (estimated) + 20 generated (max_tokens) = 0.31: two fit
    # in the 0.7 cap together, a third would not.
    with ThreadPoolExecutor(2) as pool:
        first = [pool.submit(ask) for _ in range(2)]
        wait_for(lambda: gated() == 2, 10, what="two requests at the provider")
        with pytest.raises(openai.RateLimitError) as third:
            ask()
        standin.gate.set()
        answers = [f.result() for f in first]
    assert third.value.code == "daily_cap_reserved"
    assert third.value.response.headers["retry-after"] == "5"
    assert [a.usage.completion_tokens for a in answers] == [20, 20]
    assert gated() == 2
    # What they cost (10 + 20 tokens each) leaves 0.1 of the cap: the worst case of another
    # request no longer fits at all.
    with pytest.raises(openai.RateLimitError) as fourth:
        ask()
    assert fourth.value.code == "daily_cap_reached"
    wait_for(lambda: len(rows(stack["ledger"], "reserve")) == 4, 10, what="four records")
    spent = sum(r["cost"] for r in rows(stack["ledger"], "reserve"))
    assert spent == pytest.approx(0.6) and spent <= 0.7


def test_an_apps_frontier_daily_cap_holds_concurrent_requests(stack: dict[str, Any]) -> None:
    standin: StandIn = stack["standin"]
    standin.gate.clear()

    def ask() -> httpx.Response:
        return httpx.post(stack["base"] + "/v1/chat/completions", timeout=30, trust_env=False,
                          headers={"x-sovctl-app": "frugal"},
                          json={"model": "frontier/pool/gated", "messages": HI})

    def gated() -> int:
        return len([r for r in standin.received if r["body"]["model"] == "gated"])

    before = gated()
    # Each may cost 11 prompt tokens (estimated) + 20 generated = 0.31: three fit in the app's
    # 1.0 a day together (its provider has no cap), the other five of eight at once do not.
    try:
        with ThreadPoolExecutor(8) as pool:
            asked = [pool.submit(ask) for _ in range(8)]
            wait_for(lambda: sum(f.done() for f in asked) == 5, 20, what="five refusals")
            assert gated() == before + 3
            standin.gate.set()
            answers = [f.result() for f in asked]
    finally:
        standin.gate.set()
    assert sorted(a.status_code for a in answers) == [200] * 3 + [429] * 5
    for refused in (a for a in answers if a.status_code == 429):
        err = refused.json()["error"]
        assert err["code"] == "app_frontier_daily_cap"
        assert "app 'frugal'" in err["message"] and "frontier_daily_cap = 1" in err["message"]
        assert refused.headers["retry-after"] == "5"  # the three in flight end soon
    # They cost 10 + 20 tokens each, 0.9: another's worst case no longer fits the 0.1 left.
    over = ask()
    assert over.status_code == 429 and over.json()["error"]["code"] == "app_frontier_daily_cap"
    assert "more than the 0.1 left" in over.json()["error"]["message"]
    assert 5 < int(over.headers["retry-after"]) <= 86_401
    assert gated() == before + 3
    wait_for(lambda: len(rows(stack["ledger"], "pool")) == 9, 10, what="nine records")
    spent = sum(r["cost"] for r in rows(stack["ledger"], "pool"))
    assert spent == pytest.approx(0.9) and spent <= 1.0


def test_unlisted_model_is_refused_naming_the_allowed(stack: dict[str, Any]) -> None:
    before = len(stack["standin"].received)
    with pytest.raises(openai.PermissionDeniedError) as refused:
        stack["client"].chat.completions.create(model="frontier/plain/gpt-4-dearer",
                                                messages=HI)
    err = refused.value
    assert err.status_code == 403 and err.code == "model_not_allowed"
    assert err.body["param"] == "model"  # type: ignore[index]
    assert "'gpt-4-dearer'" in err.message
    assert ("frontier/plain/gpt-test, frontier/plain/leaky, frontier/plain/leaky-auth"
            in err.message)
    assert len(stack["standin"].received) == before  # never sent


def test_max_concurrent(stack: dict[str, Any]) -> None:
    standin: StandIn = stack["standin"]
    standin.gate.clear()
    client: openai.OpenAI = stack["client"]
    before = len(standin.received)
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(client.chat.completions.create, model="frontier/single/gated",
                            messages=HI)
        wait_for(lambda: len(standin.received) == before + 1, 10, what="the first request")
        with pytest.raises(openai.RateLimitError) as second:
            client.chat.completions.create(model="frontier/single/gated", messages=HI)
        standin.gate.set()
        assert first.result().choices[0].message.content == "Hello from the stand-in"
    assert second.value.code == "provider_busy"
    assert second.value.response.headers["retry-after"] == "1"
    assert "max_concurrent" in second.value.message
    assert len(standin.received) == before + 1
    # Its place is free again.
    assert client.chat.completions.create(model="frontier/single/gated", messages=HI).usage


def test_max_tokens_cap(stack: dict[str, Any]) -> None:
    client: openai.OpenAI = stack["client"]
    standin: StandIn = stack["standin"]
    client.chat.completions.create(model="frontier/plain/gpt-test", messages=HI)
    assert standin.received[-1]["body"]["max_tokens"] == 64  # none asked: the cap applied
    client.chat.completions.create(model="frontier/plain/gpt-test", messages=HI,
                                   max_completion_tokens=10)
    sent = standin.received[-1]["body"]
    assert sent["max_completion_tokens"] == 10 and "max_tokens" not in sent
    before = len(standin.received)
    for field in ("max_tokens", "max_completion_tokens"):
        with pytest.raises(openai.BadRequestError) as above:
            client.chat.completions.create(model="frontier/plain/gpt-test", messages=HI,
                                           **{field: 65})  # type: ignore[call-overload]
        assert above.value.code == "max_tokens_above_limit"
        assert above.value.body["param"] == field  # type: ignore[index]
        assert f"{field} 65 is above provider plain's limit of 64" in above.value.message
    assert len(standin.received) == before


def test_credentials_in_a_providers_error_are_redacted(stack: dict[str, Any]) -> None:
    client: openai.OpenAI = stack["client"]
    with pytest.raises(openai.BadRequestError) as leaky:
        client.chat.completions.create(model="frontier/plain/leaky", messages=HI)
    with pytest.raises(openai.InternalServerError) as auth:
        client.chat.completions.create(model="frontier/plain/leaky-auth", messages=HI)
    assert auth.value.status_code == 502 and auth.value.code == "provider_auth_failed"
    for err in (leaky.value, auth.value):
        text = json.dumps(err.body)
        assert "[redacted]" in text
        for secret in [KEY, *SECRETS, "eyJhbGciOiJIUzI1NiJ9", "Q1w2E3r4", "abcd"]:
            assert secret not in text
    # What is not a credential still says what went wrong.
    assert ("invalid request: we were sent [redacted] and [redacted], [redacted], [redacted], "
            "[redacted], [redacted]; model gpt-4o-mini-2024-07-18 has no such parameter"
            in leaky.value.message)


def test_credentials_in_a_providers_error_event_mid_stream_are_redacted(
        stack: dict[str, Any]) -> None:
    with httpx.stream("POST", stack["base"] + "/v1/chat/completions", trust_env=False,
                      timeout=30, json={"model": "frontier/plain/broken-stream", "messages": HI,
                                        "stream": True}) as r:
        assert r.status_code == 200
        received = r.read().decode()
    events = received.split("\n\n")
    assert events[0] == events[3] and '"once "' in events[0]  # the others pass as they came
    chat_error = json.loads(events[1].removeprefix("data: "))
    assert chat_error == {"error": {"message": "upstream saw [redacted]"}}
    kind, data = events[2].split("\n")
    assert kind == "event: error"
    assert json.loads(data.removeprefix("data: "))["error"] == {
        "type": "overloaded_error", "message": "retry with [redacted]"}
    assert events[4:] == ["data: [DONE]", ""]
    for secret in [KEY, *SECRETS[:2], "Q1w2E3r4", "abcd"]:
        assert secret not in received


def test_local_stream_without_usage_is_recorded_as_estimated(stack: dict[str, Any]) -> None:
    with httpx.stream("POST", stack["base"] + "/v1/chat/completions", trust_env=False,
                      json={"model": "counted", "messages": HI, "stream": True}) as r:
        assert r.status_code == 200 and r.read().endswith(b"data: [DONE]\n\n")
    [row] = wait_for(lambda: rows(stack["ledger"], "local"), 10, what="the local record")
    # Two content events and the finish event, counted as generated tokens.
    assert (row["tokens_in"], row["tokens_out"], row["tokens_source"]) == (0, 3, "estimated")
    assert row["cost"] is None and row["cost_source"] is None  # never benched


def test_ledger_and_cost_say_what_is_estimated(stack: dict[str, Any],
                                               hung_up: dict[str, Any]) -> None:
    [row] = hung_up["record"]
    doc = run_json(stack["home"], "ledger", "--by", "route")
    assert doc["_rc"] == 0, doc["_stderr"]
    data = doc["data"]
    hangup = {r["key"]: r for r in data["rows"]}["hangup"]
    assert hangup["tokens_in"] == {"value": row["tokens_in"], "source": "estimated"}
    assert hangup["cost"] == {"value": pytest.approx(row["cost"]), "source": "estimated"}
    assert data["spend"]["hangup"]["source"] == "estimated"
    assert data["routed_tokens"]["source"] == data["tokens"]["source"] == "estimated"
    assert data["estimated"]["tokens"] >= row["tokens_in"] + row["tokens_out"]
    assert data["cloud_output_per_mtok"] == {"value": 10.0, "source": "defaulted"}
    shown = run(stack["home"], "ledger", "--by", "route")
    assert shown.returncode == 0, shown.stderr
    assert "~" in shown.stdout and "partly estimated" in shown.stdout
    assert "* a built-in default" in shown.stdout

    cost = run_json(stack["home"], "cost")
    assert cost["_rc"] == 0, cost["_stderr"]
    inputs, result = cost["data"]["inputs"], cost["data"]["result"]
    assert inputs["daily_tokens"]["source"] == "estimated"
    assert inputs["daily_tokens"]["basis"] == "ledger, the last 1 day"
    assert inputs["tokens_per_s"] == {"value": 50.0, "source": "defaulted",
                                      "basis": "built-in default; no bench run"}
    assert inputs["watts"]["source"] == "defaulted"  # bench.cpu_watts, never set
    assert result["electricity_per_mtok"]["source"] == "defaulted"
    assert result["cloud_per_day"]["source"] == "defaulted"  # default cloud prices
    assert set(cost["data"]["defaults"]) >= {"watts", "tokens_per_s", "hardware_price"}
    flagged = run_json(stack["home"], "cost", "--watts", "100", "--tokens-per-s", "50",
                       "--tariff", "0.2")["data"]
    assert flagged["result"]["electricity_per_mtok"] == {
        "value": pytest.approx(2e6 / 3.6e6 * 0.2), "source": "flag",
        "basis": "from watts, tokens_per_s, tariff"}


def test_the_ledger_stays_within_its_bound(tmp_path: Path) -> None:
    """Requests beyond [ledger] max_rows fold into daily totals: the file stops growing, the
    reports still count every request."""
    home = tmp_path / "home"
    home.mkdir()
    standin = StandIn()
    serve_in_thread(standin)
    (home / "sovctl.toml").write_text(TOML.format(
        url=f"http://127.0.0.1:{standin.server_address[1]}/v1", per=PER_TOKEN)
        + "\n[ledger]\nmax_rows = 50\n")
    ledger = store.ledger_path(Home(home))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STANDIN_KEY", KEY)
        with gateway(table_for(home)) as base, httpx.Client(base_url=base,
                                                            trust_env=False) as c:
            for i in range(150):
                # Names without number: each a 403, each a record.
                r = c.post("/v1/chat/completions", json={
                    "model": f"frontier/plain/unlisted-{i}", "messages": HI})
                assert r.status_code == 403
                if i % 50 == 49:
                    time.sleep(0.6)  # let the writer flush between bursts
            assert c.post("/v1/chat/completions", json={
                "model": "frontier/plain/gpt-test", "messages": HI}).status_code == 200
    standin.shutdown()
    with sqlite3.connect(ledger) as conn:
        kept = conn.execute("SELECT count(*) FROM requests").fetchone()[0]
        folded = conn.execute("SELECT model, sum(requests) FROM daily GROUP BY model").fetchall()
    assert kept <= 50
    # The refused requests' names are not kept: they fold under "-".
    assert folded == [("-", 151 - kept)]
    doc = run_json(home, "ledger", "--by", "route")
    assert doc["_rc"] == 0, doc["_stderr"]
    assert doc["data"]["requests"] == 151
    plain = {r["key"]: r for r in doc["data"]["rows"]}["plain"]
    assert plain["requests"] == 151
    assert plain["tokens_in"] == {"value": 10, "source": "measured"}
