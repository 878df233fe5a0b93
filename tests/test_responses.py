"""OpenAI's Responses API through the gateway: the checks and the store first, then the real
`openai` SDK against a real stack (SmolLM2 with sovctl's chatml-tools template as `smol`, and
on its own template, which has no place for tools, as `plain`)."""

from __future__ import annotations

import json
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from tests.test_serve import Stack
from tests.test_tools import tools_stack

from sovctl.gateway import responses
from sovctl.gateway.validate import Invalid

WEATHER = {"type": "function", "name": "get_weather", "description": "The current weather",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                          "required": ["city"]}}
TIME = {"type": "function", "name": "get_time", "description": "The time now",
        "parameters": {"type": "object", "properties": {}}}


# -- the checks, the store, the events ---------------------------------------------------------
@pytest.mark.parametrize(("payload", "param"), [
    ({}, "input"),
    ({"input": 3}, "input"),
    ({"input": []}, "input"),
    ({"input": [{"role": "robot", "content": "x"}]}, "input[0].role"),
    ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input[0].call_id"),
    ({"input": [{"type": "function_call_output", "call_id": "c"}]}, "input[0].output"),
    ({"input": [{"role": "user", "content": [{"type": "input_image"}]}]},
     "input[0].content[0].type"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"input": "x", "tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}},
     "tool_choice.name"),
    ({"input": "x", "tool_choice": "required"}, "tool_choice"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "a"}}},
     "text.format.schema"),
    ({"input": "x", "previous_response_id": 7}, "previous_response_id"),
    ({"input": "x", "background": True}, "background"),
])
def test_bad_requests_name_the_field(payload: dict[str, Any], param: str) -> None:
    invalid = responses.check(payload)
    assert isinstance(invalid, Invalid) and invalid.param == param, invalid


def test_good_requests_pass() -> None:
    assert responses.check({"input": "hi", "instructions": "brief", "store": False}) is None
    assert responses.check({"input": [
        {"role": "user", "content": [{"type": "input_text", "text": "hi"}]},
        {"type": "function_call", "call_id": "c", "name": "get_weather", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c", "output": "sunny"}],
        "tools": [WEATHER], "tool_choice": {"type": "function", "name": "get_weather"},
        "text": {"format": {"type": "json_schema", "name": "a", "schema": {}}}}) is None


def test_the_runtime_gets_the_format_and_the_calls_schema() -> None:
    fmt = {"format": {"type": "json_schema", "name": "a", "schema": {"type": "object"}}}
    sent = json.loads(responses.runtime_request(
        {"input": "x", "text": fmt, "store": False, "previous_response_id": "r"},
        [{"role": "user", "content": "x"}], None))
    assert sent == {"input": [{"role": "user", "content": "x"}], "response_format": {
        "type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "object"}}}}
    payload = {"input": "x", "tools": [WEATHER], "tool_choice": "required", "stream": True}
    forced = responses.chat_tools(payload)["tools"]
    sent = json.loads(responses.runtime_request(payload, [], forced))
    assert "tool_choice" not in sent and sent["stream"] is False
    assert sent["tools"] == [WEATHER]
    assert sent["response_format"]["json_schema"]["name"] == "tool_call"


def test_store_is_private_and_bounded(tmp_path: Path) -> None:
    store = responses.Store(tmp_path / "run" / "responses.sqlite3", max_count=2, max_age=60)
    for i in range(3):
        store.put(f"resp_{i}", "m", [{"role": "user", "content": str(i)}])
    assert stat.S_IMODE((tmp_path / "run" / "responses.sqlite3").stat().st_mode) == 0o600
    assert store.get("resp_0", "m") is None  # beyond the count
    assert store.get("resp_2", "m") == [{"role": "user", "content": "2"}]
    assert store.get("resp_2", "other") is None  # another model's
    store.max_age = 0.01
    time.sleep(0.02)
    assert store.get("resp_2", "m") is None  # expired
    store.close()


# -- through the gateway, on real runtimes -----------------------------------------------------
@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    yield from tools_stack(tmp_path_factory, "responses")


def bad_request(call: Any) -> dict[str, Any]:
    with pytest.raises(openai.BadRequestError) as e:
        call()
    body: dict[str, Any] = e.value.body  # type: ignore[assignment]
    return body


@pytest.mark.slow
@pytest.mark.usefixtures("models")
def test_create_stream_and_continue(stack: Stack) -> None:
    c = stack.client()
    r = c.responses.create(model="smol", input="My name is Ada. Say hello.",
                           instructions="Answer briefly.", max_output_tokens=16, temperature=0)
    assert r.status == "completed" and r.model == "smol" and r.output_text.strip()
    assert r.usage is not None and r.usage.input_tokens > 0 and r.usage.output_tokens > 0
    # The next turn carries the first: its prompt is longer than the new input alone.
    again = c.responses.create(model="smol", input="What is my name?", previous_response_id=r.id,
                               max_output_tokens=8, temperature=0)
    alone = c.responses.create(model="smol", input="What is my name?", max_output_tokens=8,
                               temperature=0, store=False)
    assert again.usage is not None and alone.usage is not None
    assert again.usage.input_tokens > alone.usage.input_tokens + 10
    assert again.previous_response_id == r.id
    # store: false answers, and keeps nothing to continue from.
    err = bad_request(lambda: c.responses.create(model="smol", input="x",
                                                 previous_response_id=alone.id))
    assert err["param"] == "previous_response_id"
    err = bad_request(lambda: c.responses.create(model="smol", input="x",
                                                 previous_response_id="resp_unknown"))
    assert err["param"] == "previous_response_id"
    assert "unknown" in err["message"]

    kinds = []
    text = ""
    final = None
    with c.responses.stream(model="smol", input="Count to three.", max_output_tokens=12,
                            previous_response_id=again.id) as events:
        for event in events:
            kinds.append(event.type)
            if event.type == "response.output_text.delta":
                text += event.delta
        final = events.get_final_response()
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] == "response.completed" and "response.output_text.delta" in kinds
    assert text and final.output_text == text and final.model == "smol"
    # The streamed response is stored too.
    follow = c.responses.create(model="smol", input="And?", previous_response_id=final.id,
                                max_output_tokens=4)
    assert follow.status in ("completed", "incomplete")
    metrics = httpx.get(stack.base + "/metrics").text
    assert 'endpoint="/v1/responses"' in metrics


@pytest.mark.slow
@pytest.mark.usefixtures("models")
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("choice", [{"type": "function", "name": "get_weather"}, "required"],
                         ids=["named", "required"])
def test_forced_call_and_its_output(stack: Stack, choice: Any, stream: bool) -> None:
    c = stack.client()
    ask = "What is the weather in Paris?"
    names = {"get_weather"} if choice != "required" else {"get_weather", "get_time"}
    if stream:
        with c.responses.stream(model="smol", input=ask, tools=[WEATHER, TIME],
                                tool_choice=choice, max_output_tokens=60) as events:
            kinds = [e.type for e in events]
            r = events.get_final_response()
        assert "response.function_call_arguments.delta" in kinds
    else:
        r = c.responses.create(model="smol", input=ask, tools=[WEATHER, TIME],
                               tool_choice=choice, max_output_tokens=60)
    (call,) = r.output
    assert call.type == "function_call" and call.name in names
    args = json.loads(call.arguments)
    if call.name == "get_weather":
        assert isinstance(args.get("city"), str)
    final = c.responses.create(
        model="smol", previous_response_id=r.id, tools=[WEATHER, TIME], max_output_tokens=12,
        input=[{"type": "function_call_output", "call_id": call.call_id,
                "output": "18 C and sunny"}])
    assert final.output_text.strip()
    # Stateless, the same round trip with the items sent back by the client.
    items: list[Any] = [{"role": "user", "content": ask},
                        {"type": "function_call", "call_id": call.call_id, "name": call.name,
                         "arguments": call.arguments},
                        {"type": "function_call_output", "call_id": call.call_id,
                         "output": "18 C and sunny"}]
    again = c.responses.create(model="smol", input=items, store=False, max_output_tokens=12)
    assert again.output_text.strip()


@pytest.mark.slow
@pytest.mark.usefixtures("models")
def test_json_schema_and_refusals(stack: Stack) -> None:
    c = stack.client()
    schema = {"type": "object", "properties": {"city": {"type": "string"}},
              "required": ["city"], "additionalProperties": False}
    r = c.responses.create(model="smol", input="Name a city in France as JSON.",
                           max_output_tokens=40,
                           text={"format": {"type": "json_schema", "name": "city",
                                            "schema": schema}})
    assert isinstance(json.loads(r.output_text)["city"], str)
    # A template with no place for tools: refused, never answered as text.
    err = bad_request(lambda: c.responses.create(model="plain", input="x", tools=[WEATHER],
                                                 tool_choice="required"))
    assert err["param"] == "tools" and "chatml-tools" in err["message"]
    err = bad_request(lambda: c.responses.create(model="smol", input=[{"role": "robot",
                                                                       "content": "x"}]))
    assert err["param"] == "input[0].role"
    err = bad_request(lambda: c.responses.create(
        model="smol", input="x", tools=[{"type": "web_search_preview"}]))
    assert err["param"] == "tools[0].type"


@pytest.mark.slow
@pytest.mark.usefixtures("models")
def test_an_agents_sdk_agent_calls_its_tool(stack: Stack) -> None:
    """The OpenAI Agents SDK on its default model, which speaks the Responses API."""
    agents = pytest.importorskip("agents")
    agents.set_tracing_disabled(True)
    called: list[str] = []

    @agents.function_tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        called.append(city)
        return "18 C and sunny"

    client = openai.AsyncOpenAI(base_url=stack.base + "/v1", api_key="unused", max_retries=0)
    agent = agents.Agent(
        name="weather", instructions="Answer with the weather.", tools=[get_weather],
        model=agents.OpenAIResponsesModel(model="smol", openai_client=client),
        # Forced once, then free to answer: the SDK resets tool_choice after a call.
        model_settings=agents.ModelSettings(tool_choice="required", max_tokens=60))
    result = agents.Runner.run_sync(agent, "What is the weather in Paris?", max_turns=4)
    assert called and isinstance(result.final_output, str)
