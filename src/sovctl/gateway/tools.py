"""OpenAI tool calls through the gateway, on what llama-server can do.

llama-server renders `tools` into the prompt only when the model's chat template has a place
for them, and otherwise drops them without a word: a request with tools for such a model is
refused, the runtime's `/props` (`chat_template_caps.supports_tools`) saying which it is.

`tool_choice` "auto" and "none" pass through: llama-server parses the calls a model writes.
It takes no named function, and a small model asked for "required" answers in prose, so the
gateway enforces those two itself. It asks the runtime for one JSON object, held by a schema
to `{"name": <one of the tools>, "arguments": <that tool's parameters>}` (a `response_format`,
since llama-server refuses a custom grammar beside `tools`, which stay in the request so the
template still shows them to the model), and retells that object as an OpenAI tool call,
streamed or not. Every model, however small, then answers with a call that fits the schema.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

from sovctl.gateway.validate import Invalid

# The client's fields that describe the output or its delivery: the call's schema replaces
# the first, the gateway's own events the others (it streams the call itself).
REPLACED_FIELDS = ("tool_choice", "response_format", "stream", "stream_options")
CALL_SCHEMA_NAME = "tool_call"
NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}


def unsupported(model: str) -> Invalid:
    return Invalid(
        f"model {model!r} is served with a chat template that has no place for tools: the "
        "model would never see them. For a ChatML model (SmolLM2, Qwen, ...) set "
        f"[models.{model}] chat_template = \"chatml-tools\" in sovctl.toml; otherwise serve a "
        "model whose own template supports tools", "tools", "unsupported_value")


def supports_tools(props: bytes) -> bool:
    """Whether llama-server's `/props` answer says its chat template renders tools."""
    try:
        caps = json.loads(props).get("chat_template_caps")
    except (ValueError, AttributeError):
        return False
    return isinstance(caps, dict) and caps.get("supports_tools") is True


class Capability:
    """One fact about a runtime, asked once: it follows from how the runtime was started,
    which holds for the gateway's life. Concurrent first askers share the one question; a
    question that fails (it raises) is asked again by the next."""

    def __init__(self) -> None:
        self.known: bool | None = None
        self._lock = asyncio.Lock()

    async def get(self, ask: Callable[[], Awaitable[bool]]) -> bool:
        async with self._lock:
            if self.known is None:
                self.known = await ask()
            return self.known


def forced(payload: dict[str, Any]) -> list[dict[str, Any]] | Invalid | None:
    """The tools the answer must call one of, when `tool_choice` demands a call ("required"
    or a named function); None when the model may answer as it likes. The payload has passed
    validate.check."""
    choice = payload.get("tool_choice")
    if choice is None or choice in ("auto", "none"):
        return None
    tools: list[dict[str, Any]] = payload.get("tools") or []
    if not tools:
        return Invalid("'tool_choice' demands a tool call but the request has no 'tools'",
                       "tool_choice", "invalid_value")
    if choice == "required":
        return tools
    name = choice["function"]["name"]
    named = [t for t in tools if t["function"]["name"] == name]
    if not named:
        return Invalid(f"'tool_choice.function.name' names {name[:64]!r}, which is not among "
                       "the request's tools", "tool_choice.function.name", "invalid_value")
    return named


def call_schema(tools: list[dict[str, Any]]) -> dict[str, Any]:
    """The JSON schema of one call of one of `tools`."""
    branches = []
    for i, tool in enumerate(tools):
        function = tool["function"]
        # A function without parameters takes none (the OpenAI API's reading).
        parameters = function.get("parameters") or NO_PARAMETERS
        branches.append({
            "type": "object",
            "properties": {"name": {"const": function["name"]},
                           # Nested here, the parameters' own "#/..." references (pydantic's
                           # $defs) must point into their new place.
                           "arguments": _rebase(parameters, f"#/anyOf/{i}/properties/arguments")},
            "required": ["name", "arguments"],
        })
    return {"anyOf": branches}


def _rebase(schema: Any, at: str) -> Any:
    if isinstance(schema, dict):
        return {k: (at + v[1:] if k == "$ref" and isinstance(v, str) and v.startswith("#")
                    else _rebase(v, at)) for k, v in schema.items()}
    if isinstance(schema, list):
        return [_rebase(v, at) for v in schema]
    return schema


def constrained_request(payload: dict[str, Any], tools: list[dict[str, Any]]) -> bytes:
    """The request for the runtime: the same chat, its answer held to one call of `tools`,
    in one piece."""
    request = {k: v for k, v in payload.items() if k not in REPLACED_FIELDS}
    request["response_format"] = {"type": "json_schema", "json_schema": {
        "name": CALL_SCHEMA_NAME, "schema": call_schema(tools)}}
    return json.dumps(request).encode()


def tool_call_answer(answer: bytes, tools: list[dict[str, Any]]) -> dict[str, Any]:
    """The runtime's constrained chat.completion, retold as an OpenAI tool call. An answer cut
    short by max_tokens stays as it is, its partial JSON as content, finish_reason "length":
    the client sees why there is no call. Raises ValueError for anything else that is not
    one call of one of `tools`."""
    try:
        doc: dict[str, Any] = json.loads(answer)
        choice = doc["choices"][0]
        content = choice["message"].get("content") or ""
    except (KeyError, IndexError, TypeError, AttributeError) as e:
        raise ValueError("the runtime's answer is not a chat completion") from e
    try:
        call = json.loads(content)
    except ValueError:
        if choice.get("finish_reason") == "length":
            return doc
        raise
    names = {t["function"]["name"] for t in tools}
    if not (isinstance(call, dict) and isinstance(call.get("name"), str)
            and call["name"] in names and isinstance(call.get("arguments"), dict)):
        raise ValueError("the runtime's answer is not a call of one of the tools")
    choice["message"] = {"role": "assistant", "content": None, "tool_calls": [{
        "id": "call_" + secrets.token_hex(12), "type": "function",
        "function": {"name": call["name"],
                     "arguments": json.dumps(call["arguments"], ensure_ascii=False)}}]}
    choice["finish_reason"] = "tool_calls"
    return doc


def stream_events(doc: dict[str, Any], include_usage: bool) -> bytes:
    """A chat.completion as the server-sent events OpenAI streams for it: the role, each
    tool call's id and name then its arguments (or the content), the finish reason, the usage
    when asked for, and [DONE]."""
    base = {"id": doc.get("id", "chatcmpl-" + secrets.token_hex(12)),
            "object": "chat.completion.chunk", "created": doc.get("created", 0),
            "model": doc.get("model", "")}
    if "system_fingerprint" in doc:
        base["system_fingerprint"] = doc["system_fingerprint"]
    choice = doc["choices"][0]
    message = choice["message"]
    deltas: list[dict[str, Any]] = [{"role": "assistant", "content": None}]
    for i, call in enumerate(message.get("tool_calls") or ()):
        deltas.append({"tool_calls": [{"index": i, "id": call["id"], "type": "function",
                                       "function": {"name": call["function"]["name"],
                                                    "arguments": ""}}]})
        deltas.append({"tool_calls": [{"index": i, "function": {
            "arguments": call["function"]["arguments"]}}]})
    if message.get("content"):
        deltas.append({"content": message["content"]})
    chunks = [{**base, "choices": [{"index": 0, "delta": d, "finish_reason": None}]}
              for d in deltas]
    chunks.append({**base, "choices": [{"index": 0, "delta": {},
                                        "finish_reason": choice.get("finish_reason")}]})
    if include_usage and "usage" in doc:
        chunks.append({**base, "choices": [], "usage": doc["usage"]})
    return b"".join(f"data: {json.dumps(c)}\n\n".encode() for c in chunks) + b"data: [DONE]\n\n"
