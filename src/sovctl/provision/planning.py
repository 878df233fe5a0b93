"""`sovctl plan NAME|REF`: find the model's GGUF header (the store, a local file, or only the
header's bytes from the Hub), and fit it to this machine's memory with the configured slots."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sovctl.config import Settings
from sovctl.errors import CheckFailed, UsageError
from sovctl.home import Home
from sovctl.provision import header as gguf
from sovctl.provision import sizing
from sovctl.provision.facts import HostFacts
from sovctl.provision.sizing import Budget, Fit, Want


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
class PlanResult:
    target: Target
    fit: Fit
    budget: Budget
    facts: HostFacts


class DoesNotFit(CheckFailed):
    """A model needs more memory than this machine has to give it."""


def _target(name: str, origin: str, location: str, commit: str | None, h: gguf.ModelHeader
            ) -> Target:
    return Target(name, origin, location, commit, h.file_size, h.fetched_bytes, h.requests)


def _remote(text: str, ref: Any, revision: str, endpoint: str, token: str | None,
            have: list[str]) -> tuple[Target, gguf.ModelHeader]:
    from sovctl.store import hub, refs

    if isinstance(ref, refs.Url):
        h = gguf.read_remote(ref.url, text, None)  # a plain URL: no token goes to it
        return _target(text, "url", ref.url, None, h), h
    res = hub.resolve(endpoint, ref.repo, revision,
                      path=ref.path if isinstance(ref, refs.HubFile) else None,
                      quant=ref.quant if isinstance(ref, refs.HubQuant) else None, have=have)
    h = gguf.read_remote(res.url, f"{res.repo}/{res.path}@{res.commit[:12]}", res.size, token)
    return _target(text, "hub", res.url, res.commit, h), h


def read_target(home: Home, cfg: Settings, text: str, *, revision: str | None = None,
                token: str | None = None) -> tuple[Target, gguf.ModelHeader]:
    """NAME (pinned in the store, or a [pull.NAME] not fetched yet) or REF (a path, hf://...,
    ORG/REPO:QUANT, an https URL) -> the model's header."""
    from sovctl.store import refs
    from sovctl.store.blobs import BlobStore
    from sovctl.store.lock import Lock

    lock = Lock.load(home)
    endpoint = str(cfg.get("hub.endpoint"))
    if text in lock.entries:
        e = lock.entries[text]
        blob = BlobStore(home).path(e.sha256)
        h = gguf.read_local(blob, label=text)
        return _target(text, "store", str(blob), e.commit or None, h), h
    have = sorted(lock.entries)
    if text in cfg.pulls:
        p = cfg.pulls[text]
        ref = refs.parse_ref(str(p["ref"]))
        if isinstance(ref, refs.LocalFile):
            h = gguf.read_local(ref.path, label=text)
            return _target(text, "pull", str(ref.path), None, h), h
        t, h = _remote(text, ref, revision or str(p.get("revision", "main")), endpoint, token,
                       have)
        return _target(text, "pull", t.location, t.commit, h), h
    ref = refs.parse_ref(text)
    if isinstance(ref, refs.LocalFile):
        h = gguf.read_local(ref.path)
        return _target(text, "file", str(ref.path), None, h), h
    return _remote(text, ref, revision or "main", endpoint, token, have)


def model_section(cfg: Settings, name: str) -> Mapping[str, Any]:
    """The [models.*] section that serves store name `name` (empty when none does)."""
    return next((m for k, m in cfg.models.items() if m.get("model", k) == name), {})


def want_for(cfg: Settings, section: Mapping[str, Any], facts: HostFacts, gpu: bool,
             n_ctx: int | None = None, parallel: int | None = None) -> Want:
    """What the configuration asks for one model; a runtime without slots serves one at once.
    GPU layers nobody set (the built-in default) are as many as fit where there is a GPU."""
    runtime = str(section.get("runtime", cfg.get("serve.runtime")))
    slots = int(section.get("parallel", cfg.get("serve.parallel")))
    if runtime == "llama-cpp-python" or (runtime == "auto" and not facts.llama.llama_server):
        slots = 1
    if "n_gpu_layers" in section:
        layers = int(section["n_gpu_layers"])
    elif cfg.source("serve.n_gpu_layers") != "default":
        layers = int(cfg.get("serve.n_gpu_layers"))
    else:
        layers = -1 if gpu else 0
    return Want(
        n_ctx=n_ctx or int(section.get("n_ctx", cfg.get("serve.n_ctx"))),
        parallel=parallel or slots,
        n_gpu_layers=layers,
    )


def budget(facts: HostFacts, ram: int | None = None, vram: int | None = None) -> Budget:
    if ram is not None:
        ram_bytes, ram_src = ram, "from --ram"
    else:
        ram_bytes, ram_src = facts.ram_available, "available now"
    if vram is not None:
        return Budget(ram_bytes, ram_src, vram, "from --vram", 1 if vram > 0 else 0)
    gpus = facts.usable_gpus
    return Budget(ram_bytes, ram_src, sum(g.memory_free for g in gpus), facts.vram_note,
                  len(gpus))


def plan(home: Home, cfg: Settings, text: str, facts: HostFacts, *, ram: int | None = None,
         vram: int | None = None, n_ctx: int | None = None, parallel: int | None = None,
         gpu_layers: int | None = None, revision: str | None = None, token: str | None = None
         ) -> PlanResult:
    target, header = read_target(home, cfg, text, revision=revision, token=token)
    if header.get("general.type") == "mmproj" or header.get("general.architecture") == "clip":
        raise UsageError(f"{text} is a multimodal projector, not a model a runtime serves on "
                         "its own", hint="plan the language model it belongs to")
    shape = sizing.shape_of(header)
    section = model_section(cfg, text)
    role = str(section.get("role", "embedding" if shape.embedding else "chat"))
    b = budget(facts, ram, vram)
    want = want_for(cfg, section, facts, b.gpus > 0, n_ctx, parallel)
    if gpu_layers is not None:
        want = Want(want.n_ctx, want.parallel, gpu_layers)
    return PlanResult(target, sizing.fit(text, role, shape, want, b), b, facts)


def local_shape(path: Path, label: str) -> sizing.ModelShape:
    return sizing.shape_of(gguf.read_local(path, label=label))
