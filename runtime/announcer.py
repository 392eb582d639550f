"""What the control side of protocol v2 publishes besides replies: notices (rate-limited per market, and
for messages to markets that are not open) and each market's retained roster, numbered for replicas."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Protocol

from blockmarket.wire.markets import MarketState, Notice, encode_market_roster, encode_notice
from blockmarket.wire.topics import MarketTopics
from runtime.market import Market, NoticeGate
from runtime.markets import MarketRegistry


class ControlPublisher(Protocol):
    """What the control side publishes (blockmarket.wire.runtime_link.RuntimeTransport satisfies it)."""

    async def publish_answer(
        self, topic: str, payload: bytes, reply_to: tuple[str, bytes] | None
    ) -> bool: ...

    async def publish_retained(self, topic: str, payload: bytes) -> bool: ...

    async def clear_retained(self, topic: str) -> bool: ...


class MarketAnnouncer:
    """Publishes the markets' notices (registry.on_notice) and rosters; notices go out in tasks of their
    own, so the serving path never waits for them."""

    def __init__(self, registry: MarketRegistry, publisher: ControlPublisher, client_id: str) -> None:
        self.registry = registry
        self.publisher = publisher
        self.client_id = client_id
        self._orphan_gates: dict[tuple[str, str], NoticeGate] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        registry.on_notice = self.notice

    async def roster(self, market: Market, state: MarketState) -> None:
        """The market's retained roster, numbered past every earlier one (and past the clock, in
        microseconds: a market closed and opened again keeps counting up for the replicas)."""
        if market.topics is not None:
            market.seq = max(market.seq + 1, time.time_ns() // 1000)
            payload = encode_market_roster(
                market.key[0], market.key[1], self.client_id, self.registry.arena.items, state, market.seq
            )
            await self.publisher.publish_retained(market.topics.roster, payload)

    def notice(self, market: Market, notice: Notice) -> None:
        if market.topics is not None:
            self._spawn(self.publisher.publish_answer(market.topics.notice, encode_notice(notice), None))

    def orphan_notice(self, topics: MarketTopics, kind: str, detail: str) -> None:
        """A notice about a market that is not open (or a request that never reached one), rate-limited."""
        key = (topics.owner, topics.market)
        gate = self._orphan_gates.get(key)
        if gate is None:
            if len(self._orphan_gates) > 4 * self.registry.limits.max_markets:
                self._orphan_gates.clear()  # bounded: a client inventing market names cannot grow it
            gate = self._orphan_gates[key] = NoticeGate(self.registry.notice_rate_hz)
        notice = gate.admit(kind, None, detail)
        if notice is not None:
            self._spawn(self.publisher.publish_answer(topics.notice, encode_notice(notice), None))

    def _spawn(self, publishing: Any) -> None:
        task = asyncio.get_running_loop().create_task(publishing)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
