"""The secrets sovctl makes, each created on first need and kept mode 0600 under HOME/secrets:
the gateway's API key, the mirror's token, and the apps' keys. They are apart so that none
opens what another guards, and a replica that holds the mirror's token holds nothing the
gateway takes.

An app's key (`sovctl keys add NAME`) is shown once and kept only as its sha256, in
`secrets/app_keys.json`: a copy of the file opens nothing. sha256 and not a slow password
hash (scrypt, argon2): a key is 256 random bits from `secrets`, so no guess can find one from
its hash however fast the hash is, and a slow one would only add its tens of milliseconds to
every request the gateway checks. The gateway's own key (`secrets/api_key`) is the app
"default"."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import secrets
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from sovctl.errors import ConfigError, NotFoundError, UsageError
from sovctl.fsutil import atomic_write, file_lock
from sovctl.home import Home

API_KEY = "api_key"
API_KEY_PREFIX = "sk-sov-"
MIRROR_TOKEN = "mirror_token"
APP_KEYS = "app_keys.json"
APP_KEYS_SCHEMA = "sovctl.app_keys/1"
APP_KEY_PREFIX = "sk-sov-app-"
# The app of the gateway's own key, and of a request that names no app.
DEFAULT_APP = "default"
# The label /metrics gives the apps beyond its bound: no app may be called so.
OTHER_APP = "other"
# An app's name: what its key is made with, a ledger column and a metrics label.
APP_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
HINT_CHARS = 4  # the end of a key kept in clear, so `keys list` can tell keys apart


def _read(home: Home, name: str) -> str | None:
    try:
        return (home.secrets / name).read_text().strip() or None
    except FileNotFoundError:
        return None


def _ensure(home: Home, name: str, prefix: str) -> tuple[str, bool]:
    """The secret, and whether it was created just now (so the CLI shows it once)."""
    value = _read(home, name)
    if value:
        return value, False
    home.ensure(home.secrets)
    os.chmod(home.secrets, 0o700)
    value = prefix + secrets.token_urlsafe(32)
    atomic_write(home.secrets / name, (value + "\n").encode(), mode=0o600)
    return value, True


def read_api_key(home: Home) -> str | None:
    return _read(home, API_KEY)


def ensure_api_key(home: Home) -> tuple[str, bool]:
    """The gateway's key, and whether it was created just now."""
    return _ensure(home, API_KEY, API_KEY_PREFIX)


def ensure_mirror_token(home: Home) -> tuple[str, bool]:
    """The token `mirror serve` requires beyond loopback, and whether it was created just now.
    A replica sends it as SOVCTL_MIRROR_TOKEN, which goes to no other endpoint."""
    return _ensure(home, MIRROR_TOKEN, "sov-mirror-")


# -- the apps' keys ------------------------------------------------------------------------------

@dataclass(frozen=True)
class AppKey:
    """An app's key as it is kept: its hash, never the key."""

    name: str
    sha256: str  # hex digest of the key
    hint: str  # "sk-sov-app-...abcd": the key's last characters, to tell keys apart
    created_at: str  # UTC, ISO 8601
    rotated_at: str | None = None


def app_keys_path(home: Home) -> Path:
    return home.secrets / APP_KEYS


def key_digest(key: bytes) -> bytes:
    """What a key is looked up by: its sha256 (see the module's note for why no slow hash)."""
    return hashlib.sha256(key).digest()


def check_app_name(name: str) -> str:
    if not APP_NAME.fullmatch(name) or name == OTHER_APP:
        raise UsageError(f"{name!r} is not an app name: 1 to 64 letters, digits, '.', '_' and "
                         f"'-', starting with a letter or digit, and not {OTHER_APP!r}",
                         hint="e.g. 'sovctl keys add support-bot'")
    return name


def read_app_keys(path: Path) -> dict[str, AppKey]:
    """The apps' keys by app; none when the file is missing. A ConfigError naming the file when
    it is not one this version wrote."""
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (ValueError, OSError) as e:
        raise ConfigError(f"cannot read the apps' keys {path}: {e}",
                          hint="restore it from a backup, or move it aside and add the keys "
                          "again") from None
    try:
        if doc["schema"] != APP_KEYS_SCHEMA:
            raise ValueError(f"schema {doc['schema']!r}, not {APP_KEYS_SCHEMA}")
        return {name: AppKey(**k) for name, k in doc["keys"].items()}
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{path} is not a file of apps' keys ({e})",
                          hint="it was written by another sovctl version, or by hand: move it "
                          "aside and add the keys again") from None


def _write_app_keys(home: Home, keys: dict[str, AppKey]) -> None:
    doc = {"schema": APP_KEYS_SCHEMA, "keys": {n: asdict(k) for n, k in sorted(keys.items())}}
    atomic_write(app_keys_path(home), (json.dumps(doc, indent=2) + "\n").encode(), mode=0o600)


def _now() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _new_key(prefix: str = APP_KEY_PREFIX) -> tuple[str, str, str]:
    """A new key, its hex digest and its hint."""
    key = prefix + secrets.token_urlsafe(32)
    return key, key_digest(key.encode()).hex(), f"{prefix}...{key[-HINT_CHARS:]}"


def _changing(home: Home) -> AbstractContextManager[None]:
    home.ensure(home.secrets)
    os.chmod(home.secrets, 0o700)
    lock = home.secrets / ".app_keys.lock"
    # Made 0600 first, as every file under secrets/ (file_lock would make it 0644).
    os.close(os.open(lock, os.O_WRONLY | os.O_CREAT, 0o600))
    # One change at a time: two `keys add` at once must not lose one of the keys.
    return file_lock(lock, timeout=30, what="the apps' keys")


def add_app_key(home: Home, name: str) -> tuple[str, AppKey]:
    """A new key for app `name`, and how it is kept; the key itself is kept nowhere."""
    check_app_name(name)
    if name == DEFAULT_APP:
        raise UsageError(f"{DEFAULT_APP!r} is the gateway's own key ({home.secrets / API_KEY})",
                         hint=f"give the app another name; 'sovctl keys rotate {DEFAULT_APP}' "
                         "replaces the gateway's key")
    with _changing(home):
        keys = read_app_keys(app_keys_path(home))
        if name in keys:
            raise UsageError(f"app {name!r} has a key already ({keys[name].hint})",
                             hint=f"'sovctl keys rotate {name}' replaces it")
        key, digest, hint = _new_key()
        keys[name] = AppKey(name, digest, hint, _now())
        _write_app_keys(home, keys)
    return key, keys[name]


def _missing(name: str) -> NotFoundError:
    return NotFoundError(f"app {name!r} has no key", hint=f"'sovctl keys list' shows the apps "
                         f"with one; 'sovctl keys add {name}' makes one")


def revoke_app_key(home: Home, name: str) -> AppKey:
    """Forget app `name`'s key: the gateway refuses it from its next request on."""
    check_app_name(name)
    if name == DEFAULT_APP:
        raise UsageError(f"the gateway's own key ({DEFAULT_APP!r}) cannot be revoked: sovctl "
                         "itself uses it", hint=f"'sovctl keys rotate {DEFAULT_APP}' replaces it")
    with _changing(home):
        keys = read_app_keys(app_keys_path(home))
        if name not in keys:
            raise _missing(name)
        gone = keys.pop(name)
        _write_app_keys(home, keys)
    return gone


def rotate_app_key(home: Home, name: str) -> tuple[str, AppKey]:
    """A new key for app `name` in place of its old one, which the gateway refuses from its
    next request on. For "default", a new gateway key (secrets/api_key)."""
    check_app_name(name)
    now = _now()
    if name == DEFAULT_APP:
        if read_api_key(home) is None:
            raise NotFoundError("the gateway has no key of its own yet", hint="it is made when "
                                "a stack first needs one: 'sovctl serve --host ADDRESS' beyond "
                                "loopback, or 'sovctl tunnel'")
        key, digest, hint = _new_key(API_KEY_PREFIX)
        atomic_write(home.secrets / API_KEY, (key + "\n").encode(), mode=0o600)
        return key, AppKey(DEFAULT_APP, digest, hint, now, now)
    key, digest, hint = _new_key()
    with _changing(home):
        keys = read_app_keys(app_keys_path(home))
        if name not in keys:
            raise _missing(name)
        keys[name] = replace(keys[name], sha256=digest, hint=hint, rotated_at=now)
        _write_app_keys(home, keys)
    return key, keys[name]
