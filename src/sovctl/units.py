"""How sizes and counts are written for people: one rule for every command and report."""

from __future__ import annotations

import re

from sovctl.errors import UsageError

MiB = 1 << 20
GiB = 1 << 30


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _scaled(n: float, units: tuple[tuple[float, str], ...], spec: str) -> str | None:
    for div, unit in units:
        if n >= div:
            return f"{n / div:{spec}}{unit}"
    return None


def human_params(n: int) -> str:
    """A parameter count the way model cards write it: 134.5M, 1.2B."""
    return _scaled(n, ((1e9, "B"), (1e6, "M"), (1e3, "K")), ".1f") or str(n)


def human_tokens(n: float, spec: str = ".1f") -> str:
    """A token count: 12.3k, 4.5M, 1.2G; `spec` formats the number before the unit (".3g":
    three significant digits, 12.3k but 123k)."""
    return _scaled(n, ((1e9, "G"), (1e6, "M"), (1e3, "k")), spec) or f"{n:.0f}"


def human_duration(seconds: float) -> str:
    """A span as a person says it: 42s, 5m, 3h, 2d."""
    for div, unit in ((86400, "d"), (3600, "h"), (60, "m")):
        if seconds >= div:
            return f"{seconds / div:.0f}{unit}"
    return f"{seconds:.0f}s"


# Sizes as people write them: config ([serve] memory_limit) and flags (plan --ram) read them.
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)(b?)\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """"100MB" (decimal), "1.5GiB" or "8G" (binary), "0", or a number of bytes."""
    m = _SIZE.match(text)
    if not m:
        raise UsageError(f"cannot read {text!r} as a size",
                         hint="write e.g. 512MiB, 8GiB, 8G (binary), 100MB (decimal) or 0")
    number, unit, binary, byte = m.groups()
    power = "kmgt".find(unit.lower()) + 1 if unit else 0
    base = 1000 if (byte and not binary and unit) else 1024
    return int(float(number) * base ** power)
