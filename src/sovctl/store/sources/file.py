"""A local file (a path or a file:// URL), imported by copying it through the hashing writer;
pinned by its absolute path, so the same file pins the same way from any working directory."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from sovctl.store.blobs import HashingWriter
from sovctl.store.sources.base import ProgressFactory, Received, Resolved, Source


class FileSource(Source):
    kind: ClassVar[str] = "file"

    def __init__(self, path: Path) -> None:
        super().__init__(str(path))
        self.path = path

    def resolve(self, sha256: str | None, *, tofu: bool, have: list[str]) -> Resolved:
        size = self.path.stat().st_size
        entry = self._entry(sha256=sha256 or "", size=size,
                            digest_from="flag" if sha256 else "computed", path=self.ref)
        return Resolved(entry, self.ref, sha256, size)

    def fetch(self, want: Resolved, partial: Path, *, label: str,
              progress: ProgressFactory | None, have: list[str]) -> Received:
        # The file is what it is now: its size is taken as copied, not held to the planned one.
        total = self.path.stat().st_size
        cb = progress(f"import {label}", total, 0) if progress else None
        writer = HashingWriter(partial, resume=False, progress=cb)
        try:
            with self.path.open("rb", buffering=0) as f:
                writer.copy_from(f)
            digest, size = writer.finish()
        except BaseException:
            writer.discard()
            raise
        return Received(digest, size, size, 0, "imported")
