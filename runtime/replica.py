"""Replica mode's two moments in a runtime's life (docs/deploy.md "Replicas"): joining the group once the
markets are known, and leaving it without dropping what the broker already handed over."""

from __future__ import annotations

import asyncio
import logging
import time

from blockmarket.wire.runtime_link import RuntimeTransport
from runtime.control import MarketControl
from runtime.housekeeping import freeze_startup_heap
from runtime.scheduler import TickScheduler

log = logging.getLogger(__name__)

ROSTER_SETTLE_S = 0.3  # no roster for this long after subscribing to them: the retained ones are in


async def join_group(
    transport: RuntimeTransport, control: MarketControl, scheduler: TickScheduler | None, group: str | None
) -> None:
    """Apply the markets' retained rosters (the broker sends them on subscribing) before taking ticks, so
    that none reaches this replica for a market it does not know yet; then one warm-up inference (the
    sessions the rosters grew run their slow first call off the serving path), then subscribe."""
    quiet_since = time.monotonic()
    while time.monotonic() - quiet_since < ROSTER_SETTLE_S:
        await asyncio.sleep(0.02)
        if control.busy():
            quiet_since = time.monotonic()
    if scheduler is not None:
        await scheduler.warm_up()
    freeze_startup_heap()  # what following made stays out of the collections while serving
    await transport.join_group()
    log.info("joined replica group %s following %d market(s)", group, len(control.registry.markets) - 1)


async def drain(
    transport: RuntimeTransport, control: MarketControl, group: str | None, timeout_s: float = 10.0
) -> None:
    """Stopping: leave the shared subscriptions (the broker sends the group's others what comes next),
    then serve what was already delivered here (it arrives before the broker's acknowledgement)."""
    log.info("leaving replica group %s: serving the ticks already delivered", group)
    await transport.leave_group()
    registry = control.registry
    deadline = time.monotonic() + timeout_s
    while control.busy() or registry.pending or registry.lock.locked():
        if time.monotonic() > deadline:
            log.warning("drain: still busy after %.0f s; stopping anyway", timeout_s)
            return
        await asyncio.sleep(0.01)
    log.info("drained: every tick delivered to this replica was served")
