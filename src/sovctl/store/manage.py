"""What an operator does with weights already in the store: verify, list, remove."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

from sovctl.errors import IntegrityError
from sovctl.home import Home
from sovctl.result import utcnow
from sovctl.store import gguf_info, integrity, signatures
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
    # For a signed name (the lock names its signer): "ok" | "bad" (it does not verify, or the
    # blob's bytes are not the signed ones) | "missing" (no signature by that key in the
    # store) | "untrusted" (no key of [trust] keys has that id); "" when unsigned.
    signature: str = ""
    signer: str = ""  # the signer's key id, as the lock names it
    signer_name: str = ""  # its name in [trust] keys, when trusted
    reason: str = ""  # why the signature check failed, naming the file

    @property
    def signature_ok(self) -> bool:
        return self.signature in ("", "ok")


@dataclass(frozen=True)
class VerifyResult:
    items: tuple[VerifyItem, ...]

    @property
    def ok(self) -> bool:
        return all(i.status == "ok" and i.signature_ok for i in self.items)

    @property
    def bad_signatures(self) -> tuple[VerifyItem, ...]:
        return tuple(i for i in self.items if not i.signature_ok)


def verify(
    home: Home,
    names: Sequence[str] = (),
    progress: Callable[[str, int], Progress] | None = None,
    trust: Mapping[str, str] | None = None,
) -> VerifyResult:
    """Re-hash each named blob (all when none named) against the lock, and check the signature
    of each signed one with the key of `trust` ([trust] keys) it names. Fully offline. A
    projector is checked as its own item, NAME/mmproj."""
    import time

    lock = Lock.load(home)
    entries = [lock.get(n) for n in names] if names else list(lock.entries.values())
    # Keys are read only when a signature is to be checked: an unsigned store needs none.
    keys = signatures.trusted(trust or {}) if any(e.signer for e in entries) else {}
    items = []
    ok = {}
    for e in entries:
        files = [(e.name, e.sha256, e.size)]
        if e.mmproj is not None:
            files.append((f"{e.name}/mmproj", e.mmproj.sha256, e.mmproj.size))
        good = True
        for label, sha256, size in files:
            start = time.perf_counter()
            cb = progress(f"verify {label}", size) if progress else None
            r = integrity.check(home, label, sha256, size, full=True, progress=cb)
            signed = _signature(home, e.signer, label, r, keys) if e.signer else ("", "")
            items.append(VerifyItem(label, r.status, sha256, r.actual,
                                    size if r.size is None else r.size,
                                    time.perf_counter() - start, signed[0], e.signer,
                                    keys[e.signer].name if e.signer in keys else "", signed[1]))
            good = good and r.ok and signed[0] in ("", "ok")
        if good:
            ok[e.name] = e.blobs
    if ok:
        now = utcnow()
        with Lock.editing(home) as edit:
            for n, blobs in ok.items():
                # Only if the name still pins the bytes just hashed (no rm + pull meanwhile).
                if n in edit.entries and edit.entries[n].blobs == blobs:
                    edit.entries[n] = replace(edit.entries[n], verified_at=now)
    return VerifyResult(tuple(items))


def _signature(home: Home, signer: str, label: str, blob: integrity.BlobCheck,
               keys: Mapping[str, signatures.TrustedKey]) -> tuple[str, str]:
    """(status, reason) of the signature of one checked blob by the key the lock names."""
    key = keys.get(signer)
    if key is None:
        return "untrusted", (f"{label} is signed by key {signer[:16]}, which [trust] keys does "
                             "not hold")
    sig = signatures.path(home, blob.sha256, signer)
    try:
        data = sig.read_bytes()
    except FileNotFoundError:
        return "missing", f"{label}: no signature by key {key.name} in the store ({sig})"
    try:
        signatures.check(data, blob.sha256, key, label=f"{label} ({sig})")
    except IntegrityError as e:
        return "bad", e.message
    if not blob.ok:
        path = BlobStore(home).path(blob.sha256)
        now = f"hashes to {blob.actual}" if blob.status == "mismatch" else "is missing"
        return "bad", (f"{label}: {path} {now}, not the sha256 {blob.sha256} that key "
                       f"{key.name} signed")
    return "ok", ""


@dataclass(frozen=True)
class ModelRow:
    entry: LockEntry
    present: bool
    facts: GgufFacts | None
    mmproj_present: bool | None = None  # whether its projector's blob is there; None: it has none


def list_models(home: Home) -> list[ModelRow]:
    lock = Lock.load(home)
    store = BlobStore(home)
    rows = []
    for name in sorted(lock.entries):
        e = lock.entries[name]
        present = store.has(e.sha256)
        facts = gguf_info.facts_for(home, e.sha256, store.path(e.sha256)) if present else None
        rows.append(ModelRow(e, present, facts,
                             store.has(e.mmproj.sha256) if e.mmproj is not None else None))
    return rows


@dataclass(frozen=True)
class RemoveResult:
    name: str
    sha256: str
    blob_removed: bool
    still_used_by: tuple[str, ...]
    mmproj_sha256: str = ""  # its projector's blob, when it had one
    mmproj_removed: bool = False
    mmproj_still_used_by: tuple[str, ...] = ()


def remove(home: Home, name: str) -> RemoveResult:
    """Unpin a name; each of its blobs goes too once no other name pins it."""
    store = BlobStore(home)
    with Lock.editing(home) as lock:
        entry = lock.get(name)
        del lock.entries[name]
        # Its previous and candidate pins' blobs too (sovctl upgrade): no name keeps them now.
        users = {sha256: tuple(lock.names_for_blob(sha256)) for sha256 in entry.held}
        for sha256, others in users.items():
            if not others:
                # Under the lock, so that a concurrent pull cannot pin this blob as it goes.
                store.remove(sha256)
                integrity.forget(home, sha256)
                gguf_info.forget(home, sha256)
                signatures.remove(home, sha256)
    others = users[entry.sha256]
    if entry.mmproj is None:
        return RemoveResult(name, entry.sha256, not others, others)
    mm_others = users[entry.mmproj.sha256]
    return RemoveResult(name, entry.sha256, not others, others, entry.mmproj.sha256,
                        not mm_others, mm_others)
