"""How each figure of `sovctl ledger` and `sovctl cost` was obtained, said with it.

Every figure is reported as {value, source}, source one of:
- measured:   counted or metered (the usage an answer reported; a bench's power meter);
- flag:       given on the command line;
- configured: a setting of the operator's (sovctl.toml, a profile, the environment);
- estimated:  inferred where nothing measured it (a stream's events or characters when no
              usage came back; energy from bench.cpu_watts when no power meter ran);
- defaulted:  a built-in default nobody chose.
A figure computed from others takes the least certain of their sources, in that order: a sum
with any estimated part is estimated, a result built on a default is defaulted.
"""

from __future__ import annotations

from dataclasses import dataclass

from sovctl.config import Settings
from sovctl.ledger.store import ESTIMATED, MEASURED

FLAG, CONFIGURED, DEFAULTED = "flag", "configured", "defaulted"
SOURCES = (MEASURED, FLAG, CONFIGURED, ESTIMATED, DEFAULTED)  # most certain first


@dataclass(frozen=True)
class Amount:
    """A figure and its source. `value` None: there is no figure (nothing to divide by)."""

    value: float | None
    source: str


def weakest(*sources: str) -> str:
    """The least certain of `sources`; measured when there are none."""
    return max(sources, key=SOURCES.index, default=MEASURED)


def mark(source: str, text: str) -> str:
    """A figure as printed: '~' before one that rests on an estimate, '*' after one that rests
    on a built-in default (MARKS explains them under a report)."""
    return f"{'~' if source == ESTIMATED else ''}{text}{'*' if source == DEFAULTED else ''}"


MARKS = {ESTIMATED: "~ rests on an estimate", DEFAULTED: "* rests on a built-in default"}


def setting_source(settings: Settings, key: str) -> str:
    """A setting's source: a built-in default, or the operator's."""
    return DEFAULTED if settings.source(key) == "default" else CONFIGURED


class Sums:
    """Running sums of figures by name, each remembering whether an estimate went into it."""

    def __init__(self) -> None:
        self.values: dict[str, float] = {}
        self.estimated: set[str] = set()

    def add(self, name: str, value: float, estimated: bool) -> None:
        self.values[name] = self.values.get(name, 0) + value
        if estimated and value:
            self.estimated.add(name)

    def value(self, name: str) -> float:
        return self.values.get(name, 0)

    def get(self, name: str) -> Amount:
        return Amount(self.value(name), ESTIMATED if name in self.estimated else MEASURED)
