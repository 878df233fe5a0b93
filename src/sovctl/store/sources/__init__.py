"""The sources `sovctl pull` brings weights from, one class per kind (`base.Source`): the Hub
(`hf`), a Hub-compatible mirror (`mirror`), a plain URL (`url`), a local file (`file`).

`source_for` is the one place a REF picks its kind; a new kind is a new module here and a line
there, and `sovctl.store.pull` does not change.
"""

from __future__ import annotations

from sovctl.errors import UsageError
from sovctl.store import hub, refs
from sovctl.store.sources.base import ProgressFactory, Received, Resolved, Source
from sovctl.store.sources.file import FileSource
from sovctl.store.sources.hf import HubSource
from sovctl.store.sources.mirror import MirrorSource
from sovctl.store.sources.url import UrlSource

__all__ = ["FileSource", "HubSource", "MirrorSource", "ProgressFactory", "Received",
           "Resolved", "Source", "UrlSource", "source_for"]


def source_for(text: str, *, endpoint: str, revision: str, hub_token: str | None) -> Source:
    """The source REF `text` names. A Hub reference goes to `endpoint` at `revision`: the Hub
    itself is given `hub_token` (HF_TOKEN), any other endpoint is a mirror and is not."""
    match refs.parse_ref(text):
        case refs.LocalFile(local):
            return FileSource(local)
        case refs.Url(url):
            return UrlSource(url)
        case refs.HubFile(repo, path):
            return _hub(text, repo, path, None, endpoint, revision, hub_token)
        case refs.HubQuant(repo, quant):
            return _hub(text, repo, None, quant, endpoint, revision, hub_token)
    raise AssertionError("unreachable")


def _hub(text: str, repo: str, path: str | None, quant: str | None, endpoint: str,
         revision: str, hub_token: str | None) -> HubSource:
    if not endpoint.startswith(("http://", "https://")):
        raise UsageError(
            f"hub endpoint {endpoint!r} is not an http:// or https:// URL",
            hint="check --endpoint, HF_ENDPOINT, SOVCTL_HUB__ENDPOINT or [hub] in sovctl.toml",
        )
    if hub.is_hub(endpoint):
        return HubSource(text, repo=repo, path=path, quant=quant, endpoint=endpoint,
                         revision=revision, hub_token=hub_token)
    return MirrorSource(text, repo=repo, path=path, quant=quant, endpoint=endpoint,
                        revision=revision)
