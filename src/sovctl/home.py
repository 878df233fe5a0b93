"""Where sovctl keeps everything it owns, all under one home directory."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


def default_home() -> Path:
    env = os.environ.get("SOVCTL_HOME")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg) / "sovctl"


@dataclass(frozen=True)
class Home:
    root: Path

    @property
    def config_path(self) -> Path:
        return self.root / "sovctl.toml"

    @property
    def lock_path(self) -> Path:
        return self.root / "sovctl.lock"

    @property
    def blobs(self) -> Path:
        return self.root / "store" / "blobs"

    @property
    def partials(self) -> Path:
        return self.root / "store" / "partial"

    @property
    def run(self) -> Path:
        return self.root / "run"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def secrets(self) -> Path:
        return self.root / "secrets"

    def ensure(self, *dirs: Path) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        for d in dirs:
            d.mkdir(parents=True, exist_ok=True)
