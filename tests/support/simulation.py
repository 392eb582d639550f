"""A market simulator built in-process (no broker): for the market view and the dashboard feed."""

from __future__ import annotations

from blockmarket.core.config import parse_config
from blockmarket.simulator.roster import default_roster
from blockmarket.simulator.simulation import MarketSimulator


def simulator(agents: int, prefix: str = "view") -> MarketSimulator:
    config = parse_config({"mqtt": {"topic_prefix": prefix}, "simulator": {"seed": 3}}).config
    roster = default_roster(agents, config.environment.num_items, seed=1)
    return MarketSimulator(config, roster.agent_ids, roster.desired)
