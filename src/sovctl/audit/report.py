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
from sovctl.result import jsonable

REPORT_SCHEMA = "sovctl.audit.report/v1"


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


def report_path(home: Home, kind: str, when: dt.datetime) -> Path:
    stamp = when.strftime("%Y%m%dT%H%M%SZ")
    path = home.reports / f"{kind}-{stamp}.json"
    n = 2
    while path.exists():
        path = home.reports / f"{kind}-{stamp}-{n}.json"
        n += 1
    return path


def write(home: Home, report: AuditReport, when: dt.datetime) -> AuditReport:
    """Write the report as JSON and return it with its path filled in."""
    import dataclasses

    path = report_path(home, report.kind, when)
    report = dataclasses.replace(report, path=str(path))
    doc = {"schema": REPORT_SCHEMA, **jsonable(report)}
    atomic_write(path, json.dumps(doc, indent=2).encode())
    return report
