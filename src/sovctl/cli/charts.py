"""The terminal's pictures: `sovctl cost --chart` (owning against the meter, month by month)
and `sovctl ledger --chart` (the local share of tokens by day against the 95/5 line), drawn
with plain characters, each line in its own glyph so that they read without colour too."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console

    from sovctl.ledger.dashboard import Curve, DayShare

WIDTH, HEIGHT = 60, 15  # the curve's plot, in characters
BAR = 40  # a day's bar at 100% local
OWNING, METERED, BOTH, EVEN = "●", "○", "◉", "┆"
LOCAL, ROUTED, TARGET = "█", "░", "│"


def _money(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 100 or v == 0 else f"{v:,.2f}"


def curve(c: Console, cv: Curve) -> None:
    """Cumulative cost of owning (hardware at month 0, then electricity) and of the meter."""
    from rich.text import Text

    from sovctl.ledger.figures import mark

    last = cv.months[-1]
    top = max(*cv.owning, *cv.metered) or 1.0
    cells = [[" "] * WIDTH for _ in range(HEIGHT)]
    styles = [[""] * WIDTH for _ in range(HEIGHT)]

    def row(v: float) -> int:
        return HEIGHT - 1 - round(v / top * (HEIGHT - 1))

    even = cv.break_even.value
    if even is not None and even <= last:
        col = round(even / last * (WIDTH - 1))
        for r in range(HEIGHT):
            cells[r][col], styles[r][col] = EVEN, "dim"
    for col in range(WIDTH):
        # Each line is straight between its monthly points: read it at this column's month.
        m = col / (WIDTH - 1) * last
        i = min(int(m), last - 1)
        frac = m - i

        def at(values: Sequence[float], i: int = i, frac: float = frac) -> float:
            return values[i] + (values[i + 1] - values[i]) * frac

        own, met = row(at(cv.owning)), row(at(cv.metered))
        cells[met][col], styles[met][col] = METERED, "red"
        if own == met:
            cells[own][col], styles[own][col] = BOTH, "magenta"
        else:
            cells[own][col], styles[own][col] = OWNING, "blue"
    labels = {0: _money(top), HEIGHT // 2: _money(top / 2), HEIGHT - 1: _money(0)}
    pad = max(len(v) for v in labels.values())
    c.print(Text(f"cumulative cost in {cv.currency}, month by month", style="bold"))
    for r in range(HEIGHT):
        line = Text(f"{labels.get(r, ''):>{pad}} {'┤' if r in labels else '│'}")
        for ch, st in zip(cells[r], styles[r], strict=True):
            line.append(ch, style=st or None)
        c.print(line, soft_wrap=True)
    axis = [" "] * (WIDTH + 6)
    step = 12 if last > 48 else 6 if last > 24 else 3
    for m in range(0, last + 1, step):
        text = str(m)
        at_col = round(m / last * (WIDTH - 1))
        axis[at_col:at_col + len(text)] = list(text)
    c.print(Text(f"{'':>{pad}} └" + "─" * WIDTH), soft_wrap=True)
    c.print(Text(f"{'':>{pad}}  " + "".join(axis).rstrip() + "  months"), soft_wrap=True)
    legend = Text("")
    legend.append(OWNING, style="blue")
    legend.append(f" owning ({mark(cv.owning_source, 'hardware, then electricity')})  ")
    legend.append(METERED, style="red")
    legend.append(f" the meter ({mark(cv.metered_source, 'its price for the same volume')})")
    c.print(legend, soft_wrap=True)
    volume = mark(cv.daily_tokens.source, f"{cv.daily_tokens.value:,.0f}")
    if even is None:
        said = "the lines never cross: owning does not break even at this volume"
    elif even > last:
        said = (f"they cross after {mark(cv.break_even.source, f'{even:.1f}')} months, "
                "beyond the chart")
    else:
        said = f"{EVEN} break-even at {mark(cv.break_even.source, f'{even:.1f}')} months"
    c.print(f"at {volume} tokens a day; {said}", highlight=False, markup=False)


def share(c: Console, days: Sequence[DayShare], target: float) -> None:
    """A bar a day: its local share of tokens, with the target line drawn through them."""
    from rich.text import Text

    from sovctl.ledger.figures import mark

    cut = round(target * BAR)
    c.print(Text(f"local share of tokens by day ({LOCAL} local, {ROUTED} routed out; "
                 f"{TARGET} the {target:.0%}/{1 - target:.0%} line)", style="bold"))
    for d in days:
        line = Text(f"{d.day} ")
        v = d.share.value
        if v is None:
            line.append(" " * cut + TARGET, style=None)
            line.append(" no tokens", style="dim")
        else:
            filled = round(v * BAR)
            for part in (range(cut), None, range(cut, BAR)):
                if part is None:
                    line.append(TARGET, style="bold red")
                    continue
                local = sum(1 for i in part if i < filled)
                line.append(LOCAL * local, style="green")
                line.append(ROUTED * (len(part) - local), style="yellow")
            line.append(" " + mark(d.share.source, f"{v:.1%}"),
                        style=None if v >= target else "red")
        c.print(line, soft_wrap=True)
