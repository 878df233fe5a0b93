"""What every source of weights is: pinned by what, resolved to which bytes, fetched how.

A source is one kind of REF (`sovctl.store.sources.source_for` picks it): it resolves to the
bytes it stands for and their expected digest, streams them through the one hashing writer
into a partial file, and says how the lock records it. `sovctl.store.pull` does the rest the
same way for every kind: the partial file under its lock, the checks, the stamp, the pin.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from sovctl.errors import IntegrityError
from sovctl.result import utcnow
from sovctl.store.blobs import Progress
from sovctl.store.lock import LockEntry, ProjectorPin

# (description, total bytes or None, bytes already done) -> a callback taking byte counts
ProgressFactory = Callable[[str, int | None, int], Progress]


@dataclass(frozen=True)
class Resolved:
    """What a source's bytes must be, known before fetching them."""

    entry: LockEntry  # the pin; sha256/size may be provisional until the bytes are hashed
    location: str  # where the bytes are: a URL, or a local path
    expected_sha: str | None
    expected_size: int | None


@dataclass(frozen=True)
class Received:
    """Bytes a source put in the partial file, hashed on the way."""

    digest: str
    size: int
    transferred: int  # bytes that crossed the network (or were copied) in this run
    resumed_from: int
    action: str  # "downloaded" | "resumed" | "imported"


class Source(ABC):
    """One REF of one kind. `kind` is the lock's `source` field for it; `ref` the text pinned."""

    kind: ClassVar[str]

    def __init__(self, ref: str) -> None:
        self.ref = ref

    def pins(self, pin: LockEntry | ProjectorPin) -> bool:
        """Whether `pin` is this source's (its bytes may still be missing from the store)."""
        return pin.ref == self.ref

    @abstractmethod
    def resolve(self, sha256: str | None, *, tofu: bool, have: list[str]) -> Resolved:
        """The bytes to fetch and what they must be; `sha256` is the operator's (--sha256),
        `tofu` whether a source that gives no digest may be trusted on first use."""

    @abstractmethod
    def fetch(self, want: Resolved, partial: Path, *, label: str,
              progress: ProgressFactory | None, have: list[str]) -> Received:
        """Bring the bytes into `partial` through a `HashingWriter` (resuming what is there,
        where the source can); `label` names the file to the operator."""

    def _entry(self, **fields: Any) -> LockEntry:
        """The pin of this source, not yet named."""
        now = utcnow()
        return LockEntry(name="", ref=self.ref, pulled_at=now, verified_at=now,
                         source=self.kind, **fields)


def tofu_or_refuse(tofu: bool, why: str) -> str:
    """The `digest_from` of a pin its source gives no digest for: trust on first use, if the
    operator said so."""
    if not tofu:
        raise IntegrityError(
            f"refusing to download without an expected sha256: {why}",
            hint="pass --sha256 HEX from a source you trust, or --trust-on-first-use",
        )
    return "trust-on-first-use"
