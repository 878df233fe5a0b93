"""`sovctl tunnel`: a public face for the running stack over SSH to a host the operator owns."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from sovctl.cli import _common
from sovctl.cli._common import JsonOpt, begin, emit

if TYPE_CHECKING:
    from collections.abc import Sequence

    from rich.console import Console

    from sovctl.ops.tunnel import Pinned
    from sovctl.runtime.tunnel import Confirm, HostKey



def _say(c: Console, text: str) -> None:
    """Plain text: a host named `[vps.example.org]:22` is no rich markup."""
    from rich.markup import escape

    c.print(escape(text), highlight=False)


def _ask(host: str, keys: Sequence[HostKey]) -> bool:
    c = _common.err_console
    _say(c, f"{host} is not pinned yet. It offers:")
    for k in keys:
        _say(c, f"  {k}")
    _say(c, "Compare with the host's own (there: ssh-keygen -lf "
            "/etc/ssh/ssh_host_ed25519_key.pub).")
    return typer.confirm("Pin this host key?", default=False, err=True)


def _confirmation(accept: bool) -> Confirm | None:
    if accept:
        return lambda host, keys: True
    # Nobody to ask: the core refuses with the fingerprint in its message.
    return _ask if sys.stdin.isatty() else None


def _pinned_lines(c: Console, p: Pinned) -> None:
    verb = "pinned" if p.pinned_now else "host key pinned"
    _say(c, f"{verb} {p.host}: {', '.join(p.host_keys)} ({p.known_hosts})")


def tunnel(
    ctx: typer.Context,
    via: Annotated[str | None, typer.Option(
        metavar="USER@HOST[:PORT]", help="The public host to tunnel from, over SSH [default: "
        "[tunnel] via in sovctl.toml].", show_default=False)] = None,
    remote_port: Annotated[int | None, typer.Option(
        metavar="N", min=1, max=65535, help="The port the public host listens on for the "
        "gateway [default: 8088].", show_default=False)] = None,
    identity: Annotated[Path | None, typer.Option(
        metavar="KEYFILE", help="The private key ssh logs in with [default: ssh's own].",
        show_default=False)] = None,
    accept_host_key: Annotated[bool, typer.Option(
        "--accept-host-key", help="Pin the host key it offers without asking (check its "
        "fingerprint out of band first).")] = False,
    pin_only: Annotated[bool, typer.Option(
        "--pin-only", help="Pin the host key and stop there (before a first serve with "
        "[tunnel] in sovctl.toml).")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Add an SSH reverse tunnel from a public host you own to the running stack's gateway."""
    from sovctl.ops import tunnel as core

    state = begin(ctx, json_out)
    flags = {"tunnel.via": via, "tunnel.remote_port": remote_port,
             "tunnel.identity": str(identity) if identity else None}
    confirm = _confirmation(accept_host_key)
    if pin_only:
        pinned = core.pin_only(state.home, flags, confirm)
        emit(pinned, lambda c: _pinned_lines(c, pinned))
        return
    added = core.add(state.home, flags, confirm)

    def render(c: Console) -> None:
        _pinned_lines(c, added.pinned)
        _say(c, f"tunnel {'up' if added.restarted else 'already up'} over {added.via} (ssh pid "
                f"{added.pid}): {added.public} -> the gateway at {added.gateway}")
        if added.probe_skipped:
            _say(c, f"end-to-end probe: skipped: {added.probe_skipped}")
        else:
            _say(c, "end-to-end probe: a request through the public host reaches the gateway")
        if added.api_key_created:
            _say(c, "the gateway now requires the API key (shown once; read it again with: "
                    f"cat {added.api_key_file}): {added.api_key}")
        else:
            _say(c, f"the gateway requires the API key: cat {added.api_key_file}")
        if added.restarted:
            t = added.tunnel
            toml = f'via = "{t.via}", remote_port = {t.remote_port}' + (
                f', identity = "{t.identity}"' if t.identity else "")
            _say(c, "it lasts as long as this stack; to start it with every serve, set "
                    f"{toml} in the [tunnel] section of sovctl.toml")

    emit(added, render)
