"""What the runtime tells game servers besides its answers (docs/protocol.md): the retained status
(identity, heartbeat, serving figures), the retained roster (who is served, with which model version),
the last will, and the log line that repeats the status; and whether they fit the broker's payload limit.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from blockmarket.core.config import Config
from blockmarket.core.state import IntArray
from blockmarket.wire.messages import (
    RosterMessage,
    encode_roster,
    encode_status,
    message_sizes,
    payload_shortfall,
)
from runtime.agents import AgentPopulation
from runtime.control import MarketControl
from runtime.scheduler import TickScheduler
from runtime.sessions import SessionPool

STATUS_GROWTH_BYTES = 1024  # the status's counters and figures grow while serving


def last_will(client_id: str, started_at: float) -> dict[str, Any]:
    """The MQTT last will: which process went offline, not the roster (a will is at most 65,535 bytes)."""
    return {"state": "offline", "pid": os.getpid(), "client_id": client_id, "started_at": started_at}


def status(
    config: Config,
    will: dict[str, Any],
    state: str,
    population: AgentPopulation | None,
    pool: SessionPool | None,
    scheduler: TickScheduler | None,
    control: MarketControl | None = None,
) -> dict[str, Any]:
    """The retained status: identity, heartbeat, what a client needs to check answers, serving figures.

    Its size does not grow with the agents (the roster has its own topic): a heartbeat stays cheap.
    """
    report: dict[str, Any] = {
        **will,
        "state": state,
        "published_at": time.time(),
        "status_interval_s": config.runtime.status_interval_s,
        "alpha": config.learning.matrix_update_rate,
    }
    if population is not None and pool is not None:
        report.update(agents=len(population), items=list(population.items), eps=pool.current.providers)
    if scheduler is not None:
        default = scheduler.markets.default
        report.update(scheduler.stats(), limits=scheduler.intake.limits.announce())
        if default is not None:
            report["agents"] = len(default)  # the v1 roster's; the markets' are in their own rosters
    if control is not None:
        report["markets"] = control.stats()
    if config.mqtt.shared_group is not None and control is not None:  # replica mode: this one's share
        markets = [m for m in control.registry.markets.values() if m.topics is not None]
        report["replica"] = {
            "group": config.mqtt.shared_group,
            "markets_open": len(markets),
            "models": len(control.pool.models),  # hot reload reaches every replica: each counts the new one
            "ticks_served": control.closed["ticks_served"]
            + sum(m.intake.ledger.outcomes["served"] for m in markets),
        }
    return report


def roster(
    client_id: str,
    started_at: float,
    population: AgentPopulation,
    pool: SessionPool,
    rows: IntArray | None = None,
) -> RosterMessage:
    """Who is served on the v1 topics (the default market's ``rows``; None: every row): ids, desired
    items, model and version per agent, starting matrices."""
    if rows is None:
        rows = np.arange(len(population))
    models = tuple(population.model_keys[r] for r in rows)
    versions = pool.current.versions
    return RosterMessage(
        client_id=client_id,
        started_at=started_at,
        pool_generation=pool.current.number,
        items=population.items,
        agent_ids=tuple(population.agent_ids[r] for r in rows),
        desired=tuple(population.items[int(d)] for d in population.desired[rows]),
        models=models,
        model_versions={key: versions[key] for key in set(models) if key in versions},
        initial_matrices=population.initial_matrices[rows],
    )


def oversized(
    config: Config,
    population: AgentPopulation,
    pool: SessionPool,
    status_now: dict[str, Any],
    roster_now: RosterMessage,
) -> str | None:
    """What does not fit mqtt.max_payload_bytes among the messages this roster needs, and what to do
    (None: everything fits). This runtime refuses a bigger tick, and game servers using this config
    refuse a bigger answer, status or roster."""
    sizes = message_sizes(population.agent_ids, population.num_items, pool.current.versions)
    sizes["status"] = len(encode_status(status_now)) + STATUS_GROWTH_BYTES
    sizes["roster"] = len(encode_roster(roster_now))
    shortfall = payload_shortfall(sizes, config.mqtt.max_payload_bytes)
    if shortfall is None:
        return None
    fewer = (
        f"fewer models in {config.model_dir} (runtime.assignment: one_per_checkpoint)"
        if config.runtime.assignment == "one_per_checkpoint"
        else "a smaller runtime.num_agents"
    )
    return f"{len(population)} agents: {shortfall}, or serve {fewer}"


def summary(scheduler: TickScheduler | None) -> str:
    """The periodic log line: the status's serving figures."""
    if scheduler is None:
        return "not serving"
    s, markets = scheduler.stats(), scheduler.markets
    default = len(markets.default) if markets.default is not None else len(scheduler.population)
    opened = len(markets.markets) - (markets.default is not None)
    extra = f" (+ {opened} markets, {markets.live_agents() - default} agents)" if opened else ""
    return (
        f"{default} agents{extra}: {s['ticks_received']} ticks received, "
        f"{s['ticks_served']} served, {s['ticks_skipped']} skipped, dropped {s['dropped'] or 0}, "
        f"p50 {s['latency_p50_ms']} ms, p99 {s['latency_p99_ms']} ms, "
        f"{s['guarded_outputs']} outputs guarded, pool generation {s['pool_generation']}"
    )
