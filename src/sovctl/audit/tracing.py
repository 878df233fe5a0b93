"""The system call tracer behind check 6: whether it works here, proven on a deliberate probe
from a native program, and what it is attached to in the running stack.

The audit hook of sovctl.runtime.egress sees only what Python does. llama-server, and the
native code inside any Python process (llama.cpp, uvloop), can open sockets the hook never
sees; strace sees them, from outside the process. Every process of the blackout's stack runs
under it (sovctl.runtime.launch, when the plan's environment names a trace log).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sovctl.netns import current_netns
from sovctl.runtime import egress

# TEST-NET-1 (RFC 5737): an address for examples, routed nowhere; and the discard port.
SELF_TEST_TARGET = ("192.0.2.1", 9)
INSTALL_HINT = "install it (Debian/Ubuntu: apt-get install strace; Fedora: dnf install strace)"


@dataclass(frozen=True)
class Tracer:
    """The tracer the stack runs under, or why it runs untraced."""

    path: str  # strace, "" when not found
    version: str
    problem: str  # why processes are not traced; "" when they are
    self_test: Mapping[str, Any] = field(default_factory=dict)

    @property
    def usable(self) -> bool:
        return bool(self.path) and not self.problem


def _version(strace: str) -> str:
    try:
        out = subprocess.run([strace, "-V"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.splitlines()[0].removeprefix("strace -- version ").strip() if out else ""


def prepare(trace_dir: Path, outer_netns: str) -> Tracer:
    """Find strace and prove that it records a connect made by native code, here.

    The proof is a deliberate connect from bash (C, no Python) to an address that is routed
    nowhere, made under the same strace options as the stack. It is made only inside the
    blackout's namespace, where there is no route at all: nothing can leave."""
    if current_netns() == outer_netns:
        return Tracer("", "", "the tracer's self-test runs only in the blackout's namespace, "
                              "and this process is in the host's")
    strace = shutil.which("strace")
    if strace is None:
        return Tracer("", "", f"strace is not installed; {INSTALL_HINT}")
    version = _version(strace)
    bash = shutil.which("bash")
    if bash is None:
        return Tracer(strace, version, "bash, which the tracer's self-test runs, is not installed")
    trace_dir.mkdir(parents=True, exist_ok=True)
    log = trace_dir / "self-test.strace"
    host, port = SELF_TEST_TARGET
    command = [bash, "-c", 'exec 3<>"/dev/tcp/$1/$2"', "self-test", host, str(port)]
    test: dict[str, Any] = {"command": f"bash -c 'exec 3<>/dev/tcp/{host}/{port}'",
                            "log": str(log), "recorded": []}
    try:
        r = subprocess.run(egress.strace_argv(strace, str(log), command),
                           stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return Tracer(strace, version, "strace's self-test did not finish within 30s", test)
    caught = [a for a in egress.read_trace(log, "self-test")
              if a["event"] == "connect" and a["target"] == f"{host}:{port}"]
    test["recorded"] = caught
    if not caught:
        said = r.stderr.strip().splitlines()
        return Tracer(strace, version, f"strace did not record a deliberate connect from bash to "
                      f"{host}:{port} ({said[0] if said else f'exit code {r.returncode}'})",
                      test)
    return Tracer(strace, version, "", test)


# -- the running stack ---------------------------------------------------------------------------

def read_environ(pid: int) -> dict[str, str] | None:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None
    env = {}
    for item in raw.split(b"\0"):
        k, sep, v = item.partition(b"=")
        if sep:
            env[k.decode(errors="replace")] = v.decode(errors="replace")
    return env


def _exe(pid: int) -> str:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return ""


def _tracer_pid(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("TracerPid:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


@dataclass(frozen=True)
class Observed:
    """One process of the running stack, as the kernel shows it."""

    pid: int  # the process the supervisor started
    serving_pid: int  # the one that serves: strace's child when traced, else pid
    exe: str  # the serving process's executable
    tracer_pid: int | None  # the process tracing it, when one is
    tracer_exe: str
    env: dict[str, str] | None  # the serving process's environment

    @property
    def program(self) -> str:
        return Path(self.exe).name or "?"


def observe(pid: int) -> Observed:
    """What runs as supervised process `pid`: under strace, the program is its traced child."""
    import psutil

    try:
        children = [c.pid for c in psutil.Process(pid).children()]
    except psutil.Error:
        children = []
    tracee = next((c for c in children if _tracer_pid(c) == pid), None)
    serving = tracee if tracee is not None else pid
    return Observed(pid=pid, serving_pid=serving, exe=_exe(serving),
                    tracer_pid=pid if tracee is not None else None,
                    tracer_exe=_exe(pid) if tracee is not None else "",
                    env=read_environ(serving))
