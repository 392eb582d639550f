"""Markets: many game servers' markets served by one runtime, every agent a row of one arena.

The session pool serves one :class:`~runtime.agents.AgentPopulation`, the *arena*. A :class:`Market` is a
set of its rows with its own agent ids, tick slot, ledger and notices, so two markets may use the same
agent ids and never share state, and a tick of one market never displaces another's. Agents of any
market that run the same model share that model's weight set in the pack, so the ticks of several markets
can go through one ``session.run`` per unit (runtime.scheduler).

Rows are leased, not deleted: an agent that leaves frees its row for a later agent of the same model,
and the arena keeps ``spare_rows`` free rows for every repository model the default market does not use,
so opening a market of repository models needs no new session. Only a model with no free row left makes
the pool grow (built off the event loop while every market keeps being served).

The v1 tick topic is the *default market*: the configured roster (``runtime.num_agents``), plus the
agents hot reload adds. Its ids are the plain agent ids; the arena labels every other row with an
unprintable prefix, which no tick can name.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace

import numpy as np

from blockmarket.core.config import Config
from blockmarket.core.state import initial_inventory, initial_matrices
from blockmarket.models.files import ModelInfo
from blockmarket.wire.limits import Limits
from blockmarket.wire.markets import ROUND_ROBIN, ControlRequest, Notice
from blockmarket.wire.topics import MarketTopics, Topics
from runtime.agents import AgentPopulation
from runtime.intake import AcceptedTick, TickIntake
from runtime.market import (
    DEFAULT_KEY,
    FREE,
    UNNAMEABLE,
    Market,
    MarketError,
    MarketLimits,
    free_rows,
    spare_models,
)

log = logging.getLogger(__name__)


class MarketRegistry:
    """The open markets over one arena: who is pending, and the control operations (between ticks)."""

    def __init__(
        self,
        arena: AgentPopulation,
        *,
        limits: MarketLimits,
        tick_limits: Limits,
        notice_rate_hz: float = 20.0,
        seed: int = 0,
    ) -> None:
        self.arena = arena
        self.limits = limits
        self.tick_limits = tick_limits
        self.notice_rate_hz = notice_rate_hz
        self.rng = np.random.default_rng([seed, 2])
        self.markets: dict[tuple[str, str], Market] = {}
        self.pending: dict[tuple[str, str], Market] = {}
        self.wakeup = asyncio.Event()
        self.lock = asyncio.Lock()  # held while a batch is served and while a request changes rows
        self.default: Market | None = None  # the v1 tick topic's (set_default)
        self._known_rows = len(arena)
        self.on_notice: Callable[[Market, Notice], None] | None = None  # publishes (runtime.control)
        self.carried_state = False  # replica mode: v2 ticks carry their agents' matrices (docs/deploy.md)

    @classmethod
    def single(cls, intake: TickIntake) -> MarketRegistry:
        """One default market around an existing intake (no v2 markets: a test's or a v1 scheduler's)."""
        arena = intake.population
        if not isinstance(arena, AgentPopulation):
            raise TypeError("a single-market registry serves an AgentPopulation")
        registry = cls(arena, limits=MarketLimits(), tick_limits=intake.limits)
        registry.set_default(registry.new_market(DEFAULT_KEY, None, intake=intake), len(arena))
        return registry

    def new_market(
        self,
        key: tuple[str, str],
        topics: MarketTopics | None,
        *,
        intake: TickIntake | None = None,
        limits: Limits | None = None,
        topic: str | None = None,
    ) -> Market:
        """A market whose ticks wake the scheduler and whose refusals become notices (not yet open:
        the caller registers it)."""
        market: Market

        def pending() -> None:
            self.mark_pending(market)

        market = Market(key, topics, self.arena, limits or self.tick_limits, pending, self.notice_rate_hz,
                        intake=intake, topic=topic)  # fmt: skip
        market.intake.on_refused = lambda kind, tick, detail: self.notify(market, kind, tick, detail)
        market.intake.carried_state = self.carried_state and topics is not None
        return market

    def set_default(self, market: Market, rows: int) -> None:
        """``market`` serves the v1 tick topic with the arena's first ``rows`` rows."""
        market.set_agents(self.arena.agent_ids[:rows], range(rows))
        self.default = market
        self.markets[DEFAULT_KEY] = market

    def notify(self, market: Market, kind: str, tick: int | None, detail: str) -> None:
        """A tick of ``market`` gets no answer: a notice, if the market's rate allows (else counted)."""
        if market.topics is None or self.on_notice is None:
            return
        notice = market.notices.admit(kind, tick, detail)
        if notice is not None:
            self.on_notice(market, notice)

    def close(self, market: Market) -> None:
        """Free the market's rows and forget it; a tick still waiting for it is counted as skipped."""
        self.release(market, market.agent_ids)
        del self.markets[market.key]
        self.pending.pop(market.key, None)
        if market.intake.slot.take_now() is not None:
            market.intake.ledger.skip_waiting()

    def mark_pending(self, market: Market) -> None:
        self.pending[market.key] = market
        self.wakeup.set()

    async def take_batch(
        self, window_s: float = 0.0, batching: bool = True
    ) -> list[tuple[Market, AcceptedTick]]:
        """The markets' waiting ticks: all of them (after ``window_s`` for more to arrive), or the
        longest-waiting one alone when ``batching`` is off."""
        while True:
            while not self.pending:
                self.wakeup.clear()
                await self.wakeup.wait()
            if window_s > 0 and batching:
                await asyncio.sleep(window_s)
            keys = list(self.pending) if batching else [next(iter(self.pending))]
            batch = []
            for key in keys:
                market = self.pending.pop(key)
                accepted = market.intake.slot.take_now()
                if accepted is not None and self.markets.get(key) is market:
                    batch.append((market, accepted))
            if batch:
                return batch

    def adopt_new_rows(self) -> None:
        """Rows that hot reload appended for new checkpoints join the default market (free rows stay free)."""
        count = len(self.arena)
        if count == self._known_rows:
            return
        labels = self.arena.agent_ids
        fresh = [r for r in range(self._known_rows, count) if not labels[r].startswith(UNNAMEABLE)]
        self._known_rows = count
        default = self.default
        if fresh and default is not None:
            default.set_agents(
                default.agent_ids + tuple(self.arena.agent_ids[r] for r in fresh),
                [*map(int, default.rows), *fresh],
            )

    # ------------------------------------------------------------------------------------- requests

    def live_agents(self) -> int:
        return sum(len(m) for m in self.markets.values())

    def free_by_model(self) -> dict[str, list[int]]:
        """Model key -> its rows that no agent leases."""
        free: dict[str, list[int]] = {}
        for row, (label, key) in enumerate(zip(self.arena.agent_ids, self.arena.model_keys, strict=True)):
            if label.startswith(FREE):
                free.setdefault(key, []).append(row)
        return free

    def leased_by_model(self) -> Counter[str]:
        """Model key -> the rows of it that v2 markets' agents lease."""
        keys = self.arena.model_keys
        return Counter(keys[int(r)] for m in self.markets.values() if m.topics is not None for r in m.rows)

    def resolve_models(self, selectors: Sequence[str], repository: Sequence[str]) -> list[str]:
        """Model names for selectors: a name of the repository, or ROUND_ROBIN (the model with the fewest
        live agents, first in repository order on a tie)."""
        known = set(repository)
        if unknown := sorted({s for s in selectors if s != ROUND_ROBIN and s not in known}):
            raise MarketError("unknown_model", f"no model {unknown[0]!r} in the repository (nor a selector)")
        live = Counter(
            key
            for label, key in zip(self.arena.agent_ids, self.arena.model_keys, strict=True)
            if not label.startswith(FREE)
        )
        live.update(s for s in selectors if s != ROUND_ROBIN)  # named ones count before any is drawn
        fewest = [(live[key], order, key) for order, key in enumerate(repository)]
        heapq.heapify(fewest)
        chosen = []
        for selector in selectors:
            if selector != ROUND_ROBIN:
                chosen.append(selector)
                continue
            count, order, key = heapq.heappop(fewest)
            heapq.heappush(fewest, (count + 1, order, key))
            chosen.append(key)
        return chosen

    def check_open(self, key: tuple[str, str], count: int) -> None:
        if (
            key not in self.markets
            and len(self.markets) - (self.default is not None) >= self.limits.max_markets
        ):
            raise MarketError(
                "limit", f"{self.limits.max_markets} markets are open (runtime.markets.max_markets)"
            )
        self.check_agents(key, count)

    def check_agents(self, key: tuple[str, str], added: int) -> None:
        market = self.markets.get(key)
        size = (len(market) if market is not None else 0) + added
        if size > self.limits.max_agents_per_market:
            raise MarketError(
                "limit",
                f"{size} agents in one market > {self.limits.max_agents_per_market} (max_agents_per_market)",
            )
        total = self.live_agents() + added
        if total > self.limits.max_agents:
            raise MarketError("limit", f"{total} agents in all > {self.limits.max_agents} (max_agents)")

    def lease(
        self,
        market: Market,
        request: ControlRequest,
        models: Sequence[str],
        rows: Sequence[int],
    ) -> None:
        """Give ``request``'s agents the free ``rows`` (one per model) with their starting state."""
        items = {item: i for i, item in enumerate(self.arena.items)}
        count = len(rows)
        index = np.asarray(rows, dtype=np.int64)
        matrices = (
            np.asarray(request.matrices, dtype=np.float32)
            if request.matrices is not None
            else initial_matrices(self.rng, count, len(items))
        )
        inventory = (
            np.asarray(request.inventory, dtype=np.float32)
            if request.inventory is not None
            else initial_inventory(self.rng, count, len(items))
        )
        self.arena.relabel(index, [market.arena_id(a) for a in request.agent_ids])
        self.arena.reset(index, [items[d] for d in request.desired], matrices, inventory)
        if request.success_rate is not None:
            self.arena.success_rate[index] = request.success_rate
        market.set_agents(market.agent_ids + request.agent_ids, [*map(int, market.rows), *rows])

    def release(self, market: Market, agent_ids: Sequence[str]) -> None:
        """Free the rows of these agents of ``market`` (the rest keep their rows and state)."""
        gone = set(agent_ids)
        rows = [int(r) for r in market.rows_for(tuple(agent_ids))]
        self.arena.relabel(rows, [f"{FREE}{r}" for r in rows])
        keep = [(a, r) for a, r in zip(market.agent_ids, market.rows, strict=True) if a not in gone]
        market.set_agents([a for a, _ in keep], [int(r) for _, r in keep])

    def spares(self, models: Sequence[str]) -> AgentPopulation:
        """Free rows to append to the arena, one per entry of ``models``."""
        return free_rows(models, len(self.arena), self.arena.items, self.rng)

    def idle(self, older_than_s: float) -> Iterator[Market]:
        """Open v2 markets with no tick or request for ``older_than_s``."""
        now = time.monotonic()
        for market in list(self.markets.values()):
            if market.topics is not None and now - market.last_active > older_than_s:
                yield market

    def summaries(self) -> list[dict[str, object]]:
        return [m.summary() for m in self.markets.values() if m.topics is not None]


def with_spare_rows(population: AgentPopulation, models: Sequence[ModelInfo], config: Config) -> int:
    """Append the free rows markets start from (runtime.markets.spare_rows per model the default market
    does not use); returns how many rows the default market has (the first ones)."""
    default_rows, markets = len(population), config.runtime.markets
    if markets.enabled and markets.spare_rows:
        spares = spare_models(models, population.model_keys, markets.spare_rows)
        if spares:
            rng = np.random.default_rng([config.runtime.seed, 1])
            population.extend(free_rows(spares, default_rows, population.items, rng))
    return default_rows


def open_markets(config: Config, arena: AgentPopulation, default_rows: int) -> MarketRegistry:
    """The markets over the arena: the v1 default market (its first ``default_rows`` rows, on the v1
    tick topic with the v1 limits) and room for the v2 ones that runtime.markets allows."""
    markets = config.runtime.markets
    limits = Limits.from_config(config.mqtt, num_agents=default_rows, num_items=arena.num_items)
    registry = MarketRegistry(
        arena,
        limits=MarketLimits(markets.max_markets, markets.max_agents_per_market, markets.max_agents),
        tick_limits=replace(limits, max_agents=markets.max_agents_per_market),
        notice_rate_hz=markets.notice_rate_hz,
        seed=config.runtime.seed,
    )
    v1_topic = Topics(config.mqtt.topic_prefix).tick
    registry.set_default(registry.new_market(DEFAULT_KEY, None, limits=limits, topic=v1_topic), default_rows)
    return registry
