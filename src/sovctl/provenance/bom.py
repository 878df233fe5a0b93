"""`sovctl bom`: the stack's bill of materials, CycloneDX JSON (spec 1.6) made with
cyclonedx-python-lib.

Its components:
- each pinned model (type machine-learning-model): name, where it was pinned from (Hub repo
  and commit, URL or path), sha256 and size exactly as in sovctl.lock, the signer when it is
  signed; architecture, quantization, parameters and licence from its GGUF header; its
  projector as a sub-component;
- the runtime: the llama.cpp build scripts/setup made (commit, build flags), the binaries
  `serve` and `worker` run, each with its sha256, and the hash of the wheel that carries them;
- every Python distribution of the environment sovctl runs in, with its version and a hash;
and sovctl itself as the component the BOM describes.

The document is a function of the stack alone: no timestamp, and a serial number derived
from its content, so the same stack gives the same bytes and their sha256 names the stack (the
audit report and the bundle carry that digest). A figure that cannot be known is left out of
its field and said in `unknown`, never guessed.
"""

from __future__ import annotations

import hashlib
import json
import platform
import re
import sysconfig
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sovctl import __version__, llamacpp
from sovctl.config import Settings
from sovctl.engines import DISTRIBUTION
from sovctl.errors import UsageError
from sovctl.fsutil import atomic_write
from sovctl.home import Home
from sovctl.store import gguf_info
from sovctl.store.blobs import BlobStore, hash_file
from sovctl.store.gguf_header import read_header
from sovctl.store.lock import Lock, LockEntry, ProjectorPin

if TYPE_CHECKING:
    from cyclonedx.model import Property
    from cyclonedx.model.component import Component

SPEC = "CycloneDX 1.6"
# The serial number is uuid5(this namespace, sha256 of the document written without one): the
# same content, the same serial; any change, another.
_SERIAL_NAMESPACE = uuid.UUID("6f1d8c3e-2b7a-4c55-9e0d-5a3b8f2e1c47")
# Properties are named in sovctl's own namespace (CycloneDX's property taxonomy asks for one).
_NS = "sovctl:"
# What a package's hash is of, as its `sovctl:hash-of` property says.
HASH_OF_WHEEL = "wheel"  # the archive installed, as pip recorded it (direct_url.json, PEP 610)
HASH_OF_RECORD = "RECORD"  # its dist-info/RECORD, which lists the sha256 of every file installed
_LICENCE_KEYS = ("general.license", "general.license.name")
# The binaries of the llama.cpp build that sovctl runs: serve, worker, bench.
_BINARIES = ("llama-server", "ggml-rpc-server", "llama-bench")


@dataclass(frozen=True)
class BomDocument:
    """A bill of materials: the CycloneDX JSON text, exactly the bytes written and hashed."""

    text: str
    sha256: str  # of `text`, UTF-8: the digest the audit report and the bundle carry
    spec: str
    models: tuple[str, ...]  # the lock's names, each a component
    packages: int  # Python distributions listed
    unknown: tuple[str, ...]  # each figure that could not be known, and why

    def document(self) -> dict[str, Any]:
        doc: dict[str, Any] = json.loads(self.text)
        return doc


def bom_document(home: Home, cfg: Settings) -> BomDocument:
    """The bill of materials of the stack this home and settings make: reads the lock, the
    blobs' GGUF headers, the llama.cpp build and the installed distributions; writes nothing."""
    from cyclonedx.model.bom import Bom, BomMetaData
    from cyclonedx.model.component import Component, ComponentType
    from cyclonedx.output.json import JsonV1Dot6

    unknown: list[str] = []
    lock = Lock.load(home)
    store = BlobStore(home)
    models = [_model(home, store, e, unknown) for _, e in sorted(lock.entries.items())]
    runtime = _runtime(cfg, unknown)
    own, packages = _packages(unknown)
    root = Component(
        name="sovctl", version=__version__, type=ComponentType.APPLICATION, bom_ref="sovctl",
        purl=_purl("pypi", "sovctl", __version__), hashes=own.hashes if own else None,
        properties=own.properties if own else None,
        description="the sovereign AI stack this BOM describes",
    )
    bom = Bom(components=[*models, runtime, *packages], metadata=BomMetaData(
        component=root, properties=[
            _prop("python", platform.python_version()),
            _prop("platform", sysconfig.get_platform()),
            _prop("lock-models", len(lock.entries)),
        ]))
    bom.metadata.timestamp = None  # type: ignore[assignment]  # see the module's docstring
    bom.register_dependency(root, [*models, runtime, *packages])
    bom.serial_number = None  # type: ignore[assignment]
    draft = JsonV1Dot6(bom).output_as_string(indent=2)
    bom.serial_number = uuid.uuid5(_SERIAL_NAMESPACE, hashlib.sha256(draft.encode()).hexdigest())
    text = JsonV1Dot6(bom).output_as_string(indent=2) + "\n"
    return BomDocument(text=text, sha256=hashlib.sha256(text.encode()).hexdigest(), spec=SPEC,
                       models=tuple(sorted(lock.entries)), packages=len(packages),
                       unknown=tuple(unknown))


def write_bom(path: Path, bom: BomDocument) -> None:
    """Write the document to `path` atomically (a reader sees the old file or the new one),
    mode 0644: a BOM is for others to read."""
    if not path.parent.is_dir():
        raise UsageError(f"cannot write the BOM to {path}: {path.parent} is not a directory",
                         hint="create the directory first, or choose another -o FILE")
    try:
        atomic_write(path, bom.text.encode(), mode=0o644)
    except OSError as e:
        raise UsageError(f"cannot write the BOM to {path}: {e.strerror}",
                         hint="choose another -o FILE") from None


# -- models -----------------------------------------------------------------------------------


def _prop(name: str, value: object) -> Property:
    from cyclonedx.model import Property

    return Property(name=_NS + name, value=str(value))


def _sha256(hexdigest: str) -> Any:
    from cyclonedx.model import HashAlgorithm, HashType

    return HashType(alg=HashAlgorithm.SHA_256, content=hexdigest)


def _purl(kind: str, name: str, version: str | None, namespace: str | None = None) -> Any:
    from packageurl import PackageURL

    return PackageURL(type=kind, namespace=namespace, name=name, version=version)


def _header(blob: Path) -> dict[str, Any]:
    """The licence keys of a GGUF header (cheap: the vocabulary is skipped, not read)."""
    try:
        return read_header(blob, lambda k: k in _LICENCE_KEYS).kv
    except (ValueError, KeyError, OSError):
        return {}


def _pin(home: Home, store: BlobStore, pin: LockEntry | ProjectorPin, label: str,
         unknown: list[str]) -> dict[str, Any]:
    """The fields of one pinned file: the lock's, then its header's."""
    from cyclonedx.contrib.license.factories import LicenseFactory

    props = [_prop("sha256", pin.sha256), _prop("size", pin.size),
             _prop("source", pin.source), _prop("ref", pin.ref),
             _prop("digest-from", pin.digest_from)]
    props += [_prop(k, v) for k, v in (("repo", pin.repo), ("path", pin.path),
                                       ("revision", pin.revision), ("commit", pin.commit),
                                       ("url", pin.url), ("endpoint", pin.endpoint)) if v]
    licences = None
    blob = store.path(pin.sha256)
    if store.has(pin.sha256):
        facts = gguf_info.facts_for(home, pin.sha256, blob, write=False)
        props += [_prop("architecture", facts.architecture),
                  _prop("quantization", facts.quantization),
                  _prop("parameters", facts.parameters)]
        kv = _header(blob)
        text = next((str(kv[k]) for k in _LICENCE_KEYS if kv.get(k)), "")
        if text:
            licences = [LicenseFactory().make_from_string(text)]
        else:
            unknown.append(f"{label}: licence (its GGUF header names none)")
    else:
        props.append(_prop("blob", "missing"))
        unknown.append(f"{label}: architecture and licence (its blob is missing from the "
                       "store; 'sovctl verify' says more)")
    version = pin.commit or None
    purl = None
    if pin.source == "hf" and pin.repo and pin.commit:
        org, _, repo = pin.repo.partition("/")
        purl = _purl("huggingface", repo, pin.commit, org)
    return {"hashes": [_sha256(pin.sha256)], "properties": props, "licenses": licences,
            "version": version, "purl": purl}


def _model(home: Home, store: BlobStore, e: LockEntry, unknown: list[str]) -> Component:
    from cyclonedx.model.component import Component, ComponentType

    fields = _pin(home, store, e, e.name, unknown)
    if e.signer:
        fields["properties"].append(_prop("signer", e.signer))
    parts = None
    if e.mmproj is not None:
        parts = [Component(name=f"{e.name}/mmproj", type=ComponentType.MACHINE_LEARNING_MODEL,
                           bom_ref=f"model:{e.name}/mmproj",
                           description="multimodal projector, served with the model",
                           **_pin(home, store, e.mmproj, f"{e.name}/mmproj", unknown))]
    return Component(name=e.name, type=ComponentType.MACHINE_LEARNING_MODEL,
                     bom_ref=f"model:{e.name}", components=parts, **fields)


# -- the runtime ------------------------------------------------------------------------------


def _runtime(cfg: Settings, unknown: list[str]) -> Component:
    """The llama.cpp build: its commit and flags, the binaries sovctl runs with their sha256,
    and the wheel of llama-cpp-python that carries it."""
    from cyclonedx.model.component import Component, ComponentType

    build = llamacpp.build_info()
    props = []
    if build is not None and build.commit and build.commit != "unknown":
        props += [_prop("commit", build.commit), _prop("build-number", build.build_number),
                  _prop("build-flags", build.flags)]
    else:
        unknown.append("llama.cpp: commit and build flags (this build was not made by "
                       "scripts/setup, which records them in llama_cpp/lib/sovctl-build.toml)")
    wheel = _distribution(DISTRIBUTION)
    if wheel is not None:
        props.append(_prop("carried-by", f"pkg:pypi/{DISTRIBUTION}@{wheel.version}"))
        sha, of = _dist_hash(wheel)
        if of == HASH_OF_WHEEL:
            props += [_prop("wheel-sha256", sha),
                      _prop("wheel", _direct_url(wheel).get("url", "").rsplit("/", 1)[-1])]
        else:
            unknown.append(f"llama.cpp: the hash of the {DISTRIBUTION} wheel (pip recorded "
                           f"none: it was not installed from a wheel file; its RECORD is "
                           f"hashed instead)")
    else:
        unknown.append(f"llama.cpp: {DISTRIBUTION} is not installed")
    binaries = []
    for name in _BINARIES:
        setting = cfg.serve.llama_server if name == "llama-server" else ""
        path = llamacpp.find_binary(name, setting)
        if path is None:
            unknown.append(f"{name}: not found (run ./scripts/setup)")
            continue
        binaries.append(Component(
            name=name, type=ComponentType.APPLICATION, bom_ref=f"runtime:{name}",
            version=build.commit if build else None, hashes=[_sha256(hash_file(path)[0])],
            properties=[_prop("path", path)]
            + ([_prop("configured-by", "serve.llama_server")] if setting else [])))
    return Component(name="llama.cpp", type=ComponentType.FRAMEWORK, bom_ref="runtime:llama.cpp",
                     version=build.commit if build else None, properties=props,
                     components=binaries or None,
                     description="the inference runtime: llama-server, ggml-rpc-server and "
                     "llama-cpp-python's engine, one build")


# -- the Python environment -------------------------------------------------------------------


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _distributions() -> Iterator[metadata.Distribution]:
    """Each distribution importable here, once: the first of a name on sys.path, as import
    finds it (an editable install also leaves an .egg-info in the source tree)."""
    seen = set()
    for d in metadata.distributions():
        name = d.metadata["Name"]
        if name and _normalise(name) not in seen:
            seen.add(_normalise(name))
            yield d


def _distribution(name: str) -> metadata.Distribution | None:
    return next((d for d in _distributions() if _normalise(d.metadata["Name"]) == name), None)


def _direct_url(d: metadata.Distribution) -> dict[str, Any]:
    try:
        doc = json.loads(d.read_text("direct_url.json") or "{}")
    except json.JSONDecodeError:
        return {}
    return doc if isinstance(doc, dict) else {}


def _record(d: metadata.Distribution) -> Path | None:
    found = next((f for f in d.files or () if f.name == "RECORD"
                  and f.parent.name.endswith(".dist-info")), None)
    return Path(str(found.locate())) if found is not None else None


def _dist_hash(d: metadata.Distribution) -> tuple[str | None, str]:
    """The distribution's sha256 and what it is of: the wheel installed where pip recorded its
    hash (a wheel installed from a file), else its RECORD (pip keeps no wheel's hash of what
    it fetched from an index; RECORD lists the sha256 of every file the wheel installed)."""
    archive = _direct_url(d).get("archive_info", {})
    sha = (archive.get("hashes") or {}).get("sha256") \
        or str(archive.get("hash", "")).removeprefix("sha256=") or None
    if sha and re.fullmatch(r"[0-9a-f]{64}", sha):
        return sha, HASH_OF_WHEEL
    record = _record(d)
    if record is not None and record.is_file():
        return hashlib.sha256(record.read_bytes()).hexdigest(), HASH_OF_RECORD
    return None, ""


def _package(d: metadata.Distribution, unknown: list[str]) -> Component:
    from cyclonedx.model.component import Component, ComponentType

    name, version = d.metadata["Name"], d.version
    sha, of = _dist_hash(d)
    props = []
    if sha:
        props.append(_prop("hash-of", of))
        record = _record(d)
        if of == HASH_OF_WHEEL and record is not None and record.is_file():
            props.append(_prop("record-sha256", hashlib.sha256(record.read_bytes()).hexdigest()))
    else:
        unknown.append(f"{name} {version}: a hash (no RECORD and no recorded wheel: not "
                       "installed by pip)")
    direct = _direct_url(d)
    if (direct.get("dir_info") or {}).get("editable"):
        props.append(_prop("editable", direct.get("url", "")))
    return Component(name=name, version=version, type=ComponentType.LIBRARY,
                     bom_ref=f"pypi:{_normalise(name)}@{version}",
                     purl=_purl("pypi", _normalise(name), version),
                     hashes=[_sha256(sha)] if sha else None, properties=props or None)


def _packages(unknown: list[str]) -> tuple[Component | None, list[Component]]:
    """sovctl's own distribution, and every other, sorted by name."""
    own, others = None, []
    for d in sorted(_distributions(), key=lambda d: _normalise(d.metadata["Name"])):
        c = _package(d, unknown)
        if _normalise(d.metadata["Name"]) == "sovctl":
            own = c
        else:
            others.append(c)
    return own, others
