"""One market of the runtime: a set of arena rows with its own agent ids, tick intake and notices.

The session pool serves one :class:`~runtime.agents.AgentPopulation`, the *arena*; every market's agents
are rows of it (runtime.markets keeps the markets and leases the rows). A row no agent leases is
labelled ``FREE`` + its number; a v2 market's rows are labelled with an unprintable prefix too, so no
label can clash with the default market's plain agent ids (a tick names agents through its market's own
ids, never through the labels).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from blockmarket.core.state import IntArray, initial_inventory, initial_matrices
from blockmarket.models.files import ModelInfo
from blockmarket.wire.limits import PROTOCOL_VERSION, Limits
from blockmarket.wire.markets import VERSION, MarketState, Notice
from blockmarket.wire.topics import MarketTopics
from runtime.agents import AgentPopulation, RosterError
from runtime.intake import TickIntake

UNNAMEABLE = "\x00"  # starts every arena label that is not a default-market agent id (unprintable)
FREE = f"{UNNAMEABLE}free:"  # the label of a row no agent leases
DEFAULT_KEY = ("", "default")


class MarketError(Exception):
    """A control request the runtime refuses; ``kind`` says which rule (limit, schema, unknown_agent...)."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


@dataclass(frozen=True)
class MarketLimits:
    """runtime.markets' limits, announced in the status."""

    max_markets: int = 64
    max_agents_per_market: int = 1000
    max_agents: int = 10_000

    def announce(self) -> dict[str, int]:
        return {
            "max_markets": self.max_markets,
            "max_agents_per_market": self.max_agents_per_market,
            "max_agents": self.max_agents,
        }


class NoticeGate:
    """At most ``rate_hz`` notices per second per market (a burst of one second's worth); the rest are
    counted and reported in the next notice that passes."""

    def __init__(self, rate_hz: float) -> None:
        self.rate_hz = rate_hz
        self._tokens = rate_hz
        self._at = time.monotonic()
        self.suppressed = 0

    def admit(self, kind: str, tick: int | None, detail: str) -> Notice | None:
        now = time.monotonic()
        self._tokens = min(self.rate_hz, self._tokens + (now - self._at) * self.rate_hz)
        self._at = now
        if self._tokens < 1.0:
            self.suppressed += 1
            return None
        self._tokens -= 1.0
        notice = Notice(kind, tick, detail, self.suppressed, time.time())
        self.suppressed = 0
        return notice


class Market:
    """One market: its agents (arena rows), its tick intake and its notices."""

    def __init__(
        self,
        key: tuple[str, str],
        topics: MarketTopics | None,
        arena: AgentPopulation,
        limits: Limits,
        on_put: Callable[[], None],
        notice_rate_hz: float,
        *,
        intake: TickIntake | None = None,
        topic: str | None = None,
    ) -> None:
        """``intake``: an existing one to serve (a single-market scheduler's); else one is made, for
        ``topics.tick`` (v2) or ``topic`` (the default market's v1 tick topic)."""
        self.key = key
        self.topics = topics  # None: the v1 default market
        self.arena = arena
        self.agent_ids: tuple[str, ...] = ()
        self.rows: IntArray = np.empty(0, dtype=np.int64)
        self._row_of: dict[str, int] = {}
        self._cache: tuple[tuple[str, ...], IntArray] | None = None
        if intake is None:
            name = topics.tick if topics is not None else topic or "v1 tick topic"
            version = VERSION if topics is not None else PROTOCOL_VERSION
            intake = TickIntake(self, limits, name, version=version)
        intake.slot.on_put = on_put
        self.intake = intake
        self.notices = NoticeGate(notice_rate_hz)
        self.last_active = time.monotonic()
        self.last_tick: int | None = None
        self.seq = 0  # roster changes so far (the retained roster's seq: replicas take newer ones)
        # (pool generation, the agent ids ticked, their models' versions): the answers' model_versions
        self.versions_cache: tuple[int, tuple[str, ...], dict[str, str]] | None = None

    @property
    def name(self) -> str:
        owner, market = self.key
        return f"{owner}/{market}" if owner else market

    def __len__(self) -> int:
        return len(self.agent_ids)

    def rows_for(self, agent_ids: tuple[str, ...]) -> IntArray:
        """Arena rows of a tick's agents (cached while the game server sends the same roster)."""
        self.last_active = time.monotonic()
        if self._cache is not None and (agent_ids is self._cache[0] or agent_ids == self._cache[0]):
            return self._cache[1]
        unknown = [a for a in agent_ids if a not in self._row_of]
        if unknown:
            shown = ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
            raise RosterError(f"{len(unknown)} agent id(s) not in market {self.name}: {shown}")
        rows = np.fromiter((self._row_of[a] for a in agent_ids), dtype=np.int64, count=len(agent_ids))
        self._cache = (agent_ids, rows)
        return rows

    def set_agents(self, agent_ids: Sequence[str], rows: Sequence[int]) -> None:
        self.agent_ids = tuple(agent_ids)
        self.rows = np.asarray(rows, dtype=np.int64)
        self._row_of = dict(zip(self.agent_ids, map(int, self.rows), strict=True))
        self._cache = None

    def arena_id(self, agent_id: str) -> str:
        """The row label of one of this market's agents (the default market's are the plain ids)."""
        owner, market = self.key
        return f"{UNNAMEABLE}{owner}/{market}/{agent_id}" if self.topics is not None else agent_id

    def whole_arena(self) -> bool:
        """True when this market's agents are every arena row in order (the v1 fast path)."""
        rows, count = self.rows, len(self.arena)
        return len(rows) == count and (count == 0 or (rows[0] == 0 and rows[-1] == count - 1))

    def state(self, versions: dict[str, str]) -> MarketState:
        arena, rows = self.arena, self.rows
        models = tuple(arena.model_keys[r] for r in rows)
        return MarketState(
            self.agent_ids,
            tuple(arena.items[int(d)] for d in arena.desired[rows]),
            models,
            arena.matrices[rows].copy(),
            arena.inventory[rows].copy(),
            arena.success_rate[rows].copy(),
            {key: versions[key] for key in set(models) if key in versions},
            self.last_tick,
        )

    def summary(self) -> dict[str, object]:
        stats = self.intake.ledger.stats()
        return {
            "owner": self.key[0],
            "market": self.key[1],
            "agents": len(self),
            "ticks_received": stats["ticks_received"],
            "ticks_served": stats["ticks_served"],
            "ticks_skipped": stats["ticks_skipped"],
            "ticks_dropped": sum(stats["dropped"].values()),
            "ticks_unpublished": stats["ticks_unpublished"],
            "inference_errors": stats["inference_errors"],
            "ticks_in_flight": stats["ticks_in_flight"],
            "notices_suppressed": self.notices.suppressed,
        }


def spare_models(models: Sequence[ModelInfo], used: Sequence[str], spares: int) -> list[str]:
    """Model keys of the free rows the arena starts with: ``spares`` for every model the default market
    does not use."""
    taken = set(used)
    return [m.key for m in models if m.key not in taken for _ in range(spares)]


def free_rows(
    models: Sequence[str], first: int, items: Sequence[str], rng: np.random.Generator
) -> AgentPopulation:
    """Rows no agent leases yet, one per entry of ``models``, labelled as free from row ``first`` on."""
    count, n = len(models), len(items)
    return AgentPopulation(
        [f"{FREE}{first + i}" for i in range(count)],
        items,
        np.zeros(count, dtype=np.int64),
        list(models),
        initial_matrices(rng, count, n),
        initial_inventory(rng, count, n),
    )
