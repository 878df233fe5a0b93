"""Every derived money and energy figure of a benchmark, computed here and nowhere else.

Inputs: tokens per second and joules per token of one phase, and the [cost] settings.
- tokens per joule      = 1 / joules per token
- Wh per million tokens = joules per token x 1e6 / 3600
- electricity per Mtok  = Wh per Mtok / 1000 x cost.electricity_per_kwh
- hardware per Mtok     = cost.hardware_price spread over the seconds the box is busy in its
                          life (hardware_lifetime_years x hardware_utilisation), divided by
                          the tokens it makes in those seconds
- local total per Mtok  = electricity + hardware
- cloud per Mtok        = cost.cloud_price_per_mtok for generated tokens, and
                          cost.cloud_input_price_per_mtok for prompt tokens
When the energy was estimated (no power meter), every figure built on it is an estimate too.

The same formulas price a local request in the ledger (`local_price`: the latest bench of the
model, at today's [cost] settings) and answer `sovctl cost`'s break-even (`break_even`):
- hardware per day      = hardware_price / (lifetime_years x 365.25): owned or not, it is paid
- electricity per Mtok  = watts / tokens per second, as joules per token, at the tariff
- margin per Mtok       = cloud per Mtok - electricity per Mtok: what each token saves once owned
- break-even volume     = hardware per day / margin (tokens a day above which owning wins over
                          the hardware's lifetime); none when the margin is not positive
- months to break even  = hardware_price / (daily volume x margin), in months of 365.25/12 days
- local per Mtok        = electricity + hardware per day / daily volume (none at zero volume)
- capacity              = tokens per second x 86400: what one box makes a day, flat out
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from sovctl.config import CostSettings
from sovctl.errors import UsageError
from sovctl.prices import Price
from sovctl.units import human_tokens

SECONDS_PER_YEAR = 365.25 * 24 * 3600
DAYS_PER_YEAR = 365.25
DAYS_PER_MONTH = DAYS_PER_YEAR / 12
JOULES_PER_KWH = 3.6e6


@dataclass(frozen=True)
class Costs:
    tokens_per_s: float
    joules_per_token: float
    tokens_per_joule: float
    wh_per_mtok: float
    electricity_per_mtok: float
    hardware_per_mtok: float
    local_per_mtok: float
    cloud_per_mtok: float
    currency: str
    estimated: bool  # true when the energy behind these figures was an estimate


def electricity_per_mtok(joules_per_token: float, per_kwh: float) -> float:
    return joules_per_token * 1e6 / JOULES_PER_KWH * per_kwh


def derive(tokens_per_s: float, joules_per_token: float, estimated: bool, cfg: CostSettings,
           prompt: bool) -> Costs:
    """The figures for one phase; `prompt` picks the cloud input price instead of the output."""
    wh_per_mtok = joules_per_token * 1e6 / 3600.0
    electricity = electricity_per_mtok(joules_per_token, cfg.electricity_per_kwh)
    busy_seconds = cfg.hardware_lifetime_years * SECONDS_PER_YEAR * cfg.hardware_utilisation
    hardware = (cfg.hardware_price / busy_seconds / tokens_per_s * 1e6
                if tokens_per_s > 0 else 0.0)
    return Costs(
        tokens_per_s=tokens_per_s,
        joules_per_token=joules_per_token,
        tokens_per_joule=1.0 / joules_per_token if joules_per_token > 0 else 0.0,
        wh_per_mtok=wh_per_mtok,
        electricity_per_mtok=electricity,
        hardware_per_mtok=hardware,
        local_per_mtok=electricity + hardware,
        cloud_per_mtok=cfg.cloud_input_price_per_mtok if prompt else cfg.cloud_price_per_mtok,
        currency=cfg.currency,
        estimated=estimated,
    )


# -- the latest bench, as the ledger and `sovctl cost` use it --------------------------------------

@dataclass(frozen=True)
class PhaseFigures:
    tokens_per_s: float
    joules_per_token: float
    estimated: bool

    @property
    def watts(self) -> float:
        return self.joules_per_token * self.tokens_per_s


@dataclass(frozen=True)
class BenchFigures:
    """One benchmarked result of a model: its prompt (pp) and generation (tg) phases."""

    run_id: str
    model: str
    sha256: str
    pp: PhaseFigures | None
    tg: PhaseFigures | None

    @property
    def estimated(self) -> bool:
        """Its energy was estimated (bench.cpu_watts; no power meter ran)."""
        return any(p.estimated for p in (self.pp, self.tg) if p)

    def describe(self) -> str:
        est = ", energy estimated" if self.estimated else ""
        return f"bench {self.run_id} of {self.model}{est}"


def _phase(p: Mapping[str, Any] | None) -> PhaseFigures | None:
    if not p or float(p["tps_mean"]) <= 0:
        return None
    c = p["costs"]
    return PhaseFigures(float(p["tps_mean"]), float(c["joules_per_token"]), bool(c["estimated"]))


def latest_bench(runs: Sequence[Mapping[str, Any]], sha256: str | None = None
                 ) -> BenchFigures | None:
    """The newest benchmarked result (of the model with that sha256, when given) among the
    history's runs, oldest first as `sovctl.bench.history.load` returns them."""
    for run in reversed(runs):
        for r in run.get("results") or ():
            if sha256 is not None and r["model"]["sha256"] != sha256:
                continue
            pp, tg = _phase(r.get("pp")), _phase(r.get("tg"))
            if pp or tg:
                return BenchFigures(str(run["id"]), str(r["model"]["name"]),
                                    str(r["model"]["sha256"]), pp, tg)
    return None


def local_price(bench: BenchFigures, cfg: CostSettings) -> Price:
    """A local model's price per million tokens: prompt tokens at its prompt phase's figures,
    generated ones at its generation phase's (either stands for both when it is alone)."""
    pp, tg = bench.pp or bench.tg, bench.tg or bench.pp
    assert pp is not None and tg is not None
    return Price(
        input_per_mtok=derive(pp.tokens_per_s, pp.joules_per_token, pp.estimated, cfg,
                              prompt=True).local_per_mtok,
        output_per_mtok=derive(tg.tokens_per_s, tg.joules_per_token, tg.estimated, cfg,
                               prompt=False).local_per_mtok,
        source=bench.describe(),
        estimated=bench.estimated,
    )


# -- break-even: owning vs the meter ---------------------------------------------------------------

@dataclass(frozen=True)
class BreakEvenInputs:
    hardware_price: float
    lifetime_years: float
    watts: float  # drawn while generating
    tokens_per_s: float  # what the box makes while generating
    tariff: float  # electricity, per kWh
    daily_tokens: float
    cloud_per_mtok: float


@dataclass(frozen=True)
class BreakEven:
    electricity_per_mtok: float
    hardware_per_day: float
    capacity_daily_tokens: float
    local_per_mtok: float | None  # at the daily volume; None when there is none
    cloud_per_mtok: float
    local_per_day: float
    cloud_per_day: float
    break_even_daily_tokens: float | None  # None: the cloud is cheaper than the electricity
    months_to_break_even: float | None  # None: never, at this volume
    owning_wins: bool  # at this volume, over the hardware's lifetime, on one box


def break_even(i: BreakEvenInputs) -> BreakEven:
    for name, value in (("hardware price", i.hardware_price), ("watts", i.watts),
                        ("tariff", i.tariff), ("daily tokens", i.daily_tokens),
                        ("cloud price", i.cloud_per_mtok)):
        if value < 0:
            raise UsageError(f"the {name} must not be negative, got {value:g}")
    if i.lifetime_years <= 0 or i.tokens_per_s <= 0:
        raise UsageError("the hardware lifetime and tokens per second must be more than 0",
                         hint="set them with the flags, [cost] or a 'sovctl bench' run")
    electricity = electricity_per_mtok(i.watts / i.tokens_per_s, i.tariff)
    per_day = i.hardware_price / (i.lifetime_years * DAYS_PER_YEAR)
    mtok = i.daily_tokens / 1e6
    margin = i.cloud_per_mtok - electricity
    volume = per_day / margin * 1e6 if margin > 0 else None
    saving = mtok * margin  # a day, once the hardware is paid for
    if i.hardware_price == 0:
        months: float | None = 0.0 if saving > 0 else None
    else:
        months = i.hardware_price / saving / DAYS_PER_MONTH if saving > 0 else None
    capacity = i.tokens_per_s * 86400
    wins = (volume is not None and mtok > 0 and i.daily_tokens >= volume
            and volume <= capacity)
    return BreakEven(
        electricity_per_mtok=electricity,
        hardware_per_day=per_day,
        capacity_daily_tokens=capacity,
        local_per_mtok=electricity + per_day / mtok if mtok > 0 else None,
        cloud_per_mtok=i.cloud_per_mtok,
        local_per_day=per_day + mtok * electricity,
        cloud_per_day=mtok * i.cloud_per_mtok,
        break_even_daily_tokens=volume,
        months_to_break_even=months,
        owning_wins=wins,
    )


@dataclass(frozen=True)
class Traffic:
    """How steady the volume was, from the ledger: days with requests of the days looked at."""

    active_days: int
    days: int

    @property
    def bursty(self) -> bool:
        # A week at least before judging; then traffic on fewer than half the days means a
        # box bought for it would idle most of the time.
        return self.days >= 7 and self.active_days * 2 < self.days


_tokens = partial(human_tokens, spec=".3g")  # three significant digits: 12.3k, 123k


def verdict(i: BreakEvenInputs, b: BreakEven, currency: str,
            traffic: Traffic | None = None) -> str:
    """The answer in one sentence, starting with what to do."""
    money = f"{{:,.2f}} {currency}".format
    wins_above = (f"owning wins above {_tokens(b.break_even_daily_tokens)} tokens a day"
                  if b.break_even_daily_tokens is not None else "")
    if b.break_even_daily_tokens is None:
        return (f"stay in the cloud: electricity alone costs {money(b.electricity_per_mtok)} "
                f"per million tokens here, no less than the cloud's {money(b.cloud_per_mtok)}")
    if b.break_even_daily_tokens > b.capacity_daily_tokens:
        return (f"stay in the cloud: {wins_above}, more than this box makes flat out "
                f"({_tokens(b.capacity_daily_tokens)} a day)")
    if i.daily_tokens <= 0:
        return f"stay in the cloud: there is no daily volume to serve ({wins_above})"
    if traffic is not None and traffic.bursty:
        return (f"stay in the cloud: the volume is bursty (requests on {traffic.active_days} "
                f"of {traffic.days} days), so a box bought for it idles most days ({wins_above})")
    if not b.owning_wins:
        return (f"stay in the cloud: at {_tokens(i.daily_tokens)} tokens a day owning costs "
                f"{money(b.local_per_day - b.cloud_per_day)} a day more than the meter "
                f"({wins_above})")
    pays = ("at once (the hardware cost nothing)" if not b.months_to_break_even
            else f"in {b.months_to_break_even:.1f} months")
    over = (f"; but {_tokens(i.daily_tokens)} a day is more than one box makes "
            f"({_tokens(b.capacity_daily_tokens)})" if i.daily_tokens > b.capacity_daily_tokens
            else "")
    return (f"own: at {_tokens(i.daily_tokens)} tokens a day the hardware pays for itself "
            f"{pays}, then saves {money(b.cloud_per_day - b.local_per_day + b.hardware_per_day)}"
            f" a day{over}")
