"""`sovctl keys`: a key per app. Each use case is one function over the key store
(`sovctl.apikey`), with the app's limits from [apps.NAME] beside it; a running gateway sees
each change at its next request."""

from __future__ import annotations

from dataclasses import dataclass

from sovctl import apikey
from sovctl.config import AppSettings, Settings
from sovctl.home import Home


@dataclass(frozen=True)
class IssuedKey:
    """A key made just now (`keys add`, `keys rotate`): the only time it is shown."""

    app: str
    key: str  # kept nowhere: only its sha256 is, in `file`
    hint: str
    created_at: str
    rotated_at: str | None
    file: str
    limits: AppSettings | None  # [apps.NAME]; None: the app has no limits


@dataclass(frozen=True)
class AppEntry:
    app: str
    has_key: bool  # an app of [apps.NAME] alone is named by X-Sovctl-App on loopback
    hint: str  # the key's last characters; "" without a key
    created_at: str | None
    rotated_at: str | None
    limits: AppSettings | None


@dataclass(frozen=True)
class KeyList:
    file: str
    apps: tuple[AppEntry, ...]


@dataclass(frozen=True)
class RevokedKey:
    app: str
    hint: str
    file: str


def _issued(home: Home, cfg: Settings, key: str, kept: apikey.AppKey) -> IssuedKey:
    file = home.secrets / (apikey.API_KEY if kept.name == apikey.DEFAULT_APP
                           else apikey.APP_KEYS)
    return IssuedKey(kept.name, key, kept.hint, kept.created_at, kept.rotated_at, str(file),
                     cfg.apps.get(kept.name))


def add(home: Home, cfg: Settings, name: str) -> IssuedKey:
    key, kept = apikey.add_app_key(home, name)
    return _issued(home, cfg, key, kept)


def rotate(home: Home, cfg: Settings, name: str) -> IssuedKey:
    key, kept = apikey.rotate_app_key(home, name)
    return _issued(home, cfg, key, kept)


def revoke(home: Home, name: str) -> RevokedKey:
    gone = apikey.revoke_app_key(home, name)
    return RevokedKey(gone.name, gone.hint, str(apikey.app_keys_path(home)))


def listing(home: Home, cfg: Settings) -> KeyList:
    """Every app: the gateway's own key ("default"), each app's key, each app of [apps]."""
    path = apikey.app_keys_path(home)
    keys = apikey.read_app_keys(path)
    entries = [AppEntry(k.name, True, k.hint, k.created_at, k.rotated_at, cfg.apps.get(k.name))
               for k in keys.values()]
    entries += [AppEntry(name, False, "", None, None, limits)
                for name, limits in cfg.apps.items() if name not in keys]
    main = apikey.read_api_key(home)
    default = next((e for e in entries if e.app == apikey.DEFAULT_APP), None)
    if main is not None:
        if default is not None:
            entries.remove(default)
        entries.append(AppEntry(apikey.DEFAULT_APP, True,
                                f"{apikey.API_KEY_PREFIX}...{main[-apikey.HINT_CHARS:]}", None,
                                None, cfg.apps.get(apikey.DEFAULT_APP)))
    return KeyList(str(path), tuple(sorted(entries, key=lambda e: e.app)))
