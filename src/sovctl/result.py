"""The versioned JSON envelope every `--json` output uses, and the conversion of typed results."""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sovctl import __version__

SCHEMA = "sovctl/v1"


def jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple | set | frozenset):
        return [jsonable(v) for v in obj]
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, dt.datetime):
        return obj.isoformat()
    return obj


def envelope(command: str, data: Any = None, error: Mapping[str, Any] | None = None) -> dict:
    return {
        "schema": SCHEMA,
        "sovctl": __version__,
        "command": command,
        "ok": error is None,
        "data": jsonable(data),
        "error": dict(error) if error else None,
    }


def utcnow() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")
