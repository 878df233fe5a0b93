"""Who a request comes from, and the limits its app is held to.

An app is known by its key: the gateway's own (`secrets/api_key`) is the app "default", and
each key of `sovctl keys add NAME` (kept as its sha256 in `secrets/app_keys.json`) is app NAME.
Both files are read again whenever they change: each request that carries a key stats them
(a microsecond or two), so a revoked or rotated key is refused from its very next request,
with no restart. A key is looked up by its hash in a dict, so a thousand keys cost what one
does. Where the gateway requires no key (loopback, no public face), a request may name its app
in the `X-Sovctl-App` header, for attribution: a name that is neither configured ([apps.NAME])
nor keyed counts as "default", so no client can grow the ledger's or the metrics' apps.
Where a key is required, the key alone says who it is: the header is ignored.

The limits of [apps.NAME] (routes table `apps`), each refused with 429 and Retry-After (or 403
for a provider not allowed), naming the app and the limit, before any work is done:
- `max_concurrent`: requests in flight at once;
- `requests_per_minute`: requests admitted in the last 60 s (a sliding window; a refused
  request does not count);
- `tokens_per_day`: prompt and generated tokens since 00:00 UTC, the day of the ledger and of
  the providers' caps: counted in memory as requests end, from the ledger's figures for the
  day when the gateway starts. Requests in flight when the limit is reached still finish, so
  a day may end above it by what they use;
- `providers`: the frontier providers its requests may be routed to (403 for another);
- `frontier_daily_cap`: money its frontier requests may spend a UTC day, held as a
  provider's `daily_cap` is (frontier.DailyCap): the day's spend (the ledger's, on a start)
  plus each request in flight's worst case, reserved against both the app's cap and the
  provider's before it is sent, and settled to its cost when it ends. A request whose worst
  case does not fit either is refused, so requests in flight together cannot pass it.
Other apps are untouched by one app's limits.
"""

from __future__ import annotations

import datetime as dt
import hmac
import logging
import math
import os
import sqlite3
import time
from collections import deque
from collections.abc import Callable
from contextvars import ContextVar
from pathlib import Path
from typing import Generic, TypeVar

from sovctl.apikey import DEFAULT_APP, key_digest, read_app_keys
from sovctl.errors import ConfigError
from sovctl.gateway.frontier import CAP_RETRY_S, Admission, DailyCap, Refusal, Shortfall
from sovctl.ledger.store import AppDay, app_usage_since
from sovctl.runtime.documents import AppLimits, RoutesTable

APP_HEADER = b"x-sovctl-app"
WINDOW_S = 60.0  # requests_per_minute's window
BUSY_RETRY_S = 1
log = logging.getLogger("sovctl.gateway.apps")

# The app of the request being served, set once where it is identified: what its ledger row,
# metrics and token counts are booked under, read deep in the serving path without each layer
# passing it on. Each request is a task of its own, with its own copy.
CURRENT: ContextVar[str] = ContextVar("sovctl_app", default=DEFAULT_APP)

T = TypeVar("T")


class _Watched(Generic[T]):
    """A file's parsed content, parsed again when the file changes (a new inode, mtime or
    size: sovctl replaces its secrets by renaming a new file over them)."""

    def __init__(self, path: Path, parse: Callable[[Path], T], missing: T) -> None:
        self.path = path
        self.parse = parse
        self.missing = missing
        self._seen: tuple[int, int, int] | None = None
        self.value = missing

    def current(self) -> T:
        try:
            st = os.stat(self.path)
            seen: tuple[int, int, int] | None = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            seen = None
        if seen != self._seen:
            self._seen = seen
            self.value = self.parse(self.path) if seen is not None else self.missing
        return self.value


def _main_key(path: Path) -> bytes | None:
    try:
        return path.read_bytes().strip() or None
    except OSError:
        return None


_NO_KEYS: tuple[dict[bytes, str], frozenset[str]] = ({}, frozenset())


def _app_keys(path: Path) -> tuple[dict[bytes, str], frozenset[str]]:
    """The apps by their keys' hashes, and their names."""
    try:
        keys = read_app_keys(path)
        return {bytes.fromhex(k.sha256): name for name, k in keys.items()}, frozenset(keys)
    except (ConfigError, ValueError) as e:
        # Closed, not open: no app key is taken until the file is right again.
        log.warning("the apps' keys are not taken: %s", e)
        return _NO_KEYS


class Keys:
    """The keys the gateway takes, each file read again when it changes."""

    def __init__(self, main: Path | None, apps: Path | None) -> None:
        self._main = _Watched(main, _main_key, None) if main else None
        self._apps = _Watched(apps, _app_keys, _NO_KEYS) if apps else None

    def app_of(self, key: bytes) -> str | None:
        """The app whose key `key` is; None when it is no key the gateway takes."""
        main = self._main.current() if self._main else None
        if main is not None and hmac.compare_digest(key, main):
            return DEFAULT_APP
        # A dict lookup by the key's hash: its timing tells of the hash, never of a key.
        return self._apps.current()[0].get(key_digest(key)) if self._apps else None

    def keyed(self) -> frozenset[str]:
        """The apps that have a key."""
        return self._apps.current()[1] if self._apps else frozenset()


class _Usage:
    """An app's traffic, as its limits count it."""

    __slots__ = ("in_flight", "limits", "money", "recent", "tokens")

    def __init__(self, limits: AppLimits, today: AppDay) -> None:
        self.limits = limits
        self.in_flight = 0
        self.recent: deque[float] = deque()  # when its requests of the last minute began
        self.tokens = today.tokens
        cap = limits.frontier_daily_cap
        self.money = (DailyCap(cap, today.frontier_cost, lambda short, a: _over_cap(
            limits.name, short, a)) if cap is not None else None)


def _next_midnight(now: float) -> float:
    day = dt.datetime.fromtimestamp(now, dt.UTC).date() + dt.timedelta(days=1)
    return dt.datetime.combine(day, dt.time(), dt.UTC).timestamp()


def _refuse(app: str, limit: str, value: float, said: str, retry: float) -> Refusal:
    wait = max(1, math.ceil(retry))
    return Refusal(429, f"app {app!r} has reached its limit {limit} = {value:g} "
                   f"([apps.{app}]): {said}; retry in {wait} s", "rate_limit_exceeded",
                   f"app_{limit}", {"Retry-After": str(wait)})


def _over_cap(app: str, short: Shortfall, a: Admission) -> Refusal:
    left = short.cap - short.spent
    if short.reason == "reserved":
        said = (f"its {short.holding} frontier requests in flight hold {short.reserved:.4g} of "
                f"the {left:.4g} left today, and this one may cost up to {a.worst:.4g}")
        retry = float(CAP_RETRY_S)
    else:
        said = (f"{short.spent:.4g} spent on frontier routes since 00:00 UTC" if
                short.reason == "spent" else f"this request may cost up to {a.worst:.4g}, "
                f"more than the {left:.4g} left today: ask for fewer max_tokens")
        now = time.time()
        retry = _next_midnight(now) - now
    return _refuse(app, "frontier_daily_cap", short.cap, said, retry)


class Apps:
    """Who each request is, and whether its app may have it now."""

    def __init__(self, table: RoutesTable) -> None:
        self.required = table.auth_required
        self.keys = Keys(Path(table.key_file) if table.key_file else None,
                         Path(table.app_keys_file) if table.app_keys_file else None)
        now = time.time()
        self._midnight = _next_midnight(now)
        today: dict[str, AppDay] = {}
        if table.ledger and any(a.tokens_per_day is not None or a.frontier_daily_cap is not None
                                for a in table.apps):
            # A restarted gateway counts the day from where the ledger left it.
            try:
                today = app_usage_since(Path(table.ledger), self._midnight - 86400)
            except (ConfigError, sqlite3.Error) as e:
                log.warning("today's use by app not read from %s, limits count from 0: %s",
                            table.ledger, e)
        # Only apps with limits are counted: the others need no state.
        self.usage = {a.name: _Usage(a, today.get(a.name, AppDay(0, 0.0))) for a in table.apps}

    def identify(self, headers: dict[bytes, bytes]) -> str | None:
        """The request's app; None when the gateway requires a key and it brings none it
        takes."""
        scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
        given = [k for k in (token if scheme.lower() == b"bearer" else b"",
                             headers.get(b"x-api-key")) if k]
        for key in given:
            app = self.keys.app_of(key)
            if app is not None:
                return app
        if self.required:
            return None
        named = headers.get(APP_HEADER)
        if named:
            name = named.decode("latin-1")
            if name in self.usage or name in self.keys.keyed():
                return name
        return DEFAULT_APP

    def authorised(self, key: bytes | None) -> bool:
        """Whether `key` opens the gateway: any key where one is required."""
        return not self.required or (key is not None and self.keys.app_of(key) is not None)

    def _roll(self, now: float) -> None:
        if now >= self._midnight:
            self._midnight = _next_midnight(now)
            for u in self.usage.values():
                u.tokens = 0

    def admit(self, app: str) -> Refusal | None:
        """Let one more request of `app` in (then `leave` when it ends), or its refusal."""
        u = self.usage.get(app)
        if u is None:
            return None
        limits = u.limits
        now = time.time()
        self._roll(now)
        if limits.max_concurrent is not None and u.in_flight >= limits.max_concurrent:
            return _refuse(app, "max_concurrent", limits.max_concurrent,
                           f"{u.in_flight} requests in flight", BUSY_RETRY_S)
        if limits.requests_per_minute is not None:
            recent = u.recent
            while recent and recent[0] <= now - WINDOW_S:
                recent.popleft()
            if len(recent) >= limits.requests_per_minute:
                return _refuse(app, "requests_per_minute", limits.requests_per_minute,
                               f"{len(recent)} requests in the last minute",
                               recent[0] + WINDOW_S - now)
            recent.append(now)
        if limits.tokens_per_day is not None and u.tokens >= limits.tokens_per_day:
            return _refuse(app, "tokens_per_day", limits.tokens_per_day,
                           f"{u.tokens} tokens used since 00:00 UTC", self._midnight - now)
        u.in_flight += 1
        return None

    def leave(self, app: str) -> None:
        u = self.usage.get(app)
        if u is not None:
            u.in_flight -= 1

    def frontier(self, app: str, provider: str) -> Refusal | None:
        """The refusal of a request of `app` for `provider`'s route, one it may not use; None
        when it may go (its frontier_daily_cap is held by `caps`)."""
        u = self.usage.get(app)
        limits = u.limits if u is not None else None
        if limits is None or limits.providers is None or provider in limits.providers:
            return None
        allowed = ", ".join(limits.providers) or "none"
        return Refusal(403, f"app {app!r} may not use provider {provider!r} ([apps.{app}] "
                       f"providers: {allowed})", "permission_denied",
                       "app_provider_not_allowed", param="model")

    def caps(self, app: str) -> tuple[DailyCap, ...]:
        """The caps a frontier request of `app` reserves its worst case against, besides its
        provider's: its frontier_daily_cap, if it has one."""
        u = self.usage.get(app)
        return (u.money,) if u is not None and u.money is not None else ()

    def count(self, app: str, tokens: int) -> None:
        """The tokens a request of `app` used, as it ends."""
        u = self.usage.get(app)
        if u is not None:
            self._roll(time.time())
            u.tokens += tokens
