"""The gateway and mirror API key: generated on first need, kept mode 0600 under the home."""

from __future__ import annotations

import os
import secrets as _random

from sovctl.fsutil import atomic_write
from sovctl.home import Home

LOOPBACK = ("127.0.0.1", "::1", "localhost")


def is_loopback(host: str) -> bool:
    return host in LOOPBACK or host.startswith("127.")


def api_key_path(home: Home) -> os.PathLike[str]:
    return home.secrets / "api_key"


def read_api_key(home: Home) -> str | None:
    try:
        return (home.secrets / "api_key").read_text().strip() or None
    except FileNotFoundError:
        return None


def ensure_api_key(home: Home) -> tuple[str, bool]:
    """The key, and whether it was created just now (so the CLI shows it once)."""
    key = read_api_key(home)
    if key:
        return key, False
    home.ensure(home.secrets)
    os.chmod(home.secrets, 0o700)
    key = "sk-sov-" + _random.token_urlsafe(32)
    atomic_write(home.secrets / "api_key", (key + "\n").encode(), mode=0o600)
    return key, True
