"""`-o/--output table|json|csv|md`: the option, its check, and the CSV and Markdown writers.

CSV and Markdown print a command's named rows: frozen dataclasses whose field names are the
columns, so a column and its value can never drift apart. The table is the command's own
renderer, and json is the versioned envelope `emit` writes.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Annotated, Any

import typer

from sovctl.cli._common import STATE, emit
from sovctl.errors import SovctlError, UsageError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance
    from rich.console import Console

FORMATS = ("table", "json", "csv", "md")

OutputOpt = Annotated[str, typer.Option(
    "-o", "--output", metavar="FORMAT",
    help="table, json (the same document as --json), csv or md.")]


def choose(output: str) -> str:
    """The checked format; json also switches on --json, so errors come as JSON too."""
    if output not in FORMATS:
        raise UsageError(f"-o/--output must be one of {', '.join(FORMATS)}, got {output!r}")
    if output == "json":
        STATE.json = True
    return output


def show(fmt: str, data: Any, render: Callable[[Console], None],
         row_type: type[DataclassInstance], rows: Callable[[], Iterable[DataclassInstance]],
         failure: SovctlError | None = None) -> None:
    """Print a result in the chosen format; `failure` is raised after it, as `emit` does.
    --json wins over -o csv and -o md."""
    if fmt in ("csv", "md") and not STATE.json:
        write_rows(fmt, row_type, rows())
        if failure is not None:
            raise failure
        return
    emit(data, render, failure)


def columns(row_type: type[DataclassInstance]) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(row_type))


def cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def write_rows(fmt: str, row_type: type[DataclassInstance],
               rows: Iterable[DataclassInstance]) -> None:
    """CSV (RFC 4180, header first) or a GitHub Markdown table on stdout. The header comes from
    `row_type`, so no rows still give a header."""
    cols = columns(row_type)
    values = ([cell(getattr(r, c)) for c in cols] for r in rows)
    if fmt == "csv":
        import csv

        w = csv.writer(sys.stdout, lineterminator="\n")
        w.writerow(cols)
        w.writerows(values)
    elif fmt == "md":
        sys.stdout.write("| " + " | ".join(cols) + " |\n")
        sys.stdout.write("|" + "|".join("---" for _ in cols) + "|\n")
        for v in values:
            sys.stdout.write("| " + " | ".join(x.replace("|", "\\|") for x in v) + " |\n")
    else:
        raise ValueError(f"write_rows writes csv or md, not {fmt!r}")
    sys.stdout.flush()
