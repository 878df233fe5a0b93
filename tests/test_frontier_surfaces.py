"""Frontier routes on every surface: `frontier/NAME/MODEL` on /v1/messages (and count_tokens)
reaches a provider of kind "anthropic", on /v1/responses one of kind "openai", through the real
gateway app under uvicorn on loopback and the real `anthropic` and `openai` SDKs.

No paid provider can be reached from here, and a test must not spend money on one: the
provider is a stand-in for a paid API on 127.0.0.1, speaking Anthropic's Messages shape at
/v1/messages and OpenAI's Responses shape at /v1/responses, each whole or streamed, with a usage
the test knows. Asserted: create and stream on each surface, the key sent as each provider
takes it, a surface a provider does not speak refused (400 in that surface's error shape), the
private header (403), the daily cap (429, max_tokens and max_output_tokens reserved), and the
ledger rows with their tokens and cost.
"""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest
from tests.helpers import wait_for
from tests.test_frontier_money import gateway, rows, serve_in_thread, table_for

from sovctl import config
from sovctl.errors import ConfigError
from sovctl.gateway import frontier
from sovctl.home import Home
from sovctl.ledger import store
from sovctl.runtime.documents import RoutesTable

KEY = "standin-Xk4pW8r2"  # the stand-in's key: in no file, and shaped like no known key
HELLO = "Hello from the stand-in"
IN_PRICE, OUT_PRICE = 1.0, 2.0  # per Mtok
PER_TOKEN = 10_000.0  # a cent a token: a few tokens move a cap


def cost(tokens_in: int, tokens_out: int) -> float:
    return (tokens_in * IN_PRICE + tokens_out * OUT_PRICE) / 1e6


class StandIn(http.server.ThreadingHTTPServer):
    """Stands in for a paid provider's API, on loopback: Anthropic's and OpenAI's shapes."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.received: list[dict[str, Any]] = []
        self.lock = threading.Lock()


def _sse(kind: str, doc: dict[str, Any]) -> bytes:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **doc})}\n\n".encode()


MESSAGE = {"id": "msg_standin", "type": "message", "role": "assistant",
           "content": [{"type": "text", "text": HELLO}], "stop_reason": "end_turn",
           "stop_sequence": None, "usage": {"input_tokens": 10, "output_tokens": 5}}
OUTPUT = [{"type": "message", "id": "msg_1", "status": "completed", "role": "assistant",
           "content": [{"type": "output_text", "text": HELLO, "annotations": []}]}]


def _response(model: str, status: str, output: list[dict[str, Any]],
              usage: dict[str, int] | None) -> dict[str, Any]:
    return {"id": "resp_standin", "object": "response", "created_at": 0, "status": status,
            "model": model, "output": output, "parallel_tool_calls": True,
            "tool_choice": "auto", "tools": [], "error": None, "incomplete_details": None,
            "instructions": None, "metadata": {}, "temperature": None, "top_p": None,
            "usage": None if usage is None else {
                **usage, "total_tokens": sum(usage.values()),
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens_details": {"reasoning_tokens": 0}}}


class Handler(http.server.BaseHTTPRequestHandler):
    server: StandIn

    def log_message(self, *args: Any) -> None:
        pass

    def _json(self, doc: dict[str, Any]) -> None:
        content = json.dumps(doc).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(content)))
        self.end_headers()
        self.wfile.write(content)

    def _events(self, events: list[bytes]) -> None:
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.end_headers()
        for e in events:
            self.wfile.write(e)
            self.wfile.flush()

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        with self.server.lock:
            self.server.received.append({"path": self.path, "headers": dict(self.headers),
                                         "body": body})
        model = body["model"]
        if self.path == "/v1/messages/count_tokens":
            self._json({"input_tokens": 9})
        elif self.path == "/v1/messages" and not body.get("stream"):
            self._json({**MESSAGE, "model": model})
        elif self.path == "/v1/messages":
            start = {**MESSAGE, "model": model, "content": [], "stop_reason": None,
                     "usage": {"input_tokens": 12, "output_tokens": 1}}
            self._events([
                _sse("message_start", {"message": start}),
                _sse("content_block_start", {"index": 0, "content_block": {
                    "type": "text", "text": ""}}),
                *(_sse("content_block_delta", {"index": 0, "delta": {
                    "type": "text_delta", "text": word}}) for word in ("Hello ", "from ",
                                                                       "the stand-in")),
                _sse("content_block_stop", {"index": 0}),
                _sse("message_delta", {"delta": {"stop_reason": "end_turn",
                                                 "stop_sequence": None},
                                       "usage": {"output_tokens": 7}}),
                _sse("message_stop", {})])
        elif self.path == "/v1/responses" and not body.get("stream"):
            self._json(_response(model, "completed", OUTPUT,
                                 {"input_tokens": 10, "output_tokens": 5}))
        elif self.path == "/v1/responses":
            item = {**OUTPUT[0], "content": [], "status": "in_progress"}
            where = {"output_index": 0, "item_id": "msg_1", "content_index": 0}
            events = [("response.created", {"response": _response(model, "in_progress", [],
                                                                  None)}),
                      ("response.output_item.added", {"output_index": 0, "item": item}),
                      ("response.content_part.added", {**where, "part": {
                          "type": "output_text", "text": "", "annotations": []}}),
                      *(("response.output_text.delta", {**where, "delta": word})
                        for word in ("Hello ", "from ", "the stand-in")),
                      ("response.output_text.done", {**where, "text": HELLO}),
                      ("response.content_part.done", {**where,
                                                      "part": OUTPUT[0]["content"][0]}),
                      ("response.output_item.done", {"output_index": 0, "item": OUTPUT[0]}),
                      ("response.completed", {"response": _response(
                          model, "completed", OUTPUT, {"input_tokens": 11,
                                                       "output_tokens": 3})})]
            self._events([_sse(kind, {**doc, "sequence_number": i})
                          for i, (kind, doc) in enumerate(events)])
        else:
            self.send_error(404)


TOML = """
[providers.claude]
kind = "anthropic"
base_url = "{root}"
api_key_env = "STANDIN_KEY"
models = {{ claude-test = {{ input_per_mtok = {inp}, output_per_mtok = {out} }} }}

[providers.oai]
base_url = "{root}/v1"
api_key_env = "STANDIN_KEY"
models = {{ gpt-test = {{ input_per_mtok = {inp}, output_per_mtok = {out} }} }}

[providers.claude-capped]
kind = "anthropic"
base_url = "{root}"
api_key_env = "STANDIN_KEY"
daily_cap = 0.05
models = {{ claude-test = {{ input_per_mtok = {per}, output_per_mtok = {per} }} }}

[providers.oai-capped]
base_url = "{root}/v1"
api_key_env = "STANDIN_KEY"
daily_cap = 0.05
max_tokens = 50
models = {{ gpt-test = {{ input_per_mtok = {per}, output_per_mtok = {per} }} }}
"""
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    home = tmp_path_factory.mktemp("surfaces") / "home"
    home.mkdir()
    standin = StandIn()
    serve_in_thread(standin)
    root = f"http://127.0.0.1:{standin.server_address[1]}"
    (home / "sovctl.toml").write_text(TOML.format(root=root, inp=IN_PRICE, out=OUT_PRICE,
                                                  per=PER_TOKEN))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STANDIN_KEY", KEY)
        table = table_for(home)
        with gateway(table) as base:
            yield {"home": home, "standin": standin, "table": table,
                   "ledger": store.ledger_path(Home(home)),
                   "anthropic": anthropic.Anthropic(base_url=base, api_key="unused",
                                                    max_retries=0, timeout=30),
                   "openai": openai.OpenAI(base_url=base + "/v1", api_key="unused",
                                           max_retries=0, timeout=30)}
    standin.shutdown()


def last_sent(stack: dict[str, Any], path: str) -> dict[str, Any]:
    sent = [r for r in stack["standin"].received if r["path"] == path]
    assert sent, f"nothing reached the stand-in's {path}"
    return sent[-1]  # type: ignore[no-any-return]


def ledger_rows(stack: dict[str, Any], route: str, n: int) -> list[dict[str, Any]]:
    return wait_for(lambda: (lambda got: got if len(got) >= n else None)(
        rows(stack["ledger"], route)), 10, what=f"{n} ledger rows of {route}")


def test_routes_table_carries_the_kind(stack: dict[str, Any], tmp_path: Path) -> None:
    table: RoutesTable = stack["table"]
    kinds = {r.provider.name: r.provider.kind for r in table.routes if r.provider}
    assert kinds == {"claude": "anthropic", "oai": "openai", "claude-capped": "anthropic",
                     "oai-capped": "openai"}
    path = tmp_path / "routes.json"
    table.write(path)
    assert json.loads(path.read_text())["schema"] == "sovctl.routes/7"
    assert RoutesTable.read(path) == table
    assert set(frontier.SURFACES) == set(config.PROVIDER_KINDS)


def test_messages_create_stream_and_count_tokens(stack: dict[str, Any]) -> None:
    client: anthropic.Anthropic = stack["anthropic"]
    message = client.messages.create(model="frontier/claude/claude-test", max_tokens=64,
                                     messages=HI)
    assert message.content[0].text == HELLO  # type: ignore[union-attr]
    assert (message.usage.input_tokens, message.usage.output_tokens) == (10, 5)
    sent = last_sent(stack, "/v1/messages")
    assert sent["body"]["model"] == "claude-test" and sent["body"]["max_tokens"] == 64
    # The key as Anthropic takes it, never the client's key nor a bearer token.
    assert sent["headers"]["x-api-key"] == KEY
    assert sent["headers"]["anthropic-version"] == frontier.ANTHROPIC_VERSION
    assert "authorization" not in {k.lower() for k in sent["headers"]}

    with client.messages.stream(model="frontier/claude/claude-test", max_tokens=64,
                                messages=HI) as events:
        text = "".join(events.text_stream)
        final = events.get_final_message()
    assert text == HELLO and final.usage.output_tokens == 7
    assert "stream_options" not in last_sent(stack, "/v1/messages")["body"]

    counted = client.messages.count_tokens(model="frontier/claude/claude-test", messages=HI)
    assert counted.input_tokens == 9

    made, streamed, count = ledger_rows(stack, "claude", 3)
    assert (made["endpoint"], made["status"], made["tokens_in"], made["tokens_out"]) == (
        "/v1/messages", 200, 10, 5)
    assert made["cost"] == pytest.approx(cost(10, 5)) and made["tokens_source"] == "measured"
    assert (streamed["tokens_in"], streamed["tokens_out"]) == (12, 7)
    assert streamed["cost"] == pytest.approx(cost(12, 7))
    assert streamed["tokens_source"] == "measured"
    assert count["endpoint"] == "/v1/messages/count_tokens" and count["cost"] == 0
    assert all(r["model"] == "frontier/claude/claude-test" for r in (made, streamed, count))


def test_responses_create_and_stream(stack: dict[str, Any]) -> None:
    client: openai.OpenAI = stack["openai"]
    response = client.responses.create(model="frontier/oai/gpt-test", input="hi")
    assert response.output_text == HELLO
    sent = last_sent(stack, "/v1/responses")
    assert sent["headers"]["authorization"] == f"Bearer {KEY}"
    # No limit asked: the provider's max_tokens, as Responses names it.
    assert sent["body"]["max_output_tokens"] == 4096 and "max_tokens" not in sent["body"]

    events = client.responses.create(model="frontier/oai/gpt-test", input="hi",
                                     max_output_tokens=32, stream=True)
    deltas, done = [], None
    for event in events:
        if event.type == "response.output_text.delta":
            deltas.append(event.delta)
        elif event.type == "response.completed":
            done = event.response
    assert "".join(deltas) == HELLO and done is not None and done.usage is not None
    assert last_sent(stack, "/v1/responses")["body"]["max_output_tokens"] == 32

    made, streamed = ledger_rows(stack, "oai", 2)
    assert (made["endpoint"], made["tokens_in"], made["tokens_out"]) == ("/v1/responses", 10, 5)
    assert made["cost"] == pytest.approx(cost(10, 5))
    assert (streamed["tokens_in"], streamed["tokens_out"]) == (11, 3)
    assert streamed["cost"] == pytest.approx(cost(11, 3))
    assert streamed["tokens_source"] == "measured"


def test_a_surface_the_provider_does_not_speak(stack: dict[str, Any]) -> None:
    before = len(stack["standin"].received)
    with pytest.raises(anthropic.BadRequestError) as on_messages:
        stack["anthropic"].messages.create(model="frontier/oai/gpt-test", max_tokens=8,
                                           messages=HI)
    e = on_messages.value
    assert e.body["type"] == "error"  # type: ignore[index]
    assert e.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    assert "speaks /v1/chat/completions, /v1/responses, not /v1/messages" in e.message

    with pytest.raises(openai.BadRequestError) as on_responses:
        stack["openai"].responses.create(model="frontier/claude/claude-test", input="hi")
    assert on_responses.value.code == "endpoint_not_routed"
    assert "speaks /v1/messages, /v1/messages/count_tokens" in on_responses.value.message
    with pytest.raises(openai.BadRequestError) as on_chat:
        stack["openai"].chat.completions.create(model="frontier/claude/claude-test",
                                                messages=HI)  # type: ignore[arg-type]
    assert "not /v1/chat/completions" in on_chat.value.message
    assert len(stack["standin"].received) == before  # nothing was sent


def test_private_requests_stay_on_every_surface(stack: dict[str, Any]) -> None:
    before = len(stack["standin"].received)
    private = {"X-Sovctl-Private": "1"}
    with pytest.raises(anthropic.PermissionDeniedError) as on_messages:
        stack["anthropic"].messages.create(model="frontier/claude/claude-test", max_tokens=8,
                                           messages=HI, extra_headers=private)
    assert on_messages.value.body["error"]["type"] == "permission_error"  # type: ignore[index]
    assert "never routed out" in on_messages.value.message
    with pytest.raises(anthropic.PermissionDeniedError):
        stack["anthropic"].messages.count_tokens(model="frontier/claude/claude-test",
                                                 messages=HI, extra_headers=private)
    with pytest.raises(openai.PermissionDeniedError) as on_responses:
        stack["openai"].responses.create(model="frontier/oai/gpt-test", input="hi",
                                         extra_headers=private)
    assert on_responses.value.code == "private_request"
    assert len(stack["standin"].received) == before


def test_caps_and_limits_on_every_surface(stack: dict[str, Any]) -> None:
    before = len(stack["standin"].received)
    # The worst case of 20 generated tokens at a cent each is more than the 0.05 cap.
    with pytest.raises(anthropic.RateLimitError) as on_messages:
        stack["anthropic"].messages.create(model="frontier/claude-capped/claude-test",
                                           max_tokens=20, messages=HI)
    assert on_messages.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    assert "daily cap" in on_messages.value.message
    assert on_messages.value.response.headers.get("retry-after")
    with pytest.raises(openai.RateLimitError) as on_responses:
        stack["openai"].responses.create(model="frontier/oai-capped/gpt-test", input="hi",
                                         max_output_tokens=20)
    assert on_responses.value.code == "daily_cap_reached"
    # max_output_tokens is held to the provider's max_tokens, as max_tokens is on chat.
    with pytest.raises(openai.BadRequestError) as above:
        stack["openai"].responses.create(model="frontier/oai-capped/gpt-test", input="hi",
                                         max_output_tokens=51)
    assert above.value.code == "max_tokens_above_limit"
    # Counting tokens costs nothing: a cap does not stop it.
    assert stack["anthropic"].messages.count_tokens(
        model="frontier/claude-capped/claude-test", messages=HI).input_tokens == 9
    with pytest.raises(anthropic.PermissionDeniedError) as unlisted:
        stack["anthropic"].messages.create(model="frontier/claude/other", max_tokens=8,
                                           messages=HI)
    assert "allowed: frontier/claude/claude-test" in unlisted.value.message
    assert len(stack["standin"].received) == before + 1  # the count alone
    # The refusal is recorded, at no cost.
    refused = wait_for(lambda: [r for r in rows(stack["ledger"], "claude-capped")
                                if r["status"] == 429], 10, what="the 429's row")
    assert refused[0]["endpoint"] == "/v1/messages" and refused[0]["cost"] == 0


def test_provider_kind_is_checked(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    body = ('[providers.x]\nkind = "{kind}"\nbase_url = "{url}"\napi_key_env = "X_KEY"\n'
            'models = {{ m = {{ input_per_mtok = 1, output_per_mtok = 1 }} }}\n')
    (home / "sovctl.toml").write_text(body.format(kind="gemini", url="https://x.example/v1"))
    with pytest.raises(ConfigError, match="kind must be one of 'openai', 'anthropic'"):
        config.load(Home(home))
    (home / "sovctl.toml").write_text(body.format(kind="anthropic",
                                                  url="https://x.example/v1"))
    with pytest.raises(ConfigError, match="does not end in /v1"):
        config.load(Home(home))
    (home / "sovctl.toml").write_text(body.format(kind="anthropic", url="https://x.example"))
    assert config.load(Home(home)).providers["x"].kind == "anthropic"
