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

# Version 2 adds a model's projector, [models.NAME.mmproj]; version 3 a model's signer; version
# 4 a model's previous pin and its upgrade candidate ([models.NAME.previous], .candidate). A lock
# is written at the lowest version that holds what it pins: a sovctl from before projectors,
# signatures or upgrades keeps reading a lock that has none. Older locks read as they are.
LOCK_VERSION = 4
_PLAIN_VERSION = 1
_PROJECTOR_VERSION = 2
_SIGNER_VERSION = 3
# The pins an entry keeps beside its own (`sovctl upgrade`, `sovctl rollback`).
_BESIDE = ("previous", "candidate")


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
    # The key that signed its files (`sovctl sign`): the sha256 of its public key (PEM), the
    # key id model-signing writes in each signature; "" when unsigned. See store.signatures.
    signer: str = ""
    mmproj: ProjectorPin | None = None
    # `sovctl upgrade`: the pin this name had before its last switch (what `sovctl rollback`
    # switches back to), and a candidate pulled beside it, compared but served only once
    # applied. Each is a pin of the same fields, with no previous or candidate of its own.
    previous: LockEntry | None = None
    candidate: LockEntry | None = None

    @property
    def short_sha(self) -> str:
        return self.sha256[:12]

    @property
    def blobs(self) -> tuple[str, ...]:
        """The sha256 of every file this name pins: its weights, then its projector."""
        return (self.sha256, self.mmproj.sha256) if self.mmproj else (self.sha256,)

    @property
    def held(self) -> tuple[str, ...]:
        """Every blob the name keeps in the store: its pin's, then its previous and its
        candidate pins' (kept for a rollback or an upgrade, though not served)."""
        out = list(self.blobs)
        for pin in (self.previous, self.candidate):
            out += [b for b in (pin.blobs if pin is not None else ()) if b not in out]
        return tuple(out)

    def pin_only(self) -> LockEntry:
        """The pin alone, without the pins kept beside it."""
        return dataclasses.replace(self, previous=None, candidate=None)

    def to_toml(self) -> dict[str, Any]:
        body = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in ("name", "mmproj", *_BESIDE) and getattr(self, f.name) != ""}
        if self.mmproj is not None:
            body["mmproj"] = {k: v for k, v in dataclasses.asdict(self.mmproj).items() if v != ""}
        for key in _BESIDE:
            pin = getattr(self, key)
            if pin is not None:
                body[key] = pin.to_toml()
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
    if "signer" in body and not is_sha256_hex(body["signer"]):
        raise ConfigError(f"lock file {path}: {what} has a bad signer (a key id is 64 hex "
                          "characters)", hint=hint)
    return body


def _entry(name: str, body: Any, what: str, path: Path, hint: str) -> LockEntry:
    """One pin of the lock: its fields and its projector."""
    projector = body.pop("mmproj", None) if isinstance(body, dict) else None
    fields = _scalars(LockEntry, body, _REQUIRED, what, path, hint)
    pin = None
    if projector is not None:
        pin = ProjectorPin(**_scalars(ProjectorPin, projector, _PROJECTOR_REQUIRED,
                                      f"{what}: mmproj", path, hint))
    return LockEntry(name=name, **fields, mmproj=pin)


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
        if data.get("version") not in (_PLAIN_VERSION, _PROJECTOR_VERSION, _SIGNER_VERSION,
                                       LOCK_VERSION):
            raise ConfigError(
                f"lock file {path} has version {data.get('version')!r}, expected "
                f"{_PLAIN_VERSION} to {LOCK_VERSION}",
                hint=hint,
            )
        models = data.get("models", {})
        if not isinstance(models, dict):
            raise ConfigError(f"lock file {path}: [models] must be a table", hint=hint)
        entries = {}
        for name, body in models.items():
            try:
                check_name(name)
            except UsageError:
                raise ConfigError(
                    f"lock file {path}: {name!r} is not a valid model name", hint=hint
                ) from None
            beside = {key: body.pop(key, None) if isinstance(body, dict) else None
                      for key in _BESIDE}
            pins = {key: _entry(name, pin, f"entry {name!r}: {key}", path, hint)
                    if pin is not None else None for key, pin in beside.items()}
            entries[name] = dataclasses.replace(_entry(name, body, f"entry {name!r}", path, hint),
                                                previous=pins["previous"],
                                                candidate=pins["candidate"])
        return cls(entries)

    @classmethod
    @contextmanager
    def editing(cls, home: Home) -> Iterator[Lock]:
        with file_lock(home.root / "store" / ".lock.flock", what="sovctl.lock"):
            lock = cls.load(home)
            yield lock
            lock.save(home)

    def save(self, home: Home) -> None:
        entries = self.entries.values()
        pins = [p for e in entries for p in (e, e.previous, e.candidate) if p is not None]
        doc = {
            "version": LOCK_VERSION if any(e.previous or e.candidate for e in entries)
            else _SIGNER_VERSION if any(p.signer for p in pins)
            else _PROJECTOR_VERSION if any(p.mmproj for p in pins)
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
        """Every name that keeps these bytes, as its weights or its projector, in its pin or
        in the previous or candidate pin kept beside it: while one does, they stay stored."""
        return sorted(n for n, e in self.entries.items() if sha256 in e.held)
