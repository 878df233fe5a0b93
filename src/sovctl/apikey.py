"""The gateway and mirror API key: created on first need, kept mode 0600 under the home."""

from __future__ import annotations

import os
import secrets

from sovctl.fsutil import atomic_write
from sovctl.home import Home


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
    key = "sk-sov-" + secrets.token_urlsafe(32)
    atomic_write(home.secrets / "api_key", (key + "\n").encode(), mode=0o600)
    return key, True
