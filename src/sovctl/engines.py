"""The engines a model is served with: one definition each, and their names nowhere else.

An engine is the program behind a runtime process. Its definition says how to start it for a
served model (the argv after the launcher), which path tells that it is up, what it can do
(tools, images, parallel slots, embeddings, reranking, a Jinja template file, RPC workers)
and the API surfaces it speaks. Plans, the gateway, request validation, `doctor`, sizing and
the audit read these attributes; none of them compares a runtime's name. A runtime setting
(`[serve] runtime`, `[models.NAME] runtime`) is an engine's name or `auto`: llama-server where
its binary is found, else llama-cpp-python. plan.json, routes.json and state.json record the
engine's name; the gateway looks its engine up once per route when it starts.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from sovctl.errors import ConfigError

LLAMA_SERVER = "llama-server"
LLAMA_CPP_PYTHON = "llama-cpp-python"
# The runtime setting that picks an engine by what is installed (choose).
AUTO = "auto"
# The Python distribution both engines come in (scripts/setup puts llama-server in its
# llama_cpp/bin), and the name of the logger llama.cpp writes to through it.
DISTRIBUTION = LLAMA_CPP_PYTHON
# A clustered llama-server's log level. llama.cpp prints llama's and ggml's own info messages,
# among them the layer split the supervisor reads ("RPC0[HOST:PORT] model buffer size = ..."),
# at its level 4 (trace), not at its default 3; and what a request carries (its body, the
# parsed answer, prompt tokens) at 5 (debug) alone. So 4, never 5: no prompt or completion
# reaches a log (tests/test_privacy.py holds the pinned build to it).
RPC_LOG_VERBOSITY = 4


class Surface(StrEnum):
    """An HTTP API an engine speaks, by its path. The gateway routes the OpenAI three today."""

    CHAT = "/v1/chat/completions"
    COMPLETIONS = "/v1/completions"
    EMBEDDINGS = "/v1/embeddings"
    MESSAGES = "/v1/messages"  # Anthropic's Messages API
    RESPONSES = "/v1/responses"  # OpenAI's Responses API
    RERANK = "/v1/rerank"  # only when started to rerank (llama-server --reranking); it
    # answers /rerank too


class Served(Protocol):
    """What an engine's argv is built from: a served model of a plan (plan.ServedModel)."""

    @property
    def name(self) -> str: ...
    @property
    def role(self) -> str: ...
    @property
    def blob(self) -> str: ...
    @property
    def parallel(self) -> int: ...
    @property
    def n_ctx(self) -> int: ...
    @property
    def n_gpu_layers(self) -> int: ...
    @property
    def n_threads(self) -> int: ...
    @property
    def n_batch(self) -> int | None: ...
    @property
    def chat_format(self) -> str | None: ...
    @property
    def chat_template(self) -> str | None: ...
    @property
    def seed(self) -> int | None: ...
    @property
    def mmproj(self) -> str | None: ...


# (the model, its port, its internal key's file, its RPC workers) -> the argv after the program.
ArgsOf = Callable[[Served, int, str, Sequence[str]], list[str]]


@dataclass(frozen=True)
class Engine:
    name: str  # the runtime setting's value, and what plans, routes and state record
    binary: str  # the program sovctl.runtime.launch execs (llamacpp.find_binary finds it)...
    module: str  # ...or the Python module it runs ("" for the other)
    args: ArgsOf
    # A path that answers without waiting on a busy model.
    health_path: str
    key_in_env: bool  # reads its internal key's file from launch's KEY_FILE_ENV, not its argv
    parallel: bool  # serves `parallel` slots at once (continuous batching); else one request
    tools: bool  # renders a request's tools (where the model's template has a place for them)
    props_path: str  # where it tells what the loaded template does; "" none
    images: bool  # reads images, given the model's multimodal projector
    embeddings: bool  # serves an embedding model
    reranking: bool  # serves a reranker (role "rerank") on its rerank surface
    chat_template_file: bool  # takes a Jinja chat template from a file
    rpc_workers: bool  # spreads a model over [cluster] workers (ggml-rpc-server)
    surfaces: frozenset[Surface]  # the APIs the program speaks, routed or not
    summary: str  # what it is, in a few words


# The roles whose model encodes its whole input at once (one pooled output, no generation).
_ENCODER_ROLES = ("embedding", "rerank")


def _llama_server_args(m: Served, port: int, key_file: str, workers: Sequence[str]
                       ) -> list[str]:
    args = [
        "--model", m.blob,
        "--alias", m.name,
        "--host", "127.0.0.1",
        "--port", str(port),
        # llama-server divides its context among its slots: each request gets n_ctx.
        "--ctx-size", str(m.n_ctx * m.parallel),
        "--parallel", str(m.parallel),
        "--n-gpu-layers", str(m.n_gpu_layers),
        "--threads", str(m.n_threads),
        # The key is read from a file: a command line is readable by every local user.
        "--api-key-file", key_file,
        "--no-webui",
        "--offline",
    ]
    if m.role in _ENCODER_ROLES:
        # An embedding request is one batch, and so is each (query, document) pair a reranker
        # scores: let the batch hold a whole context.
        args += ["--reranking" if m.role == "rerank" else "--embeddings",
                 "--ubatch-size", str(m.n_ctx), "--batch-size", str(m.n_ctx)]
    else:
        args += ["--jinja"]
    if workers:
        args += ["--rpc", ",".join(workers), "--log-verbosity", str(RPC_LOG_VERBOSITY)]
    for flag, value in (("--batch-size", m.n_batch if m.role not in _ENCODER_ROLES else None),
                        ("--mmproj", m.mmproj), ("--chat-template", m.chat_format),
                        ("--chat-template-file", m.chat_template), ("--seed", m.seed)):
        if value is not None:
            args += [flag, str(value)]
    return args


def _llama_cpp_python_args(m: Served, port: int, key_file: str, workers: Sequence[str]
                           ) -> list[str]:
    args = [
        "--model", m.blob,
        "--model_alias", m.name,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--n_ctx", str(m.n_ctx),
        "--n_gpu_layers", str(m.n_gpu_layers),
        "--n_threads", str(m.n_threads),
        # Never cut a streaming response short because another request arrived: the gateway
        # queues requests itself, and a silently truncated stream is a lost request.
        "--interrupt_requests", "False",
    ]
    if m.role == "embedding":
        args += ["--embedding", "True"]
    for flag, value in (("--n_batch", m.n_batch), ("--chat_format", m.chat_format),
                        ("--seed", m.seed)):
        if value is not None:
            args += [flag, str(value)]
    return args


_OPENAI = frozenset({Surface.CHAT, Surface.COMPLETIONS, Surface.EMBEDDINGS})

ENGINES: dict[str, Engine] = {e.name: e for e in (
    Engine(
        name=LLAMA_SERVER, binary="llama-server", module="", args=_llama_server_args,
        # Public (no key), and 503 while the model loads.
        health_path="/health", key_in_env=False, parallel=True, tools=True,
        props_path="/props", images=True, embeddings=True, reranking=True,
        chat_template_file=True, rpc_workers=True,
        surfaces=_OPENAI | {Surface.MESSAGES, Surface.RESPONSES, Surface.RERANK},
        summary="llama.cpp's own server: continuous batching over parallel slots"),
    Engine(
        name=LLAMA_CPP_PYTHON, binary="", module="llama_cpp.server",
        args=_llama_cpp_python_args,
        # Its /v1/models would wait on the model's lock behind a running request.
        health_path="/docs", key_in_env=True, parallel=False, tools=False, props_path="",
        images=False, embeddings=True, reranking=False, chat_template_file=False,
        rpc_workers=False, surfaces=_OPENAI,
        summary="the Python server of llama-cpp-python: one request at a time"),
)}
# What a runtime setting may say: `auto`, or an engine's name.
RUNTIME_CHOICES = (AUTO, *ENGINES)
# What `auto` serves with where its binary is found ([serve] llama_server names that binary),
# and what it falls back to elsewhere.
PREFERRED = ENGINES[LLAMA_SERVER]
FALLBACK = ENGINES[LLAMA_CPP_PYTHON]


def engine(name: str) -> Engine:
    """The engine named `name`; a ConfigError naming the known ones for any other."""
    try:
        return ENGINES[name]
    except KeyError:
        raise ConfigError(f"no engine named {name!r}; the engines are {', '.join(ENGINES)}",
                          hint="set runtime to one of them, or to \"auto\"") from None


def choose(wanted: str, binary_found: bool) -> Engine:
    """The engine a runtime setting asks for; `auto`: llama-server when its binary is found,
    else llama-cpp-python."""
    if wanted == AUTO:
        return PREFERRED if binary_found else FALLBACK
    return engine(wanted)


def able(can: Callable[[Engine], bool]) -> str:
    """The names of the engines that can do something, for a message: "llama-server"."""
    return " or ".join(e.name for e in ENGINES.values() if can(e))
