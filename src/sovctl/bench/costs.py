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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sovctl.errors import ConfigError

SECONDS_PER_YEAR = 365.25 * 24 * 3600


@dataclass(frozen=True)
class CostConfig:
    currency: str
    electricity_per_kwh: float
    hardware_price: float
    hardware_lifetime_years: float
    hardware_utilisation: float
    cloud_price_per_mtok: float
    cloud_input_price_per_mtok: float

    @classmethod
    def from_settings(cls, settings: Any) -> CostConfig:
        cfg = cls(**{f: settings.get(f"cost.{f}") for f in cls.__dataclass_fields__})
        if cfg.hardware_lifetime_years <= 0:
            raise ConfigError("cost.hardware_lifetime_years must be more than 0",
                              hint="set it in sovctl.toml [cost], e.g. 3.0")
        if not 0 < cfg.hardware_utilisation <= 1:
            raise ConfigError("cost.hardware_utilisation must be in (0, 1]",
                              hint="the share of its life the box spends generating, e.g. 0.5")
        for name in ("electricity_per_kwh", "hardware_price", "cloud_price_per_mtok",
                     "cloud_input_price_per_mtok"):
            if getattr(cfg, name) < 0:
                raise ConfigError(f"cost.{name} must not be negative")
        return cfg


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


def derive(tokens_per_s: float, joules_per_token: float, estimated: bool, cfg: CostConfig,
           prompt: bool) -> Costs:
    """The figures for one phase; `prompt` picks the cloud input price instead of the output."""
    wh_per_mtok = joules_per_token * 1e6 / 3600.0
    electricity = wh_per_mtok / 1000.0 * cfg.electricity_per_kwh
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
