"""Which agents the simulator plays: the runtime's retained roster (once its status says online), or a
default roster of N agents."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from blockmarket.core.config import Config, MqttConfig
from blockmarket.wire.limits import Limits, ProtocolError
from blockmarket.wire.messages import RosterMessage
from blockmarket.wire.protocol import decode_roster, decode_status
from blockmarket.wire.topics import Topics
from blockmarket.wire.transport import MqttLink

logger = logging.getLogger(__name__)


CONNECT_TIMEOUT_S = 10.0


class SimulatorError(RuntimeError):
    """The simulation cannot start or go on (no broker, a roster that does not fit the config)."""


@dataclass(frozen=True)
class Roster:
    """The agents a runtime serves, as announced in its retained roster, and its state then."""

    agent_ids: tuple[str, ...]
    desired: tuple[int, ...]  # item indices into config.environment.items_list
    state: str  # "online" / "offline"


async def _connected(
    link: MqttLink, running: asyncio.Task[None], cfg: MqttConfig, timeout_s: float = CONNECT_TIMEOUT_S
) -> None:
    """Until ``link`` (run by ``running``) is connected; re-raises its :class:`BrokerRefused`."""
    connected = asyncio.create_task(link.connected.wait())
    try:
        await asyncio.wait({connected, running}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        connected.cancel()
    if link.connected.is_set():
        return
    if running.done():
        running.result()  # the broker refused us for good: its reason, not "unreachable"
    raise SimulatorError(
        f"no MQTT broker reachable at {cfg.host}:{cfg.port} within {timeout_s:.0f} s "
        "(start `blockmarket run`, which embeds one on loopback if needed, or check mqtt.host/port)"
    )


# ---------------------------------------------------------------------------------------- roster


def roster_from_message(roster: RosterMessage, state: str, items: Sequence[str]) -> Roster:
    """The agents to play from a runtime's roster; raises if it does not fit ``items``."""
    if list(roster.items) != list(items):
        raise SimulatorError(
            f"the runtime serves items {list(roster.items)} but this config has {list(items)}: "
            "use the runtime's config.yaml (environment.items_list)"
        )
    index = {item: k for k, item in enumerate(items)}
    return Roster(roster.agent_ids, tuple(index[d] for d in roster.desired), state)


def same_runtime(roster: RosterMessage, status: dict[str, Any]) -> bool:
    """Whether a roster and a status come from the same runtime process."""
    return (roster.client_id, roster.started_at) == (status.get("client_id"), status.get("started_at"))


async def discover_roster(config: Config, wait_s: float) -> Roster | None:
    """Read the runtime's retained status and roster for up to ``wait_s``; waits for "online" while the
    status says offline. A roster counts only with a status of the same runtime (client_id, started_at)."""
    topics = Topics(config.mqtt.topic_prefix)
    limits = Limits.from_config(config.mqtt, num_agents=None)  # the roster is what we are waiting for
    latest: dict[str, Any] = {}
    changed = asyncio.Event()

    def keep(name: str, decode: Callable[[bytes, Limits], Any]) -> Callable[[bytes, float, bool], None]:
        def handler(payload: bytes, _received_at: float, _retained: bool) -> None:
            try:
                latest[name] = decode(payload, limits) if payload else None  # empty: cleared
            except ProtocolError as exc:
                logger.warning("ignoring a bad runtime %s on %s: %s", name, topics.prefix, exc)
            changed.set()

        return handler

    link = MqttLink(
        config.mqtt,
        client_id=f"blockmarket-simulator-roster-{os.getpid()}",
        subscriptions={
            topics.status: keep("status", decode_status),
            topics.roster: keep("roster", decode_roster),
        },
    )
    task = asyncio.create_task(link.run())
    roster: Roster | None = None
    try:
        await _connected(link, task, config.mqtt)
        deadline = time.monotonic() + wait_s
        while roster is None or roster.state != "online":
            status, announced = latest.get("status"), latest.get("roster")
            if status and announced and same_runtime(announced, status):
                roster = roster_from_message(announced, str(status["state"]), config.environment.items_list)
                if roster.state == "online":
                    break
            changed.clear()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                await asyncio.wait_for(changed.wait(), remaining)
            except TimeoutError:
                break
    finally:
        await link.disconnect()
        await task
    return roster


def default_roster(count: int, num_items: int, seed: int) -> Roster:
    """agent-0000.. with random desired items: the runtime's naming when agents are drawn from models."""
    desired = np.random.default_rng(seed).integers(0, num_items, count)
    return Roster(tuple(f"agent-{i:04d}" for i in range(count)), tuple(int(d) for d in desired), "unknown")
