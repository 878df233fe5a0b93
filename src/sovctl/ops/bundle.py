"""`sovctl bundle create` and `bundle import`: this stack as a directory that rebuilds it on a
machine of the same platform with no network at all.

A bundle holds the wheels of sovctl and of everything it runs on, at the versions installed
here (`sovctl.ops.wheels`), the lock of the models it carries, their blobs (weights and
projectors), `sovctl.toml`, the operator's profiles, the bill of materials, a `manifest.json`
listing every other file with its sha256 and size, and an `install` script. Nothing secret
goes in (no API key, no token, no ledger, no log): the weights are the sensitive part.

Creation reads each file once: a blob is hashed as it is copied (that hash is the full
verification: a blob that no longer matches the lock stops the bundle), a wheel packed from
installed files is hashed as it is written. Everything goes to OUT.partial, synced, then
renamed to OUT: a failed creation leaves no OUT and no partial one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, replace
from importlib import resources
from multiprocessing import get_context
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sovctl import __version__, config
from sovctl.errors import ConfigError, IntegrityError, NotFoundError, UsageError
from sovctl.fsutil import atomic_write, file_lock, fsync_path
from sovctl.home import Home
from sovctl.ops import wheels
from sovctl.result import utcnow
from sovctl.store import integrity, signatures
from sovctl.store.blobs import BlobStore, HashingWriter, hash_file
from sovctl.store.lock import Lock, LockEntry
from sovctl.store.pull import drop_unpinned
from sovctl.store.sources.base import ProgressFactory
from sovctl.units import human_bytes

if TYPE_CHECKING:
    from sovctl.provenance.bom import BomDocument

SCHEMA = "sovctl.bundle/1"
MANIFEST = "manifest.json"
INSTALL = "install"
REQUIREMENTS = "requirements.txt"
BOM = "bom.cdx.json"
# The home's files, under the same names as in a home, so `bundle import` reads them as such.
HOME_DIR = "home"


def _blob_path(sha256: str) -> str:
    return f"blobs/sha256-{sha256}"


@dataclass(frozen=True)
class Planned:
    """One file a bundle will hold, known before it is written."""

    path: str  # relative to the bundle, POSIX
    size: int
    size_is: str  # "exact" | "estimated" (a wheel packed from installed files, or built)
    what: str  # "model tiny", "projector of smol", "wheel numpy 2.4.6 (repack)", a home path


@dataclass(frozen=True)
class BundlePlan:
    out: Path
    models: tuple[str, ...]
    packages: tuple[wheels.Package, ...]
    files: tuple[Planned, ...]
    size: int  # the files' total (estimated when one of them is)
    size_is: str  # "exact" | "estimated"
    free: int  # bytes free on OUT's file system, measured
    python: str
    platform: str
    notes: tuple[str, ...]  # what the operator must know: what is not carried, and why


@dataclass(frozen=True)
class BundleFile:
    path: str
    sha256: str
    size: int


@dataclass(frozen=True)
class BundleResult:
    plan: BundlePlan
    written: bool  # False for --dry-run
    out: Path
    files: tuple[BundleFile, ...]  # what manifest.json lists (empty for a dry run)
    size: int  # every file of the bundle, manifest and install script included, measured
    seconds: float


def _copy_hashing(src: Path, dest: Path, progress: wheels.Progress | None = None
                 ) -> tuple[str, int]:
    """Copy a (small) file, hashing it on the way: its sha256 and size. Blobs, the large
    files, go through the store's threaded writer instead (`_copy_blob`)."""
    h = hashlib.sha256()
    size = 0
    with src.open("rb") as fin, dest.open("wb") as fout:
        while chunk := fin.read(1 << 22):
            fout.write(chunk)
            h.update(chunk)
            size += len(chunk)
            if progress:
                progress(len(chunk))
    return h.hexdigest(), size


def _write_small(root: Path, path: str, data: bytes, mode: int = 0o644) -> BundleFile:
    (root / path).write_bytes(data)
    os.chmod(root / path, mode)
    return BundleFile(path, hashlib.sha256(data).hexdigest(), len(data))


def _syncfs(path: Path) -> None:
    """Put every write to `path`'s file system on disk in one call: the bundle's files all at
    once, where a fsync per file would wait for the journal once per file."""
    import ctypes

    fd = os.open(path, os.O_RDONLY)
    try:
        if ctypes.CDLL(None, use_errno=True).syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
    finally:
        os.close(fd)


def _select(lock: Lock, names: Sequence[str]) -> list[LockEntry]:
    if names:
        return [lock.get(n) for n in dict.fromkeys(names)]
    return [lock.entries[n] for n in sorted(lock.entries)]


def _blobs(entries: Sequence[LockEntry]) -> dict[str, tuple[str, int]]:
    """Each blob once (two names may pin the same bytes): sha256 -> (label, size)."""
    out: dict[str, tuple[str, int]] = {}
    for e in entries:
        out.setdefault(e.sha256, (f"model {e.name}", e.size))
        if e.mmproj is not None:
            out.setdefault(e.mmproj.sha256, (f"projector of {e.name}", e.mmproj.size))
    return out


def _home_files(home: Home, entries: Sequence[LockEntry]) -> tuple[list[tuple[str, Path]],
                                                                     list[str]]:
    """The operator's files a bundle carries, as (path in the bundle, file): sovctl.toml, the
    profiles, the signatures of the bundled blobs and the trusted public keys kept under the
    home; and a note for each trusted key kept elsewhere (the other machine needs it at the
    same path)."""
    files = []
    if home.config_path.is_file():
        files.append((f"{HOME_DIR}/sovctl.toml", home.config_path))
    profiles = home.root / "profiles"
    if profiles.is_dir():
        files += [(f"{HOME_DIR}/profiles/{p.name}", p) for p in sorted(profiles.glob("*.toml"))
                  if p.is_file()]
    for sha256 in _blobs(entries):
        files += [(f"{HOME_DIR}/{sig.relative_to(home.root).as_posix()}", sig)
                  for sig in signatures.of_blob(home, sha256)]
    notes = []
    for name, key in sorted(config.load(home).trust.keys.items()):
        path = Path(key)
        if path.is_relative_to(home.root) and path.is_file():
            files.append((f"{HOME_DIR}/{path.relative_to(home.root).as_posix()}", path))
        else:
            notes.append(f"trusted key {name} ({path}) is kept outside the home, so it is not "
                         "carried: put it at the same path on the other machine")
    return files, notes


def _refuse_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out} already exists and is not an empty directory",
                         hint="give a new directory for the bundle, or remove that one")


def plan(home: Home, out: Path, names: Sequence[str] = (),
         wheel_dirs: Sequence[Path] = ()) -> BundlePlan:
    """What a bundle of these models would hold, with sizes, and every refusal that can be
    known before writing: OUT taken, a model unknown, a blob missing or of the wrong size,
    a Python distribution that cannot be bundled, too little space."""
    out = out.absolute()
    _refuse_out(out)
    lock = Lock.load(home)
    entries = _select(lock, names)
    blobs = _blobs(entries)
    bad = []
    for sha256, (label, size) in blobs.items():
        r = integrity.check(home, label, sha256, size)
        if not r.ok:
            bad.append(f"{label} is {r.status}" + (f" ({r.actual})" if r.actual else ""))
    if bad:
        raise IntegrityError(f"the store fails verification, so no bundle is made: "
                             f"{'; '.join(bad)}",
                             hint="run 'sovctl verify'; re-fetch a damaged model with "
                             "'sovctl rm NAME' then 'sovctl pull REF'")
    pkgs = wheels.packages(wheel_dirs)
    files = [Planned(_blob_path(sha), size, "exact", label)
             for sha, (label, size) in blobs.items()]
    files += [Planned(f"wheels/{Path(p.source).name if p.how == 'wheel' else p.name}",
                      p.size, "exact" if p.size_exact else "estimated",
                      f"wheel {p.name} {p.version} ({p.how})") for p in pkgs]
    carried, notes = _home_files(home, entries)
    files += [Planned(path, src.stat().st_size, "exact", path.removeprefix(f"{HOME_DIR}/"))
              for path, src in carried]
    total = sum(f.size for f in files)
    parent = out if out.is_dir() else out.parent
    if not parent.is_dir():
        raise NotFoundError(f"{parent} does not exist", hint="create it, or bundle elsewhere")
    free = shutil.disk_usage(parent).free
    return BundlePlan(out, tuple(e.name for e in entries), tuple(pkgs), tuple(files), total,
                      "exact" if all(f.size_is == "exact" for f in files) else "estimated",
                      free, f"{sys.version_info.major}.{sys.version_info.minor}",
                      sysconfig.get_platform(), tuple(notes))


def _copy_blob(home: Home, sha256: str, label: str, size: int, dest: Path,
               progress: ProgressFactory | None) -> None:
    """Copy one blob, hashing it as it goes: the full check of the bytes the bundle holds."""
    cb = progress(f"bundle {label}", size, 0) if progress else None
    writer = HashingWriter(dest, resume=False, progress=cb)
    try:
        with BlobStore(home).path(sha256).open("rb", buffering=0) as f:
            writer.copy_from(f)
        digest, got = writer.finish()
    except BaseException:
        writer.discard()
        raise
    if digest != sha256 or got != size:
        raise IntegrityError(
            f"the store fails verification, so no bundle is made: {label} hashes to {digest} "
            f"({got} bytes), the lock pins {sha256} ({size} bytes)",
            hint="re-fetch it with 'sovctl rm NAME' then 'sovctl pull REF'")


def _bom(home: Home, entries: Sequence[LockEntry]) -> BomDocument:
    """The bill of materials (`sovctl bom`) of exactly what the bundle carries: made from a
    view of the home holding only the bundled models (their blobs linked, not copied) and the
    operator's settings, so a bundle of some models lists those."""
    from sovctl.provenance.bom import bom_document

    with tempfile.TemporaryDirectory(prefix="sovctl-bom-") as tmp:
        view = Home(Path(tmp))
        Lock({e.name: e for e in entries}).save(view)
        view.ensure(view.blobs)
        store = BlobStore(home)
        for sha256 in _blobs(entries):
            os.symlink(store.path(sha256), BlobStore(view).path(sha256))
        for path, src in _home_files(home, entries)[0]:
            link = view.root / path.removeprefix(f"{HOME_DIR}/")
            link.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(src, link)
        return bom_document(view, config.load(view))


def create(
    home: Home,
    out: Path,
    names: Sequence[str] = (),
    *,
    wheel_dirs: Sequence[Path] = (),
    dry_run: bool = False,
    progress: ProgressFactory | None = None,
    planned: Callable[[BundlePlan], None] | None = None,
) -> BundleResult:
    """Write the bundle (see the module's docstring); `planned` is shown the plan, with its
    sizes, before anything is written."""
    start = time.perf_counter()
    p = plan(home, out, names, wheel_dirs)
    if planned is not None:
        planned(p)
    if dry_run:
        return BundleResult(p, False, p.out, (), p.size, time.perf_counter() - start)
    if p.size > p.free:
        raise UsageError(f"{p.out.parent} has {human_bytes(p.free)} free; the bundle needs "
                         f"about {human_bytes(p.size)}", hint="free some space, or bundle "
                         "elsewhere")
    partial = p.out.with_name(p.out.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)  # left by a creation that was killed: ours to redo
    try:
        files = _write(home, p, partial, progress)
        size = sum(f.stat().st_size for f in partial.rglob("*") if f.is_file())
        _syncfs(partial)  # the files and their directories: on disk before the name is
        if p.out.exists():
            p.out.rmdir()  # an empty directory, as _refuse_out checked
        os.replace(partial, p.out)
        fsync_path(p.out.parent)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return BundleResult(p, True, p.out, tuple(files), size, time.perf_counter() - start)


def _write(home: Home, p: BundlePlan, root: Path, progress: ProgressFactory | None
           ) -> list[BundleFile]:
    for d in ("blobs", "wheels", HOME_DIR):
        (root / d).mkdir(parents=True)
    entries = _select(Lock.load(home), p.models)
    on_wheels = progress("wheels", sum(k.size for k in p.packages) or None, 0) \
        if progress else None

    def blob(sha256: str, label: str, size: int) -> BundleFile:
        path = _blob_path(sha256)
        _copy_blob(home, sha256, label, size, root / path, progress)
        return BundleFile(path, sha256, size)

    def wheel(pkg: wheels.Package) -> BundleFile:
        dest = root / "wheels"
        if pkg.how == "repack":
            path, digest, size = wheels.repack(pkg, dest, on_wheels)
        elif pkg.how == "wheel":
            path = dest / Path(pkg.source).name
            digest, size = _copy_hashing(Path(pkg.source), path, on_wheels)
        else:
            path = wheels.build(pkg, dest)
            digest, size = hash_file(path)
        return BundleFile(f"wheels/{path.name}", digest, size)

    # Two files at a time, the largest first: hashing and packing take a core each, and the
    # I/O overlaps.
    blobs = sorted(_blobs(entries).items(), key=lambda b: -b[1][1])
    # The BOM is Python through and through (the GIL): a process of its own, not a thread.
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as bom_pool, \
            ThreadPoolExecutor(max_workers=2, thread_name_prefix="sovctl-bundle") as pool:
        bom_job = bom_pool.submit(_bom, home, entries)
        blob_jobs = [pool.submit(blob, sha, label, size) for sha, (label, size) in blobs]
        wheel_jobs = {pkg.name: pool.submit(wheel, pkg)
                      for pkg in sorted(p.packages, key=lambda k: -k.size)}
        files = [j.result() for j in blob_jobs]
        by_name = {name: j.result() for name, j in wheel_jobs.items()}
        bom = bom_job.result()
    files += by_name.values()
    files.append(_write_small(root, BOM, bom.text.encode()))

    Lock({e.name: e for e in entries}).save(Home(root / HOME_DIR))
    lock = f"{HOME_DIR}/sovctl.lock"
    files.append(BundleFile(lock, *hash_file(root / lock)))
    for path, src in _home_files(home, entries)[0]:
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        files.append(BundleFile(path, *_copy_hashing(src, root / path)))

    reqs = "".join(f"{pkg.name}=={pkg.version} --hash=sha256:{by_name[pkg.name].sha256}\n"
                   for pkg in sorted(p.packages, key=lambda k: k.name.lower()))
    files.append(_write_small(root, REQUIREMENTS, reqs.encode()))
    script = (resources.files("sovctl") / "templates" / "bundle-install.sh").read_text()
    for key, value in (("@PYTHON@", p.python), ("@PLATFORM@", p.platform),
                       ("@SOVCTL_VERSION@", __version__)):
        script = script.replace(key, value)
    files.append(_write_small(root, INSTALL, script.encode(), 0o755))
    files.sort(key=lambda f: f.path)
    manifest: dict[str, Any] = {
        "schema": SCHEMA,
        "created_at": utcnow(),
        "sovctl": __version__,
        "platform": {"python": p.python, "python_full": sys.version.split()[0],
                     "platform": p.platform},
        "models": [{"name": e.name, "sha256": e.sha256, "size": e.size,
                    "mmproj": e.mmproj.sha256 if e.mmproj else None} for e in entries],
        "packages": [{"name": pkg.name, "version": pkg.version, "how": pkg.how,
                      "wheel": by_name[pkg.name].path} for pkg in p.packages],
        "bom": {"path": BOM, "spec": bom.spec, "sha256": bom.sha256,
                "unknown": list(bom.unknown)},
        "files": [{"path": f.path, "sha256": f.sha256, "size": f.size} for f in files],
    }
    (root / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return files


# -- import --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImportedModel:
    name: str
    sha256: str
    size: int
    action: str  # "copied" | "present" (the home held these bytes) | "replaced" (--force)


@dataclass(frozen=True)
class ImportedFile:
    path: str  # relative to the home
    action: str  # "written" | "same" | "replaced"


@dataclass(frozen=True)
class ImportResult:
    bundle: Path
    home: Path
    models: tuple[ImportedModel, ...]
    files: tuple[ImportedFile, ...]  # sovctl.toml, profiles, signatures, trusted keys
    copied: int  # bytes of blobs copied into the store, each hashed on the way
    seconds: float


def read_manifest(bundle: Path) -> dict[str, Any]:
    path = bundle / MANIFEST
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise NotFoundError(f"{bundle} is not a sovctl bundle: it has no {MANIFEST}",
                            hint="give the directory 'sovctl bundle create' wrote") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path} cannot be read: {e}",
                          hint="copy the bundle again from its source") from e
    schema = doc.get("schema") if isinstance(doc, dict) else None
    if schema != SCHEMA:
        raise ConfigError(f"{path} has schema {schema!r}, this sovctl reads {SCHEMA!r}",
                          hint="import it with the sovctl that made it (the bundle's own)")
    return doc


def _check(bundle: Path, listed: dict[str, dict[str, Any]], path: str) -> Path:
    """A small file of the bundle, checked against the manifest before it is used."""
    f = bundle / path
    want = listed.get(path)
    if want is None:
        raise IntegrityError(f"{path} is not in the bundle's {MANIFEST}",
                             hint="the bundle was altered: copy it again from its source")
    try:
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
    except OSError as e:
        raise IntegrityError(f"bundle file {path} cannot be read: {e.strerror}",
                             hint="copy the bundle again from its source") from e
    if digest != want["sha256"]:
        raise IntegrityError(f"bundle file {path} does not match {MANIFEST} (sha256 {digest}, "
                             f"expected {want['sha256']})",
                             hint="the bundle was damaged or altered: copy it again")
    return f


def import_bundle(home: Home, bundle: Path, *, force: bool = False,
                  progress: ProgressFactory | None = None) -> ImportResult:
    """Bring a bundle's models and files into `home`: blobs copied into the store (each
    hashed on the way against the lock and the manifest), then the lock's entries, then
    `sovctl.toml`, the profiles, the signatures and the trusted keys. A name or a file the home
    already holds differently is refused before anything is written, unless `force`."""
    start = time.perf_counter()
    bundle = bundle.absolute()
    doc = read_manifest(bundle)
    listed = {f["path"]: f for f in doc["files"]}
    theirs = Lock.read(_check(bundle, listed, f"{HOME_DIR}/sovctl.lock"))
    carried = [(path.removeprefix(f"{HOME_DIR}/"), _check(bundle, listed, path).read_bytes())
                for path in sorted(listed)
                if path.startswith(f"{HOME_DIR}/") and path != f"{HOME_DIR}/sovctl.lock"]

    ours = Lock.load(home)
    conflicts = [f"model {n} pins sha256 {ours.entries[n].short_sha} here, "
                 f"{e.short_sha} in the bundle" for n, e in theirs.entries.items()
                 if n in ours.entries and ours.entries[n].blobs != e.blobs]
    for rel, data in carried:
        target = home.root / rel
        if target.exists() and target.read_bytes() != data:
            conflicts.append(f"{target} differs from the bundle's")
    if conflicts and not force:
        raise UsageError(f"the home {home.root} already holds other things: "
                         f"{'; '.join(conflicts)}",
                         hint="import into another home (SOVCTL_HOME), or pass --force to "
                         "replace them with the bundle's")

    store = BlobStore(home)
    stored: list[str] = []
    models: list[ImportedModel] = []
    copied = 0
    try:
        for sha256, (label, size) in _blobs(list(theirs.entries.values())).items():
            path = _blob_path(sha256)
            if path not in listed or listed[path]["sha256"] != sha256:
                raise IntegrityError(f"{label} (sha256 {sha256[:12]}) is not in the bundle's "
                                     f"{MANIFEST}", hint="the bundle was altered: copy it again")
            if store.has(sha256, size) and integrity.check(home, label, sha256, size).ok:
                continue
            copied += _import_blob(home, bundle / path, sha256, size, label, progress)
            stored.append(sha256)
        now = utcnow()
        with Lock.editing(home) as lock:
            for name, e in sorted(theirs.entries.items()):
                had = lock.entries.get(name)
                action = ("present" if e.sha256 not in stored else "copied") \
                    if had is None or had.blobs == e.blobs else "replaced"
                for sha256 in e.blobs:
                    if not store.has(sha256):
                        raise IntegrityError(f"the blob of {name} disappeared from the store "
                                             "while importing it", hint="import again")
                lock.entries[name] = replace(e, verified_at=now)
                models.append(ImportedModel(name, e.sha256, e.size, action))
    except BaseException:
        drop_unpinned(home, BlobStore(home), stored)
        raise
    # The blobs of the pins --force replaced, unless another name still pins them.
    drop_unpinned(home, BlobStore(home), [sha256 for m in models if m.action == "replaced"
                          for sha256 in ours.entries[m.name].blobs])
    written = []
    for rel, data in carried:
        target = home.root / rel
        action = "written" if not target.exists() else \
            "same" if target.read_bytes() == data else "replaced"
        if action != "same":
            atomic_write(target, data)
        written.append(ImportedFile(rel, action))
    return ImportResult(bundle, home.root, tuple(models), tuple(written), copied,
                        time.perf_counter() - start)


def _import_blob(home: Home, src: Path, sha256: str, size: int, label: str,
                 progress: ProgressFactory | None) -> int:
    store = BlobStore(home)
    home.ensure(home.partials)
    with file_lock(home.partials / f"{sha256}.flock", what=f"the import of {label}"):
        partial = store.partial(sha256)
        cb = progress(f"import {label}", size, 0) if progress else None
        writer = HashingWriter(partial, resume=False, progress=cb)
        try:
            with src.open("rb", buffering=0) as f:
                writer.copy_from(f)
            digest, got = writer.finish()
            if digest != sha256 or got != size:
                raise IntegrityError(
                    f"bundle file {_blob_path(sha256)} ({label}) hashes to {digest}, the "
                    f"bundle's lock pins {sha256}; nothing was imported",
                    hint="the bundle was damaged or altered: copy it again from its source")
        except BaseException:
            writer.discard()
            raise
        store.adopt(partial, sha256)
        integrity.record(home, sha256)
    return got

