"""`sovctl pull`: bring weights into the store, verified as they arrive, and pin them."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from sovctl.errors import IntegrityError, NotFoundError, UsageError
from sovctl.fsutil import file_lock, fsync_path
from sovctl.home import Home
from sovctl.names import check_name, is_sha256_hex, name_from_filename
from sovctl.store import gguf_info, hub, integrity, signatures
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
    # (name, key name) of each pin whose signatures were checked before its files were
    # fetched: every one when this box has [trust] keys, none when it has not
    signed: tuple[tuple[str, str], ...] = ()


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
        drop_unpinned(home, store, stored)
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
        if existing is not None and existing.blobs == entry.blobs:
            # The same bytes again (a lost blob fetched anew): their signer still vouches.
            entry = replace(entry, signer=existing.signer)
        if existing is not None:
            # The pins kept beside it (sovctl upgrade) stay.
            entry = replace(entry, previous=existing.previous, candidate=existing.candidate)
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


def drop_unpinned(home: Home, store: BlobStore, blobs: Sequence[str]) -> None:
    """Remove the blobs among `blobs` that no name pins, with what is kept of each (integrity
    stamp, GGUF facts, signatures); under the lock, so that no pull pins one as it goes."""
    if not blobs:
        return
    with Lock.editing(home) as lock:
        for sha256 in blobs:
            if not lock.names_for_blob(sha256):
                store.remove(sha256)
                integrity.forget(home, sha256)
                gguf_info.forget(home, sha256)
                signatures.remove(home, sha256)


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
              progress: ProgressFactory | None = None, token: str | None = None,
              trust: Mapping[str, str] | None = None) -> ReplicaResult:
    """Every Hub pin of another box's lock, under its name, at its commit and sha256, from
    `endpoint` (that box's `sovctl mirror serve`): a replica serving byte-identical weights.
    A file that does not hash to the pinned sha256 is refused, as any pull's.

    With `trust` ([trust] keys), the replica takes only what a trusted key signed: before any
    file is fetched, every pin must name a trusted signer and each of its files' signatures,
    fetched from the mirror, must verify and vouch for the pinned sha256; one that does not
    refuses the whole pull (IntegrityError) and nothing is stored. The signatures are kept
    and the signer recorded, so this box's `verify` checks them too."""
    other = Lock.read(lock_path)
    if not other.entries:
        raise UsageError(f"{lock_path} pins no model",
                         hint="give the sovctl.lock of a box that has pulled its models")
    keys = signatures.trusted(trust or {})
    wanted, skipped = [], []
    for e in sorted(other.entries.values(), key=lambda e: e.name):
        why = _unmirrorable(e)
        if why is None:
            wanted.append(e)
        else:
            skipped.append((e.name, why))
    checked = {e.name: _signed(e, endpoint, keys, token) for e in wanted} if keys else {}
    pulled, signed = [], []
    for e in wanted:
        result = pull(home, e.ref, name=e.name, revision=e.commit, sha256=e.sha256,
                      endpoint=endpoint, progress=progress, token=token,
                      mmproj=e.mmproj.ref if e.mmproj else None,
                      mmproj_sha256=e.mmproj.sha256 if e.mmproj else None)
        if e.name in checked:
            result = replace(result, entry=_record_signer(home, result.entry, e.signer,
                                                          checked[e.name]))
            signed.append((e.name, keys[e.signer].name))
        pulled.append(result)
    return ReplicaResult(str(lock_path), tuple(pulled), tuple(skipped), tuple(signed))


def _signed(e: LockEntry, endpoint: str, keys: Mapping[str, signatures.TrustedKey],
            token: str | None) -> dict[str, bytes]:
    """The signatures of the pin's files (by sha256), fetched and checked: each verifies with
    the trusted key the pin names and vouches for the pinned sha256; else IntegrityError."""
    names = ", ".join(sorted(k.name for k in keys.values()))
    if not e.signer:
        raise IntegrityError(
            f"{e.name} is not signed, and this box takes only models signed by a key of its "
            f"[trust] keys ({names}); nothing was stored",
            hint=f"on the box that pinned it: sovctl sign {e.name} --key KEY; then pull again")
    if e.signer not in keys:
        raise IntegrityError(
            f"{e.name} is signed by key {e.signer[:16]}, which this box's [trust] keys "
            f"({names}) does not hold; nothing was stored",
            hint="add that signer's public key to [trust] keys only if you trust it")
    found = {}
    for label, pin in ((e.name, e), (f"{e.name}/mmproj", e.mmproj)):
        if pin is None:
            continue
        url = (f"{endpoint.rstrip('/')}/api/sovctl/signatures/"
               f"{signatures.path_name(pin.sha256, e.signer)}")
        data = _fetch_signature(url, label, keys[e.signer], token)
        signatures.check(data, pin.sha256, keys[e.signer],
                         label=f"{label} (the signature {endpoint} serves)")
        found[pin.sha256] = data
    return found


def _fetch_signature(url: str, label: str, key: signatures.TrustedKey,
                     token: str | None) -> bytes:
    data = b""
    try:
        with hub.fetch(url, 0, hub.credential(url, token)) as resp:
            for chunk in resp.chunks:
                data += chunk
                if len(data) > signatures.MAX_SIGNATURE_BYTES:
                    break
    except NotFoundError:
        raise IntegrityError(
            f"{label}: the mirror serves no signature of it by key {key.name}; nothing was "
            "stored", hint=f"sign it on the mirror's box: sovctl sign {label.split('/')[0]} "
            "--key KEY") from None
    return data


def _record_signer(home: Home, entry: LockEntry, signer: str,
                   checked: Mapping[str, bytes]) -> LockEntry:
    """Keep the checked signatures and record their signer, if the name still pins those
    bytes."""
    with Lock.editing(home) as lock:
        current = lock.entries.get(entry.name)
        if current is None or set(current.blobs) != set(checked):
            return entry
        for sha256, data in checked.items():
            signatures.store(home, sha256, signer, data)
        lock.entries[entry.name] = replace(current, signer=signer)
        return lock.entries[entry.name]


def pull_candidate(home: Home, name: str, ref_text: str, *, revision: str = "main",
                   sha256: str | None = None, endpoint: str, trust_on_first_use: bool = False,
                   progress: ProgressFactory | None = None, token: str | None = None
                   ) -> PullResult:
    """`sovctl upgrade NAME REF`: REF's bytes into the store, verified as any pull's, kept as
    NAME's candidate beside its pin; nothing NAME serves changes. A candidate recorded before
    is replaced (its blob goes once nothing keeps it)."""
    sha256 = _check_sha(sha256, "--sha256")
    source = source_for(ref_text, endpoint=endpoint, revision=revision, hub_token=token)
    store = BlobStore(home)
    lock = Lock.load(home)
    current = lock.get(name)
    if current.mmproj is not None:
        raise UsageError(f"{name} is served with a projector; upgrading a vision model (its "
                         "weights and projector together) is not supported yet",
                         hint=f"pull the new model under another name with --mmproj, and serve "
                         f"that name instead of {name}")
    have = sorted(lock.entries)
    dl = _Download(source, source.resolve(sha256, tofu=trust_on_first_use, have=have))
    got = _fetch(home, store, dl, f"{name}/candidate", progress, have, _weights)
    dropped: list[str] = []
    try:
        with Lock.editing(home) as edit:
            entry = edit.get(name)
            if got.entry.sha256 == entry.sha256:
                raise UsageError(
                    f"{ref_text} is the very file {name} is pinned to (sha256 "
                    f"{entry.short_sha}): there is nothing to upgrade",
                    hint=f"give the REF of another checkpoint; 'sovctl models' shows {name}'s")
            if not store.has(got.entry.sha256, got.entry.size):
                raise IntegrityError(
                    f"the blob of {name}'s candidate disappeared from the store while pinning it",
                    hint="run the same 'sovctl upgrade' again")
            if entry.candidate is not None:
                dropped = list(entry.candidate.blobs)
            candidate = replace(got.entry, name=name)
            edit.entries[name] = replace(entry, candidate=candidate)
    except BaseException:
        drop_unpinned(home, store, [got.entry.sha256])
        raise
    drop_unpinned(home, store, dropped)
    return PullResult(name, got.action, candidate, got.transferred, got.resumed_from)
