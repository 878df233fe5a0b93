"""OpenAI's Responses API (`POST /v1/responses`) for local chat models.

llama-server answers `/v1/responses` itself, streamed or not, so a request goes to it as it
is, checked first (400s that name the field). The gateway adds what the runtime lacks:

- `previous_response_id`: a bounded store of recent conversations in the run folder (SQLite,
  mode 0600, never leaving the box) gives the earlier turns, expanded into `input` items
  before the request is forwarded; an unknown or expired id is a 400. `store: false` keeps a
  response out of it.
- `text.format` (a JSON schema or JSON mode): the runtime ignores it, so it goes as the
  `response_format` it does honour.
- `tool_choice` "required" or a named function: as on the chat path (`tools`), the runtime is
  asked for one JSON object held to the call's schema, retold as a `function_call` item, or as
  the events of one when the client asked for a stream.
- Its answers name the model by its route, not by the runtime's file, and its stream events
  carry the `sequence_number`, `output_index` and `content_index` the SDKs read.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

from sovctl.engines import Engine, Surface
from sovctl.gateway.accounting import StreamTally
from sovctl.gateway.tools import CALL_SCHEMA_NAME, call_schema
from sovctl.gateway.validate import (
    TOOL_NAME,
    Invalid,
    _Bad,
    _boolean,
    _choice,
    _fail,
    _integer,
    _not_one_of,
    _number,
    _object,
    _required_object,
    _schema,
    _string,
    _wrong_type,
)

RESPONSES = "/v1/responses"
# The store of recent conversations: how many, and for how long.
STORE_FILE = "responses.sqlite3"
MAX_STORED = 1000
MAX_AGE_S = 24 * 3600
ITEM_TYPES = ("message", "function_call", "function_call_output")
ROLES = ("user", "assistant", "system", "developer")
TEXT_PARTS = ("input_text", "output_text")
TOOL_MODES = ("none", "auto", "required")
FORMATS = ("text", "json_object", "json_schema")
# What the runtime is not sent: the gateway answers these itself.
GATEWAY_FIELDS = ("previous_response_id", "store", "text", "metadata", "include")


# -- validation ----------------------------------------------------------------------------------
def check(payload: dict[str, Any]) -> Invalid | None:
    """Why `payload` is not a Responses request the gateway serves, or None when it is."""
    try:
        _check(payload)
    except _Bad as e:
        return Invalid(str(e), e.param, e.code)
    return None


def _check(p: dict[str, Any]) -> None:
    given = p.get("input")
    if given is None:
        _fail("input", "is required", "missing_required_parameter")
    if isinstance(given, list):
        if not given:
            _fail("input", "must be a non-empty string or list of items", "empty_array")
        for i, item in enumerate(given):
            _item(item, f"input[{i}]")
    elif not isinstance(given, str):
        _wrong_type("input", "a string or a list of items", given)
    _string(p, "instructions", "")
    _string(p, "previous_response_id", "")
    _string(p, "user", "")
    _boolean(p, "store", "")
    _boolean(p, "stream", "")
    _boolean(p, "parallel_tool_calls", "")
    _integer(p, "max_output_tokens", "", lo=1)
    _number(p, "temperature", "", 0, 2)
    _number(p, "top_p", "", 0, 1)
    _object(p, "metadata", "")
    _choice(p, "truncation", "", ("auto", "disabled"))
    for unsupported in ("conversation", "prompt"):
        if p.get(unsupported) is not None:
            _fail(unsupported, "is not supported by the local runtimes", "unsupported_value")
    if p.get("background"):
        _fail("background", "is not supported: a local response is answered at once",
              "unsupported_value")
    names = _tools(p.get("tools"))
    _tool_choice(p.get("tool_choice"), names)
    text = _object(p, "text", "")
    if text is not None:
        _format(text)


def _item(item: Any, at: str) -> None:
    if not isinstance(item, dict):
        _wrong_type(at, "an input item object", item)
    kind = item.get("type", "message")
    if kind not in ITEM_TYPES:
        _not_one_of(at + ".type", ITEM_TYPES, kind)
    if kind == "message":
        _choice(item, "role", at + ".", ROLES, required=True)
        content = item.get("content")
        if isinstance(content, list):
            for j, part in enumerate(content):
                where = f"{at}.content[{j}]"
                if not isinstance(part, dict):
                    _wrong_type(where, "a content part object", part)
                if part.get("type") not in TEXT_PARTS:
                    _fail(where + ".type", "must be 'input_text' or 'output_text': images, "
                          "files and audio are not served on /v1/responses here",
                          "unsupported_value")
                _string(part, "text", where + ".", required=True)
        elif not isinstance(content, str):
            _wrong_type(at + ".content", "a string or a list of content parts", content)
    elif kind == "function_call":
        for key in ("call_id", "name", "arguments"):
            _string(item, key, at + ".", required=True)
    else:
        _string(item, "call_id", at + ".", required=True)
        _string(item, "output", at + ".", required=True)


def _tools(tools: Any) -> set[str]:
    if tools is None:
        return set()
    if not isinstance(tools, list):
        _wrong_type("tools", "a list of tools", tools)
    names = set()
    for i, tool in enumerate(tools):
        at = f"tools[{i}]"
        if not isinstance(tool, dict):
            _wrong_type(at, "a tool object", tool)
        if tool.get("type") != "function":
            _fail(at + ".type", "must be 'function': built-in tools (web search, file search, "
                  "computer use, ...) are not served locally", "unsupported_value")
        _string(tool, "name", at + ".", required=True)
        if not TOOL_NAME.fullmatch(tool["name"]):
            _fail(at + ".name", "must be 1 to 64 letters, digits, '_' or '-'")
        _string(tool, "description", at + ".")
        _schema(tool, "parameters", at + ".")
        _boolean(tool, "strict", at + ".")
        names.add(tool["name"])
    return names


def _tool_choice(choice: Any, names: set[str]) -> None:
    if choice is None:
        return
    if isinstance(choice, str):
        if choice not in TOOL_MODES:
            _not_one_of("tool_choice", TOOL_MODES, choice)
        if choice == "required" and not names:
            _fail("tool_choice", "demands a tool call but the request has no 'tools'")
        return
    if not isinstance(choice, dict):
        _wrong_type("tool_choice", "a string or a tool choice object", choice)
    _choice(choice, "type", "tool_choice.", ("function",), required=True)
    _string(choice, "name", "tool_choice.", required=True)
    if choice["name"] not in names:
        _fail("tool_choice.name", f"names {choice['name'][:64]!r}, which is not among the "
              "request's tools")


def _format(text: dict[str, Any]) -> None:
    fmt = _object(text, "format", "text.")
    if fmt is None:
        return
    _choice(fmt, "type", "text.format.", FORMATS, required=True)
    if fmt["type"] == "json_schema":
        _string(fmt, "name", "text.format.", required=True)
        _required_object(fmt, "schema", "text.format.")
        _schema(fmt, "schema", "text.format.")
        _boolean(fmt, "strict", "text.format.")


# -- the request for the runtime ---------------------------------------------------------------
def items(given: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A request's `input` as a list of items."""
    if isinstance(given, str):
        return [{"type": "message", "role": "user", "content": given}]
    return list(given)


def chat_tools(payload: dict[str, Any]) -> dict[str, Any]:
    """The request's tools and tool_choice in the chat shape `tools.forced` reads."""
    choice = payload.get("tool_choice")
    if isinstance(choice, dict):
        choice = {"type": "function", "function": {"name": choice["name"]}}
    return {"tools": [{"type": "function", "function": {
                k: v for k, v in t.items() if k in ("name", "description", "parameters")}}
                for t in payload.get("tools") or ()],
            "tool_choice": choice}


def runtime_request(payload: dict[str, Any], conversation: list[dict[str, Any]],
                    forced: list[dict[str, Any]] | None) -> bytes:
    """What the runtime is sent: the whole conversation as `input`, `text.format` as the
    `response_format` llama-server honours, and for a demanded call, the call's schema in
    place of the client's tool_choice, answered in one piece."""
    request = {k: v for k, v in payload.items() if k not in GATEWAY_FIELDS}
    request["input"] = conversation
    fmt = (payload.get("text") or {}).get("format") or {}
    if fmt.get("type") == "json_schema":
        schema = {"name": fmt["name"], "schema": fmt["schema"]}
        if "strict" in fmt:
            schema["strict"] = fmt["strict"]
        request["response_format"] = {"type": "json_schema", "json_schema": schema}
    elif fmt.get("type") == "json_object":
        request["response_format"] = {"type": "json_object"}
    if forced is not None:
        request.pop("tool_choice", None)
        request["stream"] = False
        request["response_format"] = {"type": "json_schema", "json_schema": {
            "name": CALL_SCHEMA_NAME, "schema": call_schema(forced)}}
    return json.dumps(request).encode()


# -- the answer for the client -----------------------------------------------------------------
def usage(doc: Any) -> tuple[int, int] | None:
    u = doc.get("usage") if isinstance(doc, dict) else None
    if not isinstance(u, dict):
        return None
    try:
        return int(u.get("input_tokens") or 0), int(u.get("output_tokens") or 0)
    except (TypeError, ValueError):
        return None


def finish(doc: dict[str, Any], model: str, payload: dict[str, Any]) -> dict[str, Any]:
    """The runtime's response as the client gets it: named by the route, with the request's
    settings echoed as OpenAI echoes them."""
    doc["model"] = model
    doc.setdefault("object", "response")
    doc.setdefault("created_at", int(time.time()))
    doc.setdefault("output", [])
    doc.setdefault("error", None)
    doc.setdefault("incomplete_details", None)
    doc["instructions"] = payload.get("instructions")
    doc["previous_response_id"] = payload.get("previous_response_id")
    doc["store"] = payload.get("store", True)
    doc["tools"] = payload.get("tools") or []
    doc["tool_choice"] = payload.get("tool_choice") or "auto"
    doc["parallel_tool_calls"] = payload.get("parallel_tool_calls", True)
    doc["max_output_tokens"] = payload.get("max_output_tokens")
    doc["metadata"] = payload.get("metadata") or {}
    doc["text"] = payload.get("text") or {"format": {"type": "text"}}
    for key in ("temperature", "top_p"):
        doc[key] = payload.get(key)
    return doc


def function_call_answer(doc: dict[str, Any], forced: list[dict[str, Any]],
                         limit: int | None) -> dict[str, Any]:
    """The runtime's constrained response, its text one call of one of `forced`, retold as a
    `function_call` item. A response cut short by max_output_tokens (`limit`) keeps its text,
    marked incomplete. Raises ValueError for anything else."""
    try:
        text = "".join(part.get("text") or "" for item in doc["output"]
                       if item.get("type") == "message" for part in item.get("content") or ())
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError("the runtime's answer is not a response") from e
    try:
        call = json.loads(text)
    except ValueError:
        used = usage(doc)
        if limit is not None and used is not None and used[1] >= limit:
            doc["status"] = "incomplete"
            doc["incomplete_details"] = {"reason": "max_output_tokens"}
            return doc
        raise
    names = {t["function"]["name"] for t in forced}
    if not (isinstance(call, dict) and call.get("name") in names
            and isinstance(call.get("arguments"), dict)):
        raise ValueError("the runtime's answer is not a call of one of the tools")
    doc["output"] = [{"type": "function_call", "id": "fc_" + secrets.token_hex(12),
                      "call_id": "call_" + secrets.token_hex(12), "name": call["name"],
                      "arguments": json.dumps(call["arguments"], ensure_ascii=False),
                      "status": "completed"}]
    doc["status"] = "completed"
    return doc


def _event(kind: str, seq: int, **fields: Any) -> bytes:
    doc = {"type": kind, "sequence_number": seq, **fields}
    return f"event: {kind}\ndata: {json.dumps(doc)}\n\n".encode()


def events(doc: dict[str, Any]) -> bytes:
    """A whole response as the server-sent events OpenAI streams for it."""
    started = {**doc, "status": "in_progress", "output": [], "usage": None}
    out: list[tuple[str, dict[str, Any]]] = [("response.created", {"response": started}),
           ("response.in_progress", {"response": started})]
    for i, item in enumerate(doc.get("output") or ()):
        if item.get("type") == "function_call":
            out.append(("response.output_item.added", {
                "output_index": i, "item": {**item, "arguments": "", "status": "in_progress"}}))
            out.append(("response.function_call_arguments.delta", {
                "output_index": i, "item_id": item["id"], "delta": item["arguments"]}))
            out.append(("response.function_call_arguments.done", {
                "output_index": i, "item_id": item["id"], "arguments": item["arguments"]}))
        elif item.get("type") == "message":
            out.append(("response.output_item.added", {
                "output_index": i, "item": {**item, "content": [], "status": "in_progress"}}))
            for j, part in enumerate(item.get("content") or ()):
                where = {"output_index": i, "item_id": item["id"], "content_index": j}
                out.append(("response.content_part.added",
                            {**where, "part": {**part, "text": ""}}))
                out.append(("response.output_text.delta", {**where, "delta": part["text"]}))
                out.append(("response.output_text.done", {**where, "text": part["text"]}))
                out.append(("response.content_part.done", {**where, "part": part}))
        out.append(("response.output_item.done", {"output_index": i, "item": item}))
    final = "response.incomplete" if doc.get("status") == "incomplete" else "response.completed"
    out.append((final, {"response": doc}))
    return b"".join(_event(kind, seq, **fields) for seq, (kind, fields) in enumerate(out))


class ResponsesTally(StreamTally):
    """Follows the runtime's Responses stream: each event passed on numbered and placed (the
    `sequence_number`, `output_index` and `content_index` llama-server leaves out), its
    response objects named by the route, the final one kept for the store and its usage for
    the ledger."""

    def __init__(self, model: str, payload: dict[str, Any]) -> None:
        super().__init__(keep_usage=True)
        self.model = model
        self.payload = payload
        self.final: dict[str, Any] | None = None
        self._seq = 0
        self._index = -1
        self._content = -1

    def feed(self, data: bytes) -> bytes:
        buffer = self._partial + data
        cut = buffer.rfind(b"\n\n") + 2
        if cut == 1:
            self._partial = buffer
            return b""
        complete, self._partial = buffer[:cut], buffer[cut:]
        return b"".join(self._retell(e) for e in complete.split(b"\n\n") if e.strip())

    def end(self) -> bytes:
        rest, self._partial = self._partial, b""
        return self._retell(rest) if rest.strip() else b""

    def _retell(self, event: bytes) -> bytes:
        start = event.find(b"data: ")
        try:
            doc = json.loads(event[start + 6:]) if start >= 0 else None
        except ValueError:
            doc = None
        if not isinstance(doc, dict):
            return event + b"\n\n"
        self.events += 1
        kind = doc.get("type")
        if kind == "response.output_item.added":
            self._index += 1
            self._content = -1
        elif kind == "response.content_part.added":
            self._content += 1
        if isinstance(doc.get("response"), dict):
            finish(doc["response"], self.model, self.payload)
            if kind in ("response.completed", "response.incomplete"):
                self.final = doc["response"]
                self.usage = usage(self.final)
        if kind != "response.created" and kind != "response.in_progress" and (
                "item_id" in doc or "item" in doc):
            doc.setdefault("output_index", max(self._index, 0))
            if "item_id" in doc and kind != "response.function_call_arguments.delta":
                doc.setdefault("content_index", max(self._content, 0))
        doc["sequence_number"] = self._seq
        self._seq += 1
        return f"event: {kind}\ndata: {json.dumps(doc)}\n\n".encode()


# -- the store of recent conversations -----------------------------------------------------------
class Store:
    """Recent conversations by response id: the items a later request's
    `previous_response_id` continues from. At most `max_count`, none older than `max_age`
    seconds; SQLite in the run folder, readable by its owner alone."""

    def __init__(self, path: Path, max_count: int = MAX_STORED, max_age: float = MAX_AGE_S
                 ) -> None:
        self.path = path
        self.max_count = max_count
        self.max_age = max_age
        self._db: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def _open(self) -> sqlite3.Connection:
        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
            os.chmod(self.path, 0o600)
            db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("CREATE TABLE IF NOT EXISTS responses (id TEXT PRIMARY KEY, "
                       "model TEXT NOT NULL, created REAL NOT NULL, items TEXT NOT NULL)")
            self._db = db
        return self._db

    def get(self, response_id: str, model: str) -> list[dict[str, Any]] | None:
        """The conversation up to and with the response; None when unknown or expired."""
        with self._lock:
            row = self._open().execute(
                "SELECT items FROM responses WHERE id = ? AND model = ? AND created > ?",
                (response_id, model, time.time() - self.max_age)).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, response_id: str, model: str, conversation: list[dict[str, Any]]) -> None:
        with self._lock:
            db = self._open()
            db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?)",
                       (response_id, model, time.time(), json.dumps(conversation)))
            db.execute("DELETE FROM responses WHERE created <= ? OR id NOT IN (SELECT id FROM "
                       "responses ORDER BY created DESC LIMIT ?)",
                       (time.time() - self.max_age, self.max_count))

    def close(self) -> None:
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
            self._db = None


def unknown(response_id: str) -> Invalid:
    shown = response_id if len(response_id) <= 64 else response_id[:64] + "..."
    return Invalid(f"no stored response {shown!r} for this model: it is unknown, expired "
                   f"(responses are kept {MAX_AGE_S // 3600} h, the last {MAX_STORED}), or "
                   "was created with store: false", "previous_response_id", "invalid_value")


def conversation(payload: dict[str, Any], store: Store, model: str
                 ) -> list[dict[str, Any]] | Invalid:
    """The input items the runtime is sent: the stored conversation the request continues,
    then its own input."""
    given = items(payload["input"])
    previous = payload.get("previous_response_id")
    if previous is None:
        return given
    earlier = store.get(previous, model)
    if earlier is None:
        return unknown(previous)
    return earlier + given


def remember(store: Store, payload: dict[str, Any], sent: list[dict[str, Any]],
             doc: dict[str, Any] | None) -> None:
    """Keeps a finished response's conversation, unless the request said store: false."""
    if doc is None or payload.get("store") is False or not isinstance(doc.get("id"), str):
        return
    output = [i for i in doc.get("output") or () if isinstance(i, dict)
              and i.get("type") in ITEM_TYPES]
    store.put(doc["id"], str(doc.get("model")), sent + output)


def beyond_engine(model: str, engine: Engine) -> Invalid | None:
    """A model whose engine does not speak the Responses API."""
    if Surface.RESPONSES in engine.surfaces:
        return None
    return Invalid(f"model {model!r} runs on the {engine.name} runtime, which has no "
                   "Responses API; send /v1/chat/completions, or serve it with llama-server "
                   f"([models.{model}] runtime in sovctl.toml)", "model", "unsupported_value")
