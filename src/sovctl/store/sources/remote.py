"""The sources whose bytes come over HTTP (the Hub, a mirror, a URL): one GET streamed through
the hashing writer, resumed with a Range request from the bytes already on disk."""

from __future__ import annotations

from abc import abstractmethod
from pathlib import Path

from sovctl.errors import IntegrityError
from sovctl.store import hub
from sovctl.store.blobs import HashingWriter
from sovctl.store.sources.base import ProgressFactory, Received, Resolved, Source


class RemoteSource(Source):
    @abstractmethod
    def credential(self) -> str | None:
        """What this source may send as its Bearer token (see `hub.credential`)."""

    def fetch(self, want: Resolved, partial: Path, *, label: str,
              progress: ProgressFactory | None, have: list[str]) -> Received:
        # A credential goes to the endpoint it belongs to (the Hub's token to the Hub, the
        # mirror's to a mirror), and none to an arbitrary URL.
        return download(want.location, partial, want.expected_size, progress, label,
                        self.credential(), have)


def download(
    url: str,
    partial: Path,
    expected_size: int | None,
    progress: ProgressFactory | None,
    name: str,
    token: str | None,
    have: list[str],
) -> Received:
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
        return Received(digest, size, 0, offset, "resumed")
    with hub.fetch(url, offset, token, have) as resp:
        if resp.status in (200, 416):
            # The server ignored or refused our range: start over from the first byte.
            offset = 0
        if resp.status == 416:
            partial.unlink(missing_ok=True)
            return download(url, partial, expected_size, progress, name, token, have)
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
    if expected_size is not None and size != expected_size:
        partial.unlink(missing_ok=True)
        raise IntegrityError(
            f"{name}: received {size} bytes, expected {expected_size}; nothing was stored",
            hint="the source or a proxy altered the file; try again or use another --endpoint",
        )
    return Received(digest, size, transferred, offset, "resumed" if offset else "downloaded")
