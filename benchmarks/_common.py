"""What the benchmark scripts share: how to run sovctl as an operator does."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path


def sovctl_command() -> list[str]:
    script = Path(sys.executable).parent / "sovctl"
    if script.is_file():
        return [str(script)]  # the console script an operator runs
    found = shutil.which("sovctl")
    return [found] if found else [sys.executable, "-m", "sovctl"]


def sovctl(home: Path, *args: str, env: Mapping[str, str] | None = None) -> str:
    """Run sovctl on `home` as an operator does; its stdout, or exit naming what failed."""
    done = subprocess.run([*sovctl_command(), *args], capture_output=True, text=True,
                          env={**os.environ, "SOVCTL_HOME": str(home), **(env or {})})
    if done.returncode != 0:
        raise SystemExit(f"sovctl {' '.join(args)} failed ({done.returncode}):\n{done.stderr}")
    return done.stdout
