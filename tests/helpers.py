"""Helpers for tests that run sovctl as a real process against real runtimes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

SOVCTL = [sys.executable, "-m", "sovctl"]


def run(home: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 180,
        check: bool = False) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "SOVCTL_HOME": str(home), **(env or {})}
    proc = subprocess.run([*SOVCTL, *args], env=full_env, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"sovctl {' '.join(args)} -> {proc.returncode}\n{proc.stderr}")
    return proc


def run_json(home: Path, *args: str, env: dict[str, str] | None = None,
             timeout: float = 180) -> dict[str, Any]:
    proc = run(home, "--json", *args, env=env, timeout=timeout)
    doc = json.loads(proc.stdout)
    doc["_rc"] = proc.returncode
    doc["_stderr"] = proc.stderr
    return doc  # type: ignore[no-any-return]


def wait_for(pred: Callable[[], Any], timeout: float = 60, interval: float = 0.2,
             what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = pred()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def processes(home: Path) -> dict[str, dict[str, Any]]:
    doc = run_json(home, "status")
    return {p["name"]: p for p in doc["data"]["processes"]}
