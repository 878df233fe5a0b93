"""The Python half of a bundle: every distribution sovctl runs on, as a wheel, with no index.

The set is sovctl's requirements and theirs, extras and markers applied, at the versions
installed in this environment (`importlib.metadata`): what runs here, not what an index would
resolve today. Each one becomes a wheel in one of three ways:

- `wheel`: an original wheel file whose files are the installed ones (its RECORD and the
  installed RECORD agree, hash for hash), taken as built: the llama.cpp wheel scripts/setup
  keeps in its wheelhouse (`SOVCTL_WHEELHOUSE`, default `~/.cache/sovctl/wheels/llama-*`),
  or any in `--wheels DIR`;
- `repack`: the installed files themselves, packed back into a wheel (uncompressed), each
  checked against the sha256 pip recorded when it installed them, so a file changed since
  then is refused rather than carried; pip's own additions (byte code, INSTALLER, REQUESTED,
  direct_url.json, the entry-point scripts it writes) are left for pip to make again;
- `build`: a distribution installed editable (sovctl from a checkout) has no installed files
  to pack: its source tree is built with the build backend of this environment, offline
  (`pip wheel --no-build-isolation --no-index`), unless `--wheels` holds its wheel.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import importlib.metadata as md
import io
import json
import os
import stat
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from email.parser import HeaderParser
from pathlib import Path
from urllib.parse import unquote, urlparse

from packaging.requirements import Requirement
from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename
from packaging.version import InvalidVersion, Version

from sovctl.errors import CheckFailed, ConfigError, IntegrityError, NotFoundError

Progress = Callable[[int], None]

# Written by pip when it installs a wheel, never part of one.
_INSTALLER_FILES = frozenset({"INSTALLER", "REQUESTED", "direct_url.json"})
# A fixed time for every member: the same installed files make the same wheel, byte for byte.
_EPOCH = (1980, 1, 1, 0, 0, 0)


@dataclass(frozen=True)
class Package:
    name: str  # as its metadata spells it
    version: str
    how: str  # "wheel" | "repack" | "build" (see the module's docstring)
    source: str  # the wheel file, the installed distribution's site directory, or the tree
    size: int  # the original wheel's size; the installed files' total for a repack; 0: built

    @property
    def size_exact(self) -> bool:
        return self.how == "wheel"


def _record(text: str) -> dict[str, tuple[str, int]]:
    """A RECORD's hashed files: path -> ("sha256=...", size). RECORD itself and the byte
    code pip compiles have no hash, and are left out."""
    return {row[0]: (row[1], int(row[2]) if len(row) > 2 and row[2] else 0)
            for row in csv.reader(io.StringIO(text)) if len(row) >= 2 and row[1]}


def _pip_wrote(path: str) -> bool:
    """Whether an installed file is one pip wrote itself (INSTALLER, REQUESTED,
    direct_url.json in the dist-info directory), never part of a wheel."""
    head, _, name = path.rpartition("/")
    return name in _INSTALLER_FILES and head.endswith(".dist-info") and "/" not in head


def _installed_record(dist: md.Distribution) -> dict[str, str]:
    """The installed files a wheel of this distribution holds, hash by path: what pip wrote
    itself left out, and the scripts it put outside site-packages."""
    return {p: h for p, (h, _) in _record(dist.read_text("RECORD") or "").items()
            if not p.startswith("../") and not _pip_wrote(p)}


def _editable_tree(dist: md.Distribution) -> Path | None:
    """The source tree of a distribution installed editable (`pip install -e`), else None."""
    text = dist.read_text("direct_url.json")
    if not text:
        return None
    doc = json.loads(text)
    if not doc.get("dir_info", {}).get("editable"):
        return None
    return Path(unquote(urlparse(doc["url"]).path))


@dataclass(frozen=True)
class _Installed:
    dist: md.Distribution
    name: str
    version: str
    requires: tuple[str, ...]


def _installed(dist: md.Distribution) -> _Installed:
    meta = dist.metadata  # parsed once: each access to it parses the file again
    return _Installed(dist, meta["Name"], meta["Version"],
                      tuple(meta.get_all("Requires-Dist") or ()))


def requirements_closure(root: str = "sovctl") -> list[_Installed]:
    """`root` and every distribution it requires, with extras and markers, as installed."""
    seen: dict[str, _Installed | None] = {}

    def lookup(name: str) -> _Installed | None:
        key = canonicalize_name(name)
        if key not in seen:
            try:
                seen[key] = _installed(md.distribution(name))
            except md.PackageNotFoundError:
                seen[key] = None
        return seen[key]

    found: dict[str, tuple[_Installed, frozenset[str]]] = {}
    todo: list[tuple[str, frozenset[str], str]] = [(root, frozenset(), "")]
    while todo:
        name, extras, wanted_by = todo.pop()
        inst = lookup(name)
        if inst is None:
            raise NotFoundError(
                f"{name}, required by {wanted_by or 'the bundle'}, is not installed in this "
                f"environment ({sys.prefix})",
                hint="install it here first; a bundle carries what is installed")
        key = canonicalize_name(inst.name)
        had = found[key][1] if key in found else None
        if had is not None and extras <= had:
            continue
        extras = extras | (had or frozenset())
        found[key] = (inst, extras)
        envs = [{"extra": e} for e in ("", *sorted(extras))]
        for text in inst.requires:
            req = Requirement(text)
            if req.marker is not None and not any(req.marker.evaluate(e) for e in envs):
                continue
            todo.append((req.name, frozenset(req.extras), inst.name))
            dep = lookup(req.name)
            if dep is not None and not req.specifier.contains(dep.version, prereleases=True):
                raise ConfigError(
                    f"{inst.name} requires {req}, but {dep.name} {dep.version} is installed: "
                    "pip would refuse this set offline",
                    hint=f"install a {dep.name} that fits, then create the bundle")
    return [found[k][0] for k in sorted(found)]


def _same_requires(wheel: Path, inst: _Installed) -> None:
    """An editable install's wheel (given, or built from its tree now) must require what the
    installed metadata does: the closure was read from the latter."""
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.count("/") == 1
                    and n.endswith(".dist-info/METADATA"))
        declared = HeaderParser().parsestr(z.read(meta).decode()).get_all("Requires-Dist")
    if {str(Requirement(r)) for r in declared or ()} != {str(Requirement(r))
                                                          for r in inst.requires}:
        raise CheckFailed(
            f"{wheel.name} requires other packages than the {inst.name} installed editable "
            f"here: its source tree changed its dependencies since it was installed",
            hint=f"install it again (pip install -e {_editable_tree(inst.dist)}), so that this "
            "environment holds what the wheel needs; then create the bundle")


def wheelhouses(extra: Sequence[Path] = ()) -> list[Path]:
    """Where original wheels are looked for: `extra` (--wheels), then scripts/setup's
    wheelhouse of the llama.cpp wheel: `SOVCTL_WHEELHOUSE`, else each of its default ones."""
    dirs = list(extra)
    env = os.environ.get("SOVCTL_WHEELHOUSE")
    if env:
        dirs.append(Path(env).expanduser())
    else:
        dirs += sorted((Path.home() / ".cache" / "sovctl" / "wheels").glob("llama-*"))
    return [d for d in dirs if d.is_dir()]


def _wheel_files(dirs: Sequence[Path], name: str, version: str) -> list[Path]:
    """The wheels in `dirs` of that distribution at that version."""
    want = canonicalize_name(name), Version(version)
    found = []
    for d in dirs:
        for p in sorted(d.glob("*.whl")):
            try:
                wname, wversion, _, _ = parse_wheel_filename(p.name)
            except (InvalidWheelFilename, InvalidVersion):
                continue
            if (wname, wversion) == want:
                found.append(p)
    return found


def _same_files(wheel: Path, installed: dict[str, str]) -> bool:
    """Whether the wheel holds exactly the installed files of site-packages, hash for hash."""
    try:
        with zipfile.ZipFile(wheel) as z:
            records = [n for n in z.namelist()
                       if n.count("/") == 1 and n.endswith(".dist-info/RECORD")]
            if len(records) != 1:
                return False
            theirs = _record(z.read(records[0]).decode())
    except (OSError, zipfile.BadZipFile, UnicodeDecodeError):
        return False
    return installed == {p: h for p, (h, _) in theirs.items()
                         if not p.split("/")[0].endswith(".data")}


def packages(wheel_dirs: Sequence[Path] = ()) -> list[Package]:
    """What each distribution of the closure becomes, and how, before anything is written."""
    houses = wheelhouses(wheel_dirs)
    out = []
    for inst in requirements_closure():
        dist, name, version = inst.dist, inst.name, inst.version
        tree = _editable_tree(dist)
        if tree is not None:
            # Nothing installed to compare a wheel with: one the operator gave is taken as is.
            given = _wheel_files(wheel_dirs, name, version)
            if given:
                _same_requires(given[0], inst)
            out.append(Package(name, version, "wheel", str(given[0]), given[0].stat().st_size)
                       if given else Package(name, version, "build", str(tree), 0))
            continue
        record = dist.read_text("RECORD")
        if record is None or dist.read_text("WHEEL") is None:
            raise ConfigError(f"{name} {version} was installed without a RECORD or WHEEL file "
                              "(not by pip from a wheel), so it cannot be packed again",
                              hint=f"reinstall it with pip: pip install --force-reinstall "
                              f"{name}=={version}")
        installed = _installed_record(dist)
        match = next((w for w in _wheel_files(houses, name, version)
                      if _same_files(w, installed)), None)
        if match is not None:
            out.append(Package(name, version, "wheel", str(match), match.stat().st_size))
        else:
            site = Path(str(dist.locate_file("")))
            size = sum(size for _, size in _record(record).values())
            out.append(Package(name, version, "repack", str(site), size))
    return out


# -- writing ---------------------------------------------------------------------------------


class _HashingSink:
    """The file a wheel is written to, hashed as it is written: no second read. It offers no
    seek, so zipfile streams each member (with a data descriptor) and never rewrites."""

    def __init__(self, f: io.BufferedWriter, progress: Progress | None) -> None:
        self._f = f
        self._progress = progress
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, b: bytes) -> int:
        self._f.write(b)
        self.hash.update(b)
        self.size += len(b)
        if self._progress:
            self._progress(len(b))
        return len(b)

    def flush(self) -> None:
        self._f.flush()

    def close(self) -> None:
        """The file stays open (its owner closes it): a zip's end only flushes."""
        self._f.flush()


def _b64(digest: bytes, algorithm: str = "sha256") -> str:
    """A RECORD's spelling of a digest."""
    return f"{algorithm}=" + base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def _tags(wheel_meta: str) -> str:
    """The filename's tag triple from WHEEL's Tag lines, each part's values dot-joined."""
    parts: list[list[str]] = [[], [], []]
    for tag in HeaderParser().parsestr(wheel_meta).get_all("Tag") or []:
        for values, value in zip(parts, tag.strip().split("-"), strict=True):
            if value not in values:
                values.append(value)
    return "-".join(".".join(v) for v in parts)


def _member(zf: zipfile.ZipFile, arcname: str, data: bytes, executable: bool) -> None:
    info = zipfile.ZipInfo(arcname, _EPOCH)
    info.external_attr = (stat.S_IFREG | (0o755 if executable else 0o644)) << 16
    info.compress_type = zipfile.ZIP_STORED
    zf.writestr(info, data)


def repack(pkg: Package, dest: Path, progress: Progress | None = None) -> tuple[Path, str, int]:
    """Pack the installed files of `pkg` (how == "repack") into a wheel in `dest`: its path,
    sha256 and size, the file hashed as it is written."""
    dist = md.distribution(pkg.name)
    site = pkg.source
    prefix = sys.prefix + "/"
    scripts = {ep.name for group in ("console_scripts", "gui_scripts")
               for ep in dist.entry_points.select(group=group)}
    rows = _record(dist.read_text("RECORD") or "")
    info_dir = next(p.split("/")[0] for p in rows if p.split("/")[0].endswith(".dist-info"))
    data_dir = info_dir.removesuffix(".dist-info") + ".data"
    name = canonicalize_name(pkg.name).replace("-", "_")
    path = dest / f"{name}-{pkg.version}-{_tags(dist.read_text('WHEEL') or '')}.whl"
    record: list[tuple[str, str, str]] = []
    with path.open("wb") as f:
        sink = _HashingSink(f, progress)
        with zipfile.ZipFile(sink, "w") as zf:
            for rel, (want, _) in rows.items():
                if _pip_wrote(rel):
                    continue
                src = os.path.normpath(os.path.join(site, rel))
                arcname = rel
                if rel.startswith("../"):
                    if not src.startswith(prefix):
                        raise ConfigError(f"{pkg.name} {pkg.version} installed {src} outside "
                                          f"this environment ({sys.prefix})",
                                          hint="reinstall it into the environment")
                    under = src.removeprefix(prefix)
                    script = under.removeprefix("bin/")
                    if script != under and script in scripts:
                        continue  # pip writes entry-point scripts for the new environment
                    arcname = (f"{data_dir}/scripts/{script}" if script != under
                               else f"{data_dir}/data/{under}")
                try:
                    with open(src, "rb") as fin:
                        data = fin.read()
                except OSError as e:
                    raise IntegrityError(
                        f"{pkg.name} {pkg.version}: {src}, in its RECORD, cannot be read "
                        f"({e.strerror})", hint=f"reinstall it: pip install --force-reinstall "
                        f"--no-deps {pkg.name}=={pkg.version}") from None
                algorithm, _, _ = want.partition("=")
                if _b64(hashlib.new(algorithm, data).digest(), algorithm) != want:
                    raise IntegrityError(
                        f"{pkg.name} {pkg.version}: {src} is not the file pip installed (its "
                        "sha256 differs from the distribution's RECORD), so it is not bundled",
                        hint=f"reinstall it: pip install --force-reinstall --no-deps "
                        f"{pkg.name}=={pkg.version}")
                if arcname.startswith(f"{data_dir}/scripts/") and data.startswith(b"#!"):
                    first, _, rest = data.partition(b"\n")
                    if b"python" in first:
                        # The new environment's interpreter: pip writes it in for `#!python`.
                        data = b"#!python\n" + rest
                digest = _b64(hashlib.sha256(data).digest())
                _member(zf, arcname, data, os.access(src, os.X_OK))
                record.append((arcname, digest, str(len(data))))
            text = io.StringIO()
            writer = csv.writer(text, lineterminator="\n")
            writer.writerows(record)
            writer.writerow((f"{info_dir}/RECORD", "", ""))
            _member(zf, f"{info_dir}/RECORD", text.getvalue().encode(), False)
    return path, sink.hash.hexdigest(), sink.size


def build(pkg: Package, dest: Path) -> Path:
    """Build the wheel of `pkg` (how == "build") from its source tree into `dest`, offline."""
    with tempfile.TemporaryDirectory(dir=dest, prefix=".build-") as tmp:
        done = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
             "--no-index", "--quiet", "--disable-pip-version-check", "--wheel-dir", tmp,
             pkg.source], capture_output=True, text=True, check=False)
        built = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or len(built) != 1:
            why = (done.stderr.strip().splitlines() or ["no wheel came out"])[-1]
            raise CheckFailed(
                f"could not build {pkg.name} {pkg.version} from {pkg.source} (installed "
                f"editable): {why}",
                hint="build it with this environment's backend (pip install 'setuptools>=77' "
                f"into {sys.prefix}), or give its wheel with --wheels DIR")
        path = dest / built[0].name
        os.replace(built[0], path)
    _same_requires(path, _installed(md.distribution(pkg.name)))
    return path
