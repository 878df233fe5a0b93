"""`sovctl up`: from nothing to a verified, supervised, OpenAI-compatible stack, in one command.

Each step is the code path of its own command, called here, never run as a subprocess: init
(when there is no sovctl.toml), pull of every [pull.NAME] (verified as it arrives), plan of
every served model against this machine, then serve --detach and a wait for /ready.

Idempotent and resumable: a running stack is reported as it is; `pull` of a pinned name is a
no-op and an interrupted download resumes; a sovctl.toml written by an earlier run is kept.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from dataclasses import dataclass

from sovctl import config, sizing
from sovctl.apikey import read_api_key
from sovctl.config import ModelSettings, ServeSettings, Settings
from sovctl.errors import ConfigError, NotFoundError, RuntimeStartError, UsageError
from sovctl.home import Home
from sovctl.ops import stack
from sovctl.provision import planning
from sovctl.provision.facts import HostFacts, detect
from sovctl.provision.init import InitResult, init
from sovctl.provision.planning import DoesNotFit
from sovctl.runtime import control
from sovctl.runtime.documents import ProcessKind, ProcessState, Status
from sovctl.runtime.plan import build
from sovctl.sizing import Fit
from sovctl.store.blobs import BlobStore
from sovctl.store.lock import Lock
from sovctl.store.pull import ProgressFactory, pull


@dataclass(frozen=True)
class Pulled:
    name: str
    action: str  # what `sovctl pull` did: downloaded | resumed | imported | linked | already-pinned
    ref: str
    sha256: str
    size: int
    commit: str


@dataclass(frozen=True)
class Examples:
    curl: str
    python: str


@dataclass(frozen=True)
class UpResult:
    already_running: bool
    url: str
    api_key_required: bool
    api_key_file: str | None  # where the key is, when clients need one
    api_key_created: bool
    initialised: InitResult | None
    profile: str | None
    pulled: tuple[Pulled, ...]
    fits: tuple[Fit, ...]
    processes: tuple[ProcessState, ...]
    notes: tuple[str, ...]
    examples: Examples


def _client_base(url: str) -> str:
    """The base URL a client on this machine uses (a wildcard bind is reached on loopback)."""
    for wildcard, local in (("//0.0.0.0:", "//127.0.0.1:"), ("//[::]:", "//[::1]:")):
        url = url.replace(wildcard, local)
    return url


def examples(url: str, models: list[tuple[str, str]], key_file: str | None) -> Examples:
    base = _client_base(url)
    chat = next((n for n, r in models if r == "chat"), None)
    embed = next((n for n, r in models if r == "embedding"), None)
    auth = f" \\\n  -H \"authorization: Bearer $(cat {key_file})\"" if key_file else ""
    curl, py = [], ["from openai import OpenAI", "",
                    f"client = OpenAI(base_url=\"{base}\", api_key="
                    + (f"open(\"{key_file}\").read().strip())" if key_file else "\"unused\")")]
    if chat:
        curl.append(f"curl -s {base}/chat/completions -H 'content-type: application/json'"
                    f"{auth} \\\n  -d '{{\"model\": \"{chat}\", \"messages\": [{{\"role\": "
                    "\"user\", \"content\": \"Hello!\"}]}'")
        py += [f"reply = client.chat.completions.create(model=\"{chat}\", messages=["
               "{\"role\": \"user\", \"content\": \"Hello!\"}])",
               "print(reply.choices[0].message.content)"]
    if embed:
        curl.append(f"curl -s {base}/embeddings -H 'content-type: application/json'{auth} "
                    f"\\\n  -d '{{\"model\": \"{embed}\", \"input\": \"Hello!\"}}'")
        py += [f"vector = client.embeddings.create(model=\"{embed}\", input=\"Hello!\")"
               ".data[0].embedding", "print(len(vector))"]
    if not chat and not embed:
        curl.append(f"curl -s {base}/models{auth}")
    return Examples("\n".join(curl), "\n".join(py))


def wait_ready(url: str, key: str | None, timeout: float) -> None:
    import httpx

    ready = _client_base(url).removesuffix("/v1") + "/ready"
    headers = {"authorization": f"Bearer {key}"} if key else {}
    deadline = time.monotonic() + timeout
    last = "no answer"
    while True:
        try:
            r = httpx.get(ready, headers=headers, timeout=5)
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}: {r.text[:200]}"
        except httpx.HTTPError as e:
            last = f"{type(e).__name__}: {e}"
        if time.monotonic() > deadline:
            raise RuntimeStartError(f"the stack is running but {ready} is not ready after "
                                    f"{timeout:.0f}s ({last})",
                                    hint="see 'sovctl status' and 'sovctl logs NAME'")
        time.sleep(0.25)


def _served(cfg: Settings) -> list[tuple[str, str, ModelSettings]]:
    """(store name, role, section) of each [models.*] to serve."""
    return [(m.model, m.role or "chat", m) for m in cfg.models.values()]


def _pull_all(home: Home, cfg: Settings, progress: ProgressFactory | None, token: str | None
              ) -> list[Pulled]:
    out = []
    for name, p in cfg.pulls.items():
        r = pull(home, p.ref, name=name, revision=p.revision,
                 sha256=p.sha256, endpoint=cfg.hub.endpoint,
                 progress=progress, token=token)
        out.append(Pulled(r.name, r.action, r.entry.ref, r.entry.sha256, r.entry.size,
                          r.entry.commit))
    return out


def _fitted(cfg: Settings, fits: list[Fit]) -> Settings:
    """The settings with each model's slots, context and GPU layers set to what fits."""
    by_model = {f.model: f for f in fits}
    models: dict[str, ModelSettings] = {}
    for key, m in cfg.models.items():
        f = by_model.get(m.model)
        models[key] = m if f is None else dataclasses.replace(
            m, n_ctx=f.n_ctx, parallel=f.parallel, n_gpu_layers=f.n_gpu_layers)
    return dataclasses.replace(cfg, models=models)


def _already_up(home: Home, st: control.StackStatus, url: str, timeout: float) -> UpResult:
    failed = [p.name for p in st.processes if p.status == Status.FAILED]
    if failed:
        raise RuntimeStartError(
            f"a stack runs from this home, but {', '.join(failed)} failed and stay down",
            hint=f"see 'sovctl logs {failed[0]}'; then 'sovctl stop' and 'sovctl up' again")
    key = read_api_key(home) if st.api_key_required else None
    wait_ready(url, key, timeout)
    models = [(p.model, p.role) for p in st.processes if p.kind == ProcessKind.RUNTIME]
    key_file = str(home.secrets / "api_key") if st.api_key_required else None
    return UpResult(True, url, st.api_key_required, key_file, False, None, None, (), (),
                    st.processes, (), examples(url, models, key_file))


def up(
    home: Home,
    *,
    profile: str = "auto",
    ram: int | None = None,
    vram: int | None = None,
    endpoint: str | None = None,
    token: str | None = None,
    progress: ProgressFactory | None = None,
    facts: HostFacts | None = None,
    environ: Mapping[str, str] | None = None,
) -> UpResult:
    st = control.status(home)
    if st.running and st.url:
        try:
            timeout = config.load(home, environ=environ).serve.start_timeout
        except ConfigError:  # the stack runs on what it was started with; report it
            timeout = ServeSettings().start_timeout
        return _already_up(home, st, st.url, timeout)

    notes: list[str] = []
    facts = facts or detect(home)
    initialised = None
    if not home.config_path.exists():
        initialised = init(home, profile, facts=facts, environ=environ)
    elif profile != "auto":
        notes.append(f"{home.config_path} exists, so --profile {profile} was not applied "
                     "(sovctl init --force --profile NAME replaces the file)")
    cfg = config.load(home, flags={"hub.endpoint": endpoint}, environ=environ)
    served = _served(cfg)
    if not served:
        raise UsageError("nothing to serve: no [models.NAME] section in the profile or "
                         f"{home.config_path}",
                         hint="add [pull.NAME] (ref = ...) and [models.NAME] (role = \"chat\") "
                         "sections, or choose a shipped profile: sovctl init --force")
    pulled = _pull_all(home, cfg, progress, token)

    lock = Lock.load(home)
    store = BlobStore(home)
    budget = planning.budget(facts, ram, vram, cfg.serve.memory_limit)
    wanted = []
    for name, role, section in served:
        if name not in lock.entries:
            raise NotFoundError(f"{name} is to be served but is not in the store, and no "
                                f"[pull.{name}] says where to get it",
                                hint=f"add [pull.{name}] ref = \"hf://ORG/REPO/FILE.gguf\" to "
                                f"{home.config_path}, or run: sovctl pull REF --name {name}")
        shape = planning.local_shape(store.path(lock.entries[name].sha256), name)
        wanted.append((name, role, shape,
                       planning.want_for(cfg, section, facts, budget.gpus > 0)))
    fits, _ = sizing.fit_all(wanted, budget)
    refused = [f for f in fits if not f.fits]
    if refused:
        raise DoesNotFit(
            "; ".join(sizing.refusal(f, budget) for f in refused),
            hint="serve a smaller model or quantization (edit [pull.*] and [models.*] in "
            f"{home.config_path}), or free memory; 'sovctl plan NAME' shows the numbers")
    for f in fits:
        notes += [f"{f.model}: {n}" for n in f.notes]

    plan = build(home, _fitted(cfg, fits))
    notes += plan.notes
    admitted, started = stack.start(home, plan)
    wait_ready(plan.url, admitted.api_key, cfg.serve.start_timeout)
    key_file = str(admitted.api_key_file) if admitted.api_key_file else None
    return UpResult(
        already_running=False, url=plan.url, api_key_required=plan.api_key_required,
        api_key_file=key_file, api_key_created=admitted.api_key_created, initialised=initialised,
        profile=cfg.profile, pulled=tuple(pulled), fits=tuple(fits),
        processes=started.processes, notes=tuple(notes),
        examples=examples(plan.url, [(m.name, m.role) for m in plan.models], key_file),
    )
