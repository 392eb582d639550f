"""What `blockmarket simulate` publishes for watchers (the dashboard): the market as the game side sees it.

Topic ``{prefix}/view/market``, MessagePack like every message of the protocol (docs/protocol.md §12),
not retained, QoS 0, at most every :data:`VIEW_INTERVAL_S`: agent positions, desired items and fitness,
the trades executed since the previous view, and the game-side figures (fitness, trades, latency).

Bounded in size whatever the market: at most :data:`VIEW_MAX_AGENTS` agents (an evenly spaced sample of
the rows, the same every time; ``agents_total`` says how many there are) and the last
:data:`VIEW_MAX_TRADES` trades between sampled agents (``trades_total`` counts all of them). If the
message still exceeds ``mqtt.max_payload_bytes`` the sample is halved until it fits (logged once).
About 30 bytes per sampled agent: 60 KB at 2000 agents, twice a second.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from blockmarket.core.config import Config
from blockmarket.core.state import FloatArray
from blockmarket.market.rules import MarketPopulation, TradeStats, fitness
from blockmarket.wire.codec import array_field, float_field, int_field, unpack
from blockmarket.wire.limits import WIRE_DTYPE, Limits, ProtocolError
from blockmarket.wire.messages import pack_message
from blockmarket.wire.topics import DEFAULT_MARKET

log = logging.getLogger(__name__)

VIEW_INTERVAL_S = 0.5
VIEW_MAX_AGENTS = 2000
VIEW_MAX_TRADES = 500
VIEW_KIND = "market_view"
_FIGURES = ("fitness_mean", "fitness_max", "latency_p50_ms", "latency_p99_ms", "runtime_latency_p50_ms")
_KEYS = frozenset(
    {"market", "tick", "published_at", "agents_total", "world_size", "items", "agent_ids", "positions",
     "desired", "fitness", "trades", "trades_total", "ticks_sent", "answered", *_FIGURES}
)  # fmt: skip


def view_topic(prefix: str) -> str:
    return f"{prefix}/view/market"


@dataclass(frozen=True)
class MarketView:
    """One view message: a sample of the agents and the trades between them since the previous one."""

    market: str
    tick: int
    published_at: float
    agents_total: int
    world_size: float
    items: tuple[str, ...]
    agent_ids: tuple[str, ...]  # the sample, K agents
    positions: FloatArray  # [K, 2], world coordinates in [0, world_size]
    desired: npt.NDArray[np.int64]  # [K] item index
    fitness: FloatArray  # [K]
    trades: npt.NDArray[np.int64]  # [T, 2]: (requester, target) rows into agent_ids
    trades_total: int  # trades in the whole market since the previous view (drawn or not)
    ticks_sent: int
    answered: int
    figures: Mapping[str, float | None]  # fitness mean/max, game-side and runtime latency

    def to_json(self) -> dict[str, Any]:
        """JSON-able, rounded for the page."""
        return {
            "market": self.market,
            "tick": self.tick,
            "published_at": self.published_at,
            "agents_total": self.agents_total,
            "world_size": self.world_size,
            "items": list(self.items),
            "agent_ids": list(self.agent_ids),
            "positions": np.round(self.positions, 2).tolist(),
            "desired": self.desired.tolist(),
            "fitness": np.round(self.fitness, 3).tolist(),
            "trades": self.trades.tolist(),
            "trades_total": self.trades_total,
            "ticks_sent": self.ticks_sent,
            "answered": self.answered,
            **self.figures,
        }


def _wire(values: npt.ArrayLike) -> dict[str, Any]:
    """A protocol array (docs/protocol.md §2), float32; empty arrays included (no trades)."""
    data = np.ascontiguousarray(values, dtype=WIRE_DTYPE)
    return {"dtype": WIRE_DTYPE, "shape": list(data.shape), "data": data.tobytes()}


def encode_view(view: MarketView) -> bytes:
    return pack_message(
        VIEW_KIND,
        {
            "market": view.market,
            "tick": int(view.tick),
            "published_at": float(view.published_at),
            "agents_total": int(view.agents_total),
            "world_size": float(view.world_size),
            "items": list(view.items),
            "agent_ids": list(view.agent_ids),
            "positions": _wire(view.positions),
            "desired": _wire(view.desired),
            "fitness": _wire(view.fitness),
            "trades": _wire(view.trades.reshape(-1, 2)),
            "trades_total": int(view.trades_total),
            "ticks_sent": int(view.ticks_sent),
            "answered": int(view.answered),
            **{key: None if value is None else float(value) for key, value in view.figures.items()},
        },
    )


def decode_view(payload: bytes, limits: Limits) -> MarketView:
    """Parse and check a view message (untrusted: from MQTT); raises ProtocolError."""
    data = unpack(payload, limits, VIEW_KIND, _KEYS, frozenset())
    ids, items = data["agent_ids"], data["items"]
    if not (isinstance(ids, list) and all(isinstance(a, str) for a in ids)):
        raise ProtocolError("schema", "agent_ids must be an array of strings")
    if not (isinstance(items, list) and items and all(isinstance(i, str) for i in items)):
        raise ProtocolError("schema", "items must be a non-empty array of strings")
    if not isinstance(data["market"], str):
        raise ProtocolError("schema", "market must be a string")
    k = len(ids)
    plain = Limits(max_payload_bytes=limits.max_payload_bytes, max_agents=limits.max_agents)
    positions = array_field(data, "positions", (k, 2), plain)
    desired = array_field(data, "desired", (k,), plain)
    scores = array_field(data, "fitness", (k,), plain)
    trades = array_field(data, "trades", (_leading(data["trades"]), 2), plain)
    for name, values in (("positions", positions), ("fitness", scores), ("trades", trades)):
        if not np.isfinite(values).all():
            raise ProtocolError("non_finite", f"{name} has NaN or infinite values")
    if len(desired) and (desired.min() < 0 or desired.max() >= len(items)):
        raise ProtocolError("range", "desired holds an item index outside items")
    if len(trades) and (trades.min() < 0 or trades.max() >= k):
        raise ProtocolError("range", "trades name an agent outside agent_ids")
    figures = {key: _figure(data, key) for key in _FIGURES}
    return MarketView(
        market=data["market"],
        tick=int_field(data, "tick", limits.max_tick),
        published_at=float_field(data, "published_at", limits.max_time_s),
        agents_total=int_field(data, "agents_total", 2**31),
        world_size=float_field(data, "world_size"),
        items=tuple(items),
        agent_ids=tuple(ids),
        positions=positions,
        desired=desired.astype(np.int64),
        fitness=scores,
        trades=trades.astype(np.int64),
        trades_total=int_field(data, "trades_total", 2**53),
        ticks_sent=int_field(data, "ticks_sent", 2**53),
        answered=int_field(data, "answered", 2**53),
        figures=figures,
    )


def _leading(array: Any) -> int:
    """The first dimension a wire array declares (checked in full by array_field)."""
    shape = array.get("shape") if isinstance(array, dict) else None
    return shape[0] if isinstance(shape, list) and shape and type(shape[0]) is int else 0


def _figure(data: Mapping[str, Any], key: str) -> float | None:
    """A finite number of either sign (fitness can fall), or nil."""
    value = data[key]
    if value is None:
        return None
    if type(value) is not float and type(value) is not int:
        raise ProtocolError("schema", f"{key} must be a number or nil, got {type(value).__name__}")
    if not np.isfinite(value):
        raise ProtocolError("non_finite", f"{key} is {value}")
    return float(value)


class Summary(Protocol):
    """What the view takes from the simulator's live summary (simulation.SimulationSummary)."""

    @property
    def ticks_sent(self) -> int: ...
    @property
    def answered(self) -> int: ...
    @property
    def fitness_mean(self) -> float: ...
    @property
    def fitness_max(self) -> float: ...
    @property
    def latency_p50_ms(self) -> float | None: ...
    @property
    def latency_p99_ms(self) -> float | None: ...
    @property
    def runtime_latency_p50_ms(self) -> float | None: ...


class Link(Protocol):
    async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> bool: ...


class ViewPublisher:
    """Collects the trades between two views (called from the simulator's step) and publishes the view."""

    def __init__(
        self,
        config: Config,
        population: MarketPopulation,
        start_inventory: FloatArray,
        *,
        market: str = DEFAULT_MARKET,
        interval_s: float = VIEW_INTERVAL_S,
        max_agents: int = VIEW_MAX_AGENTS,
    ) -> None:
        self.topic = view_topic(config.mqtt.topic_prefix)
        self.config = config
        self.population = population
        self.start_inventory = start_inventory
        self.market = market
        self.interval_s = interval_s
        self.limit = config.mqtt.max_payload_bytes
        self._sample(min(population.size, max_agents))
        self._trades: list[npt.NDArray[np.int64]] = []
        self._trades_total = 0
        self._next_at = 0.0
        self.published = 0

    def _sample(self, count: int) -> None:
        size = self.population.size
        self.rows = np.unique(np.linspace(0, size - 1, max(count, 1)).round().astype(np.int64))
        self._index = np.full(size, -1, dtype=np.int64)
        self._index[self.rows] = np.arange(len(self.rows))

    def record(self, stats: TradeStats) -> None:
        """One market step's trades (the simulator's step; runs on its worker thread, never concurrently
        with :meth:`publish_due`)."""
        self._trades_total += stats.trades
        if not stats.trades:
            return
        pairs = np.stack([self._index[stats.requester], self._index[stats.target]], axis=1)
        pairs = pairs[(pairs >= 0).all(axis=1)]
        if len(pairs):
            self._trades.append(pairs)
            while sum(len(t) for t in self._trades) > 2 * VIEW_MAX_TRADES:
                self._trades.pop(0)

    async def publish_due(self, link: Link, tick: int, summary: Callable[..., Summary]) -> bool:
        """Publish a view if :attr:`interval_s` has passed since the last one."""
        now = time.monotonic()
        if now < self._next_at:
            return False
        self._next_at = now + self.interval_s
        payload = self.encode(tick, summary())
        self._trades, self._trades_total = [], 0
        sent = await link.publish(self.topic, payload)
        self.published += sent
        return sent

    def encode(self, tick: int, summary: Summary) -> bytes:
        """The view for now, its sample halved until it fits mqtt.max_payload_bytes."""
        while True:
            payload = encode_view(self.view(tick, summary))
            if len(payload) <= self.limit or len(self.rows) <= 1:
                return payload
            log.warning(
                "market view of %d agents is %d bytes > mqtt.max_payload_bytes %d: sampling %d agents",
                len(self.rows), len(payload), self.limit, len(self.rows) // 2,
            )  # fmt: skip
            self._sample(len(self.rows) // 2)
            self._trades = []

    def view(self, tick: int, summary: Summary) -> MarketView:
        pop, rows = self.population, self.rows
        trades = (
            np.concatenate(self._trades)[-VIEW_MAX_TRADES:] if self._trades else np.zeros((0, 2), np.int64)
        )
        return MarketView(
            market=self.market,
            tick=tick,
            published_at=time.time(),
            agents_total=pop.size,
            world_size=self.config.environment.world_size,
            items=self.config.environment.items_list,
            agent_ids=tuple(pop.agent_ids[r] for r in rows),
            positions=pop.positions[rows],
            desired=pop.desired[rows],
            fitness=fitness(pop, self.start_inventory)[rows].astype(np.float32),
            trades=trades,
            trades_total=self._trades_total,
            ticks_sent=summary.ticks_sent,
            answered=summary.answered,
            figures={key: getattr(summary, key) for key in _FIGURES},
        )
