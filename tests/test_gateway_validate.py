"""The gateway refuses malformed requests itself, and no runtime internals reach a client.

The HTTP tests run the real gateway app under uvicorn on loopback, in front of a small fake
runtime (also on loopback) that answers the way llama-cpp-python's server does when it
crashes: a 500 with a Python traceback and file paths.
"""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest
import uvicorn

from sovctl.gateway.app import ENDPOINT_ROLES, _check, create_app
from sovctl.gateway.validate import CHECKS, check
from sovctl.runtime.documents import (
    Limits,
    ProcessState,
    Route,
    RoutesTable,
    StackState,
    Status,
)

CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
EMBED = "/v1/embeddings"


def chat(*messages: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"messages": list(messages) or [{"role": "user", "content": "hi"}], **fields}


def deep(levels: int) -> dict[str, Any]:
    """A JSON schema `levels` objects deep."""
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(levels - 1):
        schema = {"not": schema}
    return schema


def user(content: Any) -> dict[str, Any]:
    return {"role": "user", "content": content}


CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                          "arguments": '{"city": "Paris"}'}}
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather.",
                                         "parameters": {"type": "object", "properties": {}}}}

VALID = [
    (CHAT, chat()),
    (CHAT, chat({"role": "system", "content": "Be brief."},
                {"role": "developer", "content": [{"type": "text", "text": "Be kind."}]},
                user([{"type": "text", "text": "What is this?"},
                      {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA==",
                                                         "detail": "low"}}]),
                {"role": "assistant", "content": None, "tool_calls": [CALL]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
                {"role": "assistant", "tool_calls": [CALL]},
                {"role": "function", "name": "get_weather", "content": "sunny"},
                {"role": "assistant", "content": [{"type": "refusal", "refusal": "No."}]},
                user(""))),
    (CHAT, chat(tools=[TOOL], tool_choice={"type": "function",
                                           "function": {"name": "get_weather"}},
                parallel_tool_calls=False)),
    (CHAT, chat(tools=[TOOL], tool_choice="required")),
    (CHAT, chat(temperature=0, top_p=1, n=1, max_tokens=1, max_completion_tokens=1,
                presence_penalty=-2, frequency_penalty=2, seed=-1, logprobs=True,
                top_logprobs=20, stop=["a", "b", "c", "d"], stream=True,
                stream_options={"include_usage": True}, logit_bias={"15": -100}, user="u")),
    (CHAT, chat(temperature=2.0, stop="\n")),
    # null means "the default", as it does for OpenAI
    (CHAT, chat(temperature=None, stop=None, tools=None, tool_choice=None, n=None)),
    # llama.cpp's extensions pass through unchecked
    (CHAT, chat(top_k=40, min_p=0.05, grammar='root ::= "yes" | "no"',
                response_format={"type": "json_object", "schema": {"type": "object"}})),
    (CHAT, chat(response_format={"type": "json_schema",
                                 "json_schema": {"name": "answer", "schema": {}}})),
    # schemas as deep as the bound
    (CHAT, chat(tools=[{"type": "function", "function": {"name": "f", "parameters": deep(32)}}],
                response_format={"type": "json_schema",
                                 "json_schema": {"name": "answer", "schema": deep(32)}})),
    (COMP, {"prompt": ""}),
    (COMP, {"prompt": ["Once", "upon"], "max_tokens": 8, "logprobs": 5, "echo": True,
            "suffix": "end", "best_of": 1}),
    (COMP, {"prompt": [1, 2, 3]}),
    (COMP, {"prompt": [[1, 2], [3]]}),
    (EMBED, {"input": "a cat"}),
    (EMBED, {"input": ["a cat", "a dog"], "encoding_format": "base64", "dimensions": 8}),
    (EMBED, {"input": [0, 1]}),
    (EMBED, {"input": [[1], [2, 3]], "encoding_format": "float"}),
]


@pytest.mark.parametrize(("endpoint", "payload"), VALID)
def test_check_accepts_what_the_openai_api_accepts(endpoint: str, payload: dict[str, Any]
                                                   ) -> None:
    assert check(endpoint, payload) is None


INVALID = [
    (CHAT, {}, "messages", "missing_required_parameter"),
    (CHAT, {"messages": "hi"}, "messages", "invalid_type"),
    (CHAT, {"messages": None}, "messages", "missing_required_parameter"),
    (CHAT, {"messages": []}, "messages", "empty_array"),
    (CHAT, {"messages": ["hi"]}, "messages[0]", "invalid_type"),
    (CHAT, chat({"content": "hi"}), "messages[0].role", "missing_required_parameter"),
    (CHAT, chat({"role": "bot", "content": "hi"}), "messages[0].role", "invalid_value"),
    (CHAT, chat({"role": ["user"], "content": "hi"}), "messages[0].role", "invalid_value"),
    (CHAT, chat({"role": "user"}), "messages[0].content", "missing_required_parameter"),
    (CHAT, chat(user(5)), "messages[0].content", "invalid_type"),
    (CHAT, chat(user({"text": "hi"})), "messages[0].content", "invalid_type"),
    (CHAT, chat(user([])), "messages[0].content", "empty_array"),
    (CHAT, chat(user(["hi"])), "messages[0].content[0]", "invalid_type"),
    (CHAT, chat(user([{"type": "text"}])), "messages[0].content[0].text",
     "missing_required_parameter"),
    (CHAT, chat(user([{"type": "text", "text": 1}])), "messages[0].content[0].text",
     "invalid_type"),
    (CHAT, chat(user([{"type": "image_url", "image_url": {}}])),
     "messages[0].content[0].image_url.url", "missing_required_parameter"),
    (CHAT, chat(user([{"type": "image_url", "image_url": "http://x"}])),
     "messages[0].content[0].image_url", "invalid_type"),
    # an image travels inline: no URL is fetched, whatever its scheme
    *((CHAT, chat(user([{"type": "text", "text": "tags?"},
                        {"type": "image_url", "image_url": {"url": url}}])),
       "messages[0].content[1].image_url.url", "unsupported_value")
      for url in ("http://127.0.0.1:9/x.png", "https://example.org/x.png",
                  "file:///etc/hostname", "ftp://h/x.png", "x.png")),
    (CHAT, chat(user([{"type": "image_url", "image_url": {"url": "data:text/plain;base64,AA"}}])),
     "messages[0].content[0].image_url.url", "invalid_value"),
    (CHAT, chat(user([{"type": "image_url", "image_url": {"url": "data:image/png,raw"}}])),
     "messages[0].content[0].image_url.url", "invalid_value"),
    (CHAT, chat(user([{"type": "video"}])), "messages[0].content[0].type", "invalid_value"),
    (CHAT, chat(user([{"type": ["text"]}])), "messages[0].content[0].type", "invalid_value"),
    (CHAT, chat(user([{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}])),
     "messages[0].content[0].type", "unsupported_value"),
    (CHAT, chat({"role": "system", "content": [{"type": "image_url",
                                                "image_url": {"url": "http://x"}}]}),
     "messages[0].content[0].type", "invalid_value"),
    (CHAT, chat({"role": "assistant", "content": None}), "messages[0].content",
     "missing_required_parameter"),
    (CHAT, chat({"role": "assistant", "tool_calls": []}), "messages[0].tool_calls",
     "empty_array"),
    (CHAT, chat({"role": "assistant", "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "f"}}]}),
     "messages[0].tool_calls[0].function.arguments", "missing_required_parameter"),
    (CHAT, chat({"role": "assistant", "tool_calls": [{**CALL, "type": "code"}]}),
     "messages[0].tool_calls[0].type", "invalid_value"),
    (CHAT, chat({"role": "tool", "content": "sunny"}), "messages[0].tool_call_id",
     "missing_required_parameter"),
    (CHAT, chat({"role": "function", "content": "sunny"}), "messages[0].name",
     "missing_required_parameter"),
    (CHAT, chat(user("hi"), {"role": "user", "content": "hi", "name": 3}), "messages[1].name",
     "invalid_type"),
    (CHAT, chat(temperature=2.5), "temperature", "invalid_value"),
    (CHAT, chat(temperature=-0.1), "temperature", "invalid_value"),
    (CHAT, chat(temperature="hot"), "temperature", "invalid_type"),
    (CHAT, chat(temperature=True), "temperature", "invalid_type"),
    (CHAT, chat(temperature=float("nan")), "temperature", "invalid_value"),
    (CHAT, chat(top_p=1.5), "top_p", "invalid_value"),
    (CHAT, chat(n=2), "n", "unsupported_value"),
    (CHAT, chat(n=0), "n", "invalid_value"),
    (CHAT, chat(max_tokens=0), "max_tokens", "invalid_value"),
    (CHAT, chat(max_tokens=1.5), "max_tokens", "invalid_type"),
    (CHAT, chat(max_completion_tokens=0), "max_completion_tokens", "invalid_value"),
    (CHAT, chat(presence_penalty=-3), "presence_penalty", "invalid_value"),
    (CHAT, chat(frequency_penalty=2.5), "frequency_penalty", "invalid_value"),
    (CHAT, chat(seed=1.5), "seed", "invalid_type"),
    (CHAT, chat(logprobs="yes"), "logprobs", "invalid_type"),
    (CHAT, chat(top_logprobs=21), "top_logprobs", "invalid_value"),
    (CHAT, chat(stop=["a", "b", "c", "d", "e"]), "stop", "array_above_max_length"),
    (CHAT, chat(stop=[1]), "stop", "invalid_type"),
    (CHAT, chat(stream="yes"), "stream", "invalid_type"),
    (CHAT, chat(stream_options="usage"), "stream_options", "invalid_type"),
    (CHAT, chat(stream_options={"include_usage": "y"}), "stream_options.include_usage",
     "invalid_type"),
    (CHAT, chat(logit_bias={"15": 200}), "logit_bias.15", "invalid_value"),
    (CHAT, chat(tools={}), "tools", "invalid_type"),
    (CHAT, chat(tools=[]), "tools", "empty_array"),
    (CHAT, chat(tools=[{"type": "retrieval"}]), "tools[0].type", "invalid_value"),
    (CHAT, chat(tools=[{"type": "function"}]), "tools[0].function",
     "missing_required_parameter"),
    (CHAT, chat(tools=[{"type": "function", "function": {"name": "get weather"}}]),
     "tools[0].function.name", "invalid_value"),
    (CHAT, chat(tool_choice="any"), "tool_choice", "invalid_value"),
    (CHAT, chat(tool_choice=1), "tool_choice", "invalid_type"),
    (CHAT, chat(tool_choice={"type": "function"}), "tool_choice.function",
     "missing_required_parameter"),
    (CHAT, chat(response_format={"type": "xml"}), "response_format.type", "invalid_value"),
    (CHAT, chat(response_format={"type": "json_schema"}), "response_format.json_schema",
     "missing_required_parameter"),
    (CHAT, chat(tools=[{"type": "function", "function": {"name": "f", "parameters": deep(33)}}]),
     "tools[0].function.parameters", "nesting_too_deep"),
    (CHAT, chat(response_format={"type": "json_schema", "json_schema": {
        "name": "s", "schema": deep(33)}}), "response_format.json_schema.schema",
     "nesting_too_deep"),
    (COMP, {}, "prompt", "missing_required_parameter"),
    (COMP, {"prompt": 5}, "prompt", "invalid_type"),
    (COMP, {"prompt": []}, "prompt", "empty_array"),
    (COMP, {"prompt": ["a", 1]}, "prompt[1]", "invalid_type"),
    (COMP, {"prompt": [1, -1]}, "prompt[1]", "invalid_type"),
    (COMP, {"prompt": [[1], []]}, "prompt[1]", "empty_array"),
    (COMP, {"prompt": [{"text": "a"}]}, "prompt[0]", "invalid_type"),
    (COMP, {"prompt": "a", "logprobs": 6}, "logprobs", "invalid_value"),
    (COMP, {"prompt": "a", "logprobs": True}, "logprobs", "invalid_type"),
    (COMP, {"prompt": "a", "best_of": 0}, "best_of", "invalid_value"),
    (COMP, {"prompt": "a", "temperature": 3}, "temperature", "invalid_value"),
    (COMP, {"prompt": "a", "n": 3}, "n", "unsupported_value"),
    (EMBED, {}, "input", "missing_required_parameter"),
    (EMBED, {"input": ""}, "input", "invalid_value"),
    (EMBED, {"input": 3}, "input", "invalid_type"),
    (EMBED, {"input": []}, "input", "empty_array"),
    (EMBED, {"input": ["a", ""]}, "input[1]", "invalid_value"),
    (EMBED, {"input": ["a"] * 2049}, "input", "array_above_max_length"),
    (EMBED, {"input": "a", "encoding_format": "int8"}, "encoding_format", "invalid_value"),
    (EMBED, {"input": "a", "dimensions": 0}, "dimensions", "invalid_value"),
]


@pytest.mark.parametrize(("endpoint", "payload", "param", "code"), INVALID)
def test_check_names_the_offending_field(endpoint: str, payload: dict[str, Any], param: str,
                                         code: str) -> None:
    invalid = check(endpoint, payload)
    assert invalid is not None
    assert (invalid.param, invalid.code) == (param, code)
    assert f"'{param}'" in invalid.message


def test_refusals_say_why_in_words() -> None:
    n = check(CHAT, chat(n=2))
    assert n is not None and "one choice per request" in n.message
    audio = check(CHAT, chat(user([{"type": "input_audio", "input_audio": {}}])))
    assert audio is not None and "not supported" in audio.message
    role = check(CHAT, chat({"role": "bot", "content": "hi"}))
    assert role is not None and "'bot'" in role.message and "'tool'" in role.message
    remote = check(CHAT, chat(user([{"type": "image_url",
                                     "image_url": {"url": "http://127.0.0.1:9/x.png"}}])))
    assert remote is not None and "data URL" in remote.message
    assert "stays local" in remote.message and "scheme 'http'" in remote.message
    # a client's value is echoed only when short
    long = check(CHAT, chat({"role": "x" * 1000, "content": "hi"}))
    assert long is not None and "x" * 41 not in long.message


def test_every_routed_endpoint_is_checked() -> None:
    # The OpenAI surfaces here, the others in their own modules (anthropic, responses): every
    # routed endpoint has its check, which refuses an empty body.
    assert set(CHECKS) <= set(ENDPOINT_ROLES)
    for endpoint in ENDPOINT_ROLES:
        assert _check(endpoint, {}) is not None, endpoint


# -- through a real gateway ----------------------------------------------------------------
TRACEBACK = (
    "Traceback (most recent call last):\n"
    '  File "/opt/sovctl/.venv/lib/python3.11/site-packages/llama_cpp/server/app.py", '
    "line 512, in create_chat_completion\n"
    "    iterator_or_completion = await run_in_threadpool(llama.create_chat_completion)\n"
    "TypeError: string indices must be integers, not 'str'\n"
)
CONTEXT_MESSAGE = ("This model's maximum context length is 2048 tokens. However, you "
                   "requested 4100 tokens (4000 in the messages, 100 in the completion).")
OK_BODY = {"id": "chatcmpl-1", "object": "chat.completion", "model": "ok",
           "choices": [{"index": 0, "finish_reason": "stop",
                        "message": {"role": "assistant", "content": "hello"}}],
           "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}

# How each fake runtime answers: status, content type, body.
ANSWERS: dict[str, tuple[int, str, bytes]] = {
    "ok": (200, "application/json", json.dumps(OK_BODY).encode()),
    "crash": (500, "text/plain", TRACEBACK.encode()),
    "crash-json": (500, "application/json", json.dumps({"error": {
        "message": TRACEBACK, "type": "internal_server_error", "param": None,
        "code": None}}).encode()),
    "bad-path": (400, "application/json", json.dumps({"error": {
        "message": "The model `/srv/sovctl/models/smol.gguf` does not exist",
        "type": "invalid_request_error", "param": None, "code": "model_not_found"}}).encode()),
    "fastapi": (422, "application/json", json.dumps({"detail": [{
        "type": "list_type", "loc": ["body", "messages"], "msg": "Input should be a valid list",
        "input": "hi"}]}).encode()),
    "context": (400, "application/json", json.dumps({"error": {
        "message": CONTEXT_MESSAGE, "type": "invalid_request_error", "param": "messages",
        "code": "context_length_exceeded"}}).encode()),
}
FIRST_EVENT = b'data: {"choices": [{"index": 0, "delta": {"content": "he"}}]}\n\n'


class FakeRuntime(BaseHTTPRequestHandler):
    """Serves every fake runtime at once: the first path segment says which one is asked."""

    protocol_version = "HTTP/1.1"
    seen: ClassVar[list[str]] = []

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["content-length"]))
        self.seen.append(self.path)
        name = self.path.split("/")[1]
        if name == "drop":
            self._drop_mid_stream()
            return
        status, ctype, body = ANSWERS[name]
        self.send_response(status)
        self.send_header("content-type", ctype)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _drop_mid_stream(self) -> None:
        """Starts a stream, then dies the way a crashed runtime does: no end of the body."""
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        self.wfile.write(b"%x\r\n%s\r\n" % (len(FIRST_EVENT), FIRST_EVENT))
        self.wfile.flush()
        self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        pass


def routes_table(upstream: str, state_file: Path) -> RoutesTable:
    """A routing table with one chat model per fake runtime, all of them up."""
    names = [*ANSWERS, "drop"]
    StackState(
        supervisor_pid=0, started_at=0.0, updated_at=0.0, url="", host="127.0.0.1", port=0,
        api_key_required=False, stopping=False, final=False, events=(),
        processes=tuple(
            ProcessState(name=name, kind="runtime", role="chat", model=name, sha256="",
                         runtime="llama-server", port=0, pid=None, status=Status.UP,
                         restarts=0, up_since=0.0, last_exit="")
            for name in names),
    ).write(state_file)
    return RoutesTable(
        host="127.0.0.1", port=0, auth_required=False, key_file="",
        limits=Limits(queue_limit=8, queue_timeout=10, max_body_bytes=1 << 20),
        state_file=str(state_file),
        routes=tuple(Route(model=name, role="chat", kind="local", process=name,
                           upstream=f"{upstream}/{name}", runtime="llama-server", parallel=1,
                           key_file=None) for name in names),
    )


@pytest.fixture(scope="module")
def fake_runtime() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeRuntime)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def gateway(fake_runtime: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    table = routes_table(fake_runtime, tmp_path_factory.mktemp("gateway") / "state.json")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(table), log_level="warning",
                                           lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "gateway did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


@pytest.fixture
def client(gateway: str) -> Iterator[httpx.Client]:
    FakeRuntime.seen.clear()
    with httpx.Client(base_url=gateway, trust_env=False, timeout=20) as c:
        yield c


# What no answer may carry: a traceback, a source location, a file path.
INTERNALS = re.compile(r"Traceback|File \"|\.py\b|/opt/|/srv/|site-packages")


def test_malformed_request_never_reaches_the_runtime(client: httpx.Client) -> None:
    r = client.post(CHAT, json={"model": "ok", "messages": "hi"})
    assert r.status_code == 400
    assert r.json()["error"] == {
        "message": "'messages' must be a list of message objects, got a string",
        "type": "invalid_request_error", "param": "messages", "code": "invalid_type"}
    r = client.post(CHAT, json={"model": "ok", "messages": [user("hi")], "n": 2,
                                "stream": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"
    assert FakeRuntime.seen == []
    # the same gateway does pass a valid request on
    r = client.post(CHAT, json={"model": "ok", "messages": [user("hi")]})
    assert r.status_code == 200 and r.json() == OK_BODY
    assert FakeRuntime.seen == ["/ok/v1/chat/completions"]


def test_an_image_for_a_model_without_projector_never_reaches_it(client: httpx.Client) -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA=="}}
    r = client.post(CHAT, json={"model": "ok", "messages": [user([image])]})
    assert r.status_code == 400
    err = r.json()["error"]
    assert (err["param"], err["code"]) == ("messages[0].content[0]", "unsupported_value")
    assert "'ok' is served without a projector" in err["message"] and "--mmproj" in err["message"]
    assert FakeRuntime.seen == []
    listed = client.get("/v1/models").json()["data"]
    assert {m["capabilities"]["vision"] for m in listed} == {False}


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
@pytest.mark.parametrize("model", ["crash", "crash-json", "bad-path", "fastapi"])
def test_runtime_errors_reach_the_client_without_internals(client: httpx.Client, model: str,
                                                           stream: bool) -> None:
    status = ANSWERS[model][0]
    r = client.post(CHAT, json={"model": model, "messages": [user("hi")], "stream": stream})
    assert FakeRuntime.seen == [f"/{model}/v1/chat/completions"]
    assert r.status_code == status
    assert not INTERNALS.search(r.text), r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert f"(HTTP {status}); see 'sovctl logs {model}'" in err["message"]
    assert err["type"] == ("server_error" if status >= 500 else "invalid_request_error")


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_a_clean_runtime_error_keeps_its_message(client: httpx.Client, stream: bool) -> None:
    r = client.post(CHAT, json={"model": "context", "messages": [user("hi")],
                                "stream": stream})
    assert r.status_code == 400
    assert r.json()["error"] == {"message": CONTEXT_MESSAGE, "type": "invalid_request_error",
                                 "param": "messages", "code": "context_length_exceeded"}


def test_a_stream_cut_short_says_so_without_internals(client: httpx.Client) -> None:
    r = client.post(CHAT, json={"model": "drop", "messages": [user("hi")], "stream": True})
    assert r.status_code == 200
    assert r.content.startswith(FIRST_EVENT)
    events = [json.loads(line.removeprefix("data: "))
              for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[-1]["error"]["code"] == "runtime_failed"
    assert "mid-stream" in events[-1]["error"]["message"]
    assert not INTERNALS.search(r.text), r.text


def test_metrics_count_every_proxied_request(client: httpx.Client) -> None:
    """Answered and refused, plain and streamed: each request is counted once, with the
    tokens its answer's usage reports."""

    def metric(name: str) -> int:
        lines = client.get("/metrics").text.splitlines()
        return next((int(line.split()[-1]) for line in lines if line.startswith(name + " ")), 0)

    ok = f'sovctl_requests_total{{model="ok",endpoint="{CHAT}",code="200"}}'
    refused = f'sovctl_requests_total{{model="-",endpoint="{CHAT}",code="400"}}'
    tokens_in = 'sovctl_tokens_total{model="ok",direction="in"}'
    before = {m: metric(m) for m in (ok, refused, tokens_in)}
    for stream in (False, True):
        assert client.post(CHAT, json={"model": "ok", "messages": [user("hi")],
                                       "stream": stream}).status_code == 200
    assert client.post(CHAT, json={"model": "ok", "messages": "hi"}).status_code == 400
    assert metric(ok) == before[ok] + 2
    assert metric(refused) == before[refused] + 1
    assert metric(tokens_in) == before[tokens_in] + 1  # OK_BODY's usage: one prompt token
