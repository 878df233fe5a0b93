"""A plain http(s) URL: no digest but the operator's (--sha256, or trust on first use), and no
credential sent to it."""

from __future__ import annotations

from typing import ClassVar

from sovctl.store.sources.base import Resolved, tofu_or_refuse
from sovctl.store.sources.remote import RemoteSource


class UrlSource(RemoteSource):
    kind: ClassVar[str] = "url"

    def credential(self) -> str | None:
        return None

    def resolve(self, sha256: str | None, *, tofu: bool, have: list[str]) -> Resolved:
        origin = "flag" if sha256 else tofu_or_refuse(tofu, f"a URL carries no digest: {self.ref}")
        entry = self._entry(sha256=sha256 or "", size=0, digest_from=origin, url=self.ref)
        return Resolved(entry, self.ref, sha256, None)
