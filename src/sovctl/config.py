"""Layered configuration: defaults < profile < sovctl.toml < SOVCTL_* environment < flags.

Every value remembers which layer set it, so commands can tell an explicit choice from a
default (a flag the operator typed outranks everything; a default may be overridden freely).
Loading has no side effects: nothing is written, nothing is created.

Each section is a frozen dataclass (`ServeSettings`, ...), the one home of its keys, their
types and defaults; `load` checks every layer against them and builds the sections once, so a
command reads `cfg.serve.port` as an int, and `cfg.source("serve.port")` says where it came from.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from types import UnionType
from typing import Any, Self, TypeVar, Union, get_args, get_origin, get_type_hints
from urllib.parse import urlsplit

from sovctl.apikey import APP_NAME, OTHER_APP
from sovctl.engines import AUTO, RUNTIME_CHOICES
from sovctl.errors import ConfigError, UsageError
from sovctl.home import Home
from sovctl.names import check_name, is_sha256_hex
from sovctl.net import ip_literal
from sovctl.prices import Price
from sovctl.units import parse_size

# -- the sections ---------------------------------------------------------------------------------
# Each [section] is one frozen dataclass, the one home of its keys: a field is a key, its type
# what a value must be (an environment string is converted to it; a list is a tuple here, and
# SOVCTL_SECTION__KEY takes it comma-separated), its default the built-in layer.


@dataclass(frozen=True)
class HubSettings:
    endpoint: str = "https://huggingface.co"


@dataclass(frozen=True)
class ServeSettings:
    host: str = "127.0.0.1"
    port: int = 8088
    # An engine of sovctl.engines (llama-server: llama.cpp's own server, batching over
    # parallel slots; llama-cpp-python: one request at a time), or auto: llama-server where
    # installed
    runtime: str = AUTO
    llama_server: str = ""  # path of the llama-server binary; "" = the one setup built
    parallel: int = 4  # requests a llama-server runtime serves at once (its -np slots)
    n_threads: int = 0  # threads per runtime; 0 = the machine's physical cores
    n_ctx: int = 2048  # context one request may use, unless its [models.NAME] says
    n_gpu_layers: int = 0  # layers offloaded to the GPU unless [models.NAME] says (-1: all)
    queue_limit: int = 16  # requests waiting per runtime before the gateway answers 429
    queue_timeout: float = 120.0  # seconds a request may wait for its runtime before 503
    # seconds a request for an unloaded (load = "on-demand") model may wait for it to load
    load_timeout: float = 120.0
    # The memory the stack's runtimes may hold together, as the plan estimates each ("600MiB",
    # "8GiB"); "" = what is available when the stack starts, less memory_reserve. A runtime
    # loaded on demand is admitted under it by unloading idle ones, least recently used first.
    memory_limit: str = ""
    memory_reserve: str = "1GiB"  # kept free for the rest of the machine when memory_limit is ""
    # seconds a runtime replaced by `upgrade --apply` or `rollback` may take to finish its
    # requests in flight; then it is stopped, and what still runs on it fails loudly
    drain_timeout: float = 300.0
    max_body_bytes: int = 8 * 1024 * 1024
    # What one request may make a runtime decode: image parts, and each image's bytes and
    # pixels (read from its header; a small file may declare a huge canvas).
    max_images: int = 8
    max_image_bytes: int = 10 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    # Connections the gateway holds at once (open, idle or waiting); beyond, 503.
    max_connections: int = 256
    header_timeout: float = 10.0  # seconds a client may take to send a request's headers
    # Who may drive a gateway that needs no key: Host names besides loopback and
    # localhost (DNS rebinding sends any other), and web pages by Origin (a browser sends
    # one on every cross-site request). Both empty: no web page, loopback names only.
    allowed_hosts: tuple[str, ...] = ()
    allowed_origins: tuple[str, ...] = ()
    health_interval: float = 2.0
    health_timeout: float = 5.0
    health_failures: int = 3  # consecutive failed probes before a live runtime counts as hung
    start_timeout: float = 120.0
    stop_timeout: float = 10.0
    max_restarts: int = 5  # restarts within restart_window before a runtime is marked failed
    restart_window: float = 120.0
    log_max_bytes: int = 10 * 1024 * 1024
    log_backups: int = 3

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Self:
        """The section as `asdict` wrote it into a document (plan.json): lists as tuples."""
        values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v
                                  for k, v in d.items()}
        return cls(**values)


@dataclass(frozen=True)
class BenchSettings:
    cpu_watts: float = 65.0  # used to estimate energy where no power meter exists
    sample_interval: float = 0.1  # seconds between telemetry samples during a phase
    memory_bandwidth_gbs: float = 0.0  # peak for the roofline; 0 = NVML (GPU) or measured (CPU)


@dataclass(frozen=True)
class CostSettings:
    currency: str = "USD"
    electricity_per_kwh: float = 0.15
    hardware_price: float = 0.0
    hardware_lifetime_years: float = 3.0
    hardware_utilisation: float = 0.5  # share of the lifetime the box is busy generating
    cloud_price_per_mtok: float = 10.0  # generated (output) tokens
    cloud_input_price_per_mtok: float = 2.5  # prompt (input) tokens


@dataclass(frozen=True)
class TunnelSettings:
    """A public face through an SSH reverse tunnel to a host the operator owns (sovctl tunnel)."""

    via: str = ""  # USER@HOST[:PORT] of the public host; "" = no tunnel
    remote_port: int = 8088  # the port the public host listens on for the gateway
    remote_bind: str = ""  # the address it listens on there; "" = as its sshd's GatewayPorts
    identity: str = ""  # the private key ssh logs in with; "" = ssh's default keys
    keepalive_interval: int = 15  # seconds between keepalives over the SSH connection
    keepalive_count: int = 3  # keepalives unanswered before ssh exits and is restarted


@dataclass(frozen=True)
class ClusterSettings:
    """RPC workers (`sovctl worker` on other boxes) the chat runtime spreads its layers over."""

    workers: tuple[str, ...] = ()  # ("HOST:PORT", ...)
    model: str = ""  # the chat model that uses them; "" = the first chat model


@dataclass(frozen=True)
class LedgerSettings:
    """The request ledger (HOME/ledger/ledger.sqlite3), which any client of the gateway adds to."""

    # Records kept one by one; beyond, the oldest fold into per-day totals (which the reports
    # still count), so the file stays under 1 GB: 2 million is about 300 MB of typical records
    # (140 bytes each, measured), under 1 GB with every text at its longest (475 bytes).
    max_rows: int = 2_000_000


@dataclass(frozen=True)
class TrustSettings:
    """[trust]: the public keys whose signatures this box accepts (`sovctl sign`, `verify`,
    `pull --lock`), `keys = {NAME = "PATH"}`: PEM files, a relative PATH under the home. Not a
    section of SECTIONS: a table has no one default value for the environment to override."""

    keys: Mapping[str, str] = field(default_factory=dict)  # NAME -> absolute path


SECTIONS: dict[str, type] = {
    "hub": HubSettings, "serve": ServeSettings, "bench": BenchSettings, "cost": CostSettings,
    "tunnel": TunnelSettings, "cluster": ClusterSettings, "ledger": LedgerSettings,
}


# -- the tables of sections -----------------------------------------------------------------------

# What a served model does: which endpoints it answers (the gateway's ENDPOINT_ROLES).
MODEL_ROLES = ("chat", "embedding", "completion", "rerank")


@dataclass(frozen=True)
class ModelSettings:
    """A served model's section ([models.NAME]). None: not set here, so the [serve] setting of
    the same name applies."""

    model: str  # store name; the section's name unless set
    role: str | None = None  # one of MODEL_ROLES; None: chat (`sovctl plan`: as the model's
    # header says)
    runtime: str | None = None  # an engine's name (sovctl.engines), or auto
    parallel: int | None = None
    n_ctx: int | None = None
    n_gpu_layers: int | None = None
    n_threads: int | None = None
    n_batch: int | None = None
    chat_format: str | None = None  # a template llama.cpp knows by name (chatml, llama3, ...)
    # a Jinja template: one shipped with sovctl by name, or a file path
    chat_template: str | None = None
    seed: int | None = None
    extra_args: tuple[str, ...] = ()
    # "always": started with the stack; "on-demand": started by the first request for it
    load: str = "always"
    # an on-demand model's runtime is stopped once idle this long ("15m", "90s", "1h");
    # "0": never
    idle_unload: str = "0"
    # never unloaded to make room for another model (an idle_unload still applies)
    pin: bool = False


# [models.NAME] load
LOAD_MODES = ("always", "on-demand")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(s|m|h)?")
_UNITS = {None: 1.0, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float | None:
    """Seconds of a duration written "90", "90s", "15m", "1.5h"; None when it is not one."""
    found = _DURATION.fullmatch(text.strip())
    return float(found[1]) * _UNITS[found[2]] if found else None


@dataclass(frozen=True)
class PullSettings:
    """A model to fetch ([pull.NAME], NAME being the store name `sovctl pull --name` gives): what
    `sovctl up` pulls before it serves. Only `ref` is required."""

    ref: str  # any REF `sovctl pull` takes: hf://ORG/REPO/FILE.gguf, ORG/REPO:QUANT, a path
    revision: str = "main"  # branch, tag or commit; the lock pins the commit
    sha256: str | None = None  # expected digest, only where one was computed from the file itself


@dataclass(frozen=True)
class ProviderSettings:
    """A frontier API a request may be routed to by exception ([providers.NAME]); the request
    opts in by naming it, model "frontier/NAME/MODEL", MODEL one of its `models`."""

    # kind "openai": OpenAI-compatible, ending in /v1 (requests go to base_url/chat/completions
    # and base_url/responses); kind "anthropic": as the Anthropic SDK's base_url, without /v1
    # (requests go to base_url/v1/messages)
    base_url: str
    api_key_env: str  # the environment variable holding the key; the key is in no file
    # [providers.NAME.models."MODEL"] {input_per_mtok, output_per_mtok}: the only models sent
    # there, each at its price in cost.currency
    models: Mapping[str, Price]
    daily_cap: float | None = None  # money a day (UTC); once spent, its requests get 429
    # What bounds its spend beyond the cap: the requests in flight together, each reserving
    # its worst case.
    max_concurrent: int = 4  # requests in flight at once; beyond, 429
    max_tokens: int = 4096  # the most a request may generate; applied when it asks for no limit
    kind: str = "openai"  # the API it speaks: one of PROVIDER_KINDS


@dataclass(frozen=True)
class AppSettings:
    """An app's limits ([apps.NAME]), NAME being the name of its key (`sovctl keys add NAME`),
    or "default": the main key's, and that of requests that name no app. None: no limit."""

    requests_per_minute: int | None = None  # requests admitted in any 60 s; beyond, 429
    tokens_per_day: int | None = None  # prompt + generated tokens a UTC day; beyond, 429
    max_concurrent: int | None = None  # requests in flight at once; beyond, 429
    # The [providers.NAME] its requests may be routed to; None: every one; (): none.
    providers: tuple[str, ...] | None = None
    # Money a UTC day its requests may spend on frontier routes ([cost] currency); then 429.
    frontier_daily_cap: float | None = None


@dataclass(frozen=True)
class EvalCase:
    """One of the operator's golden prompts ([eval.NAME]) and what its answer must be:
    `sovctl upgrade` asks it of the model served now and of the candidate, at temperature 0,
    and says which passes. Exactly one expectation: exact, regex, json_schema or tool."""

    prompt: str  # the user's message (a chat model), or the prompt (a completion model)
    system: str | None = None  # a system message before it (a chat model)
    models: tuple[str, ...] | None = None  # the model names it is for; None: every one
    max_tokens: int = 64
    exact: str | None = None  # the answer, exactly (leading and trailing space aside)
    regex: str | None = None  # a Python regular expression found in the answer (re.search)
    # the answer is a JSON document valid against this JSON Schema (validated with jsonschema)
    json_schema: Mapping[str, Any] | None = None
    # {name, parameters[, description]}: the model is offered this one function and must call
    # it (tool_choice "required"), with arguments that parse and are valid against parameters
    tool: Mapping[str, Any] | None = None


# An [eval.NAME] case's expectations: one of them.
EVAL_EXPECTATIONS = ("exact", "regex", "json_schema", "tool")
EVAL_TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass(frozen=True)
class HardwareSettings:
    """A profile's [hardware] section: the machine class it is written for. It describes the
    profile (`sovctl profiles`, `sovctl init`), sets no setting, and belongs in profiles only."""

    summary: str = ""  # one line: what machine this is for
    accelerator: str | None = None  # "cpu" | "cuda"; None: the profile names no machine class
    min_ram_gb: float = 0.0  # system RAM the profile needs, in GiB
    min_cores: int = 0  # physical CPU cores
    min_vram_gb: float = 0.0  # memory of one GPU (cuda profiles), in GiB


def _kind(annotation: Any) -> type:
    """The plain type a field asks of a value as TOML or a flag gives it: str, int, float,
    bool, list (a tuple field) or dict (a mapping field); X | None asks for an X."""
    origin = get_origin(annotation)
    if origin in (Union, UnionType):
        return _kind(next(a for a in get_args(annotation) if a is not type(None)))
    if origin is tuple:
        return list
    if origin in (dict, Mapping):
        return dict
    assert isinstance(annotation, type), annotation
    return annotation


# The keys of each section, of a [models.NAME], a [pull.NAME], a [providers.NAME] and a
# profile's [hardware], each with the plain type its values must have.
_KINDS_OF: dict[type, dict[str, type]] = {
    cls: {name: _kind(annotation) for name, annotation in get_type_hints(cls).items()}
    for cls in (*SECTIONS.values(), ModelSettings, PullSettings, ProviderSettings,
                HardwareSettings, AppSettings, EvalCase)}
KINDS = {name: _KINDS_OF[cls] for name, cls in SECTIONS.items()}
MODEL_KEYS = _KINDS_OF[ModelSettings]
PULL_KEYS = _KINDS_OF[PullSettings]
PROVIDER_KEYS = _KINDS_OF[ProviderSettings]
HARDWARE_KEYS = _KINDS_OF[HardwareSettings]
APP_KEYS = _KINDS_OF[AppSettings]
EVAL_KEYS = _KINDS_OF[EvalCase]
# The lowest value of each of an app's limits: 0 requests or tokens would be a revoked key.
APP_MINIMUMS = {"requests_per_minute": 1, "tokens_per_day": 1, "max_concurrent": 1,
                "frontier_daily_cap": 0}
PROVIDER_REQUIRED = tuple(f.name for f in fields(ProviderSettings) if f.default is MISSING)
# The lowest value of each of a provider's numbers.
PROVIDER_MINIMUMS = {"daily_cap": 0, "max_concurrent": 1, "max_tokens": 1}
# A model's price, in cost.currency: a million prompt tokens, a million generated ones.
PRICE_KEYS = ("input_per_mtok", "output_per_mtok")
# The APIs a provider may speak: OpenAI's (Chat Completions and Responses) or Anthropic's
# (Messages). A request reaches a provider only on a surface of its kind.
PROVIDER_KINDS = ("openai", "anthropic")
PROVIDER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# A provider's model name as its API takes it ("gpt-4o-mini", "meta-llama/Llama-3-70b"):
# printable, no spaces, as long as the ledger keeps a model's name with its prefix.
PROVIDER_MODEL = re.compile(r"[!-~]{1,180}")
ENV_VAR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
ACCELERATORS = ("cpu", "cuda")

ENV_PREFIX = "SOVCTL_"

# Environment variables other tools already use for a setting. They belong to the environment
# layer but rank below the setting's own SOVCTL_* variable.
ENV_ALIASES: dict[str, tuple[str, ...]] = {
    "hub.endpoint": ("HF_ENDPOINT",),
}


def _profile_dirs(home: Home, env: Mapping[str, str]) -> list[Path]:
    """Where an operator's own profiles live, searched before the shipped ones."""
    dirs = [home.root / "profiles"]
    extra = env.get("SOVCTL_PROFILES_DIR")
    if extra:
        dirs.insert(0, Path(extra))
    return dirs


def _find_profile(home: Home, name: str, env: Mapping[str, str]) -> Path | Traversable | None:
    """An operator's own profile of that name, else the shipped one."""
    own = next((d / f"{name}.toml" for d in _profile_dirs(home, env)
                if (d / f"{name}.toml").is_file()), None)
    return own or _shipped_profile(name)


def available_profiles(home: Home, environ: Mapping[str, str] | None = None
                       ) -> dict[str, Path | Traversable]:
    """Every profile `profile = "NAME"` can select, by name: the operator's own win over the
    shipped ones of the same name."""
    env = os.environ if environ is None else environ
    found: dict[str, Path | Traversable] = {}
    for name in shipped_profiles():
        p = _shipped_profile(name)
        if p is not None:
            found[name] = p
    for d in reversed(_profile_dirs(home, env)):  # the first directory wins
        if d.is_dir():
            for p in sorted(d.glob("*.toml")):
                found[p.name.removesuffix(".toml")] = p
    return dict(sorted(found.items()))


def _shipped_profile(name: str) -> Traversable | None:
    # Package data, read through importlib.resources: a wheel has no source tree.
    p = resources.files("sovctl") / "profiles" / f"{name}.toml"
    return p if p.is_file() else None


def shipped_profiles() -> list[str]:
    return sorted(p.name.removesuffix(".toml")
                  for p in (resources.files("sovctl") / "profiles").iterdir()
                  if p.name.endswith(".toml"))


def env_name(key: str) -> str:
    return ENV_PREFIX + key.upper().replace(".", "__")


@dataclass(frozen=True)
class Settings:
    """The settings in force: one typed section each, the tables of [models.NAME], [pull.NAME]
    and [providers.NAME], and where each section key's value came from."""

    hub: HubSettings
    serve: ServeSettings
    bench: BenchSettings
    cost: CostSettings
    tunnel: TunnelSettings
    cluster: ClusterSettings
    ledger: LedgerSettings
    # "serve.port" -> "default" | "profile" | "config" | "env" | "flag"
    sources: Mapping[str, str]
    models: Mapping[str, ModelSettings] = field(default_factory=dict)
    profile: str | None = None
    pulls: Mapping[str, PullSettings] = field(default_factory=dict)  # [pull.NAME]
    hardware: HardwareSettings = field(default_factory=HardwareSettings)  # the profile's
    providers: Mapping[str, ProviderSettings] = field(default_factory=dict)  # [providers.NAME]
    apps: Mapping[str, AppSettings] = field(default_factory=dict)  # [apps.NAME]
    trust: TrustSettings = field(default_factory=TrustSettings)  # [trust]
    evals: Mapping[str, EvalCase] = field(default_factory=dict)  # [eval.NAME]: golden prompts

    def source(self, key: str) -> str:
        return self.sources[key]

    def explicit(self, key: str) -> bool:
        return self.sources[key] in ("env", "flag")

    def items(self, *sections: str) -> list[tuple[str, object]]:
        """Each key of the sections named (every section when none is) with its value,
        ("serve.port", 8088): what renders them all."""
        return [(f"{name}.{f.name}", getattr(getattr(self, name), f.name))
                for name, cls in SECTIONS.items() if not sections or name in sections
                for f in fields(cls)]


def _read_toml(path: Path | Traversable, what: str) -> dict[str, Any]:
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(
            f"{what} {path} is not valid TOML: {e}",
            hint=f"fix the file by hand (it was left untouched) or move it aside: "
            f"mv {path} {path}.bak",
        ) from e
    except OSError as e:
        raise ConfigError(f"cannot read {what} {path}: {e.strerror}") from e


def _is_a(value: Any, kind: type) -> bool:
    """Whether a value from TOML or a flag is of a field's kind (an int is a float too)."""
    if isinstance(value, bool):
        return kind is bool
    return isinstance(value, kind) or (kind is float and isinstance(value, int))


def _coerce(key: str, value: Any, origin: str) -> Any:
    section, name = key.split(".", 1)
    kind = KINDS[section][name]
    if kind is list and isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    if isinstance(value, str) and kind is not str:
        try:
            if kind is bool:
                return value.lower() in ("1", "true", "yes", "on")
            return kind(value)
        except ValueError:
            raise ConfigError(
                f"{origin}: {key} must be a {kind.__name__}, got {value!r}",
                hint="correct the value",
            ) from None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigError(
            f"{origin}: {key} must be a {kind.__name__}, got {value!r}", hint="correct the value"
        )
    return value


def _apply_layer(
    layer: Mapping[str, Any],
    origin: str,
    label: str,
    values: dict[str, Any],
    sources: dict[str, str],
    models: dict[str, dict[str, Any]],
    pulls: dict[str, dict[str, Any]] | None = None,
    hardware: dict[str, Any] | None = None,
    providers: dict[str, dict[str, Any]] | None = None,
    apps: dict[str, dict[str, Any]] | None = None,
    trust: dict[str, str] | None = None,
    evals: dict[str, dict[str, Any]] | None = None,
) -> None:
    for section, body in layer.items():
        if section == "profile":
            continue
        if section == "eval" and evals is not None:
            if not isinstance(body, dict):
                raise ConfigError(f"{origin}: [eval] must be a table of golden prompts")
            for ename, ebody in body.items():
                evals[ename] = _check_eval(ename, ebody, origin)
            continue
        if section == "trust" and trust is not None:
            trust.update(_check_trust(body, origin))
            continue
        if section == "apps" and apps is not None:
            if not isinstance(body, dict):
                raise ConfigError(f"{origin}: [apps] must be a table of apps' limits")
            for aname, abody in body.items():
                apps[aname] = {**apps.get(aname, {}), **_check_app(aname, abody, origin)}
                # Where each limit came from, as for a section's keys: apps.NAME.KEY.
                sources.update({f"apps.{aname}.{k}": label for k in abody})
            continue
        if section == "providers" and providers is not None:
            if not isinstance(body, dict):
                raise ConfigError(f"{origin}: [providers] must be a table of frontier APIs")
            for pname, pbody in body.items():
                providers[pname] = {**providers.get(pname, {}),
                                    **_check_provider(pname, pbody, origin)}
            continue
        if section == "pull" and pulls is not None:
            if not isinstance(body, dict):
                raise ConfigError(f"{origin}: [pull] must be a table of models to fetch")
            for pname, pbody in body.items():
                pulls[pname] = {**pulls.get(pname, {}), **_check_pull(pname, pbody, origin)}
            continue
        if section == "hardware" and hardware is not None:
            if label != "profile":
                raise ConfigError(
                    f"{origin}: [hardware] describes the machine a profile is written for and "
                    "belongs in a profile file",
                    hint="remove the section here; pick a profile with profile = \"NAME\"")
            hardware.update(_check_hardware(body, origin))
            continue
        if section == "models":
            if not isinstance(body, dict):
                raise ConfigError(f"{origin}: [models] must be a table of served models")
            for mname, mbody in body.items():
                models[mname] = {**models.get(mname, {}), **_check_model(mname, mbody, origin)}
            continue
        if section not in SECTIONS or not isinstance(body, dict):
            raise ConfigError(
                f"{origin}: unknown section [{section}]",
                hint="known sections: " + ", ".join(sorted(
                    [*SECTIONS, "apps", "eval", "models", "providers", "pull", "trust"])),
            )
        for name, value in body.items():
            key = f"{section}.{name}"
            if name not in KINDS[section]:
                raise ConfigError(
                    f"{origin}: unknown setting {key}",
                    hint=f"known in [{section}]: {', '.join(sorted(KINDS[section]))}",
                )
            values[key] = _coerce(key, value, origin)
            sources[key] = label


def _check_model(name: str, body: Any, origin: str) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ConfigError(f"{origin}: [models.{name}] must be a table")
    for k, v in body.items():
        if k not in MODEL_KEYS:
            raise ConfigError(
                f"{origin}: unknown setting models.{name}.{k}",
                hint=f"known model settings: {', '.join(sorted(MODEL_KEYS))}",
            )
        if not _is_a(v, MODEL_KEYS[k]):
            raise ConfigError(
                f"{origin}: models.{name}.{k} must be a {MODEL_KEYS[k].__name__}, got {v!r}"
            )
    role = body.get("role", "chat")
    if role not in MODEL_ROLES:
        raise ConfigError(
            f"{origin}: models.{name}.role must be {', '.join(MODEL_ROLES[:-1])} or "
            f"{MODEL_ROLES[-1]}, got {role!r}"
        )
    _check_runtime(body.get("runtime", AUTO), f"{origin}: models.{name}.runtime")
    if body.get("parallel", 1) < 1:
        raise ConfigError(f"{origin}: models.{name}.parallel must be at least 1")
    load = body.get("load", "always")
    if load not in LOAD_MODES:
        raise ConfigError(f"{origin}: models.{name}.load must be always or on-demand, "
                          f"got {load!r}")
    if "idle_unload" in body and parse_duration(body["idle_unload"]) is None:
        raise ConfigError(f"{origin}: models.{name}.idle_unload must be a duration, got "
                          f"{body['idle_unload']!r}",
                          hint='write seconds, minutes or hours: "90s", "15m", "1h"; "0": never')
    return dict(body)


def _check_pull(name: str, body: Any, origin: str) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ConfigError(f"{origin}: [pull.{name}] must be a table")
    try:
        check_name(name)
    except UsageError as e:
        raise ConfigError(f"{origin}: [pull.{name}]: {e.message}", hint=e.hint) from None
    for k, v in body.items():
        if k not in PULL_KEYS:
            raise ConfigError(
                f"{origin}: unknown setting pull.{name}.{k}",
                hint=f"known pull settings: {', '.join(sorted(PULL_KEYS))}",
            )
        if not isinstance(v, str) or not v:
            raise ConfigError(f"{origin}: pull.{name}.{k} must be a non-empty string, got {v!r}")
    sha = body.get("sha256")
    if sha is not None and not is_sha256_hex(sha.lower().removeprefix("sha256:")):
        raise ConfigError(f"{origin}: pull.{name}.sha256 is not a sha256 hex digest",
                          hint="leave it out: `sovctl pull` pins the digest the Hub reports")
    return dict(body)


def _check_provider(name: str, body: Any, origin: str) -> dict[str, Any]:
    where = f"{origin}: providers.{name}"
    if not PROVIDER_NAME.fullmatch(name) or name == "local":
        raise ConfigError(f"{origin}: [providers.{name}]: a provider's name is letters, "
                          "digits, '.', '_' and '-', and not \"local\"",
                          hint="it is the NAME of model \"frontier/NAME/MODEL\"")
    if not isinstance(body, dict):
        raise ConfigError(f"{origin}: [providers.{name}] must be a table")
    for k, v in body.items():
        if k in PRICE_KEYS:
            # One price for every model let a client pick a dearer model than the price said.
            raise ConfigError(f"{where}.{k}: prices are per model now, and only the models "
                              "listed may be sent", hint=f"move the prices to a table per "
                              f"model: [providers.{name}.models.\"MODEL\"] with input_per_mtok "
                              "and output_per_mtok, one for each model a request may name")
        if k not in PROVIDER_KEYS:
            raise ConfigError(f"{where}.{k} is not a provider setting",
                              hint=f"known: {', '.join(sorted(PROVIDER_KEYS))}")
        if not _is_a(v, PROVIDER_KEYS[k]):
            raise ConfigError(f"{where}.{k} has the wrong type: {v!r}")
        lowest = PROVIDER_MINIMUMS.get(k, 0)
        if isinstance(v, int | float) and v < lowest:
            raise ConfigError(f"{where}.{k} must be at least {lowest}, got {v!r}")
    for model, price in body.get("models", {}).items():
        _check_price(f"{where}.models.{model!r}", model, price)
    if body.get("models") == {}:
        raise ConfigError(f"{where}.models is empty: no request could be sent",
                          hint=f"add [providers.{name}.models.\"MODEL\"] with input_per_mtok and "
                          "output_per_mtok")
    kind = body.get("kind", "openai")
    if kind not in PROVIDER_KINDS:
        raise ConfigError(f"{where}.kind must be one of {', '.join(map(repr, PROVIDER_KINDS))}"
                          f", got {kind!r}", hint="the API the provider speaks: \"openai\" "
                          "(Chat Completions, Responses) or \"anthropic\" (Messages)")
    if "base_url" in body:
        url = urlsplit(body["base_url"])
        with_v1 = url.path.rstrip("/").endswith("/v1")
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ConfigError(f"{where}.base_url must be an http(s) URL, got "
                              f"{body['base_url']!r}", hint="as the provider's SDK takes it, "
                              "e.g. https://api.openai.com/v1")
        if kind == "openai" and not with_v1:
            raise ConfigError(f"{where}.base_url must be an http(s) URL ending in /v1, got "
                              f"{body['base_url']!r}", hint="as an OpenAI client's base_url, "
                              "e.g. https://api.openai.com/v1")
        if kind == "anthropic" and with_v1:
            raise ConfigError(f"{where}.base_url of an anthropic provider does not end in /v1 "
                              f"(requests go to base_url/v1/messages), got "
                              f"{body['base_url']!r}", hint="as an Anthropic client's "
                              "base_url, e.g. https://api.anthropic.com")
        literal = ip_literal(url.hostname)
        if url.scheme == "http" and url.hostname != "localhost" \
                and not (literal is not None and literal.is_loopback):
            # The key travels in a header: in clear text it would be readable on the way.
            raise ConfigError(f"{where}.base_url sends the key in clear text to "
                              f"{url.hostname}", hint="use https:// (plain http only on "
                              "loopback)")
    if "api_key_env" in body and not ENV_VAR_NAME.fullmatch(body["api_key_env"]):
        raise ConfigError(f"{where}.api_key_env must name an environment variable, got "
                          f"{body['api_key_env']!r}", hint="the variable's name, e.g. "
                          "OPENAI_API_KEY; the key itself goes in no file")
    return dict(body)


def _check_app(name: str, body: Any, origin: str) -> dict[str, Any]:
    where = f"{origin}: apps.{name}"
    if not APP_NAME.fullmatch(name) or name == OTHER_APP:
        raise ConfigError(f"{origin}: [apps.{name}]: an app's name is 1 to 64 letters, digits, "
                          f"'.', '_' and '-', and not \"{OTHER_APP}\"",
                          hint="it is the NAME of 'sovctl keys add NAME'")
    if not isinstance(body, dict):
        raise ConfigError(f"{origin}: [apps.{name}] must be a table")
    for k, v in body.items():
        if k not in APP_KEYS:
            raise ConfigError(f"{where}.{k} is not an app setting",
                              hint=f"known: {', '.join(sorted(APP_KEYS))}")
        if not _is_a(v, APP_KEYS[k]) or (k == "providers"
                                         and not all(isinstance(p, str) for p in v)):
            raise ConfigError(f"{where}.{k} has the wrong type: {v!r}")
        lowest = APP_MINIMUMS.get(k)
        if lowest is not None and v < lowest:
            raise ConfigError(f"{where}.{k} must be at least {lowest}, got {v!r}")
    return dict(body)


def _check_eval(name: str, body: Any, origin: str) -> dict[str, Any]:
    """An [eval.NAME] case: its keys and types, one expectation, a regex that compiles, a
    schema that is one."""
    where = f"{origin}: eval.{name}"
    hint = 'e.g. [eval.capital] prompt = "Capital of France?" regex = "Paris"'
    if not PROVIDER_NAME.fullmatch(name):
        raise ConfigError(f"{origin}: [eval.{name}]: a case's name is 1 to 64 letters, digits, "
                          "'.', '_' and '-'", hint=hint)
    if not isinstance(body, dict):
        raise ConfigError(f"{origin}: [eval.{name}] must be a table", hint=hint)
    for k, v in body.items():
        if k not in EVAL_KEYS:
            raise ConfigError(f"{where}.{k} is not a setting of a case",
                              hint=f"known: {', '.join(sorted(EVAL_KEYS))}")
        if not _is_a(v, EVAL_KEYS[k]) or (k == "models"
                                          and not all(isinstance(m, str) for m in v)):
            raise ConfigError(f"{where}.{k} has the wrong type: {v!r}", hint=hint)
    if "prompt" not in body:
        raise ConfigError(f"{where} has no prompt", hint=hint)
    given = [k for k in EVAL_EXPECTATIONS if k in body]
    if len(given) != 1:
        raise ConfigError(f"{where} needs exactly one expectation of "
                          f"{', '.join(EVAL_EXPECTATIONS)}; it has "
                          f"{', '.join(given) or 'none'}", hint=hint)
    if body.get("max_tokens", 1) < 1:
        raise ConfigError(f"{where}.max_tokens must be at least 1")
    if "regex" in body:
        try:
            re.compile(body["regex"])
        except re.error as e:
            raise ConfigError(f"{where}.regex is not a regular expression: {e}") from None
    schemas = [("json_schema", body.get("json_schema"))]
    if "tool" in body:
        tool = body["tool"]
        if not EVAL_TOOL_NAME.fullmatch(str(tool.get("name", ""))) or \
                set(tool) - {"name", "parameters", "description"}:
            raise ConfigError(f"{where}.tool must be {{name, parameters[, description]}}, the "
                              "name 1 to 64 letters, digits, '_' and '-'",
                              hint='tool = {name = "get_weather", parameters = {type = '
                              '"object", properties = {city = {type = "string"}}}}')
        schemas.append(("tool.parameters", tool.get("parameters", {"type": "object"})))
    for key, schema in schemas:
        if schema is None:
            continue
        # Imported only where a case has a schema: loading the settings stays light.
        import jsonschema

        try:
            jsonschema.validators.validator_for(schema).check_schema(schema)
        except jsonschema.SchemaError as e:
            raise ConfigError(f"{where}.{key} is not a JSON Schema: {e.message}") from None
    return dict(body)


def _check_price(where: str, model: str, price: Any) -> None:
    if not PROVIDER_MODEL.fullmatch(model):
        raise ConfigError(f"{where}: a model's name is 1 to 180 printable characters, no spaces",
                          hint="as the provider's API names it, e.g. \"gpt-4o-mini\"")
    if not isinstance(price, dict):
        raise ConfigError(f"{where} must be a table: {{ input_per_mtok = .., "
                          "output_per_mtok = .. }")
    for k, v in price.items():
        if k not in PRICE_KEYS:
            raise ConfigError(f"{where}.{k} is not a model setting",
                              hint=f"known: {', '.join(PRICE_KEYS)}")
        if not isinstance(v, int | float) or isinstance(v, bool) or v < 0:
            raise ConfigError(f"{where}.{k} must be a number, not negative, got {v!r}")
    lacking = [k for k in PRICE_KEYS if k not in price]
    if lacking:
        raise ConfigError(f"{where} lacks {', '.join(lacking)}",
                          hint="a model needs both prices, per million tokens")


def _check_trust(body: Any, origin: str) -> dict[str, str]:
    """[trust] keys = {NAME = "PATH", ...}: each a name and the path of a public key."""
    hint = 'write [trust] keys = {NAME = "/path/to/public-key.pem"}'
    if not isinstance(body, dict) or set(body) - {"keys"}:
        raise ConfigError(f"{origin}: [trust] takes one key, keys", hint=hint)
    keys = body.get("keys", {})
    if not isinstance(keys, dict):
        raise ConfigError(f"{origin}: trust.keys must be a table of names and paths", hint=hint)
    for name, path in keys.items():
        if not PROVIDER_NAME.fullmatch(name) or not isinstance(path, str) or not path:
            raise ConfigError(f"{origin}: trust.keys.{name} must name a public key file "
                              f"by a non-empty path, got {path!r}", hint=hint)
    return dict(keys)


def _under(home: Home, path: str) -> Path:
    """A path as sovctl.toml gives it: ~ expanded, a relative one under the home."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else home.root / p


def _check_hardware(body: Any, origin: str) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ConfigError(f"{origin}: [hardware] must be a table")
    for k, v in body.items():
        if k not in HARDWARE_KEYS:
            raise ConfigError(f"{origin}: unknown setting hardware.{k}",
                              hint=f"known: {', '.join(sorted(HARDWARE_KEYS))}")
        if not _is_a(v, HARDWARE_KEYS[k]):
            raise ConfigError(f"{origin}: hardware.{k} has the wrong type: {v!r}")
    if body.get("accelerator", "cpu") not in ACCELERATORS:
        raise ConfigError(f"{origin}: hardware.accelerator must be one of "
                          f"{', '.join(ACCELERATORS)}, got {body['accelerator']!r}")
    return dict(body)


# The lowest value each numeric gateway limit takes ([serve]); max_images 0 refuses images.
GATEWAY_MINIMUMS: dict[str, float] = {
    "max_images": 0, "max_image_bytes": 1, "max_image_pixels": 1, "max_connections": 1,
    "header_timeout": 0.1, "load_timeout": 0.1, "drain_timeout": 0.1,
}
_HOST_NAME = re.compile(r"[a-z0-9_-]{1,63}(\.[a-z0-9_-]{1,63})*\.?", re.IGNORECASE)
_ORIGIN = re.compile(r"[a-z][a-z0-9+.-]*://[^/?#@\s]+", re.IGNORECASE)


def _check_gateway_limits(values: dict[str, Any], sources: dict[str, str]) -> None:
    for name, lowest in GATEWAY_MINIMUMS.items():
        key = f"serve.{name}"
        if values[key] < lowest:
            raise ConfigError(f"{key} must be at least {lowest:g}, got {values[key]!r} "
                              f"(from {sources[key]})")
    for host in values["serve.allowed_hosts"]:
        # A name or an address as a client writes it in Host, without the port: the port is
        # the gateway's own.
        if not isinstance(host, str) or not (_HOST_NAME.fullmatch(host)
                                             or ip_literal(host) is not None):
            raise ConfigError(f"serve.allowed_hosts: {host!r} is not a host name or address "
                              f"(from {sources['serve.allowed_hosts']})",
                              hint='write names without scheme or port: ["box.lan"]')
    for origin in values["serve.allowed_origins"]:
        # Exactly what a browser sends: scheme://host[:port], no path. "*" and "null" (every
        # sandboxed page and file shares it) would let any page in.
        if not isinstance(origin, str) or not _ORIGIN.fullmatch(origin):
            raise ConfigError(f"serve.allowed_origins: {origin!r} is not an origin "
                              f"(from {sources['serve.allowed_origins']})",
                              hint='write each web page\'s origin as its browser sends it, '
                              'e.g. ["http://localhost:3000"]; there is no wildcard')


def parse_endpoint(endpoint: Any, what: str = "an RPC worker") -> tuple[str, int]:
    """(host, port) of a worker written HOST:PORT. llama.cpp splits an endpoint at its first
    colon, so an IPv6 address cannot name a worker: its host name can."""
    host, sep, port = str(endpoint).partition(":")
    if not isinstance(endpoint, str) or not sep or not host or not port.isdigit() \
            or not 0 < int(port) < 65536:
        raise ConfigError(f"{what}: {endpoint!r} is not HOST:PORT",
                          hint='write workers = ["10.0.0.2:50052", "gpu-box.lan:50052"]')
    return host, int(port)


def _check_runtime(value: str, what: str) -> None:
    if value not in RUNTIME_CHOICES:
        raise ConfigError(f"{what} must be one of {', '.join(RUNTIME_CHOICES)}, got {value!r}")


def load(
    home: Home,
    flags: Mapping[str, Any] | None = None,
    profile: str | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    config_file: bool = True,
) -> Settings:
    """The settings in force. `config_file=False` leaves sovctl.toml out (a profile as it is
    on its own, for `sovctl profiles` and `sovctl init`)."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    models: dict[str, dict[str, Any]] = {}
    pulls: dict[str, dict[str, Any]] = {}
    hardware: dict[str, Any] = {}
    providers: dict[str, dict[str, Any]] = {}
    apps: dict[str, dict[str, Any]] = {}
    evals: dict[str, dict[str, Any]] = {}
    for section, cls in SECTIONS.items():
        for f in fields(cls):
            values[f"{section}.{f.name}"] = f.default
            sources[f"{section}.{f.name}"] = "default"

    user: dict[str, Any] = {}
    if config_file and home.config_path.exists():
        user = _read_toml(home.config_path, "config")

    trust: dict[str, str] = {}
    profile = profile or env.get("SOVCTL_PROFILE") or user.get("profile")
    if profile is not None:
        if not isinstance(profile, str) or not profile.replace("-", "").isalnum():
            raise ConfigError(f"profile name {profile!r} is not valid")
        found = _find_profile(home, profile, env)
        if found is None:
            raise ConfigError(
                f"profile {profile!r} not found",
                hint=f"shipped profiles: {', '.join(shipped_profiles())}; your own go in "
                f"{', '.join(map(str, _profile_dirs(home, env)))}",
            )
        _apply_layer(_read_toml(found, "profile"), str(found), "profile", values, sources,
                     models, pulls, hardware, providers, apps, trust, evals)

    _apply_layer(user, str(home.config_path), "config", values, sources, models, pulls,
                 hardware, providers, apps, trust, evals)
    for pname, pbody in pulls.items():
        if "ref" not in pbody:
            raise ConfigError(f"[pull.{pname}] has no ref",
                              hint="add ref = \"hf://ORG/REPO/FILE.gguf\" (or a path)")
    for mname, mbody in models.items():
        if mbody.get("load", "always") != "on-demand" and \
                parse_duration(mbody.get("idle_unload", "0")):
            raise ConfigError(f"models.{mname}.idle_unload needs load = \"on-demand\": a model "
                              "loaded always stays loaded",
                              hint=f"set [models.{mname}] load = \"on-demand\", or remove "
                              "idle_unload")
    for pname, pbody in providers.items():
        lacking = [k for k in PROVIDER_REQUIRED if k not in pbody]
        if lacking:
            raise ConfigError(f"[providers.{pname}] lacks {', '.join(lacking)}",
                              hint="a provider needs base_url, api_key_env and models "
                              f"([providers.{pname}.models.\"MODEL\"] with input_per_mtok and "
                              "output_per_mtok)")
    for aname, abody in apps.items():
        unknown = [p for p in abody.get("providers", ()) if p not in providers]
        if unknown:
            raise ConfigError(f"apps.{aname}.providers names {', '.join(map(repr, unknown))}, "
                              "not a configured provider",
                              hint=f"configured: {', '.join(sorted(providers)) or 'none'} "
                              "([providers.NAME])")

    for key in list(values):
        for name in (*ENV_ALIASES.get(key, ()), env_name(key)):  # lowest rank first
            if env.get(name):
                values[key] = _coerce(key, env[name], f"environment {name}")
                sources[key] = "env"

    for key, value in (flags or {}).items():
        if value is not None:
            values[key] = _coerce(key, value, f"flag for {key}")
            sources[key] = "flag"
    _check_runtime(values["serve.runtime"], f"serve.runtime (from {sources['serve.runtime']})")
    for worker in values["cluster.workers"]:
        parse_endpoint(worker, f"cluster.workers (from {sources['cluster.workers']})")
    if values["serve.parallel"] < 1:
        raise ConfigError(f"serve.parallel must be at least 1 (from {sources['serve.parallel']})")
    if values["ledger.max_rows"] < 1:
        raise ConfigError(f"ledger.max_rows must be at least 1 (from "
                          f"{sources['ledger.max_rows']})")
    _check_gateway_limits(values, sources)
    for key in ("serve.memory_limit", "serve.memory_reserve"):
        if values[key]:
            try:
                parse_size(values[key])
            except UsageError as e:
                raise ConfigError(f"{key}: {e.message} (from {sources[key]})",
                                  hint=e.hint) from None
    cost = _section(CostSettings, "cost", values)
    _check_cost(cost)
    return Settings(
        hub=_section(HubSettings, "hub", values), serve=_section(ServeSettings, "serve", values),
        bench=_section(BenchSettings, "bench", values), cost=cost,
        tunnel=_section(TunnelSettings, "tunnel", values),
        cluster=_section(ClusterSettings, "cluster", values),
        ledger=_section(LedgerSettings, "ledger", values), sources=sources,
        models={k: _typed(ModelSettings, {"model": k, **m, "extra_args": [
            str(a) for a in m.get("extra_args", ())]}) for k, m in models.items()},
        profile=profile, pulls={k: _typed(PullSettings, p) for k, p in pulls.items()},
        hardware=_typed(HardwareSettings, hardware),
        providers={k: _provider(k, p) for k, p in providers.items()},
        apps={k: _typed(AppSettings, a) for k, a in apps.items()},
        evals={k: _typed(EvalCase, e) for k, e in evals.items()},
        trust=TrustSettings(keys={k: str(_under(home, v)) for k, v in trust.items()}))


_T = TypeVar("_T")


def _typed(cls: type[_T], body: Mapping[str, Any]) -> _T:
    """The dataclass of checked values: a list as a tuple, an int as a float where the field
    is a float."""
    kinds = _KINDS_OF[cls]
    return cls(**{k: tuple(v) if kinds[k] is list else float(v) if kinds[k] is float else v
                  for k, v in body.items()})


def _section(cls: type[_T], name: str, values: Mapping[str, Any]) -> _T:
    return _typed(cls, {k: values[f"{name}.{k}"] for k in KINDS[name]})


def _provider(name: str, body: Mapping[str, Any]) -> ProviderSettings:
    return _typed(ProviderSettings, {**body, "models": {
        m: Price(float(price["input_per_mtok"]), float(price["output_per_mtok"]),
                 f"[providers.{name}.models.{m!r}] prices")
        for m, price in body["models"].items()}})


def _check_cost(cost: CostSettings) -> None:
    if cost.hardware_lifetime_years <= 0:
        raise ConfigError("cost.hardware_lifetime_years must be more than 0",
                          hint="set it in sovctl.toml [cost], e.g. 3.0")
    if not 0 < cost.hardware_utilisation <= 1:
        raise ConfigError("cost.hardware_utilisation must be in (0, 1]",
                          hint="the share of its life the box spends generating, e.g. 0.5")
    for name, value in (("electricity_per_kwh", cost.electricity_per_kwh),
                        ("hardware_price", cost.hardware_price),
                        ("cloud_price_per_mtok", cost.cloud_price_per_mtok),
                        ("cloud_input_price_per_mtok", cost.cloud_input_price_per_mtok)):
        if value < 0:
            raise ConfigError(f"cost.{name} must not be negative")
