"""What the benchmark scripts share: how to run sovctl as an operator does."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path


def sovctl_command() -> list[str]:
    script = Path(sys.executable).parent / "sovctl"
    if script.is_file():
        return [str(script)]  # the console script an operator runs
    found = shutil.which("sovctl")
    return [found] if found else [sys.executable, "-m", "sovctl"]
