"""Hardware profiles: what each one is for, whether it fits this machine, and the best fit.

A profile's [hardware] section names its machine class (accelerator, RAM, one GPU's memory,
cores); it sets nothing. A "24 GB" GPU reports about 23.99 GiB and an "80 GB" one 79.6 GiB, so
a class is met at 95% of its nominal size. Auto choice: among the profiles that fit, a CUDA
profile wins when this llama.cpp build can offload to the GPU, then the largest GPU class,
then the most RAM and cores.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from sovctl import config
from sovctl.config import CostSettings
from sovctl.errors import ConfigError, NotFoundError
from sovctl.home import Home
from sovctl.provision.facts import HostFacts
from sovctl.units import GiB

TOLERANCE = 0.95


@dataclass(frozen=True)
class ProfileModel:
    name: str  # store name
    role: str  # chat | embedding | completion, from its [models.NAME] ("-" if not served)
    ref: str
    revision: str
    sha256: str | None


@dataclass(frozen=True)
class ProfileInfo:
    name: str
    path: str
    shipped: bool
    summary: str
    accelerator: str | None  # cpu | cuda; None: the profile has no [hardware]
    min_ram_gb: float
    min_vram_gb: float
    min_cores: int
    runtime: str
    n_ctx: int
    parallel: int
    n_gpu_layers: int
    n_threads: int
    models: tuple[ProfileModel, ...]
    cost: CostSettings


@dataclass(frozen=True)
class ProfileFit:
    profile: ProfileInfo
    fits: bool
    reasons: tuple[str, ...]  # why it fits, or what is missing
    chosen: bool = False


def _info(home: Home, name: str, path: object, environ: Mapping[str, str] | None
          ) -> ProfileInfo:
    import os

    env = os.environ if environ is None else environ
    # The profile on its own: no sovctl.toml, no SOVCTL_* settings, only where profiles live.
    only = {k: env[k] for k in ("SOVCTL_PROFILES_DIR",) if k in env}
    s = config.load(home, profile=name, environ=only, config_file=False)
    hw = s.hardware
    models = []
    for pname, p in s.pulls.items():
        role = next((m.role or "chat" for m in s.models.values() if m.model == pname), "-")
        models.append(ProfileModel(pname, role, p.ref, p.revision, p.sha256))
    return ProfileInfo(
        name=name, path=str(path), shipped=str(path) == str(config._shipped_profile(name)),
        summary=hw.summary, accelerator=hw.accelerator, min_ram_gb=hw.min_ram_gb,
        min_vram_gb=hw.min_vram_gb, min_cores=hw.min_cores, runtime=s.serve.runtime,
        n_ctx=s.serve.n_ctx, parallel=s.serve.parallel, n_gpu_layers=s.serve.n_gpu_layers,
        n_threads=s.serve.n_threads, models=tuple(models), cost=s.cost,
    )


def list_profiles(home: Home, environ: Mapping[str, str] | None = None) -> list[ProfileInfo]:
    return [_info(home, n, p, environ)
            for n, p in config.available_profiles(home, environ).items()]


def assess(p: ProfileInfo, f: HostFacts) -> ProfileFit:
    if p.accelerator is None:
        return ProfileFit(p, False, ("it names no machine class ([hardware]): choose it by name",))
    ok = True
    why: list[str] = []
    ram = f.ram_total / GiB
    if ram >= p.min_ram_gb * TOLERANCE:
        why.append(f"RAM {ram:.1f} GiB: enough for its {p.min_ram_gb:g} GB")
    else:
        ok = False
        why.append(f"needs {p.min_ram_gb:g} GB of RAM, this machine has {ram:.1f} GiB")
    if p.min_cores:
        if f.physical_cores >= p.min_cores:
            why.append(f"{f.physical_cores} physical cores: enough for its {p.min_cores}")
        else:
            ok = False
            why.append(f"needs {p.min_cores} physical cores, this machine has "
                       f"{f.physical_cores}")
    if p.accelerator == "cuda":
        gpu = max(f.gpus, key=lambda g: g.memory_total, default=None)
        if gpu is None:
            ok = False
            why.append(f"needs an NVIDIA GPU with {p.min_vram_gb:g} GB; none is visible "
                       "through NVML")
        else:
            vram = gpu.memory_total / GiB
            if vram >= p.min_vram_gb * TOLERANCE:
                why.append(f"GPU {gpu.index} ({gpu.name}) has {vram:.1f} GiB: enough for "
                           f"its {p.min_vram_gb:g} GB")
            else:
                ok = False
                why.append(f"needs a GPU with {p.min_vram_gb:g} GB; the largest here "
                           f"({gpu.name}) has {vram:.1f} GiB")
            if f.llama.gpu_offload:
                why.append("this llama.cpp build offloads to it")
            else:
                ok = False
                why.append("this llama.cpp build cannot offload to the GPU (rebuild with "
                           "CUDA: ./scripts/setup with nvcc installed)")
    elif f.usable_gpus:
        why.append("CPU only although a usable GPU is present")
    return ProfileFit(p, ok, tuple(why))


def _rank(fit: ProfileFit) -> tuple[int, float, float, int]:
    p = fit.profile
    return (p.accelerator == "cuda", p.min_vram_gb, p.min_ram_gb, p.min_cores)


def assess_all(home: Home, facts: HostFacts, environ: Mapping[str, str] | None = None
               ) -> list[ProfileFit]:
    fits = [assess(p, facts) for p in list_profiles(home, environ)]
    best = max((f for f in fits if f.fits), key=_rank, default=None)
    return [ProfileFit(f.profile, f.fits, f.reasons, f is best) for f in fits]


def choose(home: Home, facts: HostFacts, environ: Mapping[str, str] | None = None
           ) -> ProfileFit:
    """The best-fitting profile for this machine."""
    fits = assess_all(home, facts, environ)
    chosen = next((f for f in fits if f.chosen), None)
    if chosen is None:
        smallest = min((f for f in fits if f.profile.accelerator == "cpu"),
                       key=lambda f: f.profile.min_ram_gb, default=None)
        raise ConfigError(
            "no profile fits this machine"
            + (f": {smallest.profile.name} {'; '.join(smallest.reasons)}" if smallest else ""),
            hint="choose one anyway with --profile NAME (see 'sovctl profiles'), or write "
            "your own in HOME/profiles/NAME.toml")
    return chosen


def get(home: Home, name: str, facts: HostFacts, environ: Mapping[str, str] | None = None
        ) -> ProfileFit:
    found = config.available_profiles(home, environ)
    if name not in found:
        raise NotFoundError(f"profile {name!r} not found",
                            hint=f"profiles: {', '.join(found)} (see 'sovctl profiles')")
    return assess(_info(home, name, found[name], environ), facts)
