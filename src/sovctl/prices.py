"""The price of tokens on a route: what a provider lists, or what a local model costs to run.

A leaf: the bench computes a local model's price (`sovctl.bench.costs`), the plan carries it,
the routes table hands it to the gateway, which records each request's cost in the ledger.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Price:
    """What a million tokens cost on a route, in the [cost] currency: the provider's list
    price, or for a local model its energy and amortised hardware from the latest bench."""

    input_per_mtok: float
    output_per_mtok: float
    source: str  # where the figures come from, in words
    # The figures rest on an estimate (a bench's energy from bench.cpu_watts, no power meter):
    # every cost priced with them is recorded as estimated.
    estimated: bool = False

    def cost(self, tokens_in: int, tokens_out: int) -> float:
        return (tokens_in * self.input_per_mtok + tokens_out * self.output_per_mtok) / 1e6
