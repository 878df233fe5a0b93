"""The shape of the requests the gateway routes, as the OpenAI API reference defines it.

A runtime answers a malformed request with a crash (a 500 that carries its traceback), so the
gateway refuses such a request itself, with a 400 that names the offending field. Only known
fields are checked: llama.cpp accepts extensions (top_k, min_p, grammar, ...) and those pass
through untouched. An optional field set to null counts as absent, as it does for OpenAI.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Callable, Collection
from dataclasses import dataclass
from itertools import accumulate
from typing import Any, NoReturn

from sovctl.engines import Engine, able
from sovctl.gateway.images import ImageError, dimensions

ROLES = ("system", "developer", "user", "assistant", "tool", "function")

# The content part types each role may send.
PART_TYPES = {
    "system": ("text",),
    "developer": ("text",),
    "user": ("text", "image_url"),
    "assistant": ("text", "refusal"),
    "tool": ("text",),
}
# Valid for OpenAI, but no local runtime can read them: refused with a reason, not a crash.
UNSUPPORTED_PARTS = {"input_audio": "audio input", "file": "file input"}

# An image arrives inline, never as a URL to fetch: the gateway and the runtimes make no
# request of their own, so the data path stays local.
IMAGE_DATA_URL = re.compile(r"data:image/[A-Za-z0-9.+-]+;base64,", re.IGNORECASE)
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]{0,15}):")

TOOL_MODES = ("none", "auto", "required")
TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
MAX_STOP = 4
MAX_INPUTS = 2048
# What one rerank may score: every document is paired with the query and encoded.
MAX_DOCUMENTS = 1000
MAX_DOCUMENT_CHARS = 4_000_000
# Levels of nesting a request body may have (objects and lists), and a JSON schema in it (a
# tool's parameters, a response format): no OpenAI request needs more, and every parser on the
# way (the gateway's, the runtime's, its schema-to-grammar converter) recurses per level.
MAX_DEPTH = 64
MAX_SCHEMA_DEPTH = 32
MAX_MODEL_NAME = 256  # characters: a model's name is recorded, and echoed in errors


@dataclass(frozen=True)
class Invalid:
    message: str
    param: str
    code: str


class _Bad(Exception):
    def __init__(self, param: str, reason: str, code: str) -> None:
        super().__init__(f"'{param}' {reason}")
        self.param = param
        self.code = code


def check(endpoint: str, payload: dict[str, Any]) -> Invalid | None:
    """Why `payload` is not a valid request for `endpoint`, or None when it is."""
    try:
        CHECKS[endpoint](payload)
    except _Bad as e:
        return Invalid(str(e), e.param, e.code)
    return None


# -- the body as a whole ------------------------------------------------------------------------
# Each bracket a step up (+1) or down (-1, as a signed byte); every other byte deleted.
_STEPS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def too_deep(body: bytes, limit: int = MAX_DEPTH) -> bool:
    """Whether the JSON document `body` (already parsed, so valid) nests deeper than `limit`.

    Measured on the bytes at C speed, for the request path: a body with no more brackets than
    the limit cannot be deeper; otherwise, strings cut out (their brackets are text), the
    highest point of the running sum of the brackets' steps.
    """
    if body.count(b"[") + body.count(b"{") <= limit:
        return False
    # Backslashes appear in strings only. With escaped backslashes gone, a quote after a
    # backslash is an escaped one; with those gone too, every other piece between quotes is a
    # string.
    unescaped = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    steps = memoryview(b"".join(unescaped.split(b'"')[::2]).translate(_STEPS, _NOT_BRACKETS))
    return max(accumulate(steps.cast("b")), default=0) > limit


def model_name(model: Any) -> Invalid | None:
    """A `model` that is not a name: every route has a short one."""
    if model is None or (isinstance(model, str) and len(model) <= MAX_MODEL_NAME):
        return None
    if not isinstance(model, str):
        return Invalid(f"'model' must be a string, got {_kind(model)}", "model", "invalid_type")
    return Invalid(f"'model' must be at most {MAX_MODEL_NAME} characters; got {len(model)}",
                   "model", "string_above_max_length")


# -- reporting ---------------------------------------------------------------------------------
def _fail(param: str, reason: str, code: str = "invalid_value") -> NoReturn:
    raise _Bad(param, reason, code)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object"


def _wrong_type(param: str, expected: str, value: Any) -> NoReturn:
    _fail(param, f"must be {expected}, got {_kind(value)}", "invalid_type")


def _not_one_of(param: str, choices: Collection[str], value: Any) -> NoReturn:
    # A client's value is echoed only when short: it may be anything, of any size.
    got = repr(value) if isinstance(value, str) and len(value) <= 40 else _kind(value)
    _fail(param, f"must be one of {', '.join(repr(c) for c in choices)}; got {got}")


# -- scalar fields -----------------------------------------------------------------------------
def _is_number(value: Any) -> bool:
    # bool is an int in Python, never in JSON.
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(obj: dict[str, Any], key: str, at: str, lo: float, hi: float) -> None:
    value = obj.get(key)
    if value is None:
        return
    if not _is_number(value):
        _wrong_type(at + key, "a number", value)
    if not lo <= value <= hi:  # also refuses NaN, which Python's json reader lets through
        _fail(at + key, f"must be between {lo:g} and {hi:g}; got {value!r}")


def _integer(obj: dict[str, Any], key: str, at: str, lo: int | None = None,
             hi: int | None = None) -> int | None:
    value = obj.get(key)
    if value is None:
        return None
    if not _is_int(value):
        _wrong_type(at + key, "an integer", value)
    if lo is not None and value < lo:
        _fail(at + key, f"must be at least {lo}; got {value}")
    if hi is not None and value > hi:
        _fail(at + key, f"must be at most {hi}; got {value}")
    return int(value)


def _boolean(obj: dict[str, Any], key: str, at: str) -> None:
    value = obj.get(key)
    if value is not None and not isinstance(value, bool):
        _wrong_type(at + key, "true or false", value)


def _string(obj: dict[str, Any], key: str, at: str, required: bool = False) -> str | None:
    value = obj.get(key)
    if value is None:
        if required:
            _fail(at + key, "is required", "missing_required_parameter")
        return None
    if not isinstance(value, str):
        _wrong_type(at + key, "a string", value)
    return value


def _choice(obj: dict[str, Any], key: str, at: str, choices: Collection[str],
            required: bool = False) -> None:
    value = obj.get(key)
    if value is None:
        if required:
            _fail(at + key, "is required", "missing_required_parameter")
        return
    if value not in choices:
        _not_one_of(at + key, choices, value)


def _object(obj: dict[str, Any], key: str, at: str) -> dict[str, Any] | None:
    value = obj.get(key)
    if value is not None and not isinstance(value, dict):
        _wrong_type(at + key, "an object", value)
    return value


def _required_object(obj: dict[str, Any], key: str, at: str) -> dict[str, Any]:
    value = _object(obj, key, at)
    if value is None:
        _fail(at + key, "is required", "missing_required_parameter")
    return value


def _list(value: Any, param: str, what: str) -> list[Any]:
    if not isinstance(value, list):
        _wrong_type(param, f"a list of {what}", value)
    if not value:
        _fail(param, f"must be a non-empty list of {what}", "empty_array")
    return value


# -- fields shared by chat and text completions ------------------------------------------------
def _sampling(p: dict[str, Any]) -> None:
    _number(p, "temperature", "", 0, 2)
    _number(p, "top_p", "", 0, 1)
    _number(p, "presence_penalty", "", -2, 2)
    _number(p, "frequency_penalty", "", -2, 2)
    if (_integer(p, "n", "", lo=1) or 1) > 1:
        _fail("n", "must be 1: the local runtimes return one choice per request "
              "(send n requests instead)", "unsupported_value")
    _integer(p, "max_tokens", "", lo=1)
    _integer(p, "seed", "")
    _string(p, "user", "")
    _boolean(p, "stream", "")
    options = _object(p, "stream_options", "")
    if options is not None:
        _boolean(options, "include_usage", "stream_options.")
    stop = p.get("stop")
    if stop is not None and not isinstance(stop, str):
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            _wrong_type("stop", "a string or a list of strings", stop)
        if len(stop) > MAX_STOP:
            _fail("stop", f"may hold at most {MAX_STOP} sequences; got {len(stop)}",
                  "array_above_max_length")
    bias = _object(p, "logit_bias", "") or {}
    for token, value in bias.items():
        if not _is_number(value) or not -100 <= value <= 100:
            _fail(f"logit_bias.{token}", "must be a number between -100 and 100")


# -- /v1/chat/completions ----------------------------------------------------------------------
def _chat(p: dict[str, Any]) -> None:
    if p.get("messages") is None:
        _fail("messages", "is required", "missing_required_parameter")
    for i, message in enumerate(_list(p["messages"], "messages", "message objects")):
        _message(message, f"messages[{i}]")
    _sampling(p)
    _integer(p, "max_completion_tokens", "", lo=1)
    _boolean(p, "logprobs", "")
    _integer(p, "top_logprobs", "", lo=0, hi=20)
    _boolean(p, "parallel_tool_calls", "")
    if p.get("tools") is not None:
        for i, tool in enumerate(_list(p["tools"], "tools", "tool objects")):
            _tool(tool, f"tools[{i}]")
    _tool_choice(p.get("tool_choice"))
    fmt = _object(p, "response_format", "")
    if fmt is not None:
        _choice(fmt, "type", "response_format.", ("text", "json_object", "json_schema"),
                required=True)
        if fmt["type"] == "json_schema":
            schema = _required_object(fmt, "json_schema", "response_format.")
            _string(schema, "name", "response_format.json_schema.", required=True)
            _schema(schema, "schema", "response_format.json_schema.")


def _message(m: Any, at: str) -> None:
    if not isinstance(m, dict):
        _wrong_type(at, "a message object", m)
    _choice(m, "role", at + ".", ROLES, required=True)
    role = m["role"]
    if role == "function":  # the legacy form of a tool result
        _string(m, "name", at + ".", required=True)
        _string(m, "content", at + ".")
        return
    _string(m, "name", at + ".")
    if role == "assistant":
        if m.get("tool_calls") is not None:
            calls = _list(m["tool_calls"], f"{at}.tool_calls", "tool calls")
            for i, call in enumerate(calls):
                _tool_call(call, f"{at}.tool_calls[{i}]")
        if m.get("content") is None:
            if m.get("tool_calls") is None and m.get("function_call") is None:
                _fail(f"{at}.content", "is required unless the message has tool_calls",
                      "missing_required_parameter")
            return
    if role == "tool":
        _string(m, "tool_call_id", at + ".", required=True)
    if m.get("content") is None:
        _fail(f"{at}.content", "is required", "missing_required_parameter")
    _content(m["content"], f"{at}.content", PART_TYPES[role])


def _content(content: Any, at: str, allowed: tuple[str, ...]) -> None:
    if isinstance(content, str):
        return
    if not isinstance(content, list):
        _wrong_type(at, "a string or a list of content parts", content)
    _list(content, at, "content parts")
    for i, part in enumerate(content):
        here = f"{at}[{i}]"
        if not isinstance(part, dict):
            _wrong_type(here, "a content part object", part)
        kind = part.get("type")
        if isinstance(kind, str) and kind in UNSUPPORTED_PARTS:
            _fail(here + ".type", f"{kind!r}: {UNSUPPORTED_PARTS[kind]} is not supported by "
                  "the local runtimes", "unsupported_value")
        _choice(part, "type", here + ".", allowed, required=True)
        if kind == "image_url":
            image = _required_object(part, "image_url", here + ".")
            _string(image, "url", here + ".image_url.", required=True)
            _image_url(image["url"], here + ".image_url.url")
            _choice(image, "detail", here + ".image_url.", ("auto", "low", "high"))
        else:  # "text" or "refusal": the part carries a string under its own type's name
            _string(part, part["type"], here + ".", required=True)


def _image_url(url: str, at: str) -> None:
    if IMAGE_DATA_URL.match(url):
        return
    scheme = _SCHEME.match(url)
    if scheme is None or scheme[1].lower() != "data":
        got = f"a URL of scheme {scheme[1].lower()!r}" if scheme else "no URL scheme"
        _fail(at, "must be an inline data URL (data:image/TYPE;base64,...): images are sent "
              "inline because the data path stays local, and no URL is ever fetched; got "
              + got, "unsupported_value")
    _fail(at, "must be a base64 image data URL (data:image/TYPE;base64,...)")


def _tool_call(call: Any, at: str) -> None:
    if not isinstance(call, dict):
        _wrong_type(at, "a tool call object", call)
    _string(call, "id", at + ".", required=True)
    _choice(call, "type", at + ".", ("function",), required=True)
    function = _required_object(call, "function", at + ".")
    _string(function, "name", at + ".function.", required=True)
    _string(function, "arguments", at + ".function.", required=True)


def _tool(tool: Any, at: str) -> None:
    if not isinstance(tool, dict):
        _wrong_type(at, "a tool object", tool)
    _choice(tool, "type", at + ".", ("function",), required=True)
    function = _required_object(tool, "function", at + ".")
    _string(function, "name", at + ".function.", required=True)
    if not TOOL_NAME.fullmatch(function["name"]):
        _fail(at + ".function.name", "must be 1 to 64 letters, digits, '_' or '-'")
    _string(function, "description", at + ".function.")
    _schema(function, "parameters", at + ".function.")
    _boolean(function, "strict", at + ".function.")


def _schema(obj: dict[str, Any], key: str, at: str) -> None:
    """A JSON schema: an object, nested no deeper than MAX_SCHEMA_DEPTH."""
    value = _object(obj, key, at)
    if value is not None and _deeper_than(value, MAX_SCHEMA_DEPTH):
        _fail(at + key, f"must nest at most {MAX_SCHEMA_DEPTH} levels of objects and lists",
              "nesting_too_deep")


def _deeper_than(value: dict[str, Any] | list[Any], limit: int) -> bool:
    # A stack, not recursion: the value may be as deep as the body's limit.
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        children = node.values() if isinstance(node, dict) else node
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))
    return False


def _tool_choice(choice: Any) -> None:
    if choice is None:
        return
    if isinstance(choice, str):
        if choice not in TOOL_MODES:
            _not_one_of("tool_choice", TOOL_MODES, choice)
        return
    if not isinstance(choice, dict):
        _wrong_type("tool_choice", "a string or a tool choice object", choice)
    _choice(choice, "type", "tool_choice.", ("function",), required=True)
    function = _required_object(choice, "function", "tool_choice.")
    _string(function, "name", "tool_choice.function.", required=True)


# -- /v1/completions and /v1/embeddings --------------------------------------------------------
def _token_ids(value: list[Any], at: str) -> None:
    for i, token in enumerate(value):
        if not _is_int(token) or token < 0:
            _fail(f"{at}[{i}]", "must be a token id, an integer >= 0", "invalid_type")


def _texts_or_tokens(p: dict[str, Any], key: str, empty_string_ok: bool) -> None:
    """A string, or a non-empty list of strings, of token ids, or of lists of token ids."""
    value = p.get(key)
    if value is None:
        _fail(key, "is required", "missing_required_parameter")
    what = "strings or token ids"
    if isinstance(value, str):
        if not value and not empty_string_ok:
            _fail(key, "must not be an empty string")
        return
    if not isinstance(value, list):
        _wrong_type(key, f"a string or a list of {what}", value)
    items = _list(value, key, what)
    if len(items) > MAX_INPUTS:
        _fail(key, f"may hold at most {MAX_INPUTS} items; got {len(items)}",
              "array_above_max_length")
    first = items[0]
    if isinstance(first, str):
        for i, item in enumerate(items):
            if not isinstance(item, str):
                _wrong_type(f"{key}[{i}]", "a string, like the list's first item", item)
            if not item and not empty_string_ok:
                _fail(f"{key}[{i}]", "must not be an empty string")
    elif _is_int(first):
        _token_ids(items, key)
    elif isinstance(first, list):
        for i, item in enumerate(items):
            _token_ids(_list(item, f"{key}[{i}]", "token ids"), f"{key}[{i}]")
    else:
        _wrong_type(f"{key}[0]", what, first)


def _completion(p: dict[str, Any]) -> None:
    _texts_or_tokens(p, "prompt", empty_string_ok=True)
    _sampling(p)
    _integer(p, "logprobs", "", lo=0, hi=5)
    _integer(p, "best_of", "", lo=1)
    _boolean(p, "echo", "")
    _string(p, "suffix", "")


def _embedding(p: dict[str, Any]) -> None:
    _texts_or_tokens(p, "input", empty_string_ok=False)
    _choice(p, "encoding_format", "", ("float", "base64"))
    _integer(p, "dimensions", "", lo=1)
    _string(p, "user", "")


# -- /v1/rerank (llama-server's, Jina's and Cohere's shape) ---------------------------------
def _rerank(p: dict[str, Any]) -> None:
    _string(p, "query", "", required=True)
    if not p["query"]:
        _fail("query", "must not be an empty string")
    if p.get("documents") is None:
        _fail("documents", "is required", "missing_required_parameter")
    documents = _list(p["documents"], "documents", "strings")
    if len(documents) > MAX_DOCUMENTS:
        _fail("documents", f"may hold at most {MAX_DOCUMENTS} documents; got "
              f"{len(documents)}", "array_above_max_length")
    size = 0
    for i, document in enumerate(documents):
        if not isinstance(document, str):
            _wrong_type(f"documents[{i}]", "a string", document)
        size += len(document)
    if size > MAX_DOCUMENT_CHARS:
        _fail("documents", f"may hold at most {MAX_DOCUMENT_CHARS} characters in all; got "
              f"{size}", "string_above_max_length")
    _integer(p, "top_n", "", lo=1)
    _boolean(p, "return_documents", "")
    if p.get("stream"):
        _fail("stream", "is not supported: a rerank answers at once", "unsupported_value")


CHECKS: dict[str, Callable[[dict[str, Any]], None]] = {
    "/v1/chat/completions": _chat,
    "/v1/completions": _completion,
    "/v1/embeddings": _embedding,
    "/v1/rerank": _rerank,
}


def beyond_engine(model: str, payload: dict[str, Any], engine: Engine) -> Invalid | None:
    """What the model's engine cannot serve at all. llama-cpp-python would answer `tools` as
    plain chat and cannot see an image: a silent wrong answer is worse than a clear refusal."""
    def how(can: str) -> str:
        return (f"serve {model!r} with runtime {can} ([serve] runtime or "
                f"[models.{model}] runtime in sovctl.toml)")

    if not engine.tools and payload.get("tools"):
        return Invalid(f"model {model!r} runs on the {engine.name} runtime, which cannot "
                       f"call tools; {how(able(lambda e: e.tools))}", "tools",
                       "unsupported_value")
    image = None if engine.images else first_image(payload)
    if image is not None:
        return Invalid(f"model {model!r} runs on the {engine.name} runtime, which cannot "
                       f"read images; {how(able(lambda e: e.images))}", image,
                       "unsupported_value")
    return None


def images(payload: dict[str, Any], max_images: int, max_bytes: int, max_pixels: int
           ) -> Invalid | None:
    """What the image parts of a chat request (one `check` passed) would cost a runtime to
    decode, against the limits: how many there are, and each one's bytes and pixels as its
    header declares them."""
    count = 0
    for i, m in enumerate(payload.get("messages") or ()):
        content = m.get("content") if isinstance(m, dict) else None
        for j, part in enumerate(content if isinstance(content, list) else ()):
            if not (isinstance(part, dict) and part.get("type") == "image_url"):
                continue
            at = f"messages[{i}].content[{j}].image_url.url"
            count += 1
            if count > max_images:
                return Invalid(f"a request may carry at most {max_images} images ([serve] "
                               f"max_images); '{at}' is image {count}", at, "too_many_images")
            problem = _image_cost(part["image_url"]["url"], max_bytes, max_pixels)
            if problem is not None:
                return Invalid(f"'{at}' {problem[0]}", at, problem[1])
    return None


def _image_cost(url: str, max_bytes: int, max_pixels: int) -> tuple[str, str] | None:
    """Why an image data URL is refused, and the error code; None when it is within bounds."""
    try:
        data = base64.b64decode(url[url.index(",") + 1:])
    except ValueError:  # binascii.Error, or a character beyond ASCII
        return "is not valid base64", "invalid_image"
    if len(data) > max_bytes:
        return (f"holds {len(data)} bytes; an image may hold at most {max_bytes} ([serve] "
                "max_image_bytes)", "image_too_large")
    try:
        kind, width, height = dimensions(data)
    except ImageError as e:
        return f"cannot be read: {e}", "invalid_image"
    if width == 0 or height == 0:
        return f"is a {kind} image of {width}x{height} pixels: empty", "invalid_image"
    if width * height > max_pixels:
        return (f"is a {kind} image of {width}x{height} pixels; an image may have at most "
                f"{max_pixels} pixels ([serve] max_image_pixels)", "image_too_large")
    return None


def first_image(payload: dict[str, Any]) -> str | None:
    """Where the first image part of a (valid) chat request is, or None when it has none."""
    for i, m in enumerate(payload.get("messages") or ()):
        content = m.get("content") if isinstance(m, dict) else None
        for j, part in enumerate(content if isinstance(content, list) else ()):
            if isinstance(part, dict) and part.get("type") == "image_url":
                return f"messages[{i}].content[{j}]"
    return None


def without_projector(model: str, payload: dict[str, Any]) -> Invalid | None:
    """An image for a model served without a multimodal projector: llama-server would answer
    with a 500, the model cannot see it either way."""
    image = first_image(payload)
    if image is None:
        return None
    return Invalid(f"model {model!r} is served without a projector and cannot read images; "
                   f"pull it with --mmproj ('sovctl pull REF --mmproj PROJECTOR'), then serve "
                   "it again", image, "unsupported_value")
