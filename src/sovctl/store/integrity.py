"""A fast pre-start check of a blob against the lock, falling back to a full re-hash.

After a blob is hashed in full, its stat (size, inode, mtime, ctime) is stamped. A later
check that finds the same stat trusts that hash; any change to the file (a write bumps
ctime, which user space cannot set back) forces a full re-hash. `full=True` always re-hashes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from sovctl.fsutil import atomic_write
from sovctl.home import Home
from sovctl.store.blobs import BlobStore, hash_file


@dataclass(frozen=True)
class BlobCheck:
    name: str
    sha256: str
    status: str  # "ok" | "mismatch" | "missing"
    method: str  # "stamp" (stat unchanged since a full hash) | "rehash"
    actual: str | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _stamp_path(home: Home, sha256: str) -> Path:
    return home.root / "store" / "stamps" / f"sha256-{sha256}.json"


def _stat_key(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "ino": st.st_ino, "mtime_ns": st.st_mtime_ns,
            "ctime_ns": st.st_ctime_ns}


def record(home: Home, sha256: str) -> None:
    """Stamp a blob whose bytes were just hashed in full and matched `sha256`."""
    atomic_write(_stamp_path(home, sha256),
                 json.dumps(_stat_key(BlobStore(home).path(sha256))).encode())


def forget(home: Home, sha256: str) -> None:
    _stamp_path(home, sha256).unlink(missing_ok=True)


def check(home: Home, name: str, sha256: str, size: int, full: bool = False) -> BlobCheck:
    blob = BlobStore(home).path(sha256)
    if not blob.exists():
        return BlobCheck(name, sha256, "missing", "stat")
    key = _stat_key(blob)
    if key["size"] != size:
        return BlobCheck(name, sha256, "mismatch", "stat", f"size {key['size']} != {size}")
    stamp = _stamp_path(home, sha256)
    if not full:
        try:
            if json.loads(stamp.read_text()) == key:
                return BlobCheck(name, sha256, "ok", "stamp")
        except (FileNotFoundError, json.JSONDecodeError):
            pass
    digest, _ = hash_file(blob)
    if digest != sha256:
        stamp.unlink(missing_ok=True)
        return BlobCheck(name, sha256, "mismatch", "rehash", digest)
    record(home, sha256)
    return BlobCheck(name, sha256, "ok", "rehash")
