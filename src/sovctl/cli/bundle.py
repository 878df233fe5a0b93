"""Commands for the offline bundle: `bundle create` and `bundle import`."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from sovctl.cli._common import JsonOpt, begin, emit, human_bytes
from sovctl.cli._progress import bars

if TYPE_CHECKING:
    from rich.console import Console

    from sovctl.ops.bundle import BundlePlan


def group() -> typer.Typer:
    bundle = typer.Typer(name="bundle", help="Carry this stack to a machine with no network: "
                         "its wheels, weights and settings in one directory.",
                         no_args_is_help=True, rich_markup_mode=None)
    bundle.command("create")(create)
    bundle.command("import")(import_)
    return bundle


def _render_plan(c: Console, p: BundlePlan) -> None:
    estimated = " (estimated)" if p.size_is == "estimated" else ""
    c.print(f"bundle {p.out}: {human_bytes(p.size)}{estimated}, {human_bytes(p.free)} free "
            f"there; Python {p.python}, {p.platform}", highlight=False, soft_wrap=True)
    for f in p.files:
        if not f.path.startswith("wheels/"):
            c.print(f"  {f.what:30} {human_bytes(f.size):>10}", highlight=False)
    for note in p.notes:
        c.print(f"  [yellow]note:[/] {note}", highlight=False, soft_wrap=True)
    wheels = [f for f in p.files if f.path.startswith("wheels/")]
    how = {h: sum(1 for k in p.packages if k.how == h) for h in ("wheel", "repack", "build")}
    c.print(f"  {f'wheels ({len(wheels)})':30} {human_bytes(sum(f.size for f in wheels)):>10}"
            f"  {how['wheel']} as built, {how['repack']} packed from the installed files, "
            f"{how['build']} built from source", highlight=False, soft_wrap=True)


def create(
    ctx: typer.Context,
    out: Annotated[Path, typer.Argument(
        metavar="OUT", help="Directory to write; must not exist, or be empty.",
        show_default=False)],
    models: Annotated[list[str] | None, typer.Option(
        "--models", metavar="NAME", help="Carry only this model (repeatable) [default: every "
        "model of the lock].", show_default=False)] = None,
    wheels: Annotated[list[Path] | None, typer.Option(
        "--wheels", metavar="DIR", help="Original wheels to carry as they are where their "
        "files are the installed ones (repeatable); for sovctl installed editable, its "
        "wheel of the installed version.", show_default=False)] = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Show what the bundle would hold, and its size; write nothing.")]
    = False,
    json_out: JsonOpt = False,
) -> None:
    """Write a directory that rebuilds this stack with no network.

    Wheels, weights, lock, settings, bill of materials, a manifest of every file's sha256 and
    an install script. Refused when a bundled blob fails verification."""
    from sovctl.cli._common import err_console
    from sovctl.ops.bundle import create as do_create

    state = begin(ctx, json_out)

    def planned(p: BundlePlan) -> None:
        if not state.json and not dry_run:
            _render_plan(err_console, p)

    with bars() as progress:
        result = do_create(state.home, out, models or [], wheel_dirs=wheels or [],
                           dry_run=dry_run, progress=progress, planned=planned)

    def render(c: Console) -> None:
        if not result.written:
            _render_plan(c, result.plan)
            c.print("dry run: nothing written")
            return
        c.print(f"[green]bundle written[/] to {result.out}: {len(result.files) + 1} files, "
                f"{human_bytes(result.size)} (measured), in {result.seconds:.1f} s",
                highlight=False)
        c.print(f"  install it with no network: bash {result.out}/install [--venv DIR]",
                highlight=False)

    emit(result, render)


def import_(
    ctx: typer.Context,
    bundle: Annotated[Path, typer.Argument(
        metavar="BUNDLE", help="A directory written by 'sovctl bundle create'.",
        show_default=False)],
    force: Annotated[bool, typer.Option(
        "--force", help="Replace a model pin, sovctl.toml or profile the home holds "
        "differently.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Import a bundle's models and settings into the home.

    Each blob is hashed as it is copied; then the lock's pins, sovctl.toml, the profiles, the
    signatures and the trusted keys. The bundle's install script runs this."""
    from sovctl.ops.bundle import import_bundle

    state = begin(ctx, json_out)
    with bars() as progress:
        result = import_bundle(state.home, bundle, force=force, progress=progress)

    def render(c: Console) -> None:
        for m in result.models:
            colour = "yellow" if m.action == "replaced" else "green"
            c.print(f"[{colour}]{m.action:8}[/] {m.name}  {human_bytes(m.size)}  sha256 "
                    f"{m.sha256[:12]}", highlight=False)
        for f in result.files:
            colour = "yellow" if f.action == "replaced" else "green"
            c.print(f"[{colour}]{f.action:8}[/] {f.path}", highlight=False)
        c.print(f"imported {len(result.models)} models into {result.home} in "
                f"{result.seconds:.1f} s; each blob copied was hashed on the way "
                f"({human_bytes(result.copied)})", highlight=False)

    emit(result, render)
