"""Models loaded on demand: how the gateway and the supervisor speak of them, through files in
the run folder.

- `load/NAME`, created by the gateway when a request finds NAME unloaded (created once however
  many requests wait: O_EXCL), is taken (removed) by the supervisor, which starts NAME's runtime
  if it is still unloaded. A client that hangs up cancels nothing: the file was written.
- `used/NAME`: the gateway holds a shared lock on it while any request for NAME is in flight
  and sets its mtime when the last one ends. The supervisor unloads NAME only once that mtime
  (or the load, if later) is older than its idle_unload, and only under an exclusive lock,
  which it keeps until the stop is done and written to state.json: no request is in flight
  while it unloads, and none starts on the runtime being stopped.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import time
from pathlib import Path

from sovctl.fsutil import fresh_private_dir
from sovctl.runtime.documents import LOAD_DIR, USED_DIR, WAKE_FIFO


def prepare(run: Path) -> None:
    """The folders, empty: a request left from an earlier stack loads nothing; and the
    supervisor's wake-up pipe."""
    wake = run / WAKE_FIFO
    wake.unlink(missing_ok=True)
    os.mkfifo(wake, 0o600)
    for sub in (LOAD_DIR, USED_DIR):
        fresh_private_dir(run / sub)


# -- the gateway's side ---------------------------------------------------------------------------
class Usage:
    """One on-demand model's requests, as the gateway tells them to the supervisor."""

    def __init__(self, run: Path, name: str) -> None:
        self.load_file = run / LOAD_DIR / name
        self.wake_fifo = run / WAKE_FIFO
        self.used_file = run / USED_DIR / name
        self.in_flight = 0
        self._fd: int | None = None

    def request_load(self) -> None:
        """Ask the supervisor to load the model; one request file however many ask, and a
        byte down the supervisor's wake-up pipe so it takes it at once."""
        try:
            os.close(os.open(self.load_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            return
        try:
            fd = os.open(self.wake_fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:
            return  # no supervisor reading (ENXIO): its next tick takes the file
        try:
            os.write(fd, b"!")
        except BlockingIOError:
            pass  # the pipe is full of wake-ups already
        finally:
            os.close(fd)

    def enter(self) -> bool | None:
        """Count a request in. True when it is the first in flight (the lock was taken now:
        read the runtime's status afresh), False when others are, None while the supervisor
        is unloading the model (count it in later)."""
        if self.in_flight:
            self.in_flight += 1
            return False
        fd = os.open(self.used_file, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        self._fd = fd
        self.in_flight = 1
        return True

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0 and self._fd is not None:
            os.utime(self._fd)  # idle from now
            os.close(self._fd)
            self._fd = None


# -- the supervisor's side ------------------------------------------------------------------------
class Sleeper:
    """The supervisor's pause between looks, for a stack with no model loaded on demand."""

    def wait(self, timeout: float) -> None:
        time.sleep(timeout)

    def close(self) -> None:
        pass


class Waker(Sleeper):
    """The pause, cut short by a request asking for a load (a byte down run/wake)."""

    def __init__(self, run: Path) -> None:
        path = run / WAKE_FIFO
        self._read = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        # A writer of its own, so the pipe never reads as closed between the gateway's writes.
        self._hold = os.open(path, os.O_WRONLY | os.O_NONBLOCK)

    def wait(self, timeout: float) -> None:
        ready, _, _ = select.select([self._read], [], [], timeout)
        if ready:
            with contextlib.suppress(BlockingIOError):
                os.read(self._read, 4096)

    def close(self) -> None:
        os.close(self._read)
        os.close(self._hold)


def take_load_requests(run: Path) -> list[str]:
    """The models requests asked to load since the last look; their files removed."""
    d = run / LOAD_DIR
    try:
        names = os.listdir(d)
    except FileNotFoundError:
        return []
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(d / name)
    return names


def mark_loaded(run: Path, name: str) -> None:
    """Idle counts from the load, until a request ends."""
    path = run / USED_DIR / name
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
    os.utime(path)


def idle_for(run: Path, name: str, loaded_at: float) -> float:
    """Seconds since the model's last request ended, or since it was loaded (wall clock)
    if later or it has had none."""
    try:
        used = os.stat(run / USED_DIR / name).st_mtime
    except FileNotFoundError:
        used = 0.0
    return time.time() - max(used, loaded_at)


def lock_idle(run: Path, name: str) -> int | None:
    """An exclusive lock on the model's use (a descriptor to `release`), or None while a
    request for it is in flight."""
    fd = os.open(run / USED_DIR / name, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def release(fd: int) -> None:
    os.close(fd)


def in_flight(run: Path, names: list[str], locks: Path = Path("/proc/locks")) -> set[str]:
    """Which of the models have requests in flight: the gateway's shared locks on their use
    files, as the kernel lists them. Read-only: trying the lock instead would hold off a
    request arriving in that instant."""
    inodes: dict[tuple[int, int], str] = {}
    for name in names:
        try:
            st = os.stat(run / USED_DIR / name)
        except FileNotFoundError:
            continue
        inodes[(st.st_dev, st.st_ino)] = name
    if not inodes:
        return set()
    found: set[str] = set()
    try:
        text = locks.read_text()
    except OSError:
        return found
    for line in text.splitlines():
        # "1: FLOCK  ADVISORY  READ  1234 00:2b:5678 0 EOF"; a waiter's line has "->" first.
        parts = line.split()
        if len(parts) < 6 or parts[1] != "FLOCK" or parts[3] != "READ":
            continue
        try:
            major, minor, ino = parts[5].split(":")
            dev = os.makedev(int(major, 16), int(minor, 16))
            held = inodes.get((dev, int(ino)))
        except ValueError:
            continue
        if held is not None:
            found.add(held)
    return found
