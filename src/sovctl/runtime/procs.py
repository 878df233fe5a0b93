"""The one subprocess helper: argv objects and the processes of a plan, spawning in a process
group, and stopping them.

Stop is SIGTERM to the whole group, a bounded wait, then SIGKILL: nothing is left behind.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from sovctl.runtime.documents import ProcessKind
from sovctl.runtime.logfiles import open_log


@dataclass(frozen=True)
class Argv:
    """A process to run, fully described before anything runs (what --dry-run prints)."""

    args: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)  # added to the inherited environment
    cwd: str | None = None

    def __str__(self) -> str:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in sorted(self.env.items()))
        return (env + " " if env else "") + shlex.join(self.args)


@dataclass(frozen=True)
class ProcessSpec:
    """One process of a plan: what the supervisor starts, and how it checks the process."""

    name: str
    kind: ProcessKind
    argv: Argv
    port: int
    health_path: str
    role: str = ""
    model: str = ""
    sha256: str = ""
    runtime: str = ""  # a runtime's engine
    key_file: str | None = None  # a runtime's internal key, written at each start
    workers: tuple[str, ...] = ()  # RPC workers ([cluster]) its --rpc names, checked each start
    load: str = "always"  # a runtime's [models.NAME] load: "always" | "on-demand"
    idle_unload: float = 0.0  # seconds idle after which an on-demand runtime is stopped; 0 never
    pin: bool = False  # never unloaded to make room for another runtime
    memory: int = 0  # RAM bytes a runtime holds, by the plan's estimate (sovctl.sizing)
    vram: int = 0  # VRAM bytes, likewise


def spawn(argv: Argv, log: Path | None = None, base_env: Mapping[str, str] | None = None,
          out: int | None = None, stdin: int | None = None) -> subprocess.Popen[bytes]:
    """Start `argv` as the leader of a new session, so its whole group can be signalled. Its
    environment is `base_env` (default: this process's) with `argv.env` on top; its stdout and
    stderr go to the descriptor `out` (a pipe the caller reads), else are appended to `log`
    (a file only its owner reads), else nowhere."""
    env = dict(os.environ if base_env is None else base_env)
    env.update(argv.env)
    opened: int | None = None
    if out is None and log is not None:
        out = opened = open_log(log)
    try:
        return subprocess.Popen(
            list(argv.args),
            env=env,
            cwd=argv.cwd,
            stdin=stdin if stdin is not None else subprocess.DEVNULL,
            stdout=out if out is not None else subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    finally:
        if opened is not None:
            os.close(opened)


def _signal0(kill: Callable[[int, int], None], target: int) -> bool | None:
    """Signal 0 to a process or group: False when there is none, True when there is one that
    is not ours to signal, None when it was delivered (there is one; look closer if need be)."""
    try:
        kill(target, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return None


def alive(pid: int) -> bool:
    found = _signal0(os.kill, pid)
    if found is not None:
        return found
    # A zombie still answers signal 0; it is dead for our purposes.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def group_alive(pgid: int) -> bool:
    found = _signal0(os.killpg, pgid)
    if found is not None:
        return found
    return any(alive(pid) for pid in _group_members(pgid))


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[2]) == pgid:
            members.append(int(entry))
    return members


def stop_group(pgid: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> str:
    """SIGTERM the group, wait up to `timeout`, then SIGKILL. Returns how it ended."""
    how = "exited"
    try:
        os.killpg(pgid, signal.SIGTERM)
        how = "terminated"
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + timeout
    # Looked at soon, then less often: most programs exit within milliseconds of SIGTERM, and a
    # model being evicted keeps the one loading in its place waiting until it has.
    pause = 0.002
    while time.monotonic() < deadline:
        if proc is not None:
            proc.poll()
        if not group_alive(pgid):
            break
        time.sleep(pause)
        pause = min(pause * 2, 0.05)
    else:
        try:
            os.killpg(pgid, signal.SIGKILL)
            how = "killed"
        except ProcessLookupError:
            pass
        pause = 0.002
        while group_alive(pgid) and time.monotonic() < deadline + 5:
            if proc is not None:
                proc.poll()
            time.sleep(pause)
            pause = min(pause * 2, 0.05)
    if proc is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=1)
    return how

