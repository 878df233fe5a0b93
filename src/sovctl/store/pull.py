"""`sovctl pull`: bring weights into the store, verified as they arrive, and pin them."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from sovctl.errors import IntegrityError, UsageError
from sovctl.fsutil import file_lock, fsync_path
from sovctl.home import Home
from sovctl.names import check_name, is_sha256_hex, name_from_filename
from sovctl.store import gguf_info, integrity
from sovctl.store.blobs import BlobStore
from sovctl.store.lock import Lock, LockEntry, ProjectorPin
from sovctl.store.sources import HubSource, ProgressFactory, Resolved, Source, source_for


@dataclass(frozen=True)
class PullResult:
    name: str
    action: str  # "downloaded" | "resumed" | "imported" | "linked" | "already-pinned"
    entry: LockEntry
    transferred: int  # bytes that crossed the network (or were copied) in this run
    resumed_from: int
    mmproj_action: str = ""  # what happened to the projector, as `action`; "" if none asked


@dataclass(frozen=True)
class ReplicaResult:
    lock: str  # the other box's lock file
    pulled: tuple[PullResult, ...]
    skipped: tuple[tuple[str, str], ...]  # (name, why): pins no Hub endpoint can serve


@dataclass(frozen=True)
class _Download:
    """One file to bring into the store: its source, and what its bytes must be."""

    source: Source
    want: Resolved


def _check_sha(value: str | None, flag: str) -> str | None:
    if value is None:
        return None
    v = value.lower().removeprefix("sha256:")
    if not is_sha256_hex(v):
        raise UsageError(f"{flag} {value!r} is not a sha256 hex digest (64 hex characters)")
    return v


def _already(
    lock: Lock,
    store: BlobStore,
    source: Source,
    name: str | None,
    projector: Source | None,
) -> LockEntry | None:
    def same(pin: LockEntry | ProjectorPin, source: Source) -> bool:
        return source.pins(pin) and store.has(pin.sha256, pin.size)

    for entry in lock.entries.values():
        if name is not None and entry.name != name:
            continue
        if projector is not None and (entry.mmproj is None
                                      or not same(entry.mmproj, projector)):
            continue
        if same(entry, source):
            return entry
    return None


def _disagrees(flag: str, wanted: str | None, pinned: str, name: str) -> None:
    if wanted and wanted != pinned:
        raise IntegrityError(
            f"{flag} {wanted} disagrees with the sha256 {pinned} that {name!r} is pinned to",
            hint="check where your expected digest came from; the store was left as it was",
        )


def _repin(dl: _Download, pinned: LockEntry | ProjectorPin) -> _Download:
    """The same source again, its blob lost: the bytes must be the ones that were pinned."""
    want = dl.want
    return replace(dl, want=replace(
        want,
        expected_sha=pinned.sha256,
        entry=replace(want.entry, sha256=pinned.sha256, digest_from=pinned.digest_from),
    ))


def _weights(label: str, facts: gguf_info.GgufFacts) -> None:
    if facts.architecture == "clip":
        raise UsageError(
            f"{label} is a multimodal projector (general.architecture 'clip'), not a model",
            hint="pull the model it belongs to, with this file as its projector: "
            "sovctl pull MODEL --mmproj PROJECTOR",
        )


def _projector(label: str, facts: gguf_info.GgufFacts) -> None:
    if facts.architecture != "clip":
        raise UsageError(
            f"{label} is not a multimodal projector: its general.architecture is "
            f"{facts.architecture!r}, a projector's is 'clip'",
            hint="pass the model as REF and its projector (an mmproj-*.gguf file) as --mmproj",
        )


def pull(
    home: Home,
    ref_text: str,
    *,
    name: str | None = None,
    revision: str = "main",
    sha256: str | None = None,
    endpoint: str,
    trust_on_first_use: bool = False,
    progress: ProgressFactory | None = None,
    token: str | None = None,
    mmproj: str | None = None,
    mmproj_sha256: str | None = None,
) -> PullResult:
    """Pin REF under a name; with `mmproj`, pin that projector with it, both or neither.
    `token` is the Hub's (HF_TOKEN): given to the Hub's source only (see source_for)."""
    if name is not None:
        check_name(name)
    sha256 = _check_sha(sha256, "--sha256")
    mmproj_sha256 = _check_sha(mmproj_sha256, "--mmproj-sha256")
    if mmproj_sha256 and mmproj is None:
        raise UsageError("--mmproj-sha256 is the digest of a projector; there is no --mmproj",
                         hint="add --mmproj REF, or drop --mmproj-sha256")
    source = source_for(ref_text, endpoint=endpoint, revision=revision, hub_token=token)
    projector_source = source_for(mmproj, endpoint=endpoint, revision=revision,
                                  hub_token=token) if mmproj else None
    store = BlobStore(home)
    lock = Lock.load(home)

    done = _already(lock, store, source, name, projector_source)
    if done is not None:
        _disagrees("--sha256", sha256, done.sha256, done.name)
        if done.mmproj is not None:
            _disagrees("--mmproj-sha256", mmproj_sha256, done.mmproj.sha256, done.name)
        return PullResult(done.name, "already-pinned", done, 0, 0,
                          "already-pinned" if mmproj else "")

    have = sorted(lock.entries)
    dl = _Download(source, source.resolve(sha256, tofu=trust_on_first_use, have=have))
    final_name = name or name_from_filename(dl.want.entry.path
                                            or dl.want.entry.url.split("?")[0])
    mm_dl = None
    if projector_source is not None:
        mm_dl = _Download(projector_source, projector_source.resolve(
            mmproj_sha256, tofu=trust_on_first_use, have=have))
    existing = lock.entries.get(final_name)
    if existing is not None:
        if existing.ref != source.ref \
                or (dl.want.expected_sha or existing.sha256) != existing.sha256:
            raise UsageError(
                f"name {final_name!r} already pins {existing.ref} (sha256 {existing.short_sha})",
                hint=f"choose another --name, or 'sovctl rm {final_name}' first",
            )
        dl = _repin(dl, existing)
        pinned = existing.mmproj
        if mm_dl is not None and pinned is not None:
            if pinned.ref != mm_dl.source.ref \
                    or (mm_dl.want.expected_sha or pinned.sha256) != pinned.sha256:
                raise UsageError(
                    f"name {final_name!r} already pins the projector {pinned.ref} (sha256 "
                    f"{pinned.sha256[:12]})",
                    hint=f"choose another --name, or 'sovctl rm {final_name}' first",
                )
            mm_dl = _repin(mm_dl, pinned)

    # The projector first: it is the smaller file, so a failure of either costs little to
    # redo; and a wrong one is refused before the model is fetched at all.
    stored: list[str] = []
    try:
        projector = None
        if mm_dl is not None:
            projector = _fetch(home, store, mm_dl, f"{final_name}/mmproj", progress, have,
                               _projector)
            stored.append(projector.entry.sha256)
        model = _fetch(home, store, dl, final_name, progress, have, _weights)
        stored.append(model.entry.sha256)
        entry = _record(home, store, replace(
            model.entry, name=final_name,
            mmproj=ProjectorPin.from_entry(projector.entry) if projector else None))
    except BaseException:
        # Both or neither: a blob this pull stored and no name pins goes again.
        _drop_unpinned(home, store, stored)
        raise
    return PullResult(final_name, model.action, entry,
                      model.transferred + (projector.transferred if projector else 0),
                      model.resumed_from, projector.action if projector else "")


@dataclass(frozen=True)
class _Fetched:
    entry: LockEntry  # the download's entry with the digest and size of the stored bytes
    action: str
    transferred: int
    resumed_from: int


def _fetch(
    home: Home,
    store: BlobStore,
    dl: _Download,
    label: str,
    progress: ProgressFactory | None,
    have: list[str],
    accept: Callable[[str, gguf_info.GgufFacts], None],
) -> _Fetched:
    """Bring one file's bytes into the store, verified, and of the kind `accept` wants."""
    home.ensure(home.partials)
    want = dl.want
    key = want.expected_sha or hashlib.sha256(want.location.encode()).hexdigest()
    with file_lock(home.partials / f"{key}.flock", what=f"the download of {label}"):
        if want.expected_sha and store.has(want.expected_sha, want.expected_size):
            # Another name, or a concurrent pull that just finished, already holds these bytes.
            blob = store.path(want.expected_sha)
            accept(label, gguf_info.facts_for(home, want.expected_sha, blob))
            return _Fetched(replace(want.entry, size=blob.stat().st_size), "linked", 0, 0)
        partial = store.partial(key)
        got = dl.source.fetch(want, partial, label=label, progress=progress, have=have)
        try:
            if want.expected_sha and got.digest != want.expected_sha:
                raise IntegrityError(
                    f"{label}: sha256 mismatch: expected {want.expected_sha}, got {got.digest}; "
                    "nothing was stored",
                    hint="the bytes were altered on the way or at the source; try again or use "
                    "another --endpoint",
                )
            facts = _facts_while_syncing(partial, label=f"{label} ({want.entry.ref})")
            accept(label, facts)
        except (IntegrityError, UsageError):
            partial.unlink(missing_ok=True)
            raise
        store.adopt(partial, got.digest)
        integrity.record(home, got.digest)
        gguf_info.remember(home, got.digest, facts)
    return _Fetched(replace(want.entry, sha256=got.digest, size=got.size), got.action,
                    got.transferred, got.resumed_from)


def _facts_while_syncing(partial: Path, label: str) -> gguf_info.GgufFacts:
    """Parse the GGUF header while the disk takes the bytes: the two waits overlap instead of
    adding up, and `BlobStore.adopt`'s own fsync then finds nothing left to write."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="sovctl-fsync") as pool:
        synced = pool.submit(fsync_path, partial)
        facts = gguf_info.read_facts(partial, label=label)
        # A write error surfaces in the first fsync after it, not always in a later one.
        synced.result()
    return facts


def _record(home: Home, store: BlobStore, entry: LockEntry) -> LockEntry:
    """Pin the name, re-checking under the lock what may have changed since the pull began;
    the entry as pinned."""
    pulled = [(p.sha256, p.size) for p in (entry, entry.mmproj) if p is not None]
    with Lock.editing(home) as lock:
        existing = lock.entries.get(entry.name)
        if existing is not None and entry.mmproj is None:
            # A pull without --mmproj leaves the projector pinned before in place.
            entry = replace(entry, mmproj=existing.mmproj)
        if existing is not None and (_source(existing) != _source(entry) or (
                existing.mmproj is not None and entry.mmproj is not None
                and _source(existing.mmproj) != _source(entry.mmproj))):
            # Another pull took this name meanwhile; keep its pin (the caller drops our blobs).
            raise UsageError(
                f"name {entry.name!r} was just pinned to {existing.ref} by another sovctl",
                hint="choose another --name",
            )
        for sha256, size in pulled:
            if not store.has(sha256, size):
                # An `rm` of the last other name removed the blob meanwhile.
                raise IntegrityError(
                    f"the blob of {entry.name} disappeared from the store while pinning it",
                    hint="run the same 'sovctl pull' again",
                )
        lock.entries[entry.name] = entry
    return entry


def _source(pin: LockEntry | ProjectorPin) -> tuple[str, str]:
    return pin.ref, pin.sha256


def _drop_unpinned(home: Home, store: BlobStore, blobs: list[str]) -> None:
    """Remove the blobs no name pins (under the lock, so that no pull pins one as it goes)."""
    if not blobs:
        return
    with Lock.editing(home) as lock:
        for sha256 in blobs:
            if not lock.names_for_blob(sha256):
                store.remove(sha256)
                integrity.forget(home, sha256)
                gguf_info.forget(home, sha256)


def _unmirrorable(e: LockEntry) -> str | None:
    """Why a pin cannot be fetched from a Hub endpoint at its commit, or None."""
    for what, pin in (("it", e), ("its projector", e.mmproj)):
        if pin is None:
            continue
        if pin.source != HubSource.kind or not pin.commit:
            return (f"{what} was pinned from {pin.url or pin.path or pin.ref}, not the Hub, so "
                    "no mirror serves it: copy the file and 'sovctl pull PATH --name "
                    f"{e.name} --sha256 {pin.sha256}'")
    if e.mmproj is not None and e.mmproj.commit != e.commit:
        return (f"its projector is pinned at another commit ({e.mmproj.commit[:12]}) than the "
                f"model ({e.commit[:12]}): pull the two with 'sovctl pull'")
    return None


def pull_lock(home: Home, lock_path: Path, *, endpoint: str,
              progress: ProgressFactory | None = None, token: str | None = None
              ) -> ReplicaResult:
    """Every Hub pin of another box's lock, under its name, at its commit and sha256, from
    `endpoint` (that box's `sovctl mirror serve`): a replica serving byte-identical weights.
    A file that does not hash to the pinned sha256 is refused, as any pull's."""
    other = Lock.read(lock_path)
    if not other.entries:
        raise UsageError(f"{lock_path} pins no model",
                         hint="give the sovctl.lock of a box that has pulled its models")
    pulled, skipped = [], []
    for e in sorted(other.entries.values(), key=lambda e: e.name):
        why = _unmirrorable(e)
        if why is not None:
            skipped.append((e.name, why))
            continue
        pulled.append(pull(home, e.ref, name=e.name, revision=e.commit, sha256=e.sha256,
                           endpoint=endpoint, progress=progress, token=token,
                           mmproj=e.mmproj.ref if e.mmproj else None,
                           mmproj_sha256=e.mmproj.sha256 if e.mmproj else None))
    return ReplicaResult(str(lock_path), tuple(pulled), tuple(skipped))
