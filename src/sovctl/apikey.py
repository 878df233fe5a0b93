"""The secrets sovctl makes, each created on first need and kept mode 0600 under HOME/secrets:
the gateway's API key, and the mirror's token. They are apart so that neither opens what the
other guards, and a replica that holds the mirror's token holds nothing the gateway takes."""

from __future__ import annotations

import os
import secrets

from sovctl.fsutil import atomic_write
from sovctl.home import Home

API_KEY = "api_key"
MIRROR_TOKEN = "mirror_token"


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
    return _ensure(home, API_KEY, "sk-sov-")


def ensure_mirror_token(home: Home) -> tuple[str, bool]:
    """The token `mirror serve` requires beyond loopback, and whether it was created just now.
    A replica sends it as SOVCTL_MIRROR_TOKEN, which goes to no other endpoint."""
    return _ensure(home, MIRROR_TOKEN, "sov-mirror-")
