"""Anthropic's Messages API through the gateway: the pure translation first, then the real
`anthropic` SDK against a real stack (SmolLM2 as `smol` with sovctl's chatml-tools template,
and as `plain` with its own, which has no place for tools), and the key as x-api-key."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest
from tests.test_gateway_guard import serving
from tests.test_serve import Stack
from tests.test_tools import tools_stack

from sovctl.gateway import anthropic as messages
from sovctl.gateway import tools
from sovctl.runtime.documents import Limits, RoutesTable

WEATHER = {"name": "get_weather", "description": "The current weather in a city",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}},
                            "required": ["city"]}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def request(**fields: Any) -> dict[str, Any]:
    return {"model": "smol", "max_tokens": 16, "messages": ASK, **fields}


# -- the translation ---------------------------------------------------------------------------
def test_a_valid_request_passes() -> None:
    full = request(system=[{"type": "text", "text": "Be brief"}], tools=[WEATHER],
                   tool_choice={"type": "tool", "name": "get_weather"}, temperature=0.5,
                   stop_sequences=["\n"], metadata={"user_id": "u1"}, stream=True,
                   messages=[*ASK, {"role": "assistant", "content": [
                       {"type": "text", "text": "Let me look."},
                       {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                        "input": {"city": "Paris"}}]},
                       {"role": "user", "content": [
                           {"type": "tool_result", "tool_use_id": "toolu_1",
                            "content": "sunny"},
                           {"type": "image", "source": {"type": "base64",
                                                        "media_type": "image/png",
                                                        "data": "iVBORw0KGgo="}}]}])
    assert messages.check(messages.MESSAGES, full) is None
    count = {"model": "smol", "messages": ASK}
    assert messages.check(messages.COUNT_TOKENS, count) is None


@pytest.mark.parametrize(("fields", "param"), [
    ({"max_tokens": None}, "max_tokens"),
    ({"max_tokens": "8"}, "max_tokens"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "system", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": [{"type": "bogus"}]}]},
     "messages[0].content[0].type"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_use", "id": "t",
                                                  "name": "n", "input": {}}]}]},
     "messages[0].content[0].type"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {
        "type": "url", "url": "https://example.com/a.png"}}]}]},
     "messages[0].content[0].source.type"),
    ({"temperature": 1.5}, "temperature"),
    ({"tools": [{"name": "x"}]}, "tools[0].input_schema"),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools[0].type"),
    ({"tool_choice": {"type": "any"}}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "tool", "name": "other"}},
     "tool_choice.name"),
    ({"system": 3}, "system"),
])
def test_bad_requests_name_the_field(fields: dict[str, Any], param: str) -> None:
    payload = {k: v for k, v in request(**fields).items() if v is not None}
    invalid = messages.check(messages.MESSAGES, payload)
    assert invalid is not None and invalid.param == param, invalid


def test_the_request_retold_as_chat() -> None:
    payload = request(system="Be brief", tools=[WEATHER], stop_sequences=["END"], messages=[
        *ASK, {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1",
                                                  "name": "get_weather",
                                                  "input": {"city": "Paris"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1",
                                      "content": [{"type": "text", "text": "sunny"}]}]}])
    chat = messages.to_chat(payload)
    assert chat["messages"] == [
        {"role": "system", "content": "Be brief"}, *ASK,
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "toolu_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "sunny"}]
    assert chat["stop"] == ["END"] and chat["max_tokens"] == 16
    assert chat["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "description": WEATHER["description"],
        "parameters": WEATHER["input_schema"]}}]
    view = messages.tool_view(request(tools=[WEATHER], tool_choice={"type": "any"}))
    assert tools.forced(view) == chat["tools"]
    view = messages.tool_view(request(tools=[WEATHER], tool_choice={"type": "auto"}))
    assert tools.forced(view) is None


def test_errors_in_anthropics_shape() -> None:
    assert messages.error_body(429, "busy") == {
        "type": "error", "error": {"type": "rate_limit_error", "message": "busy"}}
    types = {s: messages.error_type(s) for s in (400, 401, 403, 404, 429, 500, 502, 503)}
    assert types == {400: "invalid_request_error", 401: "authentication_error",
                     403: "permission_error", 404: "not_found_error", 429: "rate_limit_error",
                     500: "api_error", 502: "api_error", 503: "overloaded_error"}


def test_stream_tally_reads_usage_and_renames_the_model() -> None:
    message = messages.from_chat({"choices": [{"finish_reason": "tool_calls", "message": {
        "tool_calls": [{"function": {"name": "get_weather", "arguments": '{"city": "X"}'}}]}}],
        "usage": {"prompt_tokens": 30, "completion_tokens": 7}}, "smol")
    events = messages.stream_events({**message, "model": "/some/path.gguf"})
    tally = messages.Tally("smol")
    out = b"".join(tally.feed(events[i:i + 7]) for i in range(0, len(events), 7)) + tally.end()
    assert tally.usage == (30, 7)
    assert b"/some/path" not in out and out.count(b"\n\n") == events.count(b"\n\n")
    kinds = [line[7:] for line in out.split(b"\n") if line.startswith(b"event: ")]
    assert kinds == [b"message_start", b"content_block_start", b"content_block_delta",
                     b"content_block_stop", b"message_delta", b"message_stop"]


# -- with the anthropic SDK against a real stack -----------------------------------------------
@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    yield from tools_stack(tmp_path_factory, "messages")


def client(stack: Stack) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=stack.base, api_key="unused", max_retries=0,
                               timeout=120)


def check_weather(block: Any) -> None:
    assert block.type == "tool_use" and block.name == "get_weather"
    assert block.id.startswith("toolu_")
    assert set(block.input) == {"city"} and isinstance(block.input["city"], str)


@pytest.mark.usefixtures("models")
def test_create_stream_and_count(stack: Stack) -> None:
    c = client(stack)
    m = c.messages.create(model="smol", max_tokens=8, system="Answer in one word.",
                          messages=[{"role": "user", "content": "Capital of France?"}],
                          extra_body={"temperature": 0})
    assert m.type == "message" and m.role == "assistant" and m.model == "smol"
    assert m.content[0].type == "text" and m.content[0].text
    assert m.stop_reason in ("end_turn", "max_tokens")
    assert m.usage.input_tokens > 0 and 0 < m.usage.output_tokens <= 8
    with c.messages.stream(model="smol", max_tokens=8, extra_body={"temperature": 0},
                           messages=[{"role": "user", "content": "Say hello"}]) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text and final.content[0].text == text and final.model == "smol"
    assert final.usage.output_tokens > 0
    counted = c.messages.count_tokens(model="smol",
                                      messages=[{"role": "user", "content": "Say hello"}])
    assert counted.input_tokens > 0
    # Each by surface in the ledger, with its tokens.
    time.sleep(1.5)
    db = sqlite3.connect(stack.home / "ledger" / "ledger.sqlite3")
    rows = db.execute("SELECT endpoint, tokens_in, tokens_out FROM requests "
                      "WHERE model = 'smol' AND status = 200").fetchall()
    surfaced = [r for r in rows if r[0] == "/v1/messages"]
    assert len(surfaced) >= 2 and all(i > 0 and o > 0 for _, i, o in surfaced)
    assert [r for r in rows if r[0] == "/v1/messages/count_tokens"]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("choice", [{"type": "tool", "name": "get_weather"}, {"type": "any"}],
                         ids=["tool", "any"])
@pytest.mark.usefixtures("models")
def test_forced_tool_use_and_the_result_round_trip(stack: Stack, choice: dict[str, Any],
                                                   stream: bool) -> None:
    c = client(stack)
    fields: dict[str, Any] = {"model": "smol", "max_tokens": 64, "tools": [WEATHER],
                              "tool_choice": choice, "messages": ASK}
    if stream:
        with c.messages.stream(**fields) as s:
            m = s.get_final_message()
    else:
        m = c.messages.create(**fields)
    assert m.stop_reason == "tool_use" and len(m.content) == 1
    call = m.content[0]
    check_weather(call)
    back = c.messages.create(model="smol", max_tokens=16, tools=[WEATHER], messages=[
        *ASK, {"role": "assistant", "content": [call.model_dump()]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id,
                                      "content": "Sunny, 21 C"}]}])
    assert back.content and back.usage.input_tokens > 0


@pytest.mark.usefixtures("models")
def test_bad_input_gets_anthropic_400s(stack: Stack) -> None:
    c = client(stack)
    with pytest.raises(anthropic.BadRequestError) as e:
        c.messages.create(model="smol", max_tokens=8,
                          messages=[{"role": "user", "content": [{"type": "bogus"}]}])  # type: ignore[list-item]
    assert e.value.body["error"]["type"] == "invalid_request_error"  # type: ignore[index]
    assert "messages[0].content[0].type" in e.value.message
    r = httpx.post(stack.base + "/v1/messages", timeout=30,
                   json={"model": "smol", "messages": ASK})
    assert r.status_code == 400
    assert r.json() == {"type": "error", "error": {
        "type": "invalid_request_error", "message": "'max_tokens' is required"}}
    # A template without tools: refused, never a silent text answer.
    with pytest.raises(anthropic.BadRequestError) as e:
        c.messages.create(model="plain", max_tokens=8, tools=[WEATHER],  # type: ignore[list-item]
                          tool_choice={"type": "any"}, messages=ASK)  # type: ignore[arg-type]
    assert "chatml-tools" in e.value.message
    with pytest.raises(anthropic.NotFoundError) as nf:
        c.messages.create(model="nope", max_tokens=8, messages=ASK)  # type: ignore[arg-type]
    assert nf.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]


def test_the_key_as_x_api_key(tmp_path: Path) -> None:
    key = "k" * 40
    (tmp_path / "api_key").write_text(key + "\n")
    table = RoutesTable("127.0.0.1", 0, True, str(tmp_path / "api_key"),
                        Limits(4, 10.0, 1 << 20), str(tmp_path / "state.json"), routes=())
    with serving(table) as base:
        wrong = anthropic.Anthropic(base_url=base, api_key="guess", max_retries=0)
        with pytest.raises(anthropic.AuthenticationError) as e:
            wrong.messages.create(model="smol", max_tokens=8, messages=ASK)  # type: ignore[arg-type]
        assert e.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
        right = anthropic.Anthropic(base_url=base, api_key=key, max_retries=0)
        # Past the key: no model here, told in Anthropic's shape.
        with pytest.raises(anthropic.NotFoundError):
            right.messages.create(model="smol", max_tokens=8, messages=ASK)  # type: ignore[arg-type]
        r = httpx.post(base + "/v1/messages/count_tokens", json={"model": "smol",
                                                                  "messages": ASK},
                       headers={"Authorization": f"Bearer {key}",
                                "anthropic-version": "2023-06-01"})
        assert r.status_code == 404 and r.json()["type"] == "error"
    assert json.loads(json.dumps(messages.error_body(401, "x")))["error"]["type"] == (
        "authentication_error")
