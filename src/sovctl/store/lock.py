"""sovctl.lock: the pin of every name to a source, a resolved commit, a size and a sha256.

The file is TOML, human-readable, and only ever replaced atomically under the store lock,
so a reader sees the old lock or the new one, never half of either.
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from sovctl.errors import ConfigError, NotFoundError, UsageError
from sovctl.fsutil import atomic_write, file_lock
from sovctl.home import Home
from sovctl.names import check_name, is_sha256_hex

# Version 2 adds a model's projector, [models.NAME.mmproj]. A lock without one is still
# written as version 1: a sovctl from before projectors keeps reading it.
LOCK_VERSION = 2
_PLAIN_VERSION = 1


@dataclass(frozen=True)
class ProjectorPin:
    """A model's multimodal projector (mmproj): a second GGUF file, pinned like the weights
    (the same fields, same meanings), verified with them and served with them."""

    sha256: str
    size: int
    source: str
    ref: str
    digest_from: str
    repo: str = ""
    path: str = ""
    endpoint: str = ""
    url: str = ""
    revision: str = ""
    commit: str = ""

    @classmethod
    def from_entry(cls, e: LockEntry) -> ProjectorPin:
        return cls(**{f.name: getattr(e, f.name) for f in dataclasses.fields(cls)})


@dataclass(frozen=True)
class LockEntry:
    name: str
    sha256: str
    size: int
    source: str  # "hf" | "url" | "file"
    ref: str  # what the operator asked for, as typed
    pulled_at: str
    digest_from: str  # "hub" | "flag" | "hub+flag" | "trust-on-first-use" | "computed"
    repo: str = ""
    path: str = ""
    endpoint: str = ""
    url: str = ""
    revision: str = ""
    commit: str = ""
    verified_at: str = ""
    mmproj: ProjectorPin | None = None

    @property
    def short_sha(self) -> str:
        return self.sha256[:12]

    @property
    def blobs(self) -> tuple[str, ...]:
        """The sha256 of every file this name pins: its weights, then its projector."""
        return (self.sha256, self.mmproj.sha256) if self.mmproj else (self.sha256,)

    def to_toml(self) -> dict[str, Any]:
        body = {k: v for k, v in dataclasses.asdict(self).items()
                if k not in ("name", "mmproj") and v != ""}
        if self.mmproj is not None:
            body["mmproj"] = {k: v for k, v in dataclasses.asdict(self.mmproj).items() if v != ""}
        return body


_REQUIRED = ("sha256", "size", "source", "ref", "pulled_at", "digest_from")
_PROJECTOR_REQUIRED = ("sha256", "size", "source", "ref", "digest_from")


def _scalars(cls: type, body: Any, required: tuple[str, ...], what: str, path: Path,
             hint: str) -> dict[str, Any]:
    """A lock table's string and integer fields, checked against those of `cls`."""
    types = {f.name: f.type for f in dataclasses.fields(cls) if f.type in ("str", "int")}
    types.pop("name", None)  # the table's key, never a field in it
    if not isinstance(body, dict) or any(k not in body for k in required):
        raise ConfigError(f"lock file {path}: {what} is incomplete", hint=hint)
    unknown = set(body) - set(types)
    if unknown:
        raise ConfigError(f"lock file {path}: {what} has unknown keys {sorted(unknown)}",
                          hint=hint)
    for k, v in body.items():
        want = int if types[k] == "int" else str
        if type(v) is not want:
            raise ConfigError(
                f"lock file {path}: {what}: {k} must be a{'n' * (want is int)} "
                f"{want.__name__}, got {v!r}",
                hint=hint,
            )
    if not is_sha256_hex(body["sha256"]):
        raise ConfigError(f"lock file {path}: {what} has a bad sha256", hint=hint)
    return body


class Lock:
    """An in-memory copy of the lock file; `Lock.editing(home)` writes it back atomically."""

    def __init__(self, entries: dict[str, LockEntry]) -> None:
        self.entries = entries

    @classmethod
    def load(cls, home: Home) -> Lock:
        if not home.lock_path.exists():
            return cls({})
        return cls.read(home.lock_path)

    @classmethod
    def read(cls, path: Path) -> Lock:
        """A lock file: this home's, or another box's (see pull --lock)."""
        hint = f"restore it from a backup or fix it by hand; sovctl left {path} untouched"
        try:
            data = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"lock file {path} is malformed: {e}", hint=hint) from e
        except OSError as e:
            raise ConfigError(f"cannot read lock file {path}: {e.strerror}", hint=hint) from e
        if data.get("version") not in (_PLAIN_VERSION, LOCK_VERSION):
            raise ConfigError(
                f"lock file {path} has version {data.get('version')!r}, expected "
                f"{_PLAIN_VERSION} or {LOCK_VERSION}",
                hint=hint,
            )
        models = data.get("models", {})
        if not isinstance(models, dict):
            raise ConfigError(f"lock file {path}: [models] must be a table", hint=hint)
        entries = {}
        for name, body in models.items():
            what = f"entry {name!r}"
            projector = body.pop("mmproj", None) if isinstance(body, dict) else None
            fields = _scalars(LockEntry, body, _REQUIRED, what, path, hint)
            try:
                check_name(name)
            except UsageError:
                raise ConfigError(
                    f"lock file {path}: {name!r} is not a valid model name", hint=hint
                ) from None
            pin = None
            if projector is not None:
                pin = ProjectorPin(**_scalars(ProjectorPin, projector, _PROJECTOR_REQUIRED,
                                              f"{what}: mmproj", path, hint))
            entries[name] = LockEntry(name=name, **fields, mmproj=pin)
        return cls(entries)

    @classmethod
    @contextmanager
    def editing(cls, home: Home) -> Iterator[Lock]:
        with file_lock(home.root / "store" / ".lock.flock", what="sovctl.lock"):
            lock = cls.load(home)
            yield lock
            lock.save(home)

    def save(self, home: Home) -> None:
        doc = {
            "version": LOCK_VERSION if any(e.mmproj for e in self.entries.values())
            else _PLAIN_VERSION,
            "models": {n: e.to_toml() for n, e in sorted(self.entries.items())},
        }
        header = b"# Written by sovctl. Each entry pins a name to a commit and a sha256.\n"
        atomic_write(home.lock_path, header + tomli_w.dumps(doc).encode())

    def get(self, name: str) -> LockEntry:
        try:
            return self.entries[name]
        except KeyError:
            known = ", ".join(sorted(self.entries)) or "none yet"
            raise NotFoundError(
                f"no model named {name!r} in the store",
                hint=f"known: {known}; add one with 'sovctl pull REF'",
            ) from None

    def names_for_blob(self, sha256: str) -> list[str]:
        """Every name that pins these bytes, as its weights or as its projector."""
        return sorted(n for n, e in self.entries.items() if sha256 in e.blobs)
