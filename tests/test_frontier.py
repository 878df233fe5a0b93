"""Exception routing through a real stack: a local chat model (stories260K on llama-server)
and a provider configured to a stand-in frontier API.

The real provider cannot be reached from here (and a test must not spend money on one), so the
provider is an OpenAI-compatible stand-in for a paid API, on 127.0.0.1, that records every
request it receives: /v1/chat/completions with and without streaming, reporting a fixed usage
(10 prompt and 5 generated tokens) and, on a stream, a usage event only when stream_options
asks for it. A second
provider points at a closed loopback port: unreachable. Asserted: only `frontier/...` requests
reach the stand-in, with the key from the environment; private and cap policies; a fast 502;
streaming with usage; the ledger's figures against the requests made here; `sovctl ledger` and
`sovctl cost`, hand-computed.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from tests.conftest import TINY_MODEL
from tests.helpers import run, run_json

from sovctl.runtime.ports import free_port

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("models")]

KEY = "sk-standin-0123456789"  # lives in the environment only
PRICE_IN, PRICE_OUT = 1000.0, 2000.0  # per million tokens: 10 in + 5 out cost 0.02
PER_REQUEST = (10 * PRICE_IN + 5 * PRICE_OUT) / 1e6
MAX_TOKENS = 5  # the provider's max_tokens, applied to each request (none asks for a limit)
# A request of one short message reserves 11 prompt tokens (estimated) and 5 generated, 0.021:
# three answered requests (0.06) leave less than that of the cap.
CAP = 0.07
# The fake bench of the local model: 1000 tok/s at 0.1 J/token for prompts, 100 at 1 J/token
# for generation; with no hardware price, a local Mtok costs its electricity at 0.15 a kWh.
LOCAL_IN, LOCAL_OUT = 0.1e6 / 3.6e6 * 0.15, 1.0e6 / 3.6e6 * 0.15
CHAT = {"messages": [{"role": "user", "content": "Once upon a time"}], "max_tokens": 8,
        "temperature": 0, "seed": 7}


class StandIn(http.server.ThreadingHTTPServer):
    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.received: list[dict[str, Any]] = []


class Handler(http.server.BaseHTTPRequestHandler):
    server: StandIn

    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        self.server.received.append({"path": self.path, "headers": dict(self.headers),
                                     "body": body})
        usage = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
        base = {"id": "chatcmpl-standin", "created": 0, "model": body["model"]}
        if not body.get("stream"):
            content = json.dumps({**base, "object": "chat.completion", "usage": usage,
                                  "choices": [{"index": 0, "finish_reason": "stop", "message": {
                                      "role": "assistant", "content": "Hello from the stand-in"}}]
                                  }).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(content)))
            self.end_headers()
            self.wfile.write(content)
            return
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.end_headers()
        chunk = {**base, "object": "chat.completion.chunk"}
        events = [{**chunk, "choices": [{"index": 0, "delta": {"content": word}}]}
                  for word in ("Hello", " from", " the", " stand-in")]
        events.append({**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
        if (body.get("stream_options") or {}).get("include_usage"):
            events.append({**chunk, "choices": [], "usage": usage})
        for e in events:
            self.wfile.write(f"data: {json.dumps(e)}\n\n".encode())
            self.wfile.flush()
        self.wfile.write(b"data: [DONE]\n\n")


def fake_bench(home: Path) -> None:
    sha = hashlib.sha256(TINY_MODEL.read_bytes()).hexdigest()

    def phase(tps: float, jpt: float) -> dict[str, Any]:
        return {"tps_mean": tps, "costs": {"joules_per_token": jpt, "estimated": True}}

    record = {"schema": "sovctl-bench/1", "id": "fake-run", "results": [
        {"model": {"name": "tiny", "sha256": sha}, "pp": phase(1000, 0.1), "tg": phase(100, 1.0)}]}
    (home / "bench").mkdir(parents=True, exist_ok=True)
    (home / "bench" / "history.jsonl").write_text(json.dumps(record) + "\n")


def config(standin_port: int, closed_port: int) -> str:
    return f"""
[cost]
cloud_price_per_mtok = 8.0
cloud_input_price_per_mtok = 2.0

[providers.standin]
base_url = "http://127.0.0.1:{standin_port}/v1"
api_key_env = "STANDIN_KEY"
daily_cap = {CAP}
max_tokens = {MAX_TOKENS}
[providers.standin.models.gpt-test]
input_per_mtok = {PRICE_IN}
output_per_mtok = {PRICE_OUT}

[providers.down]
base_url = "http://127.0.0.1:{closed_port}/v1"
api_key_env = "STANDIN_KEY"
models = {{ gpt-test = {{ input_per_mtok = 1.0, output_per_mtok = 1.0 }} }}
"""


def stream(base: str, body: dict[str, Any], headers: dict[str, str] | None = None
           ) -> tuple[int, list[dict[str, Any]]]:
    events = []
    with httpx.stream("POST", base + "/v1/chat/completions", json={**body, "stream": True},
                      headers=headers, timeout=60, trust_env=False) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                events.append(json.loads(line[6:]))
    return r.status_code, events


@pytest.fixture(scope="module")
def traffic(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Every request of the tests below, made once, in order; what came back of each."""
    home = tmp_path_factory.mktemp("frontier") / "home"
    standin = StandIn()
    threading.Thread(target=standin.serve_forever, daemon=True).start()
    env = {"STANDIN_KEY": KEY}
    run(home, "pull", str(TINY_MODEL), "--name", "tiny", check=True)
    fake_bench(home)
    (home / "sovctl.toml").write_text(config(standin.server_address[1], free_port()))
    port = free_port()
    started = run(home, "serve", "--chat", "tiny", "--port", str(port), "-d", env=env)
    assert started.returncode == 0, started.stderr
    base = f"http://127.0.0.1:{port}"
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=60)
    seen: dict[str, Any] = {"home": home, "base": base, "standin": standin.received}
    try:
        local = client.chat.completions.create(model="tiny", **CHAT)  # type: ignore[call-overload]
        seen["local"] = local
        seen["local_stream_usage"] = stream(base, {"model": "tiny", **CHAT,
                                                   "stream_options": {"include_usage": True}})
        seen["local_stream"] = stream(base, {"model": "tiny", **CHAT})
        seen["routed"] = client.chat.completions.create(
            model="frontier/standin/gpt-test", messages=[{"role": "user", "content": "hi"}])
        seen["private"] = httpx.post(base + "/v1/chat/completions", trust_env=False, json={
            "model": "frontier/standin/gpt-test", "messages": [{"role": "user", "content": "x"}]},
            headers={"X-Sovctl-Private": "1"})
        seen["routed_stream"] = stream(base, {"model": "frontier/standin/gpt-test",
                                              "messages": [{"role": "user", "content": "hi"}]})
        seen["routed_stream_usage"] = stream(base, {
            "model": "frontier/standin/gpt-test", "messages": [{"role": "user", "content": "hi"}],
            "stream_options": {"include_usage": True}})
        seen["capped"] = httpx.post(base + "/v1/chat/completions", trust_env=False, json={
            "model": "frontier/standin/gpt-test", "messages": [{"role": "user", "content": "x"}]})
        t0 = time.perf_counter()
        seen["down"] = httpx.post(base + "/v1/chat/completions", trust_env=False, timeout=30,
                                  json={"model": "frontier/down/gpt-test",
                                        "messages": [{"role": "user", "content": "x"}]})
        seen["down_seconds"] = time.perf_counter() - t0
        seen["unknown"] = httpx.post(base + "/v1/chat/completions", trust_env=False, json={
            "model": "gpt-test", "messages": [{"role": "user", "content": "x"}]})
        seen["after"] = client.chat.completions.create(model="tiny", **CHAT)  # type: ignore[call-overload]
        time.sleep(1.0)  # the ledger writes every 0.5 s
        seen["ledger_live"] = run_json(home, "ledger", "--by", "route")
    finally:
        stopped = run(home, "stop")
        standin.shutdown()
    assert stopped.returncode == 0, stopped.stderr
    seen["ledger"] = run_json(home, "ledger", "--by", "route")
    yield seen


def test_only_opted_in_requests_reach_the_provider(traffic: dict[str, Any]) -> None:
    received = traffic["standin"]
    # The plain request, the two streams: not the private one, the capped one, the local ones
    # or "gpt-test" without the prefix.
    assert len(received) == 3
    for r in received:
        assert r["path"] == "/v1/chat/completions"
        assert r["body"]["model"] == "gpt-test"
        assert r["body"]["max_tokens"] == MAX_TOKENS
        assert r["headers"]["authorization"] == f"Bearer {KEY}"
        assert not any(k.lower() == "x-sovctl-private" for k in r["headers"])
    assert traffic["routed"].choices[0].message.content == "Hello from the stand-in"
    assert traffic["unknown"].status_code == 404
    assert traffic["local"].choices[0].message.content  # the local model answered
    assert traffic["after"].choices[0].message.content  # and still does after all of it


def test_the_key_is_in_no_file(traffic: dict[str, Any]) -> None:
    home: Path = traffic["home"]
    routes = json.loads((home / "run" / "routes.json").read_text())
    routed = [r for r in routes["routes"] if r["kind"] == "provider"]
    assert {r["provider"]["api_key_env"] for r in routed} == {"STANDIN_KEY"}
    for path in home.rglob("*"):
        if path.is_file() and "blobs" not in path.parts:
            assert KEY.encode() not in path.read_bytes(), path


def test_private_cap_and_unreachable(traffic: dict[str, Any]) -> None:
    private = traffic["private"]
    assert private.status_code == 403
    assert private.json()["error"]["code"] == "private_request"
    capped = traffic["capped"]
    assert capped.status_code == 429 and capped.json()["error"]["code"] == "daily_cap_reached"
    assert int(capped.headers["retry-after"]) > 0
    down = traffic["down"]
    assert down.status_code == 502 and down.json()["error"]["code"] == "provider_unreachable"
    assert traffic["down_seconds"] < 2.0


def test_streams_and_usage(traffic: dict[str, Any]) -> None:
    plain, asked = traffic["standin"][1], traffic["standin"][2]
    # The gateway asks for usage on every stream.
    assert plain["body"]["stream_options"] == {"include_usage": True}
    assert asked["body"]["stream_options"] == {"include_usage": True}
    status, events = traffic["routed_stream"]
    assert status == 200
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events
                   if e["choices"]) == "Hello from the stand-in"
    assert not any("usage" in e for e in events)  # not asked for: held back
    status, events = traffic["routed_stream_usage"]
    assert status == 200 and events[-1]["usage"]["completion_tokens"] == 5
    status, events = traffic["local_stream"]
    assert status == 200 and events and not any(e.get("usage") for e in events)
    status, events = traffic["local_stream_usage"]
    assert status == 200 and events[-1]["usage"]["prompt_tokens"] > 0


def test_ledger_figures(traffic: dict[str, Any]) -> None:
    doc = traffic["ledger"]
    assert doc["_rc"] == 0, doc["_stderr"]
    data = doc["data"]
    local = traffic["local"].usage
    streamed = traffic["local_stream_usage"][1][-1]["usage"]
    # Four local chats: the same request twice plain and twice streamed, each the same answer.
    local_in = 2 * local.prompt_tokens + 2 * streamed["prompt_tokens"]
    local_out = 2 * local.completion_tokens + 2 * streamed["completion_tokens"]
    # Every stream reported its usage: the tokens are measured. The local costs rest on a
    # bench whose energy was estimated (no power meter): they say so.
    assert data["local_tokens"] == {"value": local_in + local_out, "source": "measured"}
    assert data["routed_tokens"] == {"value": 3 * 15, "source": "measured"}
    assert data["spend"] == {"down": {"value": 0.0, "source": "measured"},
                             "standin": {"value": pytest.approx(3 * PER_REQUEST),
                                         "source": "measured"}}
    assert data["local_cost"] == {"value": pytest.approx(local_in * LOCAL_IN / 1e6
                                                         + local_out * LOCAL_OUT / 1e6),
                                  "source": "estimated"}
    assert data["local_unpriced_tokens"]["value"] == 0
    assert data["local_at_cloud_price"] == {
        "value": pytest.approx((local_in * 2.0 + local_out * 8.0) / 1e6),
        "source": "configured"}  # measured tokens at the [cost] prices of sovctl.toml
    assert data["local_share"]["value"] == pytest.approx((local_in + local_out)
                                                         / (local_in + local_out + 45))
    assert data["estimated"] == {"tokens": 0, "cost": pytest.approx(data["local_cost"]["value"])}
    rows = {r["key"]: r for r in data["rows"]}
    # standin: answered 3, private 1, capped 1; down: 1; never routed: "gpt-test".
    assert {k: r["requests"] for k, r in rows.items()} == {
        "local": 4, "standin": 5, "down": 1, "-": 1}
    # Written while the stack ran, not only at its stop.
    assert traffic["ledger_live"]["data"]["requests"] == data["requests"] == 11


def test_cost_from_the_ledger_and_by_hand(traffic: dict[str, Any]) -> None:
    home: Path = traffic["home"]
    volume = traffic["ledger"]["data"]["tokens"]["value"]  # all on one day
    flags = ("--hardware-price", "1000", "--lifetime-years", "2", "--watts", "100",
             "--tokens-per-s", "50", "--tariff", "0.2", "--cloud-price", "5")
    doc = run_json(home, "cost", *flags)
    assert doc["_rc"] == 0, doc["_stderr"]
    data = doc["data"]
    assert data["inputs"]["daily_tokens"] == {"value": volume, "source": "measured",
                                              "basis": "ledger, the last 1 day"}
    # 100 W / 50 tok/s = 2 J/token: 2e6 J = 0.5556 kWh a Mtok at 0.2.
    electricity = 2e6 / 3.6e6 * 0.2
    per_day = 1000 / (2 * 365.25)
    r = {name: f["value"] for name, f in data["result"].items()}
    assert r["electricity_per_mtok"] == pytest.approx(electricity)
    assert r["break_even_daily_tokens"] == pytest.approx(per_day / (5 - electricity) * 1e6)
    assert r["months_to_break_even"] == pytest.approx(
        1000 / (volume / 1e6 * (5 - electricity)) / (365.25 / 12))
    assert r["local_per_mtok"] == pytest.approx(electricity + per_day / (volume / 1e6))
    # Flags and the ledger's measured volume: nothing estimated, nothing defaulted.
    assert {f["source"] for f in data["result"].values()} == {"flag"}
    assert not data["owning_wins"] and data["verdict"].startswith("stay in the cloud")
    assert data["defaults"] == []
    zero = run_json(home, "cost", *flags, "--daily-tokens", "0")["data"]
    assert zero["result"]["local_per_mtok"] == {"value": None, "source": "flag",
                                                "basis": "from watts, tokens_per_s, tariff, "
                                                "hardware_price, lifetime_years, daily_tokens"}
    assert zero["result"]["months_to_break_even"]["value"] is None
    assert "no daily volume" in zero["verdict"]
    text = run(home, "cost", *flags, "--daily-tokens", "5e6")
    assert text.returncode == 0 and "verdict: own:" in text.stdout


def test_blackout_with_frontier_routes(tmp_path: Path) -> None:
    """Providers configured, the key variable unset: in the blackout their requests fail fast
    with 502, local requests still answer, and the gateway's attempts to reach them (a name
    lookup, a connect to a documentation address) are listed apart from egress."""
    home = tmp_path / "home"
    run(home, "pull", str(TINY_MODEL), "--name", "tiny", check=True)
    (home / "sovctl.toml").write_text("""
[providers.named]
base_url = "https://frontier.example.org/v1"
api_key_env = "SOVCTL_TEST_UNSET_KEY"
models = { m = { input_per_mtok = 1.0, output_per_mtok = 1.0 } }

[providers.literal]
base_url = "https://203.0.113.5/v1"
api_key_env = "SOVCTL_TEST_UNSET_KEY"
models = { m = { input_per_mtok = 1.0, output_per_mtok = 1.0 } }

[providers.claude]
kind = "anthropic"
base_url = "https://203.0.113.6"
api_key_env = "SOVCTL_TEST_UNSET_KEY"
models = { m = { input_per_mtok = 1.0, output_per_mtok = 1.0 } }
""")
    doc = run_json(home, "audit", "blackout", "--chat", "tiny")
    checks = {c["id"]: c for c in doc["data"]["checks"]}
    assert doc["_rc"] == 0 and doc["ok"], doc["_stderr"] + json.dumps(checks, indent=1)
    c8 = checks[8]
    assert c8["name"] == "exception routes"
    probes = {p["what"]: p for p in c8["details"]["probes"]}
    # The anthropic provider is probed on /v1/messages, the surface it speaks.
    for name in ("named", "literal", "claude"):
        p = probes[f"frontier/{name}/m"]  # the provider's first listed model
        assert p["status"] == 502 and p["seconds"] < 5
    assert probes["tiny"]["status"] == 200
    assert "placeholder" in c8["evidence"]
    c6 = checks[6]
    assert c6["details"]["attempts"] == []
    routed = c6["details"]["routed"]
    assert {a["provider"] for a in routed} == {"named", "literal", "claude"}
    assert any(a["target"] == "203.0.113.5:443" for a in routed)
    assert "listed apart, not egress" in c6["evidence"]
    assert "exception routes" in checks[7]["evidence"]
    assert not (home / "ledger").exists()  # the audit's requests stay in its own ledger
