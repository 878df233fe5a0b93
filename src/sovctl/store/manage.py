"""What an operator does with weights already in the store: verify, list, remove."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from sovctl.home import Home
from sovctl.result import utcnow
from sovctl.store import gguf_info, integrity
from sovctl.store.blobs import BlobStore, Progress
from sovctl.store.gguf_info import GgufFacts
from sovctl.store.lock import Lock, LockEntry


@dataclass(frozen=True)
class VerifyItem:
    name: str
    status: str  # "ok" | "mismatch" | "missing"
    expected: str
    actual: str | None
    size: int
    seconds: float


@dataclass(frozen=True)
class VerifyResult:
    items: tuple[VerifyItem, ...]

    @property
    def ok(self) -> bool:
        return all(i.status == "ok" for i in self.items)


def verify(
    home: Home,
    names: Sequence[str] = (),
    progress: Callable[[str, int], Progress] | None = None,
) -> VerifyResult:
    """Re-hash each named blob (all when none named) against the lock. Fully offline."""
    import time

    lock = Lock.load(home)
    entries = [lock.get(n) for n in names] if names else list(lock.entries.values())
    items = []
    for e in entries:
        start = time.perf_counter()
        cb = progress(f"verify {e.name}", e.size) if progress else None
        r = integrity.check(home, e.name, e.sha256, e.size, full=True, progress=cb)
        items.append(VerifyItem(e.name, r.status, e.sha256, r.actual,
                                e.size if r.size is None else r.size, time.perf_counter() - start))
    ok = {i.name: i.expected for i in items if i.status == "ok"}
    if ok:
        now = utcnow()
        with Lock.editing(home) as edit:
            for n, sha in ok.items():
                # Only if the name still pins the bytes just hashed (no rm + pull meanwhile).
                if n in edit.entries and edit.entries[n].sha256 == sha:
                    edit.entries[n] = replace(edit.entries[n], verified_at=now)
    return VerifyResult(tuple(items))


@dataclass(frozen=True)
class ModelRow:
    entry: LockEntry
    present: bool
    facts: GgufFacts | None


def list_models(home: Home) -> list[ModelRow]:
    lock = Lock.load(home)
    store = BlobStore(home)
    rows = []
    for name in sorted(lock.entries):
        e = lock.entries[name]
        present = store.has(e.sha256)
        facts = gguf_info.facts_for(home, e.sha256, store.path(e.sha256)) if present else None
        rows.append(ModelRow(e, present, facts))
    return rows


@dataclass(frozen=True)
class RemoveResult:
    name: str
    sha256: str
    blob_removed: bool
    still_used_by: tuple[str, ...]


def remove(home: Home, name: str) -> RemoveResult:
    store = BlobStore(home)
    with Lock.editing(home) as lock:
        entry = lock.get(name)
        del lock.entries[name]
        others = tuple(lock.names_for_blob(entry.sha256))
        if not others:
            # Under the lock, so that a concurrent pull cannot pin this blob as it goes.
            store.remove(entry.sha256)
            integrity.forget(home, entry.sha256)
            gguf_info.forget(home, entry.sha256)
    return RemoveResult(name, entry.sha256, not others, others)
