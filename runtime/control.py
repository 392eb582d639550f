"""Protocol version 2's inbound side: market ticks to their market, control requests applied in order.

Every message on ``{prefix}/v2/+/+/tick`` goes to its market's intake (counted there like a v1 tick), or,
for a market that is not open, is counted as ``unknown_market`` with a notice. Control requests are read
on arrival and queued (bounded: a flood is counted as ``overload``, with a notice); one task applies them
one at a time, each between two served batches, and answers each with a reply. Idle markets are closed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from blockmarket.wire.limits import DropCounter, Limits, ProtocolError
from blockmarket.wire.markets import (
    ControlRequest,
    MarketState,
    Notice,
    Reply,
    decode_control,
    encode_market_roster,
    encode_notice,
    encode_reply,
)
from blockmarket.wire.topics import MarketTopics
from runtime.market import Market, MarketError, NoticeGate
from runtime.markets import MarketRegistry
from runtime.sessions import SessionPool

log = logging.getLogger(__name__)

CONTROL_QUEUE = 256  # requests waiting at most; more are refused as overload


class ControlPublisher(Protocol):
    """What the control side publishes (blockmarket.wire.runtime_link.RuntimeTransport satisfies it)."""

    async def publish_answer(
        self, topic: str, payload: bytes, reply_to: tuple[str, bytes] | None
    ) -> bool: ...

    async def publish_retained(self, topic: str, payload: bytes) -> bool: ...

    async def clear_retained(self, topic: str) -> bool: ...


class MarketControl:
    """Routes v2 messages to markets and applies control requests (open, add, remove, close, snapshot,
    restore) to the registry, one at a time."""

    def __init__(
        self,
        registry: MarketRegistry,
        pool: SessionPool,
        publisher: ControlPublisher,
        *,
        prefix: str,
        client_id: str,
        control_limits: Limits,
    ) -> None:
        self.registry = registry
        self.pool = pool
        self.publisher = publisher
        self.prefix = prefix
        self.client_id = client_id
        self.control_limits = control_limits  # requests may name up to max_agents_per_market agents
        self.queue: asyncio.Queue[tuple[MarketTopics, bytes, tuple[str, bytes] | None]] = asyncio.Queue(
            CONTROL_QUEUE
        )
        self.requests: Counter[str] = Counter()  # received, done, refused, dropped
        self.drops = DropCounter(log, what="v2 message")  # unknown markets, unreadable requests, overload
        self.closed: Counter[str] = Counter()  # the counters of closed markets, kept in the totals
        self._orphan_gates: dict[tuple[str, str], NoticeGate] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        registry.on_notice = self._send_notice

    # ---------------------------------------------------------------------------------- inbound

    def receive(
        self,
        topic: str,
        payload: bytes,
        received_at: float,
        retained: bool,
        reply_to: tuple[str, bytes] | None,
    ) -> None:
        """The transport's handler for ``{prefix}/v2/+/+/tick`` and ``/control``: never blocks or raises."""
        parsed = MarketTopics.parse(self.prefix, topic)
        if parsed is None:
            self.drops.record("bad_topic", f"{topic}: not a market topic of {self.prefix}/v2")
            return
        topics, leaf = parsed
        if leaf == "tick":
            market = self.registry.markets.get((topics.owner, topics.market))
            if market is None:
                self.drops.record(
                    "unknown_market", f"{topic}: market {topics.owner}/{topics.market} is not open"
                )
                self._orphan_notice(
                    topics, "unknown_market", "this market is not open: send an open request first"
                )
                return
            market.intake.receive(payload, received_at, retained, reply_to)
            return
        self.requests["received"] += 1
        if retained:
            self.requests["dropped"] += 1
            self.drops.record("retained", f"{topic}: a retained request replays the past; not applied")
            return
        try:
            self.queue.put_nowait((topics, payload, reply_to))
        except asyncio.QueueFull:
            self.requests["dropped"] += 1
            self.drops.record("overload", f"{topic}: {CONTROL_QUEUE} requests already wait")
            self._orphan_notice(
                topics, "overload", f"{CONTROL_QUEUE} requests already wait: this one was dropped"
            )

    async def run(self) -> None:
        """Apply queued requests in arrival order, forever."""
        while True:
            topics, payload, reply_to = await self.queue.get()
            reply = await self.apply(topics, payload)
            self.requests["done" if reply.ok else "refused"] += 1
            await self.publisher.publish_answer(topics.reply, encode_reply(reply), reply_to)
            if not reply.ok and reply.error is not None:  # also where the market's notices go
                self._orphan_notice(topics, "refused", f"{reply.op} request {reply.request}: {reply.error}")

    async def apply(self, topics: MarketTopics, payload: bytes) -> Reply:
        """One request, decoded, checked and applied; refused requests say why."""
        try:
            request = decode_control(payload, self.control_limits)
        except ProtocolError as exc:
            return Reply("?", 0, False, str(exc))
        key = (topics.owner, topics.market)
        try:
            state = await getattr(self, f"_{request.op}")(key, topics, request)
        except MarketError as exc:
            return Reply(request.op, request.request, False, str(exc))
        except Exception as exc:  # a bug must not end the control task: logged, refused
            log.exception("%s request to %s/%s failed", request.op, *key)
            return Reply(request.op, request.request, False, f"internal: {exc!r}")
        return Reply(request.op, request.request, True, None, state)

    # ------------------------------------------------------------------------------------- operations

    async def _open(self, key: tuple[str, str], topics: MarketTopics, request: ControlRequest) -> MarketState:
        if key in self.registry.markets:
            raise MarketError(
                "exists", f"market {key[0]}/{key[1]} is open: add agents, or restore to replace it"
            )
        return await self._join(key, topics, request)

    async def _add(self, key: tuple[str, str], topics: MarketTopics, request: ControlRequest) -> MarketState:
        market = self._market(key)
        if clash := set(request.agent_ids) & set(market.agent_ids):
            raise MarketError("exists", f"agents already in the market: {sorted(clash)[:5]}")
        return await self._join(key, topics, request)

    async def _restore(
        self, key: tuple[str, str], topics: MarketTopics, request: ControlRequest
    ) -> MarketState:
        if key in self.registry.markets:
            await self._close(key, topics, request, publish=False)
        return await self._join(key, topics, request)

    async def _join(self, key: tuple[str, str], topics: MarketTopics, request: ControlRequest) -> MarketState:
        """Agents into a market (opened if needed): checked, their models resolved, rows leased."""
        registry = self.registry
        registry.check_open(key, len(request.agent_ids))
        items = registry.arena.items
        if unknown := sorted(set(request.desired) - set(items)):
            raise MarketError("schema", f"desired items {unknown[:5]} are not among {list(items)}")
        for name, array, shape in (
            ("matrices", request.matrices, (len(items), len(items))),
            ("inventory", request.inventory, (len(items),)),
        ):
            if array is not None and array.shape[1:] != shape:
                raise MarketError("shape", f"{name} has shape {list(array.shape)}, expected [N, {shape}]")
        if request.matrices is not None and not np.allclose(
            np.diagonal(request.matrices, axis1=1, axis2=2), 1.0
        ):
            raise MarketError("range", "starting matrices must have 1 on the diagonal")
        models = registry.resolve_models(request.models, list(self.pool.models))
        rows = await self._free_rows(models)
        async with registry.lock:
            market = registry.markets.get(key)
            if market is None:
                market = registry.new_market(key, topics)
                registry.markets[key] = market
            registry.lease(market, request, models, rows)
            market.last_active = time.monotonic()
            state = market.state(self.pool.current.versions)
        await self._publish_roster(market, state)
        return state

    async def _free_rows(self, models: Sequence[str]) -> list[int]:
        """One free arena row per model; the pool grows (off the loop) for models with none left."""
        free = self.registry.free_by_model()
        short = Counter(models) - Counter({key: len(rows) for key, rows in free.items()})
        if short:
            spares = self.registry.spares(list(short.elements()))
            log.info("markets: %d new row(s) for %s", len(spares), ", ".join(sorted(short)))
            await self.pool.add_agents(spares, {key: self.pool.models[key] for key in short})
            free = self.registry.free_by_model()
            if still := Counter(models) - Counter({key: len(rows) for key, rows in free.items()}):
                raise MarketError(
                    "capacity", f"the session pool could not serve rows for {sorted(still)} (see log)"
                )
        return [free[key].pop(0) for key in models]

    async def _remove(
        self, key: tuple[str, str], topics: MarketTopics, request: ControlRequest
    ) -> MarketState:
        market = self._market(key)
        if unknown := sorted(set(request.agent_ids) - set(market.agent_ids)):
            raise MarketError("unknown_agent", f"not in market {market.name}: {unknown[:5]}")
        async with self.registry.lock:
            self.registry.release(market, request.agent_ids)
            market.last_active = time.monotonic()
            state = market.state(self.pool.current.versions)
        await self._publish_roster(market, state)
        return state

    async def _close(
        self, key: tuple[str, str], topics: MarketTopics, request: ControlRequest | None, publish: bool = True
    ) -> None:
        market = self._market(key)
        async with self.registry.lock:
            self.registry.close(market)
            self.closed.update({k: v for k, v in market.summary().items() if isinstance(v, int)})
        if publish:
            await self.publisher.clear_retained(topics.roster)

    async def _snapshot(
        self, key: tuple[str, str], topics: MarketTopics, request: ControlRequest
    ) -> MarketState:
        market = self._market(key)
        market.last_active = time.monotonic()
        async with self.registry.lock:
            return market.state(self.pool.current.versions)

    def _market(self, key: tuple[str, str]) -> Market:
        market = self.registry.markets.get(key)
        if market is None or market.topics is None:
            raise MarketError("unknown_market", f"market {key[0]}/{key[1]} is not open")
        return market

    # ------------------------------------------------------------------------------------- outbound

    async def _publish_roster(self, market: Market, state: MarketState) -> None:
        if market.topics is not None:
            payload = encode_market_roster(
                market.key[0], market.key[1], self.client_id, self.registry.arena.items, state
            )
            await self.publisher.publish_retained(market.topics.roster, payload)

    def _send_notice(self, market: Market, notice: Notice) -> None:
        if market.topics is not None:
            self._spawn(self.publisher.publish_answer(market.topics.notice, encode_notice(notice), None))

    def _orphan_notice(self, topics: MarketTopics, kind: str, detail: str) -> None:
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

    async def close_idle(self, idle_close_s: float) -> None:
        """Close markets with no tick or request for ``idle_close_s`` (each told by a notice), forever."""
        while True:
            await asyncio.sleep(min(idle_close_s / 4, 30.0))
            for market in list(self.registry.idle(idle_close_s)):
                assert market.topics is not None
                log.info("market %s idle for %.0f s: closed", market.name, idle_close_s)
                await self.publisher.publish_answer(
                    market.topics.notice,
                    encode_notice(
                        Notice(
                            "evicted",
                            market.last_tick,
                            f"no tick or request for {idle_close_s:g} s: closed",
                            0,
                            time.time(),
                        )
                    ),
                    None,
                )
                await self._close(market.key, market.topics, None)

    def stats(self) -> dict[str, Any]:
        """The markets part of the status: limits, each open market, requests and what was dropped."""
        return {
            "limits": self.registry.limits.announce(),
            "open": self.registry.summaries(),
            "closed": dict(self.closed),
            "requests": dict(self.requests),
            "dropped": self.drops.snapshot(),
        }
