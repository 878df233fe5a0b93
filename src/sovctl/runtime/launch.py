"""How every supervised Python process starts: `python -m sovctl.runtime.launch NAME MODULE ...`.

Before handing over to MODULE it (1) asks the kernel to kill it when its parent, the
supervisor, dies, so no child outlives a SIGKILLed supervisor, and (2) installs the egress
recorder. Any non-Python program can be run the same way with MODULE `--exec`.

When the audit asks for a system call tracer (egress.ENV_TRACE), this launch first becomes
strace, which runs the same launch again as its child: the inner launch then dies with strace
as this one dies with the supervisor (strace 6.1 cannot kill its tracees on exit, and a
parent-death signal is not inherited), and everything after it, native code included, is traced.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from pathlib import Path

from sovctl.runtime import egress

PR_SET_PDEATHSIG = 1
# llama-cpp-python takes its key only from argv or the environment: the key is read from the
# file named here into the environment, so it is never on a command line.
KEY_FILE_ENV = "SOVCTL_RUNTIME_KEY_FILE"
# A launch started ahead of need (a warm start for a model loaded on demand) waits after its
# own start-up for one byte on stdin, then runs its program; at end of input it exits unused.
WAIT_ENV = "SOVCTL_LAUNCH_WAIT"
# Settings a runtime reads from the inherited environment, some over its own argv
# (llama_cpp.server's HOST/PORT, llama-server's LLAMA_ARG_*): the plan alone decides them.
_OVERRIDES = ("HOST", "PORT", "API_KEY", "CONFIG_FILE")


def _scrub_environment() -> None:
    for k in list(os.environ):
        if k.startswith("LLAMA_ARG_") or k in _OVERRIDES:
            del os.environ[k]
    key_file = os.environ.pop(KEY_FILE_ENV, None)
    if key_file:
        os.environ["API_KEY"] = Path(key_file).read_text().strip()


def _die_with_parent(expected_parent: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    # The parent may have died before prctl took effect.
    if os.getppid() != expected_parent:
        os._exit(1)


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        sys.stderr.write("usage: python -m sovctl.runtime.launch NAME MODULE|--exec ARGS...\n")
        sys.exit(2)
    component, target, rest = argv[0], argv[1], argv[2:]
    parent = os.environ.get("SOVCTL_SUPERVISOR_PID")
    if parent:
        _die_with_parent(int(parent))
    if os.environ.pop(WAIT_ENV, None):
        if not os.read(0, 1):
            os._exit(0)  # not needed after all
        os.close(0)
        os.open(os.devnull, os.O_RDONLY)  # its stdin from here on, as any runtime's
    trace_log = os.environ.get(egress.ENV_TRACE)
    if trace_log:
        # strace keeps this pid, so it is the inner launch's parent; the inner one must not
        # trace again. The environment is scrubbed there, where the program runs.
        inner = [sys.executable, "-m", "sovctl.runtime.launch", *argv]
        os.execvp("strace", egress.strace_argv(
            "strace", trace_log, inner,
            env=(egress.ENV_TRACE, f"SOVCTL_SUPERVISOR_PID={os.getpid()}")))
    _scrub_environment()
    if target == "--exec":
        probe = os.environ.get(egress.ENV_PROBE)
        if probe:
            egress.native_probe(probe)
        os.execvp(rest[0], rest)
    log = os.environ.get(egress.ENV_LOG)
    if log:
        egress.install(Path(log), component)
    probe = os.environ.get(egress.ENV_PROBE)
    if probe:
        egress.probe(probe)
    import runpy  # here: a runtime loaded on demand waits on the `--exec` path above

    sys.argv = [target, *rest]
    runpy.run_module(target, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
