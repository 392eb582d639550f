"""Policies playing markets: per step one batched forward for every agent of every market, the update
rule, then one vectorized trade step for all markets (independent: nobody trades across them)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from blockmarket.core.config import EnvironmentConfig
from blockmarket.core.state import FloatArray, apply_update
from blockmarket.market.rules import MarketPopulation, fitness, trade_step
from training.policy import PolicyPopulation


@dataclass(frozen=True)
class MarketResults:
    """Outcome of E markets of P seats each after the last step."""

    fitness: FloatArray  # [E, P]
    success_rate: FloatArray  # [E, P]
    trades: int  # executed trades, summed over markets and steps
    volume: float  # units moved, summed over markets and steps


def play(
    market: MarketPopulation,
    policies: PolicyPopulation,
    steps: int,
    alpha: float,
    env: EnvironmentConfig,
    rng: np.random.Generator,
) -> MarketResults:
    """Seat p of every market is played by network p for ``steps`` steps (the market changes in place)."""
    seats, markets, n = len(policies), market.markets, market.num_items
    if market.market_size != seats:
        raise ValueError(f"markets of {market.market_size} seats for {seats} networks (one per seat)")
    start = market.inventory.copy()
    trades, volume = 0, 0.0
    for _ in range(steps):
        states = market.states().reshape(markets, seats, -1).swapaxes(0, 1)  # [P, E, D]
        proposals = policies.forward(states).swapaxes(0, 1).reshape(-1, n, n)
        apply_update(market.matrices, proposals, alpha)
        stats = trade_step(market, rng, env)
        trades += stats.trades
        volume += stats.volume
    return MarketResults(
        fitness=fitness(market, start).reshape(markets, seats),
        success_rate=market.success_rate().reshape(markets, seats),
        trades=trades,
        volume=volume,
    )
