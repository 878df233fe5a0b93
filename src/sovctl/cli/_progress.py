"""rich progress bars on stderr, shown only to a person at a terminal."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from sovctl.cli._common import STATE, _stderr_console


@contextmanager
def bars() -> Iterator[Callable[..., Callable[[int], None]] | None]:
    if STATE.json or not sys.stderr.isatty():
        yield None
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=_stderr_console(),
        transient=True,
    ) as progress:

        def factory(description: str, total: int | None, done: int = 0) -> Callable[[int], None]:
            task = progress.add_task(description, total=total, completed=done)
            return lambda n: progress.advance(task, n)

        yield factory
