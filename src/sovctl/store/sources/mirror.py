"""The same references as the Hub's, at any other Hub-compatible endpoint: a `sovctl mirror
serve` on the LAN (--endpoint, or `pull --lock` from a replica), plain http as likely as not."""

from __future__ import annotations

from sovctl.store import hub
from sovctl.store.sources.hf import HubSource


class MirrorSource(HubSource):
    """Sent $SOVCTL_MIRROR_TOKEN and never HF_TOKEN, which would open the operator's Hub
    account to whoever runs the mirror: it is never even given it."""

    def __init__(self, ref: str, *, repo: str, path: str | None, quant: str | None,
                 endpoint: str, revision: str) -> None:
        super().__init__(ref, repo=repo, path=path, quant=quant, endpoint=endpoint,
                         revision=revision, hub_token=None)

    def credential(self) -> str | None:
        return hub.mirror_token()
