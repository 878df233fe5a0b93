"""The logs of a running stack: HOME/logs/NAME.log, mode 0600 in a 0700 directory, each rotated
by size while its process runs.

A supervised child writes into a pipe, never into its file. A thread of the supervisor reads the
pipe and writes what comes out into the file, and that writer alone rotates it: NAME.log becomes
NAME.log.1 (NAME.log.1 becomes .2, and so on, the oldest dropped) before a write would take it
past the limit. A child holding the file itself would write on into the renamed file; truncating
under it (copy-truncate) loses what it writes between the copy and the truncation.
"""

from __future__ import annotations

import array
import contextlib
import fcntl
import os
import select
import termios
import threading
import time
from pathlib import Path

FILE_MODE = 0o600
DIR_MODE = 0o700
# What is kept in memory of one start's output for the supervisor to read (a runtime's load log,
# ssh's reason for failing): its beginning, as much as a model load prints and more.
HEAD_BYTES = 256 * 1024
_READ = 64 * 1024


def ensure_dir(path: Path) -> None:
    """The logs directory, only its owner let in: what a process logs is the operator's alone."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, DIR_MODE)


def open_log(path: Path) -> int:
    """A descriptor appending to `path`, a file only its owner reads, whatever mode it had."""
    ensure_dir(path.parent)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, FILE_MODE)
    os.fchmod(fd, FILE_MODE)  # a file made by an older sovctl was group-readable
    return fd


class RotatingLog:
    """One log file, rotated before a write would take it past `max_bytes`, keeping `backups`
    older files. Thread-safe: the writer of a process's output and the supervisor's events may
    share it."""

    def __init__(self, path: Path, max_bytes: int, backups: int) -> None:
        self.path, self.max_bytes, self.backups = path, max_bytes, backups
        self._lock = threading.Lock()
        self._fd = open_log(path)

    def write(self, data: bytes) -> None:
        with self._lock:
            if self._fd < 0:
                return  # closed: a child that outlived the supervisor's wait for its output
            size = os.fstat(self._fd).st_size
            if size and size + len(data) > self.max_bytes:
                # The complete lines that still fit end this file; the rest begins the next.
                cut = data.rfind(b"\n", 0, self.max_bytes - size) + 1
                self._write(data[:cut])
                data = data[cut:]
                self._rotate()
            self._write(data)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]

    def _rotate(self) -> None:
        os.close(self._fd)
        # A file removed by hand meanwhile is simply not there to move.
        with contextlib.suppress(FileNotFoundError):
            for i in range(self.backups - 1, 0, -1):
                older = self.path.with_name(f"{self.path.name}.{i}")
                if older.exists():
                    os.replace(older, self.path.with_name(f"{self.path.name}.{i + 1}"))
            if self.backups:
                os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
            else:
                self.path.unlink()
        self._fd = open_log(self.path)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                # Never written through again: the number may be another file's by then.
                self._fd = -1


class Pump:
    """One start of a child: what it writes to the pipe `fd` (its stdout and stderr) goes to
    `log`, by a thread of its own that reads as fast as the child writes, so the child never
    waits on the supervisor; the first HEAD_BYTES are also kept for the supervisor to read."""

    def __init__(self, fd: int, log: RotatingLog) -> None:
        self._fd, self._log = fd, log
        self._head = bytearray()
        # Held while a chunk is read and handed on (never while waiting for one): whoever holds
        # it sees nothing in hand, only what is still in the pipe.
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"log {log.path.name}",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        ready = select.poll()  # not select(): a descriptor may be numbered past 1023
        ready.register(self._fd, select.POLLIN)
        while True:
            ready.poll()  # data, or the end of it: the read below does not block
            with self._lock:
                chunk = os.read(self._fd, _READ)
                if not chunk:
                    os.close(self._fd)
                    self._fd = -1
                    return
                if len(self._head) < HEAD_BYTES:
                    self._head += chunk[:HEAD_BYTES - len(self._head)]
                # A full disk loses lines, never the child: it must not block on its pipe.
                with contextlib.suppress(OSError):
                    self._log.write(chunk)

    def _caught_up(self) -> bool:
        with self._lock:
            if self._fd < 0:
                return True
            pending = array.array("i", [0])
            fcntl.ioctl(self._fd, termios.FIONREAD, pending)
            return pending[0] == 0

    def head(self, timeout: float = 0.5) -> str:
        """What the child wrote first since this start: all it has written by now (waiting up
        to `timeout` for the thread to read it), as far as HEAD_BYTES."""
        deadline = time.monotonic() + timeout
        while len(self._head) < HEAD_BYTES and not self._caught_up() \
                and time.monotonic() < deadline:
            time.sleep(0.01)
        return bytes(self._head).decode(errors="replace")

    def drain(self, timeout: float) -> None:
        """Wait for the end of the output of a child that has exited: all it wrote is read."""
        self._thread.join(timeout)
