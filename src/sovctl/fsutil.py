"""Small filesystem primitives: durable writes and renames, and advisory file locks."""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from sovctl.errors import BusyError


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write via a temp file in the same directory and rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_path(path.parent)


def fsync_path(path: Path) -> None:
    """Wait until what was written to `path`, by any descriptor, is on disk. For a directory:
    its entries, which a rename or a new file changes and which its files do not carry."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def file_lock(path: Path, timeout: float = 600.0, what: str = "the store") -> Iterator[None]:
    """Exclusive flock on `path`; waits up to `timeout` seconds for another sovctl to finish."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise BusyError(
                        f"another sovctl process is still working on {what}",
                        hint=f"wait for it to finish, or remove a stale {path} if none runs",
                    ) from None
                time.sleep(0.1)
        yield
    finally:
        os.close(fd)


def fresh_private_dir(path: Path) -> None:
    """`path` as a folder only its owner opens (0700), empty: what an earlier run left in it
    means nothing now."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    for f in path.iterdir():
        with contextlib.suppress(FileNotFoundError):
            f.unlink()
