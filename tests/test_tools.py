"""OpenAI tool calls through the gateway: the pure translation first, then the round trip with
the `openai` SDK against real llama-server runtimes (SmolLM2 with sovctl's chatml-tools
template, and the same model on its own template, which has no place for tools)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from tests.conftest import CHAT_MODEL, TINY_MODEL
from tests.helpers import run, run_json
from tests.test_serve import Stack, start_stack, stop_stack

from sovctl.gateway import tools
from sovctl.gateway.validate import Invalid

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "The time now"}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


def answer(content: str, finish: str = "stop") -> bytes:
    return json.dumps({
        "id": "chatcmpl-1", "object": "chat.completion", "created": 7, "model": "m",
        "choices": [{"index": 0, "finish_reason": finish,
                     "message": {"role": "assistant", "content": content}}],
        "usage": {"prompt_tokens": 190, "completion_tokens": 20, "total_tokens": 210}}).encode()


# -- the translation ---------------------------------------------------------------------------
def test_only_a_demanded_call_is_enforced() -> None:
    for choice in (None, "auto", "none"):
        assert tools.forced({"tools": [WEATHER], "tool_choice": choice}) is None
    assert tools.forced({"tools": [WEATHER, TIME], "tool_choice": "required"}) == [WEATHER, TIME]
    assert tools.forced({"tools": [WEATHER, TIME], "tool_choice": NAMED}) == [WEATHER]
    other = tools.forced({"tools": [TIME], "tool_choice": NAMED})
    assert isinstance(other, Invalid) and other.param == "tool_choice.function.name"
    none = tools.forced({"tool_choice": "required"})
    assert isinstance(none, Invalid) and none.param == "tool_choice"


def test_call_schema_nests_each_tools_parameters() -> None:
    defs = {"type": "object", "properties": {"at": {"$ref": "#/$defs/Place"}},
            "$defs": {"Place": {"type": "string"}}}
    schema = tools.call_schema([WEATHER, TIME, {"type": "function",
                                                "function": {"name": "go", "parameters": defs}}])
    weather, now, go = schema["anyOf"]
    assert weather["properties"] == {"name": {"const": "get_weather"},
                                     "arguments": WEATHER["function"]["parameters"]}
    assert weather["required"] == ["name", "arguments"]
    # No parameters: the function takes none, so the only arguments are {}.
    assert now["properties"]["arguments"] == tools.NO_PARAMETERS
    # A reference still points at its definition, now nested in the call's schema.
    ref = go["properties"]["arguments"]["properties"]["at"]["$ref"]
    assert ref == "#/anyOf/2/properties/arguments/$defs/Place"
    node: Any = schema
    for part in ref[2:].split("/"):
        node = node[int(part)] if isinstance(node, list) else node[part]
    assert node == {"type": "string"}


def test_constrained_request_keeps_the_chat_and_replaces_the_output() -> None:
    payload = {"model": "smol", "messages": ASK, "tools": [WEATHER], "tool_choice": NAMED,
               "stream": True, "stream_options": {"include_usage": True}, "max_tokens": 50,
               "response_format": {"type": "text"}}
    sent = json.loads(tools.constrained_request(payload, [WEATHER]))
    assert sent["messages"] == ASK and sent["tools"] == [WEATHER] and sent["max_tokens"] == 50
    assert not {"tool_choice", "stream", "stream_options"} & sent.keys()
    assert sent["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "tool_call", "schema": tools.call_schema([WEATHER])}}


def test_a_constrained_answer_becomes_a_tool_call() -> None:
    doc = tools.tool_call_answer(
        answer('{\n "name": "get_weather",\n "arguments": {"city": "Zürich"}}'), [WEATHER])
    choice = doc["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["content"] is None and len(message["tool_calls"]) == 1
    call = message["tool_calls"][0]
    assert call["id"].startswith("call_") and call["type"] == "function"
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Zürich"}
    assert doc["usage"]["prompt_tokens"] == 190 and doc["id"] == "chatcmpl-1"


def test_an_answer_cut_short_stays_as_it_is() -> None:
    doc = tools.tool_call_answer(answer('{"name": "get_wea', "length"), [WEATHER])
    assert doc["choices"][0]["finish_reason"] == "length"
    assert doc["choices"][0]["message"]["content"] == '{"name": "get_wea'


@pytest.mark.parametrize("content", ["Sunny.", '{"name": "get_time", "arguments": {}}',
                                     '{"name": "get_weather", "arguments": "x"}', "[1]"])
def test_an_answer_that_is_no_call_is_an_error(content: str) -> None:
    with pytest.raises(ValueError):
        tools.tool_call_answer(answer(content), [WEATHER])
    with pytest.raises(ValueError):
        tools.tool_call_answer(b'{"choices": []}', [WEATHER])


def sse(data: bytes) -> list[Any]:
    events = data.decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    return [json.loads(e.removeprefix("data: ")) for e in events[:-2]]


def test_stream_events_replay_the_call_as_openai_streams_it() -> None:
    doc = tools.tool_call_answer(answer('{"name": "get_weather", "arguments": {"city": "Oslo"}}'),
                                 [WEATHER])
    chunks = sse(tools.stream_events(doc, include_usage=True))
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert {c["id"] for c in chunks} == {"chatcmpl-1"}
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    calls = [d for c in chunks for ch in c["choices"]
             for d in ch["delta"].get("tool_calls", ())]
    assert calls[0]["id"] == doc["choices"][0]["message"]["tool_calls"][0]["id"]
    assert calls[0]["function"]["name"] == "get_weather"
    assert json.loads("".join(d["function"]["arguments"] for d in calls)) == {"city": "Oslo"}
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 210
    without = sse(tools.stream_events(doc, include_usage=False))
    assert without[-1]["choices"][0]["finish_reason"] == "tool_calls"
    cut = sse(tools.stream_events(tools.tool_call_answer(answer("{", "length"), [WEATHER]),
                                  include_usage=False))
    assert cut[1]["choices"][0]["delta"] == {"content": "{"}
    assert cut[-1]["choices"][0]["finish_reason"] == "length"


def test_props_say_whether_the_template_renders_tools() -> None:
    assert tools.supports_tools(b'{"chat_template_caps": {"supports_tools": true}}')
    assert not tools.supports_tools(b'{"chat_template_caps": {"supports_tools": false}}')
    assert not tools.supports_tools(b'{"model_path": "x"}')
    assert not tools.supports_tools(b"not json")
    assert "chatml-tools" in tools.unsupported("plain").message


def test_capability_is_asked_once_and_again_after_a_failure() -> None:
    asked = []

    async def ask() -> bool:
        asked.append(1)
        await asyncio.sleep(0.01)
        if len(asked) == 1:
            raise OSError("runtime down")
        return True

    async def scenario() -> None:
        cap = tools.Capability()
        with pytest.raises(OSError):
            await cap.get(ask)
        assert await asyncio.gather(cap.get(ask), cap.get(ask), cap.get(ask)) == [True] * 3

    asyncio.run(scenario())
    assert len(asked) == 2


# -- through the gateway, on real runtimes -----------------------------------------------------
def tools_stack(tmp_path_factory: pytest.TempPathFactory, name: str) -> Iterator[Stack]:
    """SmolLM2 twice: as `smol` with sovctl's chatml-tools template, as `plain` with its own
    (whose template renders no tools). The tool tests of every surface run on it."""
    home = tmp_path_factory.mktemp(name)
    (home / "sovctl.toml").write_text(
        '[serve]\nparallel = 2\n\n[models.smol]\nrole = "chat"\nchat_template = "chatml-tools"\n'
        '\n[models.plain]\nrole = "chat"\n')
    s = start_stack(home, models=((CHAT_MODEL, "smol"), (CHAT_MODEL, "plain")))
    yield s
    stop_stack(s)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    yield from tools_stack(tmp_path_factory, "tools")


def check_call(call: Any, names: set[str]) -> Any:
    """The call is of one of the tools named, its arguments valid for its parameters' schema
    (get_weather takes a city, a string; get_time takes nothing)."""
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name in names
    args = json.loads(call.function.arguments)
    if call.function.name == "get_weather":
        assert isinstance(args, dict) and set(args) == {"city"} and isinstance(args["city"], str)
    else:
        assert args == {}
    return call


def streamed(chunks: Iterator[Any]) -> tuple[str, list[dict[str, str]], str | None]:
    """Content, tool calls and finish reason, put together from the deltas as a client does."""
    text, calls, finish = "", [], None
    for chunk in chunks:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        text += delta.content or ""
        for d in delta.tool_calls or ():
            while len(calls) <= d.index:
                calls.append({"id": "", "name": "", "arguments": ""})
            calls[d.index]["id"] += d.id or ""
            calls[d.index]["name"] += (d.function.name or "") if d.function else ""
            calls[d.index]["arguments"] += (d.function.arguments or "") if d.function else ""
        finish = chunk.choices[0].finish_reason or finish
    return text, calls, finish


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("choice", [NAMED, "required"], ids=["named", "required"])
@pytest.mark.slow
@pytest.mark.usefixtures("models")
def test_tool_call_round_trip(stack: Stack, choice: Any, stream: bool) -> None:
    c = stack.client()
    # Named: that tool, of two. Required: either, the model's choice.
    offered = [WEATHER, TIME]
    names = {"get_weather"} if choice == NAMED else {"get_weather", "get_time"}
    if stream:
        chunks = c.chat.completions.create(
            model="smol", messages=ASK, tools=offered, tool_choice=choice, temperature=0,
            max_tokens=60, stream=True, stream_options={"include_usage": True})
        _, calls, finish = streamed(chunks)
        assert finish == "tool_calls" and len(calls) == 1
        call = {"id": calls[0]["id"], "type": "function",
                "function": {"name": calls[0]["name"], "arguments": calls[0]["arguments"]}}
        check_call(openai.types.chat.ChatCompletionMessageToolCall.model_validate(call), names)
    else:
        r = c.chat.completions.create(model="smol", messages=ASK, tools=offered,
                                      tool_choice=choice, temperature=0, max_tokens=60)
        choice0 = r.choices[0]
        assert choice0.finish_reason == "tool_calls" and choice0.message.content is None
        assert r.usage is not None and r.usage.prompt_tokens > 100  # the tools are in the prompt
        call = check_call(choice0.message.tool_calls[0], names).model_dump()
    loop = [*ASK, {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call["id"], "content": "18 C and sunny"}]
    if stream:
        text, calls, finish = streamed(c.chat.completions.create(
            model="smol", messages=loop, tools=offered, tool_choice="none", temperature=0,
            max_tokens=12, stream=True))
        assert not calls
    else:
        final = c.chat.completions.create(model="smol", messages=loop, tools=offered,
                                          tool_choice="none", temperature=0, max_tokens=12)
        text, finish = final.choices[0].message.content or "", final.choices[0].finish_reason
    assert text.strip() and finish in ("stop", "length")


@pytest.mark.slow
@pytest.mark.usefixtures("models")
def test_auto_passes_through_to_the_runtime(stack: Stack) -> None:
    r = stack.client().chat.completions.create(
        model="smol", messages=ASK, tools=[WEATHER], tool_choice="auto", temperature=0,
        max_tokens=8)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")


@pytest.mark.slow
@pytest.mark.usefixtures("models")
def test_tools_for_a_template_without_them_get_a_400(stack: Stack) -> None:
    c = stack.client()
    for choice in ("auto", "none", "required", NAMED):
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError) as e:
                c.chat.completions.create(model="plain", messages=ASK, tools=[WEATHER],
                                          tool_choice=choice, max_tokens=5, stream=stream)
            err = e.value.body
            assert isinstance(err, dict) and err["param"] == "tools", err
            assert "chatml-tools" in err["message"]
    # The same model still chats, and a named tool the request does not offer is refused.
    assert c.chat.completions.create(model="plain", messages=ASK, max_tokens=5).choices
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="smol", messages=ASK, tools=[WEATHER], max_tokens=5,
                                  tool_choice={"type": "function",
                                               "function": {"name": "get_time"}})


@pytest.mark.slow
@pytest.mark.usefixtures("models")
def test_models_and_status_show_tool_support(stack: Stack) -> None:
    models = httpx.get(stack.base + "/v1/models").json()["data"]
    assert {m["id"]: m["capabilities"]["tools"] for m in models} == {"smol": True,
                                                                    "plain": False}
    procs = {p["name"]: p for p in run_json(stack.home, "status")["data"]["processes"]}
    assert {p["model"]: p["tools"] for p in procs.values() if p["kind"] == "runtime"} == {
        "smol": True, "plain": False}
    table = run(stack.home, "status").stdout
    assert "TOOLS" in table and "yes" in table


@pytest.mark.slow
@pytest.mark.usefixtures("models")
def test_the_fallback_runtime_refuses_tools(tmp_path: Path) -> None:
    s = start_stack(tmp_path / "fallback", "--chat", "tiny",
                    env={"SOVCTL_SERVE__RUNTIME": "llama-cpp-python"},
                    models=((TINY_MODEL, "tiny"),))
    try:
        r = httpx.post(s.base + "/v1/chat/completions", timeout=30, json={
            "model": "tiny", "messages": ASK, "tools": [WEATHER], "tool_choice": "required"})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == "tools"
        assert "llama-cpp-python" in r.json()["error"]["message"]
        models = httpx.get(s.base + "/v1/models").json()["data"]
        assert models[0]["capabilities"] == {"tools": False, "vision": False}
    finally:
        stop_stack(s)
