"""Policies playing markets: per step one batched forward for every agent of every market, the update
rule, then one trade step per market (markets are independent: nobody trades across them)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from runtime.config import EnvironmentConfig
from runtime.market import MarketPopulation, fitness, trade_step
from runtime.state import FloatArray, apply_update, state_dim
from training.policy import PolicyPopulation


@dataclass(frozen=True)
class MarketResults:
    """Outcome of E markets of P seats each after the last step."""

    fitness: FloatArray  # [E, P]
    success_rate: FloatArray  # [E, P]
    trades: int  # executed trades, summed over markets and steps
    volume: float  # units moved, summed over markets and steps


def play(
    markets: Sequence[MarketPopulation],
    policies: PolicyPopulation,
    steps: int,
    alpha: float,
    env: EnvironmentConfig,
    rng: np.random.Generator,
) -> MarketResults:
    """Seat p of every market is played by network p for ``steps`` steps (markets change in place)."""
    seats = len(policies)
    if any(market.size != seats for market in markets):
        sizes = sorted({market.size for market in markets})
        raise ValueError(f"every market needs {seats} seats, one per network; got sizes {sizes}")
    starts = [market.inventory.copy() for market in markets]
    states = np.empty((seats, len(markets), state_dim(policies.num_items)), dtype=np.float32)
    trades, volume = 0, 0.0
    for _ in range(steps):
        for e, market in enumerate(markets):
            states[:, e] = market.states()
        proposals = policies.forward(states)
        for e, market in enumerate(markets):
            apply_update(market.matrices, proposals[:, e], alpha)
            stats = trade_step(market, rng, env)
            trades += stats.trades
            volume += stats.volume
    return MarketResults(
        fitness=np.stack([fitness(market, start) for market, start in zip(markets, starts, strict=True)]),
        success_rate=np.stack([market.success_rate() for market in markets]),
        trades=trades,
        volume=volume,
    )
