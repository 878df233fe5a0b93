"""`sovctl bom`: the stack's bill of materials, CycloneDX JSON."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from sovctl.cli._common import STATE, JsonOpt, begin, emit, settings

if TYPE_CHECKING:
    from rich.console import Console


def bom(
    ctx: typer.Context,
    output: Annotated[Path | None, typer.Option(
        "-o", "--output", metavar="FILE", help="Write the BOM to FILE (atomically, mode 0644) "
        "instead of stdout.", show_default=False)] = None,
    json_out: JsonOpt = False,
) -> None:
    """Write the bill of materials as CycloneDX JSON: each model (repo, commit, sha256,
    licence, architecture), the llama.cpp build and every Python package, with hashes."""
    from sovctl.provenance.bom import bom_document, write_bom

    state = begin(ctx, json_out)
    doc = bom_document(state.home, settings())
    if output is not None:
        write_bom(output, doc)
    summary = {"path": str(output) if output is not None else None, "sha256": doc.sha256,
               "spec": doc.spec, "models": list(doc.models), "packages": doc.packages,
               "unknown": list(doc.unknown)}
    if STATE.json:
        # The BOM itself rides in the document when it was not written to a file.
        emit({**summary, "bom": doc.document() if output is None else None}, lambda c: None)
        return
    if output is None:
        # The BOM alone on stdout, as written to a file: `sovctl bom > stack.cdx.json` works.
        sys.stdout.write(doc.text)
        sys.stdout.flush()
        return

    def render(c: Console) -> None:
        c.print(f"wrote {output}: {doc.spec}, {len(doc.models)} model(s), the llama.cpp "
                f"runtime, {doc.packages} Python package(s)", highlight=False)
        c.print(f"  sha256 {doc.sha256}", highlight=False)
        for figure in doc.unknown:
            c.print(f"  [yellow]not known:[/] {figure}", highlight=False)

    emit(summary, render)
