"""Which clients may drive the gateway: the Host and Origin rules that keep web pages out.

On loopback the gateway takes no key, so whatever can send it a request can use it, and a
browser sends requests for every page its user opens. Two rules, on every path, close that:

- Host. DNS rebinding points a name the attacker owns at 127.0.0.1: the browser then takes the
  gateway for that name's own server, but still writes the name in Host. Without a key the
  gateway answers only a Host that is a loopback address, `localhost`, or a name of
  [serve] allowed_hosts. With a key, the key is the guard: a client may use any name or
  address (a LAN client reaches the box by its address, a tunnel by its public name).
- Origin. A browser writes the page's origin on every cross-site request, a `text/plain` POST
  included, which needs no CORS preflight. A request with an Origin not in
  [serve] allowed_origins is refused; one without (curl, the SDKs, agents) is not from a page.
  Preflights are answered for allowed origins only, and their answers say so in CORS headers.

Both checks read two header values the request path scans for anyway: a set lookup each.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from sovctl.runtime.documents import Limits

Message = MutableMapping[str, Any]
Send = Callable[[Message], Awaitable[None]]

# Host values found allowed, kept for a set lookup next time; a bound, since a local client
# may write any loopback address and port.
_KNOWN_HOSTS = 64
_SHOWN = 100  # characters of a refused value echoed back; a longer one is not shown
PREFLIGHT_MAX_AGE = b"600"


@dataclass(frozen=True)
class Refusal:
    reason: str  # the metrics label: "host" or "origin"
    message: str
    code: str


def _shown(value: bytes) -> str:
    text = value.decode("latin-1")
    return repr(text) if len(text) <= _SHOWN else f"of {len(text)} characters"


def host_name(host: str) -> str:
    """The name or address of a Host value, without its port: "[::1]:8088" -> "::1"."""
    if host.startswith("["):
        return host[1:].partition("]")[0]
    name, colon, port = host.rpartition(":")
    return name if colon and port.isdigit() else host


class Access:
    def __init__(self, limits: Limits, key_required: bool) -> None:
        self.check_host = not key_required
        self.names = {"localhost",
                      *(h.lower().strip("[]").rstrip(".") for h in limits.allowed_hosts)}
        self.origins = frozenset(o.lower().encode() for o in limits.allowed_origins)
        self._hosts_ok: set[bytes] = set()

    def refusal(self, host: bytes | None, origin: bytes | None) -> Refusal | None:
        """Why a request with these Host and Origin values is refused; None when it is not.
        A request without Host is no browser's (HTTP/1.1 browsers always send it)."""
        if self.check_host and host is not None and host not in self._hosts_ok:
            if not self._host_allowed(host.decode("latin-1")):
                return Refusal(
                    "host", f"Host {_shown(host)} is not allowed: a gateway that takes no API "
                    "key answers requests addressed to a loopback address, localhost or a "
                    "name of [serve] allowed_hosts only (a web page could reach it through "
                    "DNS rebinding otherwise)", "host_not_allowed")
            if len(self._hosts_ok) < _KNOWN_HOSTS:
                self._hosts_ok.add(host)
        if origin is not None and not self.origin_allowed(origin):
            return Refusal(
                "origin", f"Origin {_shown(origin)} is not allowed: the gateway answers a web "
                "page only when its origin is in [serve] allowed_origins", "origin_not_allowed")
        return None

    def origin_allowed(self, origin: bytes) -> bool:
        return origin.lower() in self.origins

    def _host_allowed(self, host: str) -> bool:
        name = host_name(host).lower().rstrip(".")
        if name in self.names:
            return True
        try:
            return ipaddress.ip_address(name).is_loopback
        except ValueError:
            return False


def preflight_headers(origin: bytes, asked_headers: bytes | None
                      ) -> list[tuple[bytes, bytes]]:
    """The answer to an allowed origin's CORS preflight: the methods the gateway serves, and
    the headers the page asked to send (its key, its content type, an SDK's own)."""
    headers = [(b"access-control-allow-origin", origin), (b"vary", b"Origin"),
               (b"access-control-allow-methods", b"GET, POST"),
               (b"access-control-max-age", PREFLIGHT_MAX_AGE)]
    if asked_headers:
        headers.append((b"access-control-allow-headers", asked_headers))
    return headers


def with_cors(send: Send, origin: bytes) -> Send:
    """`send`, with the headers that let an allowed origin's page read the answer."""

    async def send_cors(message: Message) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [*message.get("headers", ()),
                                  (b"access-control-allow-origin", origin),
                                  (b"vary", b"Origin")]
        await send(message)

    return send_cors
