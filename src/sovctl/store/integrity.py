"""Whether a blob still holds the bytes the lock pins: the one check behind `verify`, the
pre-start check of `serve` and the audit.

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
from sovctl.store.blobs import BlobStore, Progress, hash_file


@dataclass(frozen=True)
class BlobCheck:
    name: str
    sha256: str
    status: str  # "ok" | "mismatch" | "missing"
    method: str  # "stat" (missing or wrong size) | "stamp" (unchanged since hashed) | "rehash"
    actual: str | None = None  # the blob's sha256 when hashed, or why it is the wrong size
    size: int | None = None  # the blob's length, when it exists

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def _stamp_path(home: Home, sha256: str) -> Path:
    return home.root / "store" / "stamps" / f"sha256-{sha256}.json"


def _stat_key(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "ino": st.st_ino, "mtime_ns": st.st_mtime_ns,
            "ctime_ns": st.st_ctime_ns}


def _stamp(home: Home, sha256: str, key: dict[str, int]) -> None:
    atomic_write(_stamp_path(home, sha256), json.dumps(key).encode())


def record(home: Home, sha256: str) -> None:
    """Stamp a blob whose bytes were just hashed in full and matched `sha256`."""
    _stamp(home, sha256, _stat_key(BlobStore(home).path(sha256)))


def forget(home: Home, sha256: str) -> None:
    _stamp_path(home, sha256).unlink(missing_ok=True)


def check(
    home: Home,
    name: str,
    sha256: str,
    size: int,
    full: bool = False,
    progress: Progress | None = None,
) -> BlobCheck:
    blob = BlobStore(home).path(sha256)
    try:
        key = _stat_key(blob)
    except FileNotFoundError:
        return BlobCheck(name, sha256, "missing", "stat")
    if not full:
        if key["size"] != size:
            return BlobCheck(name, sha256, "mismatch", "stat", f"size {key['size']} != {size}",
                             key["size"])
        try:
            if json.loads(_stamp_path(home, sha256).read_text()) == key:
                return BlobCheck(name, sha256, "ok", "stamp", size=size)
        except (FileNotFoundError, json.JSONDecodeError):
            pass
    digest, hashed = hash_file(blob, progress)
    if digest != sha256 or hashed != size:
        forget(home, sha256)
        return BlobCheck(name, sha256, "mismatch", "rehash", digest, hashed)
    # Stamped with the stat from before the hash, and only if the file did not change while
    # it was read: a stamp must never vouch for bytes that were not the ones hashed.
    if _stat_key(blob) == key:
        _stamp(home, sha256, key)
    return BlobCheck(name, sha256, "ok", "rehash", digest, hashed)
