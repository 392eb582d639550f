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
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from blockmarket.wire.limits import DropCounter, Limits, ProtocolError
from blockmarket.wire.markets import (
    ControlRequest,
    MarketState,
    Notice,
    Reply,
    decode_control,
    decode_market_roster,
    encode_notice,
    encode_reply,
)
from blockmarket.wire.topics import MarketTopics
from runtime.announcer import ControlPublisher, MarketAnnouncer
from runtime.market import Market, MarketError
from runtime.markets import MarketRegistry
from runtime.sessions import SessionPool

log = logging.getLogger(__name__)

CONTROL_QUEUE = 256  # requests waiting at most; more are refused as overload
HELD_TICKS = 64  # ticks of one market waiting behind its requests at most; the oldest are dropped


@dataclass(frozen=True)
class _Queued:
    """A message waiting for the control task: a request, a replica's roster, or a tick behind them."""

    leaf: str  # control, roster or tick
    topics: MarketTopics
    payload: bytes
    reply_to: tuple[str, bytes] | None
    received_at: float
    retained: bool
    seq: int = 0  # its place among its market's queued messages


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
        self.queue: asyncio.Queue[_Queued] = asyncio.Queue(CONTROL_QUEUE)
        self._waiting: Counter[tuple[str, str]] = Counter()  # queued requests and rosters per market
        self._queued: Counter[tuple[str, str]] = Counter()  # ... ever queued while some waited (seq)
        self._held: dict[tuple[str, str], deque[tuple[int, _Queued]]] = {}  # ticks behind them
        self.requests: Counter[str] = Counter()  # received, done, refused, dropped
        self.drops = DropCounter(log, what="v2 message")  # unknown markets, unreadable requests, overload
        self.closed: Counter[str] = Counter()  # the counters of closed markets, kept in the totals
        self.out = MarketAnnouncer(registry, publisher, client_id)  # notices and rosters

    def receive(
        self,
        topic: str,
        payload: bytes,
        received_at: float,
        retained: bool,
        reply_to: tuple[str, bytes] | None,
    ) -> None:
        """The transport's handler for ``{prefix}/v2/+/+/tick`` and ``/control`` (and, for a replica, the
        markets' ``/roster``): never blocks or raises. A tick waits behind the requests of its market that
        arrived before it (they are applied first, as a single runtime would)."""
        parsed = MarketTopics.parse(self.prefix, topic)
        if parsed is None:
            self.drops.record("bad_topic", f"{topic}: not a market topic of {self.prefix}/v2")
            return
        topics, leaf = parsed
        key = (topics.owner, topics.market)
        if leaf == "tick":
            tick = _Queued("tick", topics, payload, reply_to, received_at, retained)
            if self._waiting[key]:
                self._hold(key, tick)
            else:
                self._tick(tick)
            return
        if leaf == "roster":  # another replica changed the market (or closed it: an empty payload)
            self._enqueue(_Queued("roster", topics, payload, None, received_at, retained))
            return
        self.requests["received"] += 1
        if retained:
            self.requests["dropped"] += 1
            self.drops.record("retained", f"{topic}: a retained request replays the past; not applied")
            return
        self._enqueue(_Queued("control", topics, payload, reply_to, received_at, retained))

    def _tick(self, tick: _Queued) -> None:
        topics = tick.topics
        market = self.registry.markets.get((topics.owner, topics.market))
        if market is None:
            detail = "this market is not open: send an open request first"
            self.drops.record("unknown_market", f"{topics.tick}: {detail}")
            self.out.orphan_notice(topics, "unknown_market", detail)
            return
        market.intake.receive(tick.payload, tick.received_at, tick.retained, tick.reply_to)

    def _enqueue(self, item: _Queued) -> None:
        key = (item.topics.owner, item.topics.market)
        try:
            self.queue.put_nowait(replace(item, seq=self._queued[key] + 1))
        except asyncio.QueueFull:
            if item.leaf == "control":
                self.requests["dropped"] += 1
            what = "request" if item.leaf == "control" else "replica's roster"
            self._overload(item, f"{CONTROL_QUEUE} requests already wait: this {what} was dropped")
            return
        self._queued[key] += 1
        self._waiting[key] += 1

    def _hold(self, key: tuple[str, str], tick: _Queued) -> None:
        """A tick behind requests of its market: it goes to the market once those before it are applied
        (its market's latest-wins slot then counts the overtaken ones). Bounded per market."""
        held = self._held.setdefault(key, deque())
        if len(held) >= HELD_TICKS:
            self._overload(held.popleft()[1], f"{HELD_TICKS} ticks already wait for requests: dropped")
        held.append((self._queued[key], tick))

    def _overload(self, item: _Queued, detail: str) -> None:
        self.drops.record("overload", f"{item.topics.leaf(item.leaf)}: {detail}")
        self.out.orphan_notice(item.topics, "overload", detail)

    async def run(self) -> None:
        """Apply queued requests (and replicas' rosters) in arrival order, forever; a tick queued behind
        them goes to its market once they are applied."""
        while True:
            item = await self.queue.get()
            key = (item.topics.owner, item.topics.market)
            try:
                if item.leaf == "roster":
                    await self.follow(item.topics, item.payload)
                else:
                    await self._answer(item)
            finally:
                self._waiting[key] -= 1
                held = self._held.get(key, deque())
                while held and held[0][0] <= item.seq:  # the ticks that arrived before the next request
                    self._tick(held.popleft()[1])
                if not self._waiting[key]:
                    del self._waiting[key], self._queued[key]
                    self._held.pop(key, None)

    async def _answer(self, item: _Queued) -> None:
        reply = await self.apply(item.topics, item.payload)
        self.requests["done" if reply.ok else "refused"] += 1
        await self.publisher.publish_answer(item.topics.reply, encode_reply(reply), item.reply_to)
        if not reply.ok and reply.error is not None:  # also where the market's notices go
            detail = f"{reply.op} request {reply.request}: {reply.error}"
            self.out.orphan_notice(item.topics, "refused", detail)

    def busy(self) -> bool:
        """Requests, rosters or ticks wait in the queue, or one is being applied."""
        return bool(self._waiting or self._held)

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
        seq = 0
        if key in self.registry.markets:
            seq = self.registry.markets[key].seq
            await self._close(key, topics, request, publish=False)
        return await self._join(key, topics, request, seq=seq)

    async def _join(
        self,
        key: tuple[str, str],
        topics: MarketTopics,
        request: ControlRequest,
        *,
        seq: int = 0,
        publish: bool = True,
    ) -> MarketState:
        """Agents into a market (opened if needed): checked, their models resolved, rows leased.
        ``seq``: a replaced market's roster number (a restore's roster must be newer)."""
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
                market.seq = seq
                registry.markets[key] = market
            registry.lease(market, request, models, rows)
            market.last_active = time.monotonic()
            state = market.state(self.pool.current.versions)
        if publish:
            await self.out.roster(market, state)
        return state

    async def _free_rows(self, models: Sequence[str]) -> list[int]:
        """One free arena row per model; the pool grows (off the loop) for models with none left, by as
        many rows as markets lease of the model already (at least what is missing)."""
        free = self.registry.free_by_model()
        short = Counter(models) - Counter({key: len(rows) for key, rows in free.items()})
        if short:  # grown geometrically: markets opening one after another rebuild units O(log n) times
            leased = self.registry.leased_by_model()
            grow = Counter({key: max(count, leased[key]) for key, count in short.items()})
            spares = self.registry.spares(list(grow.elements()))
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
        await self.out.roster(market, state)
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

    async def follow(self, topics: MarketTopics, payload: bytes) -> None:
        """Replica mode: another replica's roster of a market (newer than ours) becomes ours: agents it
        no longer has are released, new ones leased (their matrices come with every tick), the order
        made its. An empty payload: the market was closed."""
        key = (topics.owner, topics.market)
        market = self.registry.markets.get(key)
        if not payload:
            if market is not None and market.topics is not None:
                await self._close(key, topics, None, publish=False)
            return
        try:
            roster = decode_market_roster(payload, self.control_limits)
        except ProtocolError as exc:
            self.drops.record_error(exc, topics.roster)
            return
        seq = int(roster.get("seq", 0))
        if market is not None and seq <= market.seq:
            return  # one we are past, our own included (a restarted replica's own earlier ones are not)
        agents = list(zip(roster["agent_ids"], roster["desired"], roster["models"], strict=True))
        try:
            await self._become(key, topics, agents)
        except MarketError as exc:
            log.warning("cannot follow market %s/%s as another replica changed it: %s", *key, exc)
            return
        self.registry.markets[key].seq = seq

    async def _become(
        self, key: tuple[str, str], topics: MarketTopics, agents: list[tuple[str, str, str]]
    ) -> None:
        market = self.registry.markets.get(key)
        have: set[tuple[str, str, str]] = set()
        if market is not None:
            state = market.state({})
            have = set(zip(state.agent_ids, state.desired, state.models, strict=True))
            if gone := [a for a, _, _ in have - set(agents)]:
                async with self.registry.lock:
                    self.registry.release(market, gone)
        if new := [agent for agent in agents if agent not in have]:  # (all of them for a market not open)
            ids, desired, models = zip(*new, strict=True)
            await self._join(key, topics, ControlRequest("add", 0, ids, desired, models), publish=False)
        market = self.registry.markets[key]
        order = tuple(a for a, _, _ in agents)
        async with self.registry.lock:  # the roster's order: the market mean sums in it
            market.set_agents(order, [int(r) for r in market.rows_for(order)])

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
