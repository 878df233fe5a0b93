"""Commands for owned weights: pull, verify, sign, models, rm, mirror serve."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from sovctl.cli._common import JsonOpt, begin, emit, human_bytes, human_params, settings
from sovctl.cli._progress import bars
from sovctl.errors import CheckFailed, IntegrityError, RuntimeStartError, UsageError

if TYPE_CHECKING:
    from collections.abc import Mapping

    from rich.console import Console

    from sovctl.errors import SovctlError
    from sovctl.home import Home
    from sovctl.store.lock import LockEntry, ProjectorPin
    from sovctl.store.pull import PullResult
    from sovctl.store.sign import SignResult


def register(app: typer.Typer) -> None:
    app.command("pull")(pull)
    app.command("verify")(verify)
    app.command("sign")(sign)
    app.command("models")(models)
    app.command("rm")(rm)
    mirror = typer.Typer(help="Serve this box's store to the operator's other machines.",
                         no_args_is_help=True, rich_markup_mode=None)
    mirror.command("serve")(mirror_serve)
    app.add_typer(mirror, name="mirror")


def pull(
    ctx: typer.Context,
    ref: Annotated[str | None, typer.Argument(
        metavar="REF", help="hf://ORG/REPO/PATH/FILE.gguf, ORG/REPO:QUANT, a local path or "
        "file:// URL, or an https:// URL (with --sha256).", show_default=False)] = None,
    name: Annotated[str | None, typer.Option(
        metavar="NAME", help="Store name [default: from the file name].")] = None,
    revision: Annotated[str, typer.Option(
        metavar="REV", help="Branch, tag or commit; pinned as its commit.")] = "main",
    sha256: Annotated[str | None, typer.Option(
        "--sha256", metavar="HEX",
        help="Expected sha256 of the file; must agree with the Hub's.")] = None,
    endpoint: Annotated[str | None, typer.Option(
        metavar="URL", help="Hugging Face compatible endpoint, e.g. a sovctl mirror [env: "
        "SOVCTL_HUB__ENDPOINT, HF_ENDPOINT; default: https://huggingface.co].")] = None,
    trust_on_first_use: Annotated[bool, typer.Option(
        "--trust-on-first-use", help="Accept a download with no expected sha256; the lock "
        "records that it was trusted on first use.")] = False,
    mmproj: Annotated[str | None, typer.Option(
        "--mmproj", metavar="REF", help="The model's multimodal projector (any REF form, at "
        "the same --revision): pinned, verified and served with it, so the model reads "
        "images.")] = None,
    mmproj_sha256: Annotated[str | None, typer.Option(
        "--mmproj-sha256", metavar="HEX", help="Expected sha256 of the projector.")] = None,
    lock: Annotated[Path | None, typer.Option(
        "--lock", metavar="FILE", help="Instead of REF: every model another box's sovctl.lock "
        "pins from the Hub, under its name, at its commit and sha256, from --endpoint (that "
        "box's 'sovctl mirror serve'): a replica of its weights.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Download or import GGUF weights, verify them as they arrive, and pin them in the lock."""
    import os

    from sovctl.store.pull import pull as do_pull

    state = begin(ctx, json_out)
    cfg = settings({"hub.endpoint": endpoint})
    if lock is not None:
        others = [f for f, v in (("REF", ref), ("--name", name), ("--sha256", sha256),
                                 ("--mmproj", mmproj), ("--mmproj-sha256", mmproj_sha256),
                                 ("--revision", None if revision == "main" else revision),
                                 ("--trust-on-first-use", trust_on_first_use or None))
                  if v is not None]
        if others:
            raise UsageError(f"--lock takes every name, commit and sha256 from the lock, so "
                             f"{', '.join(others)} cannot be given with it",
                             hint="drop them, or pull one REF without --lock")
        _pull_lock(state.home, lock, cfg.hub.endpoint, os.environ.get("HF_TOKEN"),
                   cfg.trust.keys)
        return
    if ref is None:
        raise UsageError("nothing to pull: give a REF, or --lock FILE",
                         hint="e.g. sovctl pull hf://ORG/REPO/FILE.gguf, or sovctl pull --lock "
                         "other-box/sovctl.lock --endpoint http://other-box:8089")
    with bars() as progress:
        result = do_pull(
            state.home,
            ref,
            name=name,
            revision=revision,
            sha256=sha256,
            endpoint=cfg.hub.endpoint,
            trust_on_first_use=trust_on_first_use,
            progress=progress,
            token=os.environ.get("HF_TOKEN"),
            mmproj=mmproj,
            mmproj_sha256=mmproj_sha256,
        )

    emit(result, lambda c: _render_pull(c, result))


def _render_pull(c: Console, result: PullResult) -> None:
    e = result.entry
    if result.action == "already-pinned":
        c.print(f"{e.name}: already pinned and present (sha256 {e.short_sha}"
                + (f", projector {e.mmproj.sha256[:12]}" if e.mmproj else "")
                + "); nothing to do")
        return
    extra = f", resumed at {human_bytes(result.resumed_from)}" if result.resumed_from else ""
    pins: list[tuple[str, str, LockEntry | ProjectorPin, str]] = [
        (result.action, e.name, e, extra)]
    if e.mmproj is not None and result.mmproj_action:
        pins.append((result.mmproj_action, f"{e.name} projector", e.mmproj, ""))
    for action, what, pin, more in pins:
        where = (f"{pin.repo}/{pin.path}@{pin.commit[:12]}" if pin.source == "hf"
                 else (pin.url or pin.path))
        c.print(f"[green]{action}[/] {what}: {human_bytes(pin.size)} from {where}{more}")
        c.print(f"  sha256 {pin.sha256} ({pin.digest_from})", highlight=False)
        if pin.digest_from == "trust-on-first-use":
            c.print("  [yellow]trusted on first use:[/] no independent digest vouched for it")


def _pull_lock(home: Home, lock: Path, endpoint: str, token: str | None,
               trust: Mapping[str, str]) -> None:
    from sovctl.store.pull import pull_lock

    with bars() as progress:
        result = pull_lock(home, lock, endpoint=endpoint, progress=progress, token=token,
                           trust=trust)

    def render(c: Console) -> None:
        signers = dict(result.signed)
        for r in result.pulled:
            _render_pull(c, r)
            if r.name in signers:
                c.print(f"  signature by key {signers[r.name]} verified before fetching",
                        highlight=False)
        if not trust:
            c.print("[yellow]signatures not checked:[/] this box has no \\[trust] keys")
        for name, why in result.skipped:
            c.print(f"[red]not pulled[/] {name}: {why}", highlight=False)

    failure = None
    if result.skipped:
        names = ", ".join(n for n, _ in result.skipped)
        failure = CheckFailed(f"{len(result.pulled)} of {len(result.pulled) + len(result.skipped)}"
                              f" pins of {lock} pulled; not {names}: no Hub endpoint serves them",
                              hint="copy those files from that box and pull each by path with "
                              "its --sha256 (the lines above say how)")
    emit(result, render, failure)


def verify(
    ctx: typer.Context,
    names: Annotated[list[str] | None, typer.Argument(
        metavar="NAME", help="Names to check [default: all].", show_default=False)] = None,
    json_out: JsonOpt = False,
) -> None:
    """Re-hash blobs against the lock, and check signed models' signatures, fully offline.
    Exit 0 only if every one is ok."""
    from sovctl.store.manage import verify as do_verify

    state = begin(ctx, json_out)
    trust = settings().trust.keys
    with bars() as progress:
        result = do_verify(state.home, names or [], progress, trust)

    def render(c: Console) -> None:
        from rich.markup import escape

        if not result.items:
            c.print("nothing to verify: the store is empty")
        for i in result.items:
            colour = {"ok": "green", "mismatch": "red", "missing": "red"}[i.status]
            line = f"[{colour}]{i.status:8}[/] {i.name}  sha256 {i.expected[:12]}"
            if i.status == "mismatch":
                line += f" but the blob hashes to {i.actual}"
            if i.signature == "ok":
                line += f"  [green]signed[/] by key {i.signer_name} ({i.signer[:16]})"
            elif i.signature:
                line += f"  [red]signature {i.signature}[/]: {escape(i.reason)}"
            c.print(line, highlight=False)

    failure: SovctlError | None = None
    if result.bad_signatures:
        # A signed model that fails is an integrity failure (exit 5): its signer no longer
        # vouches for what is stored, or this box cannot tell that it does.
        failure = IntegrityError(
            f"{len(result.bad_signatures)} signature check(s) failed: "
            + "; ".join(i.reason for i in result.bad_signatures),
            hint="a changed blob: 'sovctl rm NAME' then pull it again; a key this box does "
            "not trust: add its public key to [trust] keys; a missing signature: sovctl sign "
            "NAME --key KEY")
    elif not result.ok:
        bad = [i.name for i in result.items if i.status != "ok"]
        failure = CheckFailed(
            f"{len(bad)} of {len(result.items)} failed verification: {', '.join(bad)}",
            hint="re-fetch with 'sovctl rm NAME' then 'sovctl pull REF'",
        )
    emit(result, render, failure)


def sign(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(metavar="NAME", help="The pinned model to sign.")],
    key: Annotated[Path, typer.Option(
        "--key", metavar="KEY", help="Your ECDSA private key (PEM; P-256, P-384 or P-521), "
        "outside the home; read to sign, never copied. An encrypted one takes its passphrase "
        "from SOVCTL_SIGNING_PASSWORD.", show_default=False)],
    json_out: JsonOpt = False,
) -> None:
    """Sign a model's files (weights, projector) with your key, offline; the lock records the
    signer, so verify and a replica's pull --lock check it."""
    import os

    from sovctl.store.sign import sign as do_sign

    state = begin(ctx, json_out)
    result = do_sign(state.home, name, key, password=os.environ.get("SOVCTL_SIGNING_PASSWORD"),
                     trust=settings().trust.keys)
    emit(result, lambda c: _render_sign(c, result))


def _render_sign(c: Console, r: SignResult) -> None:
    from rich.markup import escape

    known = f"key {r.trusted_as} ({r.signer[:16]})" if r.trusted_as else f"key {r.signer[:16]}"
    c.print(f"[green]signed[/] {r.name} with {known}", highlight=False)
    for f in r.files:
        c.print(f"  {f.label}  sha256 {f.sha256[:12]}  signature {f.signature}",
                highlight=False)
    if r.replaced:
        c.print(f"  it replaces the signature by key {r.replaced[:16]}", highlight=False)
    if not r.trusted_as:
        c.print("[yellow]this box does not trust the key:[/] 'sovctl verify' refuses its "
                "signature until its public key is in sovctl.toml: "
                + escape('[trust] keys = {NAME = "/path/to/key.pub"}'), highlight=False)


def models(ctx: typer.Context, json_out: JsonOpt = False) -> None:
    """List pinned models with their size, digest, revision and GGUF header facts."""
    from sovctl.store.manage import list_models

    state = begin(ctx, json_out)
    rows = list_models(state.home)

    def render(c: Console) -> None:
        from rich.table import Table

        if not rows:
            c.print("no models yet: add one with 'sovctl pull REF'")
            return
        t = Table(box=None, pad_edge=False)
        t.add_column("NAME", no_wrap=True)
        for col in ("SIZE", "SHA256", "REVISION", "ARCH", "PARAMS", "QUANT", "CTX",
                    "CHAT", "EMBED", "MMPROJ"):
            t.add_column(col)
        for r in rows:
            e, f = r.entry, r.facts
            rev = f"{e.revision}@{e.commit[:7]}" if e.commit else e.source
            t.add_row(
                e.name, human_bytes(e.size), e.short_sha + ("" if r.present else " MISSING"), rev,
                f.architecture if f else "?", human_params(f.parameters) if f else "?",
                f.quantization if f else "?", str(f.context_length or "?") if f else "?",
                ("yes" if f.chat_template else "no") if f else "?",
                ("yes" if f.embedding else "no") if f else "?",
                e.mmproj.sha256[:12] + ("" if r.mmproj_present else " MISSING")
                if e.mmproj else "-",
            )
        if not c.is_terminal:
            # Piped or logged: no terminal width to fit, so keep every cell whole.
            from rich.console import Console as _Console

            c = _Console(width=max(c.width, 240), soft_wrap=True)
        c.print(t)

    emit(rows, render)


def rm(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(metavar="NAME", help="Name to remove.")],
    json_out: JsonOpt = False,
) -> None:
    """Remove a name; its blob goes too once no other name uses it."""
    from sovctl.store.manage import remove

    state = begin(ctx, json_out)
    result = remove(state.home, name)

    def render(c: Console) -> None:
        if result.blob_removed:
            c.print(f"removed {name} and its blob sha256 {result.sha256[:12]}")
        else:
            c.print(f"removed {name}; blob kept for {', '.join(result.still_used_by)}")
        if result.mmproj_sha256 and result.mmproj_removed:
            c.print(f"  and its projector blob sha256 {result.mmproj_sha256[:12]}")
        elif result.mmproj_sha256:
            c.print(f"  projector blob kept for {', '.join(result.mmproj_still_used_by)}")

    emit(result, render)


def mirror_serve(
    ctx: typer.Context,
    host: Annotated[str, typer.Option(
        metavar="HOST", help="Address to bind; other than loopback, clients need the mirror's "
        "token.")]
    = "127.0.0.1",
    port: Annotated[int, typer.Option(metavar="PORT", help="Port to bind; 0 picks a free one.")]
    = 8089,
    json_out: JsonOpt = False,
) -> None:
    """Serve the store read-only as a Hugging Face compatible endpoint (Ctrl-C stops)."""
    from sovctl.apikey import MIRROR_TOKEN, ensure_mirror_token
    from sovctl.net import is_loopback
    from sovctl.store.hub import MIRROR_TOKEN_ENV
    from sovctl.store.mirror import Catalog, make_server

    state = begin(ctx, json_out)
    catalog = Catalog.from_store(state.home)
    token = None
    created = False
    if not is_loopback(host):
        token, created = ensure_mirror_token(state.home)
    try:
        server = make_server(catalog, host, port, token=token)
    except OSError as e:
        raise RuntimeStartError(f"cannot bind {host}:{port}: {e.strerror}",
                                hint="choose another --port or --host") from None
    shown_host = f"[{host}]" if ":" in host else host  # an IPv6 address goes in brackets
    bound = f"http://{shown_host}:{server.server_address[1]}"
    info = {"url": bound, "repos": sorted(catalog.repos()), "files": len(catalog.files),
            "signatures": len(catalog.signed), "token_required": token is not None}

    def render(c: Console) -> None:
        c.print(f"mirror serving {len(catalog.files)} file(s) from {len(catalog.repos())} "
                f"repo(s) and {len(catalog.signed)} signature(s) at {bound} (read-only; "
                "Ctrl-C stops)")
        c.print(f"  clients: sovctl pull --endpoint {bound} hf://ORG/REPO/FILE.gguf  "
                f"or  HF_ENDPOINT={bound}")
        if token:
            c.print(f"  clients must send the mirror's token ({MIRROR_TOKEN_ENV}=<token>)"
                    + (f"; new token, shown once: {token}" if created else
                       f"; read it with: cat {state.home.secrets / MIRROR_TOKEN}"))

    emit(info, render)
    import sys

    sys.stdout.flush()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
