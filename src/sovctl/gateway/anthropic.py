"""Anthropic's Messages API through the gateway: `POST /v1/messages` and
`POST /v1/messages/count_tokens`, for local chat models on an engine that speaks them
(llama-server answers both natively).

The gateway checks a request against Anthropic's shape, forwards it to the runtime's own
`/v1/messages`, reads its usage (`usage` of the message; `message_start` and `message_delta` of a
stream) for the ledger, and tells every error of its own in Anthropic's error shape. A forced
tool call (`tool_choice` `any` or `tool`) takes the chat path's machinery (`tools`): the request
is retold as a Chat Completions one, the runtime writes the call under the call's schema, and
the answer is retold as a message with one `tool_use` block, or as its events.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Collection
from typing import Any

from starlette.responses import JSONResponse

from sovctl.engines import Engine, Surface, able
from sovctl.gateway.accounting import StreamTally
from sovctl.gateway.validate import (
    Invalid,
    _Bad,
    _fail,
    _is_int,
    _kind,
    _not_one_of,
    _number,
    _object,
    _required_object,
    _string,
    _wrong_type,
)

MESSAGES = "/v1/messages"
COUNT_TOKENS = "/v1/messages/count_tokens"
ENDPOINTS = (MESSAGES, COUNT_TOKENS)

ROLES = ("user", "assistant")
IMAGE_TYPES = ("image/jpeg", "image/png", "image/gif", "image/webp")
TOOL_CHOICES = ("auto", "any", "tool", "none")
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_STOP_SEQUENCES = 16

# Anthropic's error type for each status the gateway answers with.
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
               403: "permission_error", 404: "not_found_error", 405: "invalid_request_error",
               413: "request_too_large", 429: "rate_limit_error", 503: "overloaded_error"}


# -- errors ------------------------------------------------------------------------------------
def error_type(status: int) -> str:
    return ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")


def error_body(status: int, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": error_type(status), "message": message}}


def retell_error(response: JSONResponse) -> JSONResponse:
    """A gateway error (in the OpenAI shape every other surface uses) in Anthropic's shape,
    with its status and headers (Retry-After, WWW-Authenticate, CORS)."""
    try:
        message = str(json.loads(bytes(response.body))["error"]["message"])
    except (ValueError, KeyError, TypeError):
        message = f"HTTP {response.status_code}"
    headers = {k: v for k, v in response.headers.items()
               if k not in ("content-length", "content-type")}
    return JSONResponse(error_body(response.status_code, message),
                        status_code=response.status_code, headers=headers)


def stream_error(message: str) -> bytes:
    """The error event that ends a stream the runtime broke off."""
    return f"event: error\ndata: {json.dumps(error_body(500, message))}\n\n".encode()


# -- the request's shape -----------------------------------------------------------------------
def _one_of(param: str, choices: Collection[str], value: Any) -> None:
    if value not in choices:
        _not_one_of(param, choices, value)


def _list(obj: dict[str, Any], key: str, at: str, what: str, required: bool = False,
          empty_ok: bool = True) -> list[Any]:
    value = obj.get(key)
    if value is None:
        if required:
            _fail(at + key, "is required", "missing_required_parameter")
        return []
    if not isinstance(value, list):
        _wrong_type(at + key, f"a list of {what}", value)
    if not value and not empty_ok:
        _fail(at + key, f"must be a non-empty list of {what}", "empty_array")
    return value


def check(endpoint: str, payload: dict[str, Any]) -> Invalid | None:
    """Why `payload` is not a valid request for `endpoint` (one of ENDPOINTS), or None."""
    try:
        _request(payload, counting=endpoint == COUNT_TOKENS)
    except _Bad as e:
        return Invalid(str(e), e.param, e.code)
    return None


def _request(p: dict[str, Any], counting: bool) -> None:
    _string(p, "model", "", required=True)
    if not counting:
        max_tokens = p.get("max_tokens")
        if max_tokens is None:
            _fail("max_tokens", "is required", "missing_required_parameter")
        if not _is_int(max_tokens):
            _wrong_type("max_tokens", "an integer", max_tokens)
        if max_tokens < 1:
            _fail("max_tokens", f"must be at least 1; got {max_tokens}")
        _number(p, "temperature", "", 0, 1)
        _number(p, "top_p", "", 0, 1)
        top_k = p.get("top_k")
        if top_k is not None and (not _is_int(top_k) or top_k < 0):
            _fail("top_k", "must be an integer >= 0", "invalid_type")
        stream = p.get("stream")
        if stream is not None and not isinstance(stream, bool):
            _wrong_type("stream", "true or false", stream)
        stops = _list(p, "stop_sequences", "", "strings")
        if len(stops) > MAX_STOP_SEQUENCES:
            _fail("stop_sequences", f"may hold at most {MAX_STOP_SEQUENCES} sequences",
                  "array_above_max_length")
        for i, stop in enumerate(stops):
            if not isinstance(stop, str) or not stop:
                _fail(f"stop_sequences[{i}]", "must be a non-empty string", "invalid_type")
        metadata = _object(p, "metadata", "")
        if metadata is not None:
            _string(metadata, "user_id", "metadata.")
    system = p.get("system")
    if system is not None and not isinstance(system, str):
        if not isinstance(system, list):
            _wrong_type("system", "a string or a list of text blocks", system)
        for i, block in enumerate(system):
            _block(block, f"system[{i}]", ("text",))
    messages = _list(p, "messages", "", "message objects", required=True, empty_ok=False)
    for i, m in enumerate(messages):
        _message(m, f"messages[{i}]")
    names = [_tool(t, f"tools[{i}]") for i, t in enumerate(_list(p, "tools", "", "tools"))]
    choice = _object(p, "tool_choice", "")
    if choice is not None:
        _one_of("tool_choice.type", TOOL_CHOICES, choice.get("type"))
        if choice["type"] == "tool":
            name = _string(choice, "name", "tool_choice.", required=True)
            if name not in names:
                _fail("tool_choice.name", f"names {str(name)[:64]!r}, which is not among the "
                      "request's tools")
        elif choice["type"] == "any" and not names:
            _fail("tool_choice", "demands a tool call but the request has no 'tools'")
        flag = choice.get("disable_parallel_tool_use")
        if flag is not None and not isinstance(flag, bool):
            _wrong_type("tool_choice.disable_parallel_tool_use", "true or false", flag)


def _message(m: Any, at: str) -> None:
    if not isinstance(m, dict):
        _wrong_type(at, "a message object", m)
    _one_of(at + ".role", ROLES, m.get("role"))
    content = m.get("content")
    if isinstance(content, str):
        return
    if not isinstance(content, list):
        _wrong_type(at + ".content", "a string or a list of content blocks", content)
    allowed = ("text", "image", "tool_result") if m["role"] == "user" else ("text", "tool_use")
    for j, block in enumerate(content):
        _block(block, f"{at}.content[{j}]", allowed)


def _block(block: Any, at: str, allowed: tuple[str, ...]) -> None:
    if not isinstance(block, dict):
        _wrong_type(at, "a content block", block)
    kind = block.get("type")
    if kind not in allowed:
        got = repr(kind) if isinstance(kind, str) and len(kind) <= 40 else _kind(kind)
        _fail(at + ".type", f"must be one of {', '.join(repr(a) for a in allowed)} here; got "
              f"{got}" + (" (not supported by local models)"
                          if kind in ("document", "thinking", "redacted_thinking",
                                      "server_tool_use", "search_result") else ""),
              "unsupported_value" if isinstance(kind, str) else "invalid_value")
    at += "."
    if kind == "text":
        _string(block, "text", at, required=True)
    elif kind == "image":
        source = _required_object(block, "source", at)
        assert source is not None
        if source.get("type") != "base64":
            _fail(at + "source.type", "must be 'base64': the gateway fetches no URL, nor any "
                  "file it does not hold", "unsupported_value")
        _one_of(at + "source.media_type", IMAGE_TYPES, source.get("media_type"))
        _string(source, "data", at + "source.", required=True)
    elif kind == "tool_use":
        _string(block, "id", at, required=True)
        _string(block, "name", at, required=True)
        _required_object(block, "input", at)
    elif kind == "tool_result":
        _string(block, "tool_use_id", at, required=True)
        content = block.get("content")
        if content is not None and not isinstance(content, str):
            if not isinstance(content, list):
                _wrong_type(at + "content", "a string or a list of content blocks", content)
            for k, part in enumerate(content):
                _block(part, f"{at}content[{k}]", ("text", "image"))
        flag = block.get("is_error")
        if flag is not None and not isinstance(flag, bool):
            _wrong_type(at + "is_error", "true or false", flag)


def _tool(tool: Any, at: str) -> str:
    if not isinstance(tool, dict):
        _wrong_type(at, "a tool object", tool)
    kind = tool.get("type")
    if kind not in (None, "custom"):
        _fail(at + ".type", f"{str(kind)[:40]!r} is a server tool, which local models do not "
              "have; only client tools (name, description, input_schema) are supported",
              "unsupported_value")
    name = _string(tool, "name", at + ".", required=True)
    assert name is not None
    if not TOOL_NAME.fullmatch(name):
        _fail(at + ".name", "must be 1 to 64 letters, digits, '_' or '-'")
    _string(tool, "description", at + ".")
    _required_object(tool, "input_schema", at + ".")
    return name


# -- the request as Chat Completions -----------------------------------------------------------
def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "\n".join(b.get("text", "") for b in content or () if b.get("type") == "text")


def _image_url(block: dict[str, Any]) -> dict[str, Any]:
    source = block["source"]
    return {"type": "image_url", "image_url": {
        "url": f"data:{source['media_type']};base64,{source['data']}"}}


def chat_tools(payload: dict[str, Any]) -> list[dict[str, Any]]:
    """The request's tools as OpenAI function tools."""
    out = []
    for t in payload.get("tools") or ():
        function = {"name": t["name"], "parameters": t["input_schema"]}
        if t.get("description"):
            function["description"] = t["description"]
        out.append({"type": "function", "function": function})
    return out


def to_chat(payload: dict[str, Any]) -> dict[str, Any]:
    """A (checked) Messages request as the Chat Completions request that says the same."""
    messages: list[dict[str, Any]] = []
    system = payload.get("system")
    if system:
        messages.append({"role": "system", "content": _text(system)})
    for m in payload["messages"]:
        content = m["content"]
        if isinstance(content, str):
            messages.append({"role": m["role"], "content": content})
        elif m["role"] == "assistant":
            said: dict[str, Any] = {"role": "assistant", "content": _text(content) or None}
            calls = [{"id": b["id"], "type": "function", "function": {
                "name": b["name"], "arguments": json.dumps(b["input"], ensure_ascii=False)}}
                for b in content if b["type"] == "tool_use"]
            if calls:
                said["tool_calls"] = calls
            messages.append(said)
        else:
            parts: list[dict[str, Any]] = []
            for b in content:
                if b["type"] == "tool_result":
                    result = b.get("content")
                    messages.append({"role": "tool", "tool_call_id": b["tool_use_id"],
                                     "content": _text(result)})
                    if isinstance(result, list):
                        parts += [_image_url(r) for r in result if r["type"] == "image"]
                elif b["type"] == "text":
                    parts.append({"type": "text", "text": b["text"]})
                else:
                    parts.append(_image_url(b))
            if parts:
                messages.append({"role": "user", "content": parts})
    chat: dict[str, Any] = {"model": payload.get("model"), "messages": messages}
    if "max_tokens" in payload:
        chat["max_tokens"] = payload["max_tokens"]
    for key in ("temperature", "top_p", "top_k"):
        if payload.get(key) is not None:
            chat[key] = payload[key]
    if payload.get("stop_sequences"):
        chat["stop"] = payload["stop_sequences"]
    if payload.get("tools"):
        chat["tools"] = chat_tools(payload)
    return chat


def beyond_engine(model: str, engine: Engine) -> Invalid | None:
    """The refusal of a model whose engine does not speak Messages."""
    if Surface.MESSAGES in engine.surfaces:
        return None
    return Invalid(f"model {model!r} runs on the {engine.name} runtime, which does not speak "
                   f"Anthropic's Messages API; serve it with runtime "
                   f"{able(lambda e: Surface.MESSAGES in e.surfaces)} ([serve] runtime or "
                   f"[models.{model}] runtime in sovctl.toml), or send /v1/chat/completions",
                   "model", "unsupported_value")


def tool_view(payload: dict[str, Any]) -> dict[str, Any]:
    """The request's tools and tool_choice as a chat request says them, for `tools.forced`
    and the tool checks of the chat path."""
    view: dict[str, Any] = {"tools": chat_tools(payload)}
    choice = payload.get("tool_choice") or {}
    kind = choice.get("type")
    if kind == "any":
        view["tool_choice"] = "required"
    elif kind == "tool":
        view["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
    elif kind in ("auto", "none"):
        view["tool_choice"] = kind
    return view


# -- answers -----------------------------------------------------------------------------------
def _usage(u: Any) -> tuple[int, int]:
    if not isinstance(u, dict):
        return 0, 0
    try:
        # llama-server counts the prompt tokens its cache held apart, as Anthropic does.
        tokens_in = sum(int(u.get(k) or 0) for k in (
            "input_tokens", "cache_read_input_tokens", "cache_creation_input_tokens"))
        return tokens_in, int(u.get("output_tokens") or 0)
    except (TypeError, ValueError):
        return 0, 0


def message_usage(doc: Any) -> tuple[int, int] | None:
    """(input, output) tokens of a message's usage; None when it has none."""
    u = doc.get("usage") if isinstance(doc, dict) else None
    return _usage(u) if isinstance(u, dict) else None


def answer(content: bytes, model: str) -> tuple[bytes, tuple[int, int]]:
    """The runtime's message as the client gets it (under the model's name here, not the
    runtime's file), with its (input, output) tokens. A count_tokens answer uses none."""
    try:
        doc = json.loads(content)
    except ValueError:
        return content, (0, 0)
    if not isinstance(doc, dict) or doc.get("type") != "message":
        return content, (0, 0)
    doc["model"] = model
    return json.dumps(doc, ensure_ascii=False).encode(), _usage(doc.get("usage"))


def from_chat(doc: dict[str, Any], model: str) -> dict[str, Any]:
    """A chat.completion that `tools.tool_call_answer` made (one call, or an answer cut short)
    as an Anthropic message."""
    choice = doc["choices"][0]
    said = choice["message"]
    blocks: list[dict[str, Any]] = []
    if said.get("content"):
        blocks.append({"type": "text", "text": said["content"]})
    for call in said.get("tool_calls") or ():
        blocks.append({"type": "tool_use", "id": "toolu_" + secrets.token_hex(12),
                       "name": call["function"]["name"],
                       "input": json.loads(call["function"]["arguments"])})
    stop = {"tool_calls": "tool_use", "length": "max_tokens"}.get(choice.get("finish_reason"),
                                                                  "end_turn")
    u = doc.get("usage") or {}
    return {"id": "msg_" + secrets.token_hex(12), "type": "message", "role": "assistant",
            "model": model, "content": blocks, "stop_reason": stop, "stop_sequence": None,
            "usage": {"input_tokens": int(u.get("prompt_tokens") or 0),
                      "output_tokens": int(u.get("completion_tokens") or 0)}}


def _event(kind: str, data: dict[str, Any]) -> bytes:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n".encode()


def stream_events(message: dict[str, Any]) -> bytes:
    """A whole message as the events Anthropic streams for it."""
    usage = message["usage"]
    start = {**message, "content": [], "stop_reason": None,
             "usage": {"input_tokens": usage["input_tokens"], "output_tokens": 0}}
    out = [_event("message_start", {"message": start})]
    for i, block in enumerate(message["content"]):
        if block["type"] == "tool_use":
            first = {**block, "input": {}}
            delta = {"type": "input_json_delta",
                     "partial_json": json.dumps(block["input"], ensure_ascii=False)}
        else:
            first = {"type": "text", "text": ""}
            delta = {"type": "text_delta", "text": block["text"]}
        out += [_event("content_block_start", {"index": i, "content_block": first}),
                _event("content_block_delta", {"index": i, "delta": delta}),
                _event("content_block_stop", {"index": i})]
    out += [_event("message_delta", {
        "delta": {"stop_reason": message["stop_reason"], "stop_sequence": None},
        "usage": {"output_tokens": usage["output_tokens"]}}),
        _event("message_stop", {})]
    return b"".join(out)


class Tally(StreamTally):
    """Follows a Messages stream as it passes, for the ledger: the input tokens of its
    `message_start`, the output tokens of its `message_delta`. The first event, which names
    the model, waits for its end and goes out under the model's name here; the rest passes as
    it comes."""

    def __init__(self, model: str) -> None:
        super().__init__(keep_usage=True)
        self.model = model
        self.tokens_in = 0
        self._started = False

    def feed(self, data: bytes) -> bytes:
        buffer = self._partial + data if self._partial else data
        cut = buffer.rfind(b"\n\n") + 2
        if cut == 1:
            self._partial = buffer
            return data if self._started else b""
        complete, self._partial = buffer[:cut], buffer[cut:]
        self.events += complete.count(b"data: {")
        out = data
        if not self._started:
            self._started = True
            out = self._first(complete) + self._partial
        if b"message_delta" in complete or b"message_start" in complete:
            for event in complete.split(b"\n\n"):
                self._read(event)
        return out

    def end(self) -> bytes:
        rest, self._partial = self._partial, b""
        return b"" if self._started else rest

    def _first(self, complete: bytes) -> bytes:
        head, sep, rest = complete.partition(b"\n\n")
        start = head.find(b"data: {")
        if start < 0 or b"message_start" not in head:
            return complete
        try:
            doc = json.loads(head[start + 6:])
            doc["message"]["model"] = self.model
        except (ValueError, KeyError, TypeError):
            return complete
        return head[:start + 6] + json.dumps(doc, ensure_ascii=False).encode() + sep + rest

    def _read(self, event: bytes) -> None:
        start = event.find(b"data: {")
        if start < 0 or b'"usage"' not in event:
            return
        try:
            doc = json.loads(event[start + 6:])
        except ValueError:
            return
        if not isinstance(doc, dict):
            return
        if doc.get("type") == "message_start":
            message = doc.get("message")
            self.tokens_in = _usage(message.get("usage") if isinstance(message, dict)
                                    else None)[0]
        elif doc.get("type") == "message_delta":
            u = doc.get("usage")
            tokens_in, tokens_out = _usage(u)
            self.usage = (tokens_in or self.tokens_in, tokens_out)
