"""Turning configuration into a plan: which processes run, with which argv, on which ports.

A plan is plain data (it is written to disk for a detached supervisor and printed by
--dry-run); nothing here starts a process.
"""

from __future__ import annotations

import json
import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sovctl.config import Settings
from sovctl.errors import ConfigError, UsageError
from sovctl.home import Home
from sovctl.runtime import egress
from sovctl.runtime.procs import Argv
from sovctl.secrets import ensure_api_key, is_loopback
from sovctl.store.blobs import BlobStore
from sovctl.store.lock import Lock

# Environment every supervised process gets: no hub access, no telemetry of any library.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "1",
    "ANONYMIZED_TELEMETRY": "False",
    "PYTHONUNBUFFERED": "1",
}

RUNTIME_HEALTH_PATH = "/docs"  # answers without taking llama-cpp-python's model lock


@dataclass(frozen=True)
class ServedModel:
    name: str
    role: str  # "chat" | "embedding" | "completion"
    sha256: str
    size: int
    blob: str
    n_ctx: int = 2048
    n_gpu_layers: int = 0
    n_threads: int | None = None
    n_batch: int | None = None
    chat_format: str | None = None
    seed: int | None = None
    extra_args: tuple[str, ...] = ()


@dataclass(frozen=True)
class ProcessSpec:
    name: str
    kind: str  # "runtime" | "gateway"
    argv: Argv
    port: int
    health_path: str
    role: str = ""
    model: str = ""
    sha256: str = ""


@dataclass(frozen=True)
class Plan:
    host: str
    port: int
    processes: tuple[ProcessSpec, ...]
    models: tuple[ServedModel, ...]
    routes_file: str
    state_file: str
    egress_log: str
    logs_dir: str
    api_key_required: bool
    supervision: Mapping[str, Any] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        d = json.loads(text)
        procs = tuple(
            ProcessSpec(**{**p, "argv": Argv(args=tuple(p["argv"]["args"]), env=p["argv"]["env"],
                                             cwd=p["argv"]["cwd"])})
            for p in d.pop("processes")
        )
        models = tuple(ServedModel(**{**m, "extra_args": tuple(m["extra_args"])})
                       for m in d.pop("models"))
        return cls(processes=procs, models=models, **d)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def served_models(
    home: Home, cfg: Settings, chat: Sequence[str] = (), embedding: Sequence[str] = ()
) -> list[ServedModel]:
    """The models to serve: the flags when any were given, otherwise [models.*] in config."""
    if chat or embedding:
        # A flag names a store model; settings for it may still come from its config section.
        by_model = {m.get("model", k): m for k, m in cfg.models.items()}
        roles = [(n, "chat") for n in chat] + [(n, "embedding") for n in embedding]
        wanted: list[tuple[str, Mapping[str, Any]]] = [
            (n, {**by_model.get(n, {}), "role": role}) for n, role in roles
        ]
    else:
        wanted = [(m.get("model", k), m) for k, m in cfg.models.items()]
    if not wanted:
        raise UsageError(
            "no models to serve",
            hint="pass --chat NAME and/or --embedding NAME, or add [models.NAME] sections to "
            f"{home.config_path}",
        )
    lock = Lock.load(home)
    store = BlobStore(home)
    seen: set[str] = set()
    out = []
    for name, m in wanted:
        if name in seen:
            raise ConfigError(f"model {name!r} is listed twice", hint="serve each model once")
        seen.add(name)
        entry = lock.get(name)
        out.append(ServedModel(
            name=name,
            role=str(m.get("role", "chat")),
            sha256=entry.sha256,
            size=entry.size,
            blob=str(store.path(entry.sha256)),
            # Per-model settings win; the [serve] defaults are what a hardware profile sets.
            n_ctx=int(m.get("n_ctx", cfg.get("serve.n_ctx"))),
            n_gpu_layers=int(m.get("n_gpu_layers", cfg.get("serve.n_gpu_layers"))),
            n_threads=m.get("n_threads"),
            n_batch=m.get("n_batch"),
            chat_format=m.get("chat_format"),
            seed=m.get("seed"),
            extra_args=tuple(str(a) for a in m.get("extra_args", ())),
        ))
    return out


def runtime_argv(m: ServedModel, port: int, common_env: Mapping[str, str]) -> Argv:
    args = [
        sys.executable, "-m", "sovctl.runtime.launch", m.name, "llama_cpp.server",
        "--model", m.blob,
        "--model_alias", m.name,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--n_ctx", str(m.n_ctx),
        "--n_gpu_layers", str(m.n_gpu_layers),
        # Never cut a streaming response short because another request arrived: the gateway
        # queues requests itself, and a silently truncated stream is a lost request.
        "--interrupt_requests", "False",
    ]
    if m.role == "embedding":
        args += ["--embedding", "True"]
    for flag, value in (("--n_threads", m.n_threads), ("--n_batch", m.n_batch),
                        ("--chat_format", m.chat_format), ("--seed", m.seed)):
        if value is not None:
            args += [flag, str(value)]
    args += list(m.extra_args)
    return Argv(args=tuple(args), env=dict(common_env))


def build(
    home: Home,
    cfg: Settings,
    chat: Sequence[str] = (),
    embedding: Sequence[str] = (),
    egress_probe: str | None = None,
) -> Plan:
    host, port = str(cfg.get("serve.host")), int(cfg.get("serve.port"))
    models = served_models(home, cfg, chat, embedding)
    needs_key = not is_loopback(host)
    if needs_key:
        ensure_api_key(home)
    run = home.run
    common_env = {**OFFLINE_ENV, egress.ENV_LOG: str(run / "egress.jsonl")}
    if egress_probe:
        common_env[egress.ENV_PROBE] = egress_probe
    procs = []
    for m in models:
        rport = free_port()
        procs.append(ProcessSpec(
            name=m.name, kind="runtime", argv=runtime_argv(m, rport, common_env), port=rport,
            health_path=RUNTIME_HEALTH_PATH, role=m.role, model=m.name, sha256=m.sha256,
        ))
    routes_file = run / "routes.json"
    gateway = Argv(
        args=(sys.executable, "-m", "sovctl.runtime.launch", "gateway", "sovctl.gateway",
              "--routes", str(routes_file)),
        env=dict(common_env),
    )
    procs.append(ProcessSpec(name="gateway", kind="gateway", argv=gateway, port=port,
                             health_path="/health"))
    supervision = {k.removeprefix("serve."): cfg.get(k) for k in cfg.values
                   if k.startswith("serve.")}
    return Plan(
        host=host, port=port, processes=tuple(procs), models=tuple(models),
        routes_file=str(routes_file), state_file=str(run / "state.json"),
        egress_log=str(run / "egress.jsonl"), logs_dir=str(home.logs),
        api_key_required=needs_key, supervision=supervision,
    )


def routes_table(plan: Plan, home: Home) -> dict[str, Any]:
    """The gateway's one routing table: model name -> where its requests go."""
    return {
        "version": 1,
        "listen": {"host": plan.host, "port": plan.port},
        "auth": {"required": plan.api_key_required,
                 "key_file": str(home.secrets / "api_key")},
        "limits": {k: plan.supervision[k] for k in
                   ("queue_limit", "queue_timeout", "max_body_bytes")},
        "state_file": plan.state_file,
        "routes": [
            {"model": p.model, "role": p.role, "kind": "local", "process": p.name,
             "upstream": f"http://127.0.0.1:{p.port}"}
            for p in plan.processes if p.kind == "runtime"
        ],
    }


def write_routes(plan: Plan, home: Home) -> Path:
    from sovctl.fsutil import atomic_write

    path = Path(plan.routes_file)
    atomic_write(path, json.dumps(routes_table(plan, home), indent=2).encode())
    return path
