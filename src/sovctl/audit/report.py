"""The audit report: what ran, where, on which weights, each check with its evidence; written
as JSON under `HOME/reports/` with a timestamped name."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import platform
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sovctl import __version__
from sovctl.audit.checks import CheckResult
from sovctl.engines import DISTRIBUTION
from sovctl.fsutil import atomic_write
from sovctl.home import Home
from sovctl.hostinfo import cpu_model
from sovctl.llamacpp import build_info
from sovctl.provenance.bom import BomDocument, write_bom
from sovctl.result import jsonable

# v2: `bom`, the digest of the stack's bill of materials, written beside the report. v3:
# `changes`, the models switched to other weights (sovctl upgrade, rollback) since the last one.
REPORT_SCHEMA = "sovctl.audit.report/v3"
# Every switch of a model's weights, one JSON line each, until a report names it.
CHANGES_FILE = "changes.jsonl"


@dataclass(frozen=True)
class ModelInfo:
    name: str
    role: str
    sha256: str
    size: int


@dataclass(frozen=True)
class AuditReport:
    kind: str  # "blackout"
    started_at: str
    finished_at: str
    passed: bool
    isolation: Mapping[str, Any]  # mode (netns | userns+netns), namespace ids, weaker: False
    models: tuple[ModelInfo, ...]
    checks: tuple[CheckResult, ...]
    baseline: Mapping[str, Any]
    timings: Mapping[str, float]
    host: Mapping[str, Any]
    versions: Mapping[str, str]
    schema: str = REPORT_SCHEMA
    path: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)
    # The bill of materials of the stack audited (sovctl bom): sha256, spec, and path, the
    # BOM itself, written beside the report
    bom: Mapping[str, Any] = field(default_factory=dict)
    # The models switched to other weights since the last report: {name, why, from_sha256,
    # to_sha256, at, live, text}, oldest first (see `record_change`).
    changes: tuple[Mapping[str, Any], ...] = ()

    @property
    def failed(self) -> tuple[CheckResult, ...]:
        return tuple(c for c in self.checks if not c.passed)


def versions() -> dict[str, str]:
    from importlib import metadata

    try:
        llama = metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        llama = "not installed"
    build = build_info()
    # The llama.cpp build scripts/setup made, behind both runtimes (each baseline also records
    # the build of the engine that actually served it).
    return {"sovctl": __version__, DISTRIBUTION: llama,
            "llama.cpp": build.commit if build and build.commit else "unknown",
            "python": platform.python_version()}


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def host_fingerprint() -> dict[str, Any]:
    """What the audit ran on; the machine id is hashed, never written out."""
    os_name = next((line.split("=", 1)[1].strip().strip('"')
                    for line in _read("/etc/os-release").splitlines()
                    if line.startswith("PRETTY_NAME=")), platform.system())
    mem_kib = next((int(line.split()[1]) for line in _read("/proc/meminfo").splitlines()
                    if line.startswith("MemTotal:")), 0)
    machine_id = _read("/etc/machine-id").strip()
    facts: dict[str, Any] = {
        "hostname": socket.gethostname(),
        "os": os_name,
        "kernel": platform.release(),
        "arch": platform.machine(),
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "memory_bytes": mem_kib * 1024,
        "machine_id_sha256": hashlib.sha256(machine_id.encode()).hexdigest()[:16]
        if machine_id else "",
        "user": "root" if os.geteuid() == 0 else str(os.geteuid()),
    }
    facts["fingerprint"] = hashlib.sha256(
        json.dumps(facts, sort_keys=True).encode()).hexdigest()[:16]
    return facts


def record_change(home: Home, change: Mapping[str, Any]) -> None:
    """Note a switch of a model's weights for the next report (`changes_since`): one line,
    appended whole (O_APPEND, one write), so that concurrent writers never mix lines."""
    path = home.root / "audit" / CHANGES_FILE
    home.ensure(path.parent)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (json.dumps(dict(change), sort_keys=True) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def changes_since(home: Home, kind: str) -> tuple[dict[str, Any], ...]:
    """The switches recorded after the last report of this kind started (all when there is
    none): what the next report names."""
    try:
        lines = (home.root / "audit" / CHANGES_FILE).read_text().splitlines()
    except FileNotFoundError:
        return ()
    last = ""
    reports = sorted(home.reports.glob(f"{kind}-*.json"), key=lambda p: p.stat().st_mtime) \
        if home.reports.is_dir() else []
    if reports:
        try:
            last = str(json.loads(reports[-1].read_text()).get("started_at") or "")
        except (OSError, ValueError):
            last = ""
    found = []
    for line in lines:
        try:
            change = json.loads(line)
        except ValueError:
            continue  # a line cut short by a crash: the switch it told of is in the lock
        if isinstance(change, dict) and str(change.get("at", "")) > last:
            found.append(change)
    return tuple(found)


def report_path(home: Home, kind: str, when: dt.datetime) -> Path:
    stamp = when.strftime("%Y%m%dT%H%M%SZ")
    path = home.reports / f"{kind}-{stamp}.json"
    n = 2
    while path.exists():
        path = home.reports / f"{kind}-{stamp}-{n}.json"
        n += 1
    return path


def write(home: Home, report: AuditReport, when: dt.datetime,
          bom: BomDocument | None = None) -> AuditReport:
    """Write the report as JSON and return it with its path filled in; with `bom`, the bill of
    materials first, beside it (bom-REPORT.cdx.json), and its digest into the report."""
    import dataclasses

    path = report_path(home, report.kind, when)
    report = dataclasses.replace(report, path=str(path))
    if bom is not None:
        # Not blackout-*.json: whatever lists the reports by name finds reports alone.
        bom_path = path.with_name(f"bom-{path.stem}.cdx.json")
        home.ensure(home.reports)
        write_bom(bom_path, bom)
        report = dataclasses.replace(report, bom={"sha256": bom.sha256, "spec": bom.spec,
                                                  "path": str(bom_path)})
    doc = {"schema": REPORT_SCHEMA, **jsonable(report)}
    atomic_write(path, json.dumps(doc, indent=2).encode())
    return report
