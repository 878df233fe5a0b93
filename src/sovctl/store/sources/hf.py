"""A file of a repository on the Hugging Face Hub: hf://ORG/REPO/PATH/FILE.gguf or
ORG/REPO:QUANT, at a revision resolved to a commit, with the sha256 of its LFS pointer."""

from __future__ import annotations

from typing import ClassVar

from sovctl.errors import IntegrityError
from sovctl.store import hub
from sovctl.store.lock import LockEntry, ProjectorPin
from sovctl.store.sources.base import Resolved, tofu_or_refuse
from sovctl.store.sources.remote import RemoteSource


class HubSource(RemoteSource):
    """At the Hub itself (huggingface.co over https): sent the Hub's token, HF_TOKEN."""

    kind: ClassVar[str] = "hf"

    def __init__(self, ref: str, *, repo: str, path: str | None, quant: str | None,
                 endpoint: str, revision: str, hub_token: str | None = None) -> None:
        super().__init__(ref)
        self.repo, self.path, self.quant = repo, path, quant
        self.endpoint, self.revision = endpoint, revision
        self._hub_token = hub_token

    def credential(self) -> str | None:
        return self._hub_token

    def pins(self, pin: LockEntry | ProjectorPin) -> bool:
        return super().pins(pin) and self.revision in (pin.revision, pin.commit)

    def resolve(self, sha256: str | None, *, tofu: bool, have: list[str]) -> Resolved:
        res = hub.resolve(self.endpoint, self.repo, self.revision, path=self.path,
                          quant=self.quant, have=have, token=self.credential())
        if sha256 and res.sha256 and sha256 != res.sha256:
            raise IntegrityError(
                f"--sha256 {sha256} disagrees with the Hub's sha256 {res.sha256} for "
                f"{res.repo}/{res.path}@{res.commit[:12]}",
                hint="check where your expected digest came from; nothing was downloaded",
            )
        expected = res.sha256 or sha256
        if res.sha256 and sha256:
            origin = "hub+flag"
        elif expected:
            origin = "hub" if res.sha256 else "flag"
        else:
            origin = tofu_or_refuse(tofu, f"{self.endpoint} gives no sha256 for {res.path}")
        entry = self._entry(sha256=expected or "", size=res.size or 0, digest_from=origin,
                            repo=res.repo, path=res.path, endpoint=self.endpoint,
                            revision=self.revision, commit=res.commit)
        return Resolved(entry, res.url, expected, res.size)
