"""`sovctl plan NAME|REF`: find the model's GGUF header (the store, a local file, or only the
header's bytes from the Hub), and fit it to this machine's memory with the configured slots; for
the model the [cluster] workers serve, also split it over the workers' memory, as they report
it now."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from sovctl import sizing
from sovctl.config import ModelSettings, Settings
from sovctl.engines import choose
from sovctl.errors import CheckFailed, UsageError
from sovctl.home import Home
from sovctl.provision.facts import HostFacts
from sovctl.runtime import cluster
from sovctl.runtime.plan import clustered_model
from sovctl.sizing import Budget, ClusterFit, Device, Fit, Want
from sovctl.store import header as gguf
from sovctl.store import hub, refs
from sovctl.store.blobs import BlobStore
from sovctl.store.gguf_info import is_reranker
from sovctl.store.lock import Lock
from sovctl.units import parse_size

# A worker answers its HELLO in milliseconds; one that does not within this is down or busy.
PROBE_TIMEOUT = 3.0


@dataclass(frozen=True)
class Target:
    name: str
    origin: str  # "store" | "pull" (a [pull.NAME] not pulled yet) | "file" | "hub" | "url"
    location: str  # the file, or the URL its header was read from
    commit: str | None
    file_size: int
    fetched_bytes: int  # bytes of it that crossed the network (the header; 0 when local)
    requests: int  # HTTP range requests (0 for a local file)


@dataclass(frozen=True)
class ClusterPlan:
    workers: tuple[str, ...]  # [cluster] workers, as configured
    lost: tuple[cluster.WorkerHealth, ...]  # no answer: left out, as serve would start without
    fit: ClusterFit


@dataclass(frozen=True)
class PlanResult:
    target: Target
    fit: Fit  # this machine alone
    budget: Budget
    facts: HostFacts
    cluster: ClusterPlan | None = None  # when the [cluster] workers serve this model


class DoesNotFit(CheckFailed):
    """A model needs more memory than this machine has to give it."""


def _target(name: str, origin: str, location: str, commit: str | None, h: gguf.ModelHeader
            ) -> Target:
    return Target(name, origin, location, commit, h.file_size, h.fetched_bytes, h.requests)


def _remote(text: str, ref: Any, revision: str, endpoint: str, token: str | None,
            have: list[str]) -> tuple[Target, gguf.ModelHeader]:
    if isinstance(ref, refs.Url):
        h = gguf.read_remote(ref.url, text, None)  # a plain URL: no token goes to it
        return _target(text, "url", ref.url, None, h), h
    sent = hub.credential(endpoint, token)  # HF_TOKEN to the Hub alone, as pull sends it
    res = hub.resolve(endpoint, ref.repo, revision,
                      path=ref.path if isinstance(ref, refs.HubFile) else None,
                      quant=ref.quant if isinstance(ref, refs.HubQuant) else None, have=have,
                      token=sent)
    h = gguf.read_remote(res.url, f"{res.repo}/{res.path}@{res.commit[:12]}", res.size, sent)
    return _target(text, "hub", res.url, res.commit, h), h


def read_target(home: Home, cfg: Settings, text: str, *, revision: str | None = None,
                token: str | None = None) -> tuple[Target, gguf.ModelHeader]:
    """NAME (pinned in the store, or a [pull.NAME] not fetched yet) or REF (a path, hf://...,
    ORG/REPO:QUANT, an https URL) -> the model's header."""
    lock = Lock.load(home)
    endpoint = cfg.hub.endpoint
    if text in lock.entries:
        e = lock.entries[text]
        blob = BlobStore(home).path(e.sha256)
        h = gguf.read_local(blob, label=text)
        return _target(text, "store", str(blob), e.commit or None, h), h
    have = sorted(lock.entries)
    if text in cfg.pulls:
        p = cfg.pulls[text]
        ref = refs.parse_ref(p.ref)
        if isinstance(ref, refs.LocalFile):
            h = gguf.read_local(ref.path, label=text)
            return _target(text, "pull", str(ref.path), None, h), h
        t, h = _remote(text, ref, revision or p.revision, endpoint, token, have)
        return _target(text, "pull", t.location, t.commit, h), h
    ref = refs.parse_ref(text)
    if isinstance(ref, refs.LocalFile):
        h = gguf.read_local(ref.path)
        return _target(text, "file", str(ref.path), None, h), h
    return _remote(text, ref, revision or "main", endpoint, token, have)


def model_section(cfg: Settings, name: str) -> ModelSettings:
    """The [models.*] section that serves store name `name` (one that sets nothing when none
    does)."""
    return next((m for m in cfg.models.values() if m.model == name), ModelSettings(model=name))


def want_for(cfg: Settings, section: ModelSettings, facts: HostFacts, gpu: bool,
             n_ctx: int | None = None, parallel: int | None = None) -> Want:
    """What the configuration asks for one model; a runtime without slots serves one at once.
    GPU layers nobody set (the built-in default) are as many as fit where there is a GPU."""
    runtime = section.runtime or cfg.serve.runtime
    slots = cfg.serve.parallel if section.parallel is None else section.parallel
    if not choose(runtime, binary_found=bool(facts.llama.llama_server)).parallel:
        slots = 1
    if section.n_gpu_layers is not None:
        layers = section.n_gpu_layers
    elif cfg.source("serve.n_gpu_layers") != "default":
        layers = cfg.serve.n_gpu_layers
    else:
        layers = -1 if gpu else 0
    return Want(
        n_ctx=n_ctx or (cfg.serve.n_ctx if section.n_ctx is None else section.n_ctx),
        parallel=parallel or slots,
        n_gpu_layers=layers,
    )


def budget(facts: HostFacts, ram: int | None = None, vram: int | None = None,
           memory_limit: str = "") -> Budget:
    """The memory to plan with: --ram, else [serve] memory_limit (the budget the stack's
    runtimes are admitted under, taken whole), else what is available now."""
    if ram is not None:
        ram_bytes, ram_src = ram, "from --ram"
    elif memory_limit:
        return _with_vram(facts, vram, Budget(parse_size(memory_limit), "[serve] memory_limit",
                                              0, "", 0, headroom=0.0))
    else:
        ram_bytes, ram_src = facts.ram_available, "available now"
    return _with_vram(facts, vram, Budget(ram_bytes, ram_src, 0, "", 0))


def _with_vram(facts: HostFacts, vram: int | None, b: Budget) -> Budget:
    if vram is not None:
        return replace(b, vram_bytes=vram, vram_source="from --vram", gpus=1 if vram > 0 else 0)
    gpus = facts.usable_gpus
    return replace(b, vram_bytes=sum(g.memory_free for g in gpus), vram_source=facts.vram_note,
                   gpus=len(gpus))


def parse_worker_memory(values: Sequence[str]) -> dict[str, int]:
    """--worker-memory ENDPOINT=SIZE, repeated -> {endpoint: bytes}."""
    out = {}
    for value in values:
        endpoint, sep, size = value.rpartition("=")
        if not sep or not endpoint:
            raise UsageError(f"--worker-memory {value!r} is not ENDPOINT=SIZE",
                             hint="write e.g. --worker-memory 10.0.0.2:50052=24GiB")
        out[endpoint] = parse_size(size)
    return out


def _head_gpus(facts: HostFacts, vram: int | None) -> list[Device]:
    if vram is not None:
        return [Device("head GPU", vram, sizing.VRAM_OVERHEAD, "from --vram")] if vram else []
    return [Device(f"head GPU {g.index}", g.memory_free, sizing.VRAM_OVERHEAD, "free, NVML")
            for g in facts.usable_gpus]


def plan_cluster(cfg: Settings, name: str, shape: sizing.ModelShape, want: Want,
                 facts: HostFacts, head: Budget, vram: int | None = None,
                 worker_memory: Mapping[str, int] | None = None) -> ClusterPlan | None:
    """The split of `name` over the [cluster] workers (each probed now, unless --worker-memory
    gives its free memory) and the head's GPUs; None when the workers do not serve it."""
    workers = cfg.cluster.workers
    given = dict(worker_memory or {})
    if unknown := [w for w in given if w not in workers]:
        raise UsageError(f"--worker-memory names {', '.join(unknown)}, not a [cluster] worker",
                         hint=f"[cluster] workers: {', '.join(workers) or 'none'}")
    # With no [models] sections, serve takes its models from its flags: this one, as planned.
    served = [(m.model, m.role or "chat") for m in cfg.models.values()
              ] or [(name, "embedding" if shape.embedding else "chat")]
    if not workers or clustered_model(cfg, served) != name:
        if given:
            raise UsageError(f"--worker-memory sizes the [cluster] split, and the workers do not "
                             f"serve {name}",
                             hint="plan the model that [cluster] model names (default: the "
                             "first chat model of [models])")
        return None
    asked = [w for w in workers if w not in given]
    with ThreadPoolExecutor(max_workers=max(len(asked), 1)) as pool:
        health = dict(zip(asked, pool.map(lambda w: cluster.probe_worker(w, PROBE_TIMEOUT),
                                          asked), strict=True))
    devices = []
    for w in workers:
        if w in given:
            devices.append(Device(w, given[w], source="from --worker-memory"))
        elif health[w].ok:
            own = health[w].devices
            devices += [Device(w if len(own) == 1 else f"{w}#{i}", free,
                               source="free, as the worker reports")
                        for i, (free, _) in enumerate(own)]
    devices += _head_gpus(facts, vram)
    return ClusterPlan(workers, tuple(h for h in health.values() if not h.ok),
                       sizing.fit_cluster(name, shape, want, devices, head))


def plan(home: Home, cfg: Settings, text: str, facts: HostFacts, *, ram: int | None = None,
         vram: int | None = None, n_ctx: int | None = None, parallel: int | None = None,
         gpu_layers: int | None = None, revision: str | None = None, token: str | None = None,
         worker_memory: Mapping[str, int] | None = None) -> PlanResult:
    target, header = read_target(home, cfg, text, revision=revision, token=token)
    if header.get("general.type") == "mmproj" or header.get("general.architecture") == "clip":
        raise UsageError(f"{text} is a multimodal projector, not a model a runtime serves on "
                         "its own", hint="plan the language model it belongs to")
    shape = sizing.shape_of(header)
    section = model_section(cfg, text)
    arch = str(header.get("general.architecture") or "")
    reranker = is_reranker(arch, header.metadata, {t.name for t in header.tensors})
    role = section.role or ("rerank" if reranker else "embedding" if shape.embedding
                            else "chat")
    b = budget(facts, ram, vram, cfg.serve.memory_limit)
    want = want_for(cfg, section, facts, b.gpus > 0, n_ctx, parallel)
    if gpu_layers is not None:
        want = Want(want.n_ctx, want.parallel, gpu_layers)
    return PlanResult(target, sizing.fit(text, role, shape, want, b), b, facts,
                      plan_cluster(cfg, text, shape, want, facts, b, vram, worker_memory))


def local_shape(path: Path, label: str) -> sizing.ModelShape:
    return sizing.shape_of(gguf.read_local(path, label=label))
