"""`sovctl mirror serve`: the store, read-only, as a Hugging Face compatible endpoint.

Other machines of the same operator pull from this box (`sovctl pull --endpoint`, or any
huggingface_hub client with HF_ENDPOINT) and get the very commit and sha256 it pinned.
Only files named in the lock are reachable, and the signatures of the names the lock says are
signed (`/api/sovctl/signatures/FILE`, for `pull --lock` on a replica that takes only signed
weights); lookups are by table, never by filesystem path.
Beyond loopback every request needs the mirror's own token (never the gateway's key, never a Hub
token); no client text reaches a header unescaped; a client that stalls cannot hold the server.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import re
import socket
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, BinaryIO, ClassVar
from urllib.parse import unquote, urlparse

from sovctl.home import Home
from sovctl.store import signatures
from sovctl.store.blobs import BlobStore
from sovctl.store.lock import Lock


@dataclass(frozen=True)
class MirrorFile:
    repo: str
    revision: str
    commit: str
    path: str
    sha256: str
    size: int
    blob: Path
    pulled_at: str


class Catalog:
    def __init__(self, files: list[MirrorFile],
                 signed: dict[str, Path] | None = None) -> None:
        self.files = files
        self.signed = signed or {}  # a signature's file name -> where it is kept

    @classmethod
    def from_store(cls, home: Home) -> Catalog:
        store = BlobStore(home)
        files: dict[tuple[str, str, str], MirrorFile] = {}
        entries = Lock.load(home).entries.values()
        for e in sorted(entries, key=lambda e: e.pulled_at):
            # A projector is served too: another box pulls the model and its projector here.
            for pin in (e, e.mmproj):
                if pin is not None and pin.source == "hf" and store.has(pin.sha256, pin.size):
                    # Two names may pin the same file at the same commit: serve it once.
                    files[(pin.repo, pin.commit, pin.path)] = MirrorFile(
                        pin.repo, pin.revision, pin.commit, pin.path, pin.sha256, pin.size,
                        store.path(pin.sha256), e.pulled_at)
        signed = {}
        for e in entries:
            for sha256 in e.blobs if e.signer else ():
                sig = signatures.path(home, sha256, e.signer)
                if sig.is_file():
                    signed[sig.name] = sig
        return cls(list(files.values()), signed)

    def repos(self) -> set[str]:
        return {f.repo for f in self.files}

    def snapshot(self, repo: str, revision: str) -> list[MirrorFile] | None:
        """The files of `repo` at `revision` (a commit sha, or a branch/tag as pinned)."""
        files = [f for f in self.files if f.repo == repo]
        if not files:
            return None
        at_commit = [f for f in files if f.commit == revision]
        if at_commit:
            return at_commit
        named = [f for f in files if f.revision == revision]
        if not named:
            return []
        # The same branch pinned at several times: the latest pin is what this box serves.
        latest = max(named, key=lambda f: f.pulled_at).commit
        return [f for f in named if f.commit == latest]


# Matched whole (fullmatch): "$" with match would also take a path ending in a newline.
_API = re.compile(r"/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?/?")
_PATHS = re.compile(r"/api/models/(?P<repo>[^/]+/[^/]+)/paths-info/(?P<rev>[^/]+)")
_RESOLVE = re.compile(r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)")
_SIGNATURE = re.compile(
    r"/api/sovctl/signatures/(?P<name>sha256-[0-9a-f]{64}\.[0-9a-f]{64}\.sig)")
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")
# What a header value may hold as it is: printable ASCII. Anything else a message carries (it
# may quote the client's own path, URL-decoded: CR LF would start a header of the client's
# choosing) is percent-escaped.
_HEADER_SAFE = re.compile(r"[^\x20-\x7e]")
# How long a connection may sit without sending (or taking) a byte before it is closed, and how
# many may be open at once, in all and from one address: a client that opens connections and
# stalls (slowloris) holds a few of them for a while, never the mirror.
IDLE_TIMEOUT = 30.0
MAX_CONNECTIONS = 64
MAX_PER_CLIENT = 16


def header_value(text: str) -> str:
    """`text` as it may go into a response header: CR, LF and every other byte outside printable
    ASCII percent-escaped, so no client text can end the header or start another."""
    return _HEADER_SAFE.sub(lambda m: "".join(f"%{b:02X}" for b in m[0].encode()), text)


class MirrorHandler(BaseHTTPRequestHandler):
    catalog: ClassVar[Catalog]
    token: ClassVar[str | None] = None  # the mirror's own token (HOME/secrets/mirror_token)
    server_version = "sovctl-mirror"
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        pass  # access logs would go to stderr of the serving terminal; keep it quiet

    # -- plumbing ---------------------------------------------------------------------------
    def _send_json(self, status: int, body: object, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _error(self, status: int, code: str, message: str) -> None:
        self._send_json(status, {"error": message}, {"X-Error-Code": code,
                                                     "X-Error-Message": header_value(message)})

    def _authorised(self) -> bool:
        if self.token is None:
            return True
        given = self.headers.get("Authorization", "").removeprefix("Bearer ").strip()
        if hmac.compare_digest(given.encode(), self.token.encode()):
            return True
        self._error(401, "Unauthorized", "this mirror needs Authorization: Bearer <its token>")
        return False

    def _snapshot(self, repo: str, rev: str) -> list[MirrorFile] | None:
        snap = self.catalog.snapshot(repo, rev)
        if snap is None:
            self._error(404, "RepoNotFound", f"repository {repo} is not on this mirror")
        elif not snap:
            self._error(404, "RevisionNotFound", f"revision {rev} of {repo} is not on this mirror")
        return snap or None

    # -- routes -----------------------------------------------------------------------------
    def do_GET(self) -> None:
        if not self._authorised():
            return
        path = unquote(urlparse(self.path).path)
        if m := _API.fullmatch(path):
            self._model_info(m["repo"], m["rev"] or "main")
        elif m := _RESOLVE.fullmatch(path):
            self._resolve(m["repo"], m["rev"], m["path"])
        elif m := _SIGNATURE.fullmatch(path):
            self._signature(m["name"])
        else:
            self._error(404, "NotFound", f"no route for {path}")

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_POST(self) -> None:
        if not self._authorised():
            return
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(min(length, 1 << 20)).decode(errors="replace")
        path = unquote(urlparse(self.path).path)
        if m := _PATHS.fullmatch(path):
            from urllib.parse import parse_qs

            wanted = set(parse_qs(body).get("paths", []))
            snap = self._snapshot(m["repo"], m["rev"])
            if snap is not None:
                self._send_json(200, [
                    {"type": "file", "path": f.path, "size": f.size, "oid": f.sha256,
                     "lfs": {"oid": f.sha256, "size": f.size, "pointerSize": 135}}
                    for f in snap if f.path in wanted
                ])
        else:
            self._error(404, "NotFound", f"no route for {path}")

    def _model_info(self, repo: str, rev: str) -> None:
        snap = self._snapshot(repo, rev)
        if snap is None:
            return
        self._send_json(200, {
            "id": repo,
            "modelId": repo,
            "sha": snap[0].commit,
            "private": False,
            "disabled": False,
            "gated": False,
            "tags": ["gguf"],
            "siblings": [
                {"rfilename": f.path, "size": f.size,
                 "lfs": {"sha256": f.sha256, "size": f.size, "pointerSize": 135}}
                for f in snap
            ],
        })

    def _signature(self, name: str) -> None:
        where = self.catalog.signed.get(name)
        try:
            data = where.read_bytes() if where is not None else None
        except OSError:
            data = None  # re-signed or removed since the mirror started
        if data is None:
            self._error(404, "SignatureNotFound", f"no signature {name} on this mirror")
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _resolve(self, repo: str, rev: str, path: str) -> None:
        snap = self._snapshot(repo, rev)
        if snap is None:
            return
        match = [f for f in snap if f.path == path]
        if not match:
            self._error(404, "EntryNotFound", f"{path} is not on this mirror at {rev}")
            return
        f = match[0]
        start, end = 0, f.size - 1
        status = HTTPStatus.OK
        if rng := self.headers.get("Range"):
            m = _RANGE.fullmatch(rng.strip())
            if not m or (not m[1] and not m[2]):
                self._error(416, "RangeNotSatisfiable", f"bad range {rng!r}")
                return
            if m[1]:
                start = int(m[1])
                end = min(int(m[2]), f.size - 1) if m[2] else f.size - 1
            else:
                start = max(f.size - int(m[2]), 0)
            if start >= f.size or start > end:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{f.size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = HTTPStatus.PARTIAL_CONTENT
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", f'"{f.sha256}"')
        self.send_header("X-Linked-Etag", f'"{f.sha256}"')
        self.send_header("X-Linked-Size", str(f.size))
        self.send_header("X-Repo-Commit", f.commit)
        if status == HTTPStatus.PARTIAL_CONTENT:
            self.send_header("Content-Range", f"bytes {start}-{end}/{f.size}")
        self.end_headers()
        if self.command == "HEAD":
            return
        with f.blob.open("rb") as src:
            for chunk in self.body_chunks(f, src, start, end):
                self.wfile.write(chunk)

    def body_chunks(self, f: MirrorFile, src: BinaryIO, start: int, end: int) -> Iterator[bytes]:
        """The bytes start..end of the file. Tests override this to simulate a bad network."""
        src.seek(start)
        left = end - start + 1
        while left > 0:
            chunk = src.read(min(1 << 20, left))
            if not chunk:
                return
            left -= len(chunk)
            yield chunk


class _MirrorServer(ThreadingHTTPServer):
    """A thread per connection, as many as MAX_CONNECTIONS in all and MAX_PER_CLIENT from one
    address; one more is answered 503 and closed at once, without a thread."""

    daemon_threads = True
    # The kernel's queue of connections not yet accepted: socketserver's 5 would drop a burst
    # of clients at the door, to retry in an order of chance, instead of serving or refusing it.
    request_queue_size = MAX_CONNECTIONS

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(address, handler)
        self._lock = threading.Lock()
        self._open: dict[Any, str] = {}  # each connection being served -> its client's address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        host = str(client_address[0])
        with self._lock:
            from_host = sum(1 for h in self._open.values() if h == host)
            if len(self._open) < MAX_CONNECTIONS and from_host < MAX_PER_CLIENT:
                self._open[request] = host
                return True
        with contextlib.suppress(OSError):
            # Never wait on this client: what the socket takes at once, or nothing.
            request.setblocking(False)
            request.send(_BUSY)
        return False

    def shutdown_request(self, request: Any) -> None:
        with self._lock:
            self._open.pop(request, None)
        super().shutdown_request(request)

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], OSError):
            return  # a client that stalled (timed out) or went away: nothing to report
        super().handle_error(request, client_address)


_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 5\r\nContent-Length: 0\r\n"
         b"Connection: close\r\n\r\n")


class _MirrorServer6(_MirrorServer):
    address_family = socket.AF_INET6


def make_server(
    catalog: Catalog,
    host: str,
    port: int,
    token: str | None = None,
    handler: type[MirrorHandler] = MirrorHandler,
    idle_timeout: float = IDLE_TIMEOUT,
) -> ThreadingHTTPServer:
    bound = type("BoundMirrorHandler", (handler,), {"catalog": catalog, "token": token,
                                                    # socketserver sets it on each connection
                                                    "timeout": idle_timeout})
    server_cls = _MirrorServer6 if ":" in host else _MirrorServer  # an IPv6 address: ::1
    return server_cls((host, port), bound)
