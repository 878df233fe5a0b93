"""`sovctl tag`: the vision-tagging workload as one command."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from sovctl.cli._common import JsonOpt, begin, emit

if TYPE_CHECKING:
    from rich.console import Console



def tag(
    ctx: typer.Context,
    images: Annotated[list[Path], typer.Argument(
        metavar="IMAGE", help="Image files (PNG, JPEG, WebP or GIF), read here and sent "
        "inline.", show_default=False)],
    model: Annotated[str | None, typer.Option(
        metavar="NAME", help="Served model to ask [default: the first served chat model "
        "with a projector].", show_default=False)] = None,
    prompt: Annotated[str | None, typer.Option(
        metavar="TEXT", help="What to ask about each image [default: a comma-separated list "
        "of tags].", show_default=False)] = None,
    max_tokens: Annotated[int, typer.Option(
        metavar="N", min=1, help="Longest answer per image, in tokens.")] = 64,
    json_out: JsonOpt = False,
) -> None:
    """Tag local images with a vision model, through the running stack's gateway."""
    from sovctl.vision.tag import DEFAULT_PROMPT
    from sovctl.vision.tag import tag as do_tag

    state = begin(ctx, json_out)
    result = do_tag(state.home, images, model=model, prompt=prompt or DEFAULT_PROMPT,
                    max_tokens=max_tokens)

    def render(c: Console) -> None:
        from rich.table import Table

        t = Table(box=None, pad_edge=False, title=f"tags from {result.model}",
                  title_justify="left")
        t.add_column("IMAGE", no_wrap=True)
        t.add_column("TAGS")
        for i in result.images:
            t.add_row(i.image, ", ".join(i.tags) or "(none)")
        c.print(t)

    emit(result, render)
