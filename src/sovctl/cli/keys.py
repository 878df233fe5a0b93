"""`sovctl keys`: a key per app, for attribution and limits: add, list, revoke, rotate."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from sovctl.cli._common import JsonOpt, begin, emit, settings

if TYPE_CHECKING:
    from rich.console import Console

    from sovctl.config import AppSettings
    from sovctl.ops.keys import IssuedKey

NameArg = Annotated[str, typer.Argument(metavar="NAME", help="The app's name: letters, digits, "
                                        "'.', '_', '-'; what the ledger and /metrics call it.")]


def group() -> typer.Typer:
    keys = typer.Typer(name="keys", help="Give each app its own API key: add, list, revoke, "
                       "rotate.", no_args_is_help=True, rich_markup_mode=None)
    keys.command("add")(add)
    keys.command("list")(list_keys)
    keys.command("revoke")(revoke)
    keys.command("rotate")(rotate)
    return keys


def _say(c: Console, text: str) -> None:
    c.print(text, highlight=False, markup=False)


def _limits(limits: AppSettings | None) -> str:
    if limits is None:
        return "no limits"
    from dataclasses import fields

    said = [f"{f.name} = {', '.join(v) if isinstance(v, tuple) else f'{v:g}'}"
            for f in fields(limits) if (v := getattr(limits, f.name)) is not None]
    return "; ".join(said) or "no limits"


def _issued(c: Console, k: IssuedKey, what: str) -> None:
    _say(c, f"app {k.app}: {what} (shown once; only its hash is kept, in {k.file}):")
    _say(c, k.key)
    _say(c, "send it as 'Authorization: Bearer KEY' (OpenAI clients' api_key) or "
            "'x-api-key: KEY' (Anthropic's)")
    _say(c, f"limits: {_limits(k.limits)}" + ("" if k.limits else
                                              f" (set them in sovctl.toml [apps.{k.app}])"))


def add(ctx: typer.Context, name: NameArg, json_out: JsonOpt = False) -> None:
    """Make a key for app NAME and show it once; only its hash is kept."""
    from sovctl.ops import keys

    state = begin(ctx, json_out)
    issued = keys.add(state.home, settings(), name)
    emit(issued, lambda c: _issued(c, issued, "a new key"))


def list_keys(ctx: typer.Context, json_out: JsonOpt = False) -> None:
    """List the apps: their keys (by their last characters) and their limits."""
    from rich.markup import escape
    from rich.table import Table

    from sovctl.ops import keys

    state = begin(ctx, json_out)
    found = keys.listing(state.home, settings())

    def render(c: Console) -> None:
        if not found.apps:
            _say(c, "no apps: 'sovctl keys add NAME' makes a key")
            return
        t = Table(box=None, pad_edge=False)
        for col in ("APP", "KEY", "CREATED", "ROTATED", "LIMITS"):
            t.add_column(col, no_wrap=col != "LIMITS")
        for e in found.apps:
            t.add_row(escape(e.app), e.hint or "- (X-Sovctl-App on loopback)",
                      e.created_at or "-", e.rotated_at or "-", escape(_limits(e.limits)))
        c.print(t)

    emit(found, render)


def revoke(ctx: typer.Context, name: NameArg, json_out: JsonOpt = False) -> None:
    """Revoke app NAME's key: the gateway refuses it from its next request, no restart."""
    from sovctl.ops import keys

    state = begin(ctx, json_out)
    gone = keys.revoke(state.home, name)
    emit(gone, lambda c: _say(c, f"app {gone.app}: key {gone.hint} revoked; the gateway "
                                 "refuses it from its next request"))


def rotate(ctx: typer.Context, name: NameArg, json_out: JsonOpt = False) -> None:
    """Replace app NAME's key (or, for "default", the gateway's own) and show the new one
    once; the old one is refused from the next request."""
    from sovctl.ops import keys

    state = begin(ctx, json_out)
    issued = keys.rotate(state.home, settings(), name)
    emit(issued, lambda c: _issued(c, issued, "a new key, and the old one refused from its "
                                              "next request"))
