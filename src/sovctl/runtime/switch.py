"""Switching a served model to other weights while the stack runs, losing no request
(`sovctl upgrade --apply`, `sovctl rollback`): how the CLI, the supervisor and the gateway
speak of it, through files in the run folder.

- `switch/NAME` (a `SwitchRequest`, JSON, written atomically by the CLI) asks the supervisor to
  serve NAME from another blob. The supervisor takes it (removes it), starts a second runtime
  for NAME on a new port (the same argv but for the model and the port, the same internal
  key), and once that one answers its health check, writes state.json naming the new port:
  from then on the gateway sends NAME's requests there. The old runtime is stopped only once
  no request is in flight on it and none can be sent to it any more (below); state.json's
  `switches` tells the CLI how it went.
- `serving/NAME.PORT` exists while the runtime of NAME on PORT may be sent requests. The
  gateway holds a shared lock on it while any request is in flight there, and takes it before
  sending (never creating the file). To retire a port the supervisor takes the exclusive lock
  (so none is in flight) and removes the file while holding it: a gateway that read an older
  state.json then finds no file, or a lock it cannot take, or a file that is not the one it
  opened, reads state.json afresh and sends the request to the new port instead. No request
  reaches a runtime being stopped, and none on it is cut off.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from sovctl.fsutil import atomic_write, fresh_private_dir
from sovctl.runtime.documents import SERVING_DIR, SWITCH_DIR


@dataclass(frozen=True)
class SwitchRequest:
    """Serve `name` from these weights: a blob of the store, checked against the lock by the
    CLI that asks."""

    id: str  # chosen by the CLI, to find its outcome in state.json's switches
    name: str
    sha256: str
    size: int
    blob: str
    why: str  # "upgrade" | "rollback": said in the supervisor's events

    @classmethod
    def from_json(cls, text: str) -> SwitchRequest | None:
        try:
            d = json.loads(text)
            return cls(**{k: d[k] for k in ("id", "name", "sha256", "size", "blob", "why")})
        except (ValueError, KeyError, TypeError):
            return None


def prepare(run: Path) -> None:
    """The folders, empty: a request or a port left from an earlier stack means nothing."""
    for sub in (SWITCH_DIR, SERVING_DIR):
        fresh_private_dir(run / sub)


# -- the CLI's side -------------------------------------------------------------------------------
def ask(run: Path, request: SwitchRequest) -> None:
    d = run / SWITCH_DIR
    d.mkdir(parents=True, exist_ok=True)
    atomic_write(d / request.name, json.dumps(asdict(request)).encode(), mode=0o600)


# -- the supervisor's side ------------------------------------------------------------------------
def take_requests(run: Path) -> list[SwitchRequest | str]:
    """The requests written since the last look, their files removed; a file that holds no
    request is given by its name alone (the supervisor says so and drops it)."""
    d = run / SWITCH_DIR
    try:
        names = os.listdir(d)
    except FileNotFoundError:
        return []
    found: list[SwitchRequest | str] = []
    for name in names:
        if name.startswith("."):
            continue  # atomic_write's temporary file, not yet renamed
        try:
            text = (d / name).read_text()
        except FileNotFoundError:
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(d / name)
        found.append(SwitchRequest.from_json(text) or name)
    return found


def _serving(run: Path, name: str, port: int) -> Path:
    return run / SERVING_DIR / f"{name}.{port}"


def open_port(run: Path, name: str, port: int) -> None:
    """The runtime of `name` on `port` may be sent requests (written before it starts)."""
    os.close(os.open(_serving(run, name, port), os.O_WRONLY | os.O_CREAT, 0o600))


def retire_port(run: Path, name: str, port: int) -> bool:
    """Whether no request is in flight on the runtime of `name` on `port` and none can be sent
    to it any more (True: its file is gone); False while one is in flight."""
    path = _serving(run, name, port)
    try:
        fd = os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    else:
        # Removed under the exclusive lock: a gateway that opened it before gets the shared
        # lock only after this, and sees that the name no longer leads to what it opened.
        path.unlink(missing_ok=True)
        return True
    finally:
        os.close(fd)


# -- the gateway's side ---------------------------------------------------------------------------
class Ports:
    """One model's requests in flight per runtime port, as the gateway tells the supervisor."""

    def __init__(self, run: Path, name: str) -> None:
        self.run = run
        self.name = name
        # A gateway run without a supervisor (no serving folder) sends where state.json says.
        self.managed = (run / SERVING_DIR).is_dir()
        self._held: dict[int, list[int]] = {}  # port -> [descriptor, requests in flight]

    def enter(self, port: int) -> bool:
        """Count a request in on `port`: False when that port is retired (or being retired),
        so the request must go where state.json says now."""
        held = self._held.get(port)
        if held is not None:
            held[1] += 1
            return True
        if not self.managed:
            self._held[port] = [-1, 1]
            return True
        path = _serving(self.run, self.name, port)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except (BlockingIOError, FileNotFoundError):
            same = False
        if not same:
            os.close(fd)
            return False
        self._held[port] = [fd, 1]
        return True

    def leave(self, port: int) -> None:
        held = self._held[port]
        held[1] -= 1
        if held[1] == 0:
            del self._held[port]
            if held[0] >= 0:
                os.close(held[0])

    def busy(self) -> set[int]:
        """The ports with requests in flight."""
        return set(self._held)
