"""`sovctl pull`: bring weights into the store, verified as they arrive, and pin them."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from sovctl.errors import IntegrityError, UsageError
from sovctl.fsutil import file_lock, fsync_path
from sovctl.home import Home
from sovctl.names import check_name, is_sha256_hex, name_from_filename
from sovctl.result import utcnow
from sovctl.store import gguf_info, hub, integrity, refs
from sovctl.store.blobs import BlobStore, HashingWriter, Progress
from sovctl.store.lock import Lock, LockEntry, ProjectorPin

# (description, total bytes or None, bytes already done) -> a callback taking byte counts
ProgressFactory = Callable[[str, int | None, int], Progress]


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
    """One file to bring into the store: where from, and what its bytes must be."""

    entry: LockEntry  # sha256/size may be provisional until the bytes are hashed
    fetch_url: str | None  # None: copy from a local file
    local: Path | None
    expected_sha: str | None
    expected_size: int | None


def _check_sha(value: str | None, flag: str) -> str | None:
    if value is None:
        return None
    v = value.lower().removeprefix("sha256:")
    if not is_sha256_hex(v):
        raise UsageError(f"{flag} {value!r} is not a sha256 hex digest (64 hex characters)")
    return v


def _to_download(
    ref_text: str,
    ref: refs.Ref,
    *,
    revision: str,
    sha256: str | None,
    endpoint: str,
    tofu: bool,
    have: list[str],
    token: str | None,
) -> _Download:
    now = utcnow()
    common: dict[str, Any] = {"ref": ref_text, "pulled_at": now, "verified_at": now, "name": ""}
    if isinstance(ref, refs.HubFile | refs.HubQuant):
        res = hub.resolve(
            endpoint,
            ref.repo,
            revision,
            path=ref.path if isinstance(ref, refs.HubFile) else None,
            quant=ref.quant if isinstance(ref, refs.HubQuant) else None,
            have=have,
            token=hub.credential(endpoint, token),
        )
        if sha256 and res.sha256 and sha256 != res.sha256:
            raise IntegrityError(
                f"--sha256 {sha256} disagrees with the Hub's sha256 {res.sha256} for "
                f"{res.repo}/{res.path}@{res.commit[:12]}",
                hint="check where your expected digest came from; nothing was downloaded",
            )
        expected = res.sha256 or sha256
        if res.sha256 and sha256:
            origin = "hub+flag"
        elif expected:
            origin = "hub" if res.sha256 else "flag"
        else:
            origin = _tofu_or_refuse(tofu, f"{endpoint} gives no sha256 for {res.path}")
        entry = LockEntry(
            **common,
            sha256=expected or "",
            size=res.size or 0,
            source="hf",
            digest_from=origin,
            repo=res.repo,
            path=res.path,
            endpoint=endpoint,
            revision=revision,
            commit=res.commit,
        )
        return _Download(entry, res.url, None, expected, res.size)
    if isinstance(ref, refs.Url):
        origin = "flag" if sha256 else _tofu_or_refuse(tofu, f"a URL carries no digest: {ref.url}")
        entry = LockEntry(
            **common, sha256=sha256 or "", size=0, source="url", digest_from=origin, url=ref.url
        )
        return _Download(entry, ref.url, None, sha256, None)
    entry = LockEntry(
        **common,
        sha256=sha256 or "",
        size=ref.path.stat().st_size,
        source="file",
        digest_from="flag" if sha256 else "computed",
        path=str(ref.path),
    )
    return _Download(entry, None, ref.path, sha256, entry.size)


def _tofu_or_refuse(tofu: bool, why: str) -> str:
    if not tofu:
        raise IntegrityError(
            f"refusing to download without an expected sha256: {why}",
            hint="pass --sha256 HEX from a source you trust, or --trust-on-first-use",
        )
    return "trust-on-first-use"


def _already(
    lock: Lock,
    store: BlobStore,
    ref_text: str,
    revision: str,
    name: str | None,
    mmproj_text: str | None,
) -> LockEntry | None:
    def same(pin: LockEntry | ProjectorPin, ref: str) -> bool:
        same_rev = pin.source != "hf" or revision in (pin.revision, pin.commit)
        return pin.ref == ref and same_rev and store.has(pin.sha256, pin.size)

    for entry in lock.entries.values():
        if name is not None and entry.name != name:
            continue
        if mmproj_text is not None and (entry.mmproj is None
                                        or not same(entry.mmproj, mmproj_text)):
            continue
        if same(entry, ref_text):
            return entry
    return None


def _parse(ref_text: str, endpoint: str) -> tuple[refs.Ref, str]:
    """The reference, and its text as pinned."""
    ref = refs.parse_ref(ref_text)
    if isinstance(ref, refs.HubFile | refs.HubQuant) and not endpoint.startswith(
        ("http://", "https://")
    ):
        raise UsageError(
            f"hub endpoint {endpoint!r} is not an http:// or https:// URL",
            hint="check --endpoint, HF_ENDPOINT, SOVCTL_HUB__ENDPOINT or [hub] in sovctl.toml",
        )
    if isinstance(ref, refs.LocalFile):
        ref_text = str(ref.path)  # the same file pins the same way from any working directory
    return ref, ref_text


def _disagrees(flag: str, wanted: str | None, pinned: str, name: str) -> None:
    if wanted and wanted != pinned:
        raise IntegrityError(
            f"{flag} {wanted} disagrees with the sha256 {pinned} that {name!r} is pinned to",
            hint="check where your expected digest came from; the store was left as it was",
        )


def _repin(dl: _Download, pinned: LockEntry | ProjectorPin) -> _Download:
    """The same source again, its blob lost: the bytes must be the ones that were pinned."""
    return replace(
        dl,
        expected_sha=pinned.sha256,
        entry=replace(dl.entry, sha256=pinned.sha256, digest_from=pinned.digest_from),
    )


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
    `token` is the Hub's (HF_TOKEN): sent to the Hub only (see hub.credential)."""
    if name is not None:
        check_name(name)
    sha256 = _check_sha(sha256, "--sha256")
    mmproj_sha256 = _check_sha(mmproj_sha256, "--mmproj-sha256")
    if mmproj_sha256 and mmproj is None:
        raise UsageError("--mmproj-sha256 is the digest of a projector; there is no --mmproj",
                         hint="add --mmproj REF, or drop --mmproj-sha256")
    ref, ref_text = _parse(ref_text, endpoint)
    projector_ref, mmproj_text = _parse(mmproj, endpoint) if mmproj else (None, None)
    store = BlobStore(home)
    lock = Lock.load(home)

    done = _already(lock, store, ref_text, revision, name, mmproj_text)
    if done is not None:
        _disagrees("--sha256", sha256, done.sha256, done.name)
        if done.mmproj is not None:
            _disagrees("--mmproj-sha256", mmproj_sha256, done.mmproj.sha256, done.name)
        return PullResult(done.name, "already-pinned", done, 0, 0,
                          "already-pinned" if mmproj else "")

    have = sorted(lock.entries)
    dl = _to_download(ref_text, ref, revision=revision, sha256=sha256, endpoint=endpoint,
                      tofu=trust_on_first_use, have=have, token=token)
    final_name = name or name_from_filename(dl.entry.path or dl.entry.url.split("?")[0])
    mm_dl = None
    if projector_ref is not None and mmproj_text is not None:
        mm_dl = _to_download(mmproj_text, projector_ref, revision=revision,
                             sha256=mmproj_sha256, endpoint=endpoint, tofu=trust_on_first_use,
                             have=have, token=token)
    existing = lock.entries.get(final_name)
    if existing is not None:
        if existing.ref != ref_text or (dl.expected_sha or existing.sha256) != existing.sha256:
            raise UsageError(
                f"name {final_name!r} already pins {existing.ref} (sha256 {existing.short_sha})",
                hint=f"choose another --name, or 'sovctl rm {final_name}' first",
            )
        dl = _repin(dl, existing)
        pinned = existing.mmproj
        if mm_dl is not None and pinned is not None:
            if pinned.ref != mmproj_text or (mm_dl.expected_sha or pinned.sha256) \
                    != pinned.sha256:
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
            projector = _fetch(home, store, mm_dl, f"{final_name}/mmproj", progress, token,
                               have, _projector)
            stored.append(projector.entry.sha256)
        model = _fetch(home, store, dl, final_name, progress, token, have, _weights)
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
    token: str | None,
    have: list[str],
    accept: Callable[[str, gguf_info.GgufFacts], None],
) -> _Fetched:
    """Bring one file's bytes into the store, verified, and of the kind `accept` wants."""
    home.ensure(home.partials)
    source = dl.fetch_url or str(dl.local)
    key = dl.expected_sha or hashlib.sha256(source.encode()).hexdigest()
    with file_lock(home.partials / f"{key}.flock", what=f"the download of {label}"):
        if dl.expected_sha and store.has(dl.expected_sha, dl.expected_size):
            # Another name, or a concurrent pull that just finished, already holds these bytes.
            blob = store.path(dl.expected_sha)
            accept(label, gguf_info.facts_for(home, dl.expected_sha, blob))
            return _Fetched(replace(dl.entry, size=blob.stat().st_size), "linked", 0, 0)
        partial = store.partial(key)
        if dl.local is not None:
            digest, size, transferred, resumed = _copy(dl.local, partial, progress, label)
        else:
            assert dl.fetch_url is not None
            # A credential goes to the endpoint it belongs to (the Hub's token to the Hub, the
            # mirror's to a mirror), and none to an arbitrary URL.
            sent = hub.credential(dl.entry.endpoint, token) if dl.entry.source == "hf" \
                else None
            digest, size, transferred, resumed = _download(
                dl.fetch_url, partial, dl.expected_size, progress, label, sent, have,
            )
        try:
            _check_digest(dl, digest, size, label)
            facts = _facts_while_syncing(partial, label=f"{label} ({dl.entry.ref})")
            accept(label, facts)
        except (IntegrityError, UsageError):
            partial.unlink(missing_ok=True)
            raise
        store.adopt(partial, digest)
        integrity.record(home, digest)
        gguf_info.remember(home, digest, facts)
    action = "imported" if dl.local is not None else "resumed" if resumed else "downloaded"
    return _Fetched(replace(dl.entry, sha256=digest, size=size), action, transferred, resumed)


def _check_digest(dl: _Download, digest: str, size: int, name: str) -> None:
    if dl.expected_size is not None and dl.local is None and size != dl.expected_size:
        raise IntegrityError(
            f"{name}: received {size} bytes, expected {dl.expected_size}; nothing was stored",
            hint="the source or a proxy altered the file; try again or use another --endpoint",
        )
    if dl.expected_sha and digest != dl.expected_sha:
        raise IntegrityError(
            f"{name}: sha256 mismatch: expected {dl.expected_sha}, got {digest}; "
            "nothing was stored",
            hint="the bytes were altered on the way or at the source; try again or use another "
            "--endpoint",
        )


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


def _copy(
    src: Path, partial: Path, progress: ProgressFactory | None, name: str
) -> tuple[str, int, int, int]:
    total = src.stat().st_size
    cb = progress(f"import {name}", total, 0) if progress else None
    writer = HashingWriter(partial, resume=False, progress=cb)
    try:
        with src.open("rb", buffering=0) as f:
            writer.copy_from(f)
        digest, size = writer.finish()
    except BaseException:
        writer.discard()
        raise
    return digest, size, size, 0


def _download(
    url: str,
    partial: Path,
    expected_size: int | None,
    progress: ProgressFactory | None,
    name: str,
    token: str | None,
    have: list[str],
) -> tuple[str, int, int, int]:
    offset = partial.stat().st_size if partial.exists() else 0
    if expected_size is not None and offset > expected_size:
        offset = 0
    if offset and offset == expected_size:
        # An earlier run received every byte but stopped before storing them: hash, no fetch.
        try:
            writer = HashingWriter(partial, resume=True)
        except IntegrityError:
            partial.unlink(missing_ok=True)
            raise
        digest, size = writer.finish()
        return digest, size, 0, offset
    with hub.fetch(url, offset, token, have) as resp:
        if resp.status in (200, 416):
            # The server ignored or refused our range: start over from the first byte.
            offset = 0
        if resp.status == 416:
            partial.unlink(missing_ok=True)
            return _download(url, partial, expected_size, progress, name, token, have)
        total = resp.total if resp.total is not None else expected_size
        cb = progress(f"pull {name}", total, offset) if progress else None
        try:
            writer = HashingWriter(partial, resume=offset > 0)
        except IntegrityError:
            partial.unlink(missing_ok=True)
            raise
        transferred = 0
        try:
            for chunk in resp.chunks:
                writer.write(chunk)
                transferred += len(chunk)
                if cb:
                    cb(len(chunk))
        except IntegrityError:
            writer.discard()
            raise
        except hub.Interrupted as e:
            writer.close()
            raise hub.Interrupted(
                f"download of {name} interrupted after {writer.size} of "
                f"{total if total is not None else '?'} bytes ({e})",
                hint="run the same 'sovctl pull' again: it resumes from the bytes on disk",
            ) from None
    digest, size = writer.finish()
    if total is not None and size < total:
        raise hub.Interrupted(
            f"download of {name} ended early after {size} of {total} bytes",
            hint="run the same 'sovctl pull' again: it resumes from the bytes on disk",
        )
    return digest, size, transferred, offset


def _unmirrorable(e: LockEntry) -> str | None:
    """Why a pin cannot be fetched from a Hub endpoint at its commit, or None."""
    for what, pin in (("it", e), ("its projector", e.mmproj)):
        if pin is None:
            continue
        if pin.source != "hf" or not pin.commit:
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
