"""Turning configuration into a plan: which processes run, with which argv, on which ports.

A plan is plain data (it is written to disk for a detached supervisor and printed by
--dry-run); nothing here starts a process.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path

from sovctl.apikey import app_keys_path
from sovctl.bench import costs, history
from sovctl.config import ModelSettings, ServeSettings, Settings, parse_duration
from sovctl.engines import AUTO, LLAMA_SERVER, PREFERRED, able, choose, engine
from sovctl.errors import ConfigError, UsageError
from sovctl.fsutil import atomic_write
from sovctl.home import Home
from sovctl.hostinfo import physical_cores
from sovctl.ledger.store import MAX_ROWS, ledger_path
from sovctl.llamacpp import SETUP_HINT, find_binary
from sovctl.net import is_loopback
from sovctl.prices import Price
from sovctl.runtime import egress, memory
from sovctl.runtime import tunnel as public_face
from sovctl.runtime.documents import (
    FRONTIER_PREFIX,
    LOCAL,
    PLAN_SCHEMA,
    PROVIDER,
    AppLimits,
    Limits,
    MemoryBudget,
    ProcessKind,
    Provider,
    Route,
    RoutesTable,
    check_schema,
)
from sovctl.runtime.launch import KEY_FILE_ENV
from sovctl.runtime.ports import free_port
from sovctl.runtime.procs import Argv, ProcessSpec
from sovctl.store import gguf_info
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

# What a supervised process takes from the supervisor's own environment, by name (NAME* is a
# prefix): where the system, the locale and the accelerators are, and nothing else. A secret of
# the operator's shell (HF_TOKEN, a provider's key, SOVCTL_MIRROR_TOKEN) reaches no runtime,
# worker or ssh, where any library it loads could send it on: a child gets this, what its plan
# gives it (Argv.env), and the gateway the provider keys its routes name (inherited_env).
INHERITED_ENV = ("PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "LC_*", "TZ", "TMPDIR",
                 "PYTHONPATH", "VIRTUAL_ENV", "LD_LIBRARY_PATH", "CUDA_*", "NVIDIA_*", "HIP_*",
                 "ROCR_*", "HSA_*", "GPU_DEVICE_ORDINAL", "GGML_*", "OMP_*")
# The tunnel's ssh may need the agent holding the operator's key (one with a passphrase).
SSH_ENV = ("SSH_AUTH_SOCK",)

# n_gpu_layers meaning "all of them", however many the model has.
ALL_LAYERS = 999


@dataclass(frozen=True)
class ServedModel:
    name: str
    role: str  # one of config.MODEL_ROLES: "chat" | "embedding" | "completion" | "rerank"
    sha256: str
    size: int
    blob: str
    runtime: str = LLAMA_SERVER  # its engine's name (sovctl.engines)
    parallel: int = 4  # requests served at once (always 1 on an engine without slots)
    n_ctx: int = 2048  # what one request may use
    n_gpu_layers: int = 0
    n_threads: int = 1
    n_batch: int | None = None
    chat_format: str | None = None
    chat_template: str | None = None  # the path of a Jinja template file
    seed: int | None = None
    extra_args: tuple[str, ...] = ()
    mmproj: str | None = None  # the multimodal projector's blob: the model reads images
    mmproj_sha256: str = ""
    mmproj_size: int = 0
    load: str = "always"  # [models.NAME] load: "always" | "on-demand"
    idle_unload: float = 0.0  # seconds; 0: never
    pin: bool = False  # [models.NAME] pin: never evicted for another model


ON_DEMAND = "on-demand"


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
    supervision: ServeSettings = field(default_factory=ServeSettings)  # [serve]
    notes: tuple[str, ...] = ()  # what the operator should know (a fallback taken)
    tunnel: public_face.Tunnel | None = None  # the public face, when the stack has one
    ledger: str = ""  # the file the gateway records each request in
    ledger_max_rows: int = MAX_ROWS  # [ledger] max_rows
    frontier: tuple[Route, ...] = ()  # the provider routes of [providers.NAME], opted into
    prices: Mapping[str, Price] = field(default_factory=dict)  # local model -> its price
    apps: tuple[AppLimits, ...] = ()  # [apps.NAME]: the limits the gateway holds each app to
    # What the runtimes may hold together; each runtime's estimate is in its ProcessSpec.
    memory: MemoryBudget = field(default_factory=lambda: MemoryBudget(0, "not sized"))

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def to_json(self) -> str:
        """plan.json, as a detached supervisor reads it (PLAN_SCHEMA)."""
        return json.dumps({"schema": PLAN_SCHEMA, **asdict(self)}, indent=2)

    @classmethod
    def from_json(cls, text: str, source: str = "plan.json") -> Plan:
        """The plan `to_json` wrote; a ConfigError for a plan of another version (`source`
        names the file in it)."""
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{source} is not valid JSON: {e}",
                              hint="remove it; the next serve writes it again") from None
        d = dict(check_schema(doc, PLAN_SCHEMA, Path(source)))
        del d["schema"]
        procs = tuple(
            ProcessSpec(**{**p, "kind": ProcessKind(p["kind"]),
                           "argv": Argv(args=tuple(p["argv"]["args"]), env=p["argv"]["env"],
                                        cwd=p["argv"]["cwd"]),
                           "workers": tuple(p["workers"])})
            for p in d.pop("processes")
        )
        models = tuple(ServedModel(**{**m, "extra_args": tuple(m["extra_args"])})
                       for m in d.pop("models"))
        public = d.pop("tunnel")
        return cls(processes=procs, models=models, notes=tuple(d.pop("notes")),
                   tunnel=public_face.Tunnel(**public) if public else None,
                   frontier=tuple(Route.from_dict(r) for r in d.pop("frontier")),
                   prices={k: Price(**v) for k, v in d.pop("prices").items()},
                   apps=tuple(AppLimits.from_dict(a) for a in d.pop("apps")),
                   memory=MemoryBudget(**d.pop("memory")),
                   supervision=ServeSettings.from_dict(d.pop("supervision")), **d)


def _allowed(name: str, allowed: Sequence[str]) -> bool:
    return any(name.startswith(a[:-1]) if a.endswith("*") else name == a for a in allowed)


def inherited_env(spec: ProcessSpec, provider_keys: Sequence[str] = (),
                  environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """What `spec`'s process takes from `environ` (the supervisor's): INHERITED_ENV; besides,
    the gateway the variables of the provider keys (`provider_keys`), the tunnel ssh's agent.
    Its plan's own environment goes on top."""
    env = os.environ if environ is None else environ
    allowed = (*INHERITED_ENV, *(provider_keys if spec.kind == ProcessKind.GATEWAY else ()),
               *(SSH_ENV if spec.kind == ProcessKind.TUNNEL else ()))
    return {k: v for k, v in env.items() if _allowed(k, allowed)}


def supervisor_env(plan: Plan, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """What a detached supervisor keeps of the starting shell's environment: only what one of
    its children may take (inherited_env), so HF_TOKEN and the like are not even held there."""
    env = os.environ if environ is None else environ
    allowed = (*INHERITED_ENV, *SSH_ENV, *provider_keys(plan))
    return {k: v for k, v in env.items() if _allowed(k, allowed)}


def provider_keys(plan: Plan) -> tuple[str, ...]:
    """The variables holding the keys of the plan's provider routes: the gateway's alone."""
    return tuple(r.provider.api_key_env for r in plan.frontier if r.provider is not None)


def _choose_runtime(name: str, wanted: str, binary: Path | None) -> tuple[str, str | None]:
    """(the runtime, a note when auto fell back). `binary`: the native engine's, when found."""
    chosen = choose(wanted, binary is not None)
    if chosen.binary and binary is None:
        raise ConfigError(f"{name}: runtime {chosen.name} is asked for, but no {chosen.binary} "
                          "binary was found", hint=SETUP_HINT)
    if wanted != AUTO or binary is not None:
        return chosen.name, None
    return chosen.name, (f"{name}: {PREFERRED.binary} not found, serving with "
                         f"{chosen.name} (one request at a time); to batch, {SETUP_HINT}")


def shipped_templates() -> list[str]:
    return sorted(p.name.removesuffix(".jinja")
                  for p in (resources.files("sovctl") / "templates").iterdir()
                  if p.name.endswith(".jinja"))


def chat_template_file(name: str, value: str, runtime: str) -> str:
    """A [models.NAME] chat_template: a template shipped with sovctl, or a file of one's own."""
    if not engine(runtime).chat_template_file:
        can = able(lambda e: e.chat_template_file)
        raise ConfigError(f"{name}: chat_template needs the {can} runtime",
                          hint=f"remove it, or set [models.{name}] runtime = \"{can}\"")
    shipped = resources.files("sovctl") / "templates" / f"{value}.jinja"
    if shipped.is_file():
        return str(shipped)  # a wheel installs package data as plain files
    path = Path(value).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"{name}: chat_template {value!r} is neither a template shipped with sovctl nor a file",
            hint=f"shipped templates: {', '.join(shipped_templates())}; or give a .jinja path")
    return str(path.resolve())


def _check_role(home: Home, name: str, role: str, sha256: str, blob: Path
                ) -> gguf_info.GgufFacts | None:
    """Refuse a model in a role its GGUF says it cannot play; its facts when it can."""
    if not blob.exists():
        return None  # the weights check before start refuses it, with the better message
    facts = gguf_info.facts_for(home, sha256, blob, write=False)
    if role == "rerank" and not facts.rerank:
        raise UsageError(
            f"{name} is a {facts.architecture} model without a reranker's head (its GGUF "
            "neither pools by rank nor has a cls.output classifier); it cannot serve rerank",
            hint=f"serve it with --{'embedding' if facts.embedding else 'chat'} {name}, and "
            "pull a reranker GGUF (such as bge-reranker-v2-m3) for --rerank",
        )
    if role != "rerank" and facts.rerank:
        raise UsageError(
            f"{name} is a reranker ({facts.architecture}, it scores query and document pairs); "
            f"it cannot serve {role}",
            hint=f"serve it with --rerank {name} (role = \"rerank\" in its [models.{name}])",
        )
    if role in ("chat", "completion") and facts.embedding:
        raise UsageError(
            f"{name} is an embedding model ({facts.architecture}, it pools its output into one "
            f"vector); it cannot serve {role}",
            hint=f"serve it with --embedding {name}, and a text-generation model with --chat",
        )
    if role == "embedding" and not facts.embedding:
        raise UsageError(
            f"{name} is a {facts.architecture} text-generation model with no pooling; it cannot "
            "serve embeddings",
            hint=f"serve it with --chat {name}, and pull an embedding model (a BERT-style GGUF "
            "such as all-MiniLM-L6-v2) for --embedding",
        )
    return facts


@dataclass(frozen=True)
class Selection:
    models: tuple[ServedModel, ...]
    notes: tuple[str, ...]  # fallbacks the operator should know about
    llama_server: str | None  # the binary, when any model runs on it


def served_models(
    home: Home, cfg: Settings, chat: Sequence[str] = (), embedding: Sequence[str] = (),
    rerank: Sequence[str] = (),
) -> Selection:
    """The models to serve: the flags when any were given, otherwise [models.*] in config."""
    if chat or embedding or rerank:
        # A flag names a store model; settings for it may still come from its config section.
        by_model = {m.model: m for m in cfg.models.values()}
        roles = ([(n, "chat") for n in chat] + [(n, "embedding") for n in embedding]
                 + [(n, "rerank") for n in rerank])
        wanted = [(n, replace(by_model.get(n) or ModelSettings(model=n), role=role))
                  for n, role in roles]
    else:
        wanted = [(m.model, m) for m in cfg.models.values()]
    if not wanted:
        raise UsageError(
            "no models to serve",
            hint="pass --chat NAME, --embedding NAME or --rerank NAME, or add [models.NAME] "
            "sections to "
            f"{home.config_path}",
        )
    lock = Lock.load(home)
    store = BlobStore(home)
    binary: Path | None = None
    # The preferred engine's binary, looked for when any model may run on it.
    if any(choose(m.runtime or cfg.serve.runtime, binary_found=True).binary for _, m in wanted):
        binary = find_binary(PREFERRED.binary, cfg.serve.llama_server)
    threads = cfg.serve.n_threads or physical_cores()
    seen: set[str] = set()
    out: list[ServedModel] = []
    notes: list[str] = []
    for name, m in wanted:
        if name in seen:
            raise ConfigError(f"model {name!r} is listed twice", hint="serve each model once")
        seen.add(name)
        entry = lock.get(name)
        role = m.role or "chat"
        blob = store.path(entry.sha256)
        facts = _check_role(home, name, role, entry.sha256, blob)
        wanted_runtime = m.runtime or cfg.serve.runtime
        runtime, note = _choose_runtime(name, wanted_runtime, binary)
        if note:
            notes.append(note)
        projector = entry.mmproj
        if projector is not None and not engine(runtime).images:
            # llama-cpp-python's server loads a projector only through a per-family chat
            # handler, not from a GGUF projector alone: the image would be dropped silently.
            can = able(lambda e: e.images)
            raise ConfigError(
                f"{name} has a multimodal projector, and vision needs the {can} runtime; "
                f"{name} would run on {runtime}",
                hint=f"set runtime = \"{can}\" in [serve] or [models.{name}] of sovctl.toml"
                if wanted_runtime != AUTO else SETUP_HINT)
        if role == "rerank" and not engine(runtime).reranking:
            can = able(lambda e: e.reranking)
            raise ConfigError(
                f"{name} is served to rerank, and reranking needs the {can} runtime; {name} "
                f"would run on {runtime}, which cannot rerank",
                hint=f"set runtime = \"{can}\" in [serve] or [models.{name}] of sovctl.toml"
                if wanted_runtime != AUTO else SETUP_HINT)
        parallel = cfg.serve.parallel if m.parallel is None else m.parallel
        n_ctx = cfg.serve.n_ctx if m.n_ctx is None else m.n_ctx
        if role in ("embedding", "rerank") and facts and facts.context_length:
            # An encoder cannot look past what it was trained on (512 tokens for MiniLM).
            n_ctx = min(n_ctx, facts.context_length)
        out.append(ServedModel(
            name=name,
            role=role,
            sha256=entry.sha256,
            size=entry.size,
            blob=str(blob),
            runtime=runtime,
            parallel=parallel if engine(runtime).parallel else 1,
            # Per-model settings win; the [serve] defaults are what a hardware profile sets.
            n_ctx=n_ctx,
            n_gpu_layers=cfg.serve.n_gpu_layers if m.n_gpu_layers is None else m.n_gpu_layers,
            n_threads=threads if m.n_threads is None else m.n_threads,
            n_batch=m.n_batch,
            chat_format=m.chat_format,
            chat_template=chat_template_file(name, m.chat_template, runtime)
            if m.chat_template else None,
            seed=m.seed,
            extra_args=m.extra_args,
            mmproj=str(store.path(projector.sha256)) if projector else None,
            mmproj_sha256=projector.sha256 if projector else "",
            mmproj_size=projector.size if projector else 0,
            load=m.load,
            idle_unload=parse_duration(m.idle_unload) or 0.0,
            pin=m.pin,
        ))
    used = any(engine(m.runtime).binary for m in out)
    return Selection(tuple(out), tuple(notes), str(binary) if used and binary else None)


def runtime_argv(m: ServedModel, port: int, common_env: Mapping[str, str], key_file: str,
                 binary: str | None, workers: Sequence[str] = ()) -> Argv:
    """Every runtime starts through sovctl.runtime.launch (death with the supervisor, the
    egress recorder, a scrubbed environment); a native one is exec'd from there."""
    e = engine(m.runtime)
    launch = [sys.executable, "-m", "sovctl.runtime.launch", m.name]
    if e.binary:
        assert binary is not None
        program = [*launch, "--exec", binary]
    else:
        program = [*launch, e.module]
    env = {**common_env, KEY_FILE_ENV: key_file} if e.key_in_env else dict(common_env)
    return Argv(args=(*program, *e.args(m, port, key_file, workers), *m.extra_args), env=env)


def frontier_routes(cfg: Settings) -> tuple[Route, ...]:
    """One route per [providers.NAME]: requests naming "frontier/NAME/MODEL" go there."""
    return tuple(
        Route(model=f"{FRONTIER_PREFIX}{name}", role="chat", kind=PROVIDER, process="",
              upstream=p.base_url.rstrip("/"), runtime="",
              parallel=0,  # the provider admits what it admits; its 429 reaches the client
              key_file=None,
              provider=Provider(
                  name=name, api_key_env=p.api_key_env, daily_cap=p.daily_cap,
                  models=dict(p.models), max_concurrent=p.max_concurrent,
                  max_tokens=p.max_tokens, kind=p.kind))
        for name, p in sorted(cfg.providers.items()))


def local_prices(home: Home, cfg: Settings, models: Sequence[ServedModel]
                 ) -> tuple[dict[str, Price], tuple[str, ...]]:
    """(each benched model's price per Mtok, for the ledger; a note when the bench history
    cannot be read). A model never benched has no price: its requests are recorded unpriced."""
    try:
        runs = history.load(home)
    except ConfigError as e:
        return {}, (f"the ledger records no local cost: {e.message}",)
    prices = {}
    for m in models:
        bench = costs.latest_bench(runs, m.sha256)
        if bench is not None:
            prices[m.name] = costs.local_price(bench, cfg.cost)
    return prices, ()


def clustered_model(cfg: Settings, served: Sequence[tuple[str, str]]) -> str | None:
    """Which of the served (name, role) models the [cluster] workers serve: [cluster] model,
    else the first chat model; None when that is no served chat model."""
    wanted = cfg.cluster.model
    chat = [name for name, role in served if role in ("chat", "completion")]
    return (wanted if wanted in chat else None) if wanted else next(iter(chat), None)


def _cluster(cfg: Settings, models: tuple[ServedModel, ...]
             ) -> tuple[tuple[ServedModel, ...], str, tuple[str, ...], tuple[str, ...]]:
    """(the models, the one using the [cluster] workers, the workers, notes). That model's
    layers are offloaded, or none would reach a worker; llama.cpp splits them over the devices
    by the free memory each reports."""
    workers = cfg.cluster.workers
    if not workers:
        return models, "", (), ()
    wanted = cfg.cluster.model
    name = clustered_model(cfg, [(m.name, m.role) for m in models])
    target = next((m for m in models if m.name == name), None)
    if target is None:
        if wanted:
            raise ConfigError(f"[cluster] model {wanted!r} is not a chat model being served",
                              hint="name a served chat model, or leave model out: the first")
        return models, "", (), ("[cluster] workers are unused: no chat model is served",)
    if target.load == ON_DEMAND:
        raise ConfigError(f"{target.name} uses the [cluster] workers and cannot be loaded on "
                          "demand: a clustered model stays loaded",
                          hint=f"set [models.{target.name}] load = \"always\", or name "
                          "another model in [cluster] model")
    if not engine(target.runtime).rpc_workers:
        can = able(lambda e: e.rpc_workers)
        raise ConfigError(f"{target.name}: [cluster] workers need the {can} runtime",
                          hint=f"set [models.{target.name}] runtime = \"{can}\"")
    notes: tuple[str, ...] = ()
    if target.n_gpu_layers == 0:
        notes = (f"{target.name}: every layer offloaded (n_gpu_layers = {ALL_LAYERS}) to spread "
                 f"it over the workers {', '.join(workers)}",)
        target = replace(target, n_gpu_layers=ALL_LAYERS)
    return (tuple(target if m.name == target.name else m for m in models), target.name, workers,
            notes)


def build(
    home: Home,
    cfg: Settings,
    chat: Sequence[str] = (),
    embedding: Sequence[str] = (),
    egress_probe: str | None = None,
    rerank: Sequence[str] = (),
) -> Plan:
    """Decide what would run. No side effects: nothing is written, no key is created (the
    caller creates the API key when `api_key_required` and it is about to start)."""
    host, port = cfg.serve.host, cfg.serve.port
    selection = served_models(home, cfg, chat, embedding, rerank)
    run = home.run
    common_env = {**OFFLINE_ENV, egress.ENV_LOG: str(run / "egress.jsonl")}
    if egress_probe:
        common_env[egress.ENV_PROBE] = egress_probe
    procs = []
    models, clustered, workers_all, cluster_notes = _cluster(cfg, selection.models)
    budget = memory.budget(cfg.serve)
    needs = _sized(models, clustered, budget)
    for m in models:
        rport = free_port()
        key_file = str(run / "keys" / f"{m.name}.key")
        workers = workers_all if m.name == clustered else ()
        need = needs.get(m.name, memory.Need(0, 0))
        procs.append(ProcessSpec(
            name=m.name, kind=ProcessKind.RUNTIME, argv=runtime_argv(m, rport, common_env, key_file,
                                                               selection.llama_server, workers),
            port=rport, health_path=engine(m.runtime).health_path, role=m.role, model=m.name,
            sha256=m.sha256, runtime=m.runtime, key_file=key_file, workers=workers,
            load=m.load, idle_unload=m.idle_unload, pin=m.pin, memory=need.ram,
            vram=need.vram,
        ))
    routes_file = run / "routes.json"
    gateway = Argv(
        args=(sys.executable, "-m", "sovctl.runtime.launch", "gateway", "sovctl.gateway",
              "--routes", str(routes_file)),
        env=dict(common_env),
    )
    procs.append(ProcessSpec(name="gateway", kind=ProcessKind.GATEWAY, argv=gateway, port=port,
                             health_path="/health"))
    public = public_face.from_settings(home, cfg)
    if public is not None:
        procs.append(public_face.process(public, host, port, common_env))
    prices, price_notes = local_prices(home, cfg, models)
    return Plan(
        host=host, port=port, processes=tuple(procs), models=models,
        routes_file=str(routes_file), state_file=str(run / "state.json"),
        egress_log=str(run / "egress.jsonl"), logs_dir=str(home.logs),
        # A tunnel is a public face: the gateway requires the key even on loopback.
        api_key_required=not is_loopback(host) or public is not None, supervision=cfg.serve,
        notes=selection.notes + cluster_notes + price_notes, tunnel=public,
        ledger=str(ledger_path(home)), frontier=frontier_routes(cfg), prices=prices,
        ledger_max_rows=cfg.ledger.max_rows, memory=budget,
        apps=tuple(AppLimits(name, **asdict(a)) for name, a in sorted(cfg.apps.items())),
    )


def _sized(models: Sequence[ServedModel], clustered: str | None, budget: MemoryBudget
           ) -> dict[str, memory.Need]:
    """Each runtime's memory by the plan's estimate, refused here (before anything starts) when
    the budget could never hold it. A clustered runtime is not counted: its layers are on the
    workers, and `sovctl plan` sizes its split; a blob missing is refused by the weights check."""
    sized = [memory.Sized(m.name, memory.need(Path(m.blob), m.name, m.n_ctx, m.parallel,
                                              m.n_gpu_layers, budget.vram > 0, m.mmproj_size),
                          always=m.load != ON_DEMAND)
             for m in models if m.name != clustered and Path(m.blob).exists()]
    memory.admit(sized, budget)
    return {s.name: s.need for s in sized}


def routes_table(plan: Plan, home: Home) -> RoutesTable:
    """The gateway's one routing table: model name -> where its requests go."""
    by_name = {m.name: m for m in plan.models}
    return RoutesTable(
        host=plan.host,
        port=plan.port,
        auth_required=plan.api_key_required,
        key_file=str(home.secrets / "api_key"),
        limits=Limits.from_dict(asdict(plan.supervision)),
        state_file=plan.state_file,
        routes=tuple(
            Route(model=p.model, role=p.role, kind=LOCAL, process=p.name,
                  upstream=f"http://127.0.0.1:{p.port}", runtime=p.runtime,
                  parallel=by_name[p.model].parallel, key_file=p.key_file,
                  vision=by_name[p.model].mmproj is not None, price=plan.prices.get(p.model),
                  on_demand=p.load == ON_DEMAND)
            for p in plan.processes if p.kind == ProcessKind.RUNTIME
        ) + plan.frontier,
        ledger=plan.ledger, ledger_max_rows=plan.ledger_max_rows,
        app_keys_file=str(app_keys_path(home)), apps=plan.apps, home=str(home.root),
    )


def write_runtime_keys(plan: Plan) -> None:
    """A fresh internal key per runtime, at each start, readable by the owner only: with it
    the gateway reaches the runtime; without it, a local user who finds the port gets 401."""
    import secrets


    for p in plan.processes:
        if p.key_file:
            d = Path(p.key_file).parent
            d.mkdir(parents=True, exist_ok=True)
            os.chmod(d, 0o700)
            atomic_write(Path(p.key_file), (secrets.token_urlsafe(32) + "\n").encode(),
                         mode=0o600)


def write_routes(plan: Plan, home: Home) -> Path:
    path = Path(plan.routes_file)
    routes_table(plan, home).write(path)
    return path
