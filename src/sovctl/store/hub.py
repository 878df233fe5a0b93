"""Talking to a Hugging Face compatible endpoint: resolve a revision to a commit and a file to
its LFS sha256, then stream its bytes with HTTP Range so an interrupted download resumes."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

from sovctl.errors import IntegrityError, NetworkError, NotFoundError, UsageError

TIMEOUT = 30.0
# The Hugging Face Hub itself, the one endpoint that is sent HF_TOKEN (over https).
HUB_HOSTS = ("huggingface.co", "hf.co")
# The credential of any other endpoint: a sovctl mirror's token (`mirror serve` makes it).
MIRROR_TOKEN_ENV = "SOVCTL_MIRROR_TOKEN"
MIRROR_TOKEN_HINT = (f"a sovctl mirror is sent {MIRROR_TOKEN_ENV}: set it to its token (on the "
                     "mirror's box: cat HOME/secrets/mirror_token)")


def is_hub(url: str) -> bool:
    """Whether `url` is on the Hugging Face Hub, over https."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower()
    return parts.scheme == "https" and any(host == h or host.endswith("." + h)
                                           for h in HUB_HOSTS)


def credential(endpoint: str, hub_token: str | None) -> str | None:
    """What may be sent to `endpoint`: the Hub's token (HF_TOKEN) to the Hub alone; any other
    endpoint, a mirror on the LAN over plain http as likely as not, gets $SOVCTL_MIRROR_TOKEN
    and never the Hub's token, which would open the operator's Hub account to whoever runs it."""
    return hub_token if is_hub(endpoint) else mirror_token()


def mirror_token() -> str | None:
    """The one credential sent to an endpoint other than the Hub: $SOVCTL_MIRROR_TOKEN."""
    return os.environ.get(MIRROR_TOKEN_ENV) or None


def _auth_hint(url: str) -> str:
    return ("set HF_TOKEN to a Hub token with access to the repo" if is_hub(url)
            else MIRROR_TOKEN_HINT)


@dataclass(frozen=True)
class HubResolution:
    repo: str
    path: str
    commit: str
    size: int | None
    sha256: str | None  # from the LFS pointer; None for a file stored outside LFS
    url: str


def _offline(endpoint: str, err: Exception, have: list[str]) -> NetworkError:
    known = ", ".join(have) if have else "nothing yet"
    return NetworkError(
        f"cannot reach {endpoint}: this host looks offline ({type(err).__name__})",
        hint=f"already in the store: {known}; or pull from a mirror with --endpoint URL",
    )


def _http_error(endpoint: str, repo: str, e: Any) -> NetworkError:
    """One line for an HTTP error (huggingface_hub's own message spans several lines)."""
    status = getattr(getattr(e, "response", None), "status_code", None)
    said = (getattr(e, "server_message", None) or str(e)).strip().splitlines()
    detail = f": {said[-1]}" if said else ""
    hint = _auth_hint(endpoint) if status in (401, 403) else None
    return NetworkError(f"{endpoint} answered HTTP {status} for {repo}{detail}", hint=hint)


def resolve(
    endpoint: str,
    repo: str,
    revision: str,
    *,
    path: str | None = None,
    quant: str | None = None,
    have: list[str],
    token: str | None = None,
) -> HubResolution:
    """Resolve `revision` to a commit and find the file, from one model-info call, sending
    `token` (see `credential`) and nothing else."""
    import httpx2
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (
        HfHubHTTPError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    # False, not None: huggingface_hub would otherwise send HF_TOKEN, to whatever endpoint.
    api = HfApi(endpoint=endpoint, token=token or False)
    try:
        info = api.model_info(repo, revision=revision, files_metadata=True, timeout=TIMEOUT)
    except RepositoryNotFoundError:
        raise NotFoundError(
            f"repository {repo} not found at {endpoint}",
            hint="check the ORG/REPO spelling, or " + (
                "set HF_TOKEN for a gated or private repo" if is_hub(endpoint)
                else MIRROR_TOKEN_HINT),
        ) from None
    except RevisionNotFoundError:
        raise NotFoundError(
            f"revision {revision!r} not found in {repo}",
            hint="pass a branch, tag or full commit sha with --revision",
        ) from None
    except (httpx2.TransportError, OfflineModeIsEnabled) as e:
        raise _offline(endpoint, e, have) from None
    except HfHubHTTPError as e:
        raise _http_error(endpoint, repo, e) from None
    if not info.sha:
        raise NetworkError(f"{endpoint} did not report a commit for {repo}@{revision}")
    siblings = {s.rfilename: s for s in info.siblings or []}
    if path is None:
        assert quant is not None
        ggufs = sorted(f for f in siblings if f.lower().endswith(".gguf"))
        matches = [f for f in ggufs if quant.lower() in f.rsplit("/", 1)[-1].lower()]
        if not matches:
            raise NotFoundError(
                f"no .gguf file in {repo} matches {quant!r}",
                hint=f"files there: {', '.join(ggufs) or 'none'}",
            )
        if len(matches) > 1:
            raise UsageError(
                f"{len(matches)} .gguf files in {repo} match {quant!r}: {', '.join(matches)}",
                hint=f"name one with hf://{repo}/FILE.gguf",
            )
        path = matches[0]
    sib = siblings.get(path)
    if sib is None:
        raise NotFoundError(
            f"{path} is not in {repo} at {revision}",
            hint=f".gguf files there: {', '.join(f for f in siblings if f.endswith('.gguf'))}",
        )
    lfs = sib.lfs
    return HubResolution(
        repo=repo,
        path=path,
        commit=info.sha,
        size=lfs.size if lfs else sib.size,
        sha256=lfs.sha256.lower() if lfs else None,
        url=f"{endpoint.rstrip('/')}/{repo}/resolve/{info.sha}/{quote(path)}",
    )


@dataclass(frozen=True)
class Response:
    status: int
    total: int | None  # full size of the resource when the server says it
    chunks: Iterator[bytes]


@contextmanager
def fetch(
    url: str, offset: int, token: str | None = None, have: list[str] | None = None
) -> Iterator[Response]:
    """GET `url` from byte `offset` (a Range request when offset > 0)."""
    import httpx

    headers = {"Accept-Encoding": "identity", "User-Agent": "sovctl"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    if token:
        headers["Authorization"] = f"Bearer {token}"
    timeout = httpx.Timeout(TIMEOUT, read=60.0)
    try:
        with (
            httpx.Client(follow_redirects=True, timeout=timeout) as client,
            client.stream("GET", url, headers=headers) as r,
        ):
            if r.status_code == 404:
                raise NotFoundError(f"{url} answered 404 Not Found")
            if r.status_code == 416:
                yield Response(416, None, iter(()))
                return
            if r.status_code in (401, 403):
                raise NetworkError(f"{url} answered HTTP {r.status_code}", hint=_auth_hint(url))
            if r.status_code not in (200, 206):
                raise NetworkError(f"{url} answered HTTP {r.status_code}")
            total = None
            if r.status_code == 206:
                crange = r.headers.get("Content-Range", "")
                if not crange.startswith(f"bytes {offset}-"):
                    raise IntegrityError(f"{url} answered a range we did not ask for: {crange!r}")
                tail = crange.rsplit("/", 1)[-1]
                total = int(tail) if tail.isdigit() else None
            elif "Content-Length" in r.headers:
                total = int(r.headers["Content-Length"])
            yield Response(r.status_code, total, _chunks(r))
    except (httpx.ConnectError, httpx.ConnectTimeout) as e:
        # Nothing was received: the host is offline or the server is not there.
        origin = urlsplit(url)
        raise _offline(f"{origin.scheme}://{origin.netloc}", e, have or []) from None
    except httpx.TransportError as e:
        raise Interrupted(str(e) or type(e).__name__) from e


def _chunks(r: Any) -> Iterator[bytes]:
    import httpx

    try:
        # No chunk_size: every block is handed on as it arrives, so when the connection drops,
        # all bytes received so far reach the partial file and a resume starts after them.
        yield from r.iter_raw()
    except httpx.TransportError as e:
        raise Interrupted(str(e) or type(e).__name__) from e


class Interrupted(NetworkError):
    """The connection failed before or during the body; the partial file is kept for resume."""
