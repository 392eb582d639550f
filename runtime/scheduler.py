"""The per-tick pipeline: latest tick wins, one inference per model group, one answer message per tick.

``on_tick`` only drops the raw payload into a one-place slot (a newer tick overwrites an unserved one and
the overwritten tick is counted as skipped), so a slow tick never builds a queue. One serving task
takes the newest payload and runs decode -> states [N, D] -> pool inference -> update rule -> encode ->
publish, all vectorized over agents, and records the receive -> publish latency.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from dataclasses import replace
from typing import Any, Protocol

import numpy as np

from runtime.agents import AgentPopulation, RosterError
from runtime.protocol import (
    DropCounter,
    Limits,
    MatricesMessage,
    ProtocolError,
    decode_tick,
    encode_agent_matrices,
    encode_matrices,
)
from runtime.sessions import PoolGeneration, SessionPool
from runtime.state import FloatArray, state_dim

log = logging.getLogger(__name__)

LATENCY_WINDOW = 1024  # ticks in the sliding latency window


class Publisher(Protocol):
    """The outbound half of the transport (runtime.transport.RuntimeTransport satisfies it)."""

    async def publish_matrices(self, payload: bytes) -> bool: ...

    async def publish_agent_matrix(self, agent_id: str, payload: bytes) -> bool: ...


class TickSlot:
    """A one-place mailbox: put never blocks and replaces what is unread; take waits for the newest."""

    def __init__(self) -> None:
        self._item: tuple[bytes, float] | None = None
        self._ready = asyncio.Event()
        self.overwritten = 0

    def put(self, payload: bytes, received_at: float) -> None:
        if self._item is not None:
            self.overwritten += 1
        self._item = (payload, received_at)
        self._ready.set()

    async def take(self) -> tuple[bytes, float]:
        while self._item is None:
            self._ready.clear()
            await self._ready.wait()
        item, self._item = self._item, None
        return item


class LatencyWindow:
    """Receive -> publish latencies of the last ticks, for p50/p99 in logs and status."""

    def __init__(self, size: int = LATENCY_WINDOW) -> None:
        self._samples: deque[float] = deque(maxlen=size)

    def add(self, latency_ms: float) -> None:
        self._samples.append(latency_ms)

    def percentiles(self) -> tuple[float | None, float | None]:
        if not self._samples:
            return None, None
        p50, p99 = np.percentile(np.fromiter(self._samples, dtype=np.float64), [50, 99])
        return round(float(p50), 3), round(float(p99), 3)


class TickScheduler:
    """Serves market ticks for one population through one session pool."""

    def __init__(
        self,
        population: AgentPopulation,
        pool: SessionPool,
        publisher: Publisher,
        *,
        limits: Limits,
        alpha: float,
        tick_topic: str,
        per_agent_topics: bool = False,
        drops: DropCounter | None = None,
        slot: TickSlot | None = None,
    ) -> None:
        self.population = population
        self.pool = pool
        self.publisher = publisher
        self.limits = limits
        self.alpha = alpha
        self.tick_topic = tick_topic
        self.per_agent_topics = per_agent_topics
        self.drops = drops or DropCounter(log, what=f"tick on {tick_topic}")
        self.slot = slot or TickSlot()
        self.latency = LatencyWindow()
        self.ticks_served = 0
        self.unpublished = 0
        self.inference_errors = 0
        self._states = np.empty((len(population), 0), dtype=np.float32)
        self._versions: tuple[int, dict[str, str]] = (-1, {})

    @property
    def ticks_skipped(self) -> int:
        return self.slot.overwritten

    def on_tick(self, payload: bytes, received_at: float) -> None:
        """The transport's callback: O(1), never blocks, never raises."""
        self.slot.put(payload, received_at)

    async def run(self) -> None:
        """Serve the newest tick, forever (until cancelled)."""
        while True:
            payload, received_at = await self.slot.take()
            await self.serve(payload, received_at)

    async def serve(self, payload: bytes, received_at: float) -> MatricesMessage | None:
        """One tick end to end; a refused or failed tick is counted and logged, never raised."""
        population = self.population
        try:
            tick = decode_tick(payload, self._tick_limits())
            rows = population.rows_for(tick.agent_ids)
        except ProtocolError as exc:
            self.drops.record_error(exc, self.tick_topic)
            return None
        except RosterError as exc:
            self.drops.record("unknown_agent", f"{self.tick_topic}: tick {tick.tick}: {exc}")
            return None
        population.observe(rows, tick.inventory, tick.successful, tick.attempted)
        states = population.states(tick.market_mean, out=self._state_buffer())
        try:
            generation = self.pool.current  # a swap during this tick serves the next one
            proposals = await self.pool.infer(states, generation)
        except Exception:  # an ORT failure on one tick must not stop serving the next
            self.inference_errors += 1
            log.exception("tick %d: inference failed; agents keep their matrices", tick.tick)
            return None
        matrices = population.update(rows, proposals, self.alpha)
        msg = MatricesMessage(
            tick=tick.tick,
            sent_at=tick.sent_at,
            served_at=time.time(),
            agent_ids=tick.agent_ids,
            matrices=matrices,
            latency_ms=(time.perf_counter() - received_at) * 1e3,
            model_versions=self._model_versions(generation),
        )
        published = await self.publisher.publish_matrices(encode_matrices(msg))
        if self.per_agent_topics:
            for agent_id, agent_payload in encode_agent_matrices(msg):
                await self.publisher.publish_agent_matrix(agent_id, agent_payload)
        if published:
            self.ticks_served += 1
            self.latency.add((time.perf_counter() - received_at) * 1e3)
        else:
            self.unpublished += 1
        return msg

    def _tick_limits(self) -> Limits:
        """A tick names at most the agents served, and their number grows when new models join."""
        if self.limits.max_agents < len(self.population):
            self.limits = replace(self.limits, max_agents=len(self.population))
        return self.limits

    def _state_buffer(self) -> FloatArray:
        """Reuse one [N, D] buffer across ticks (reallocated only when the roster grows)."""
        dim = state_dim(self.population.num_items)
        if self._states.shape != (len(self.population), dim):
            self._states = np.empty((len(self.population), dim), dtype=np.float32)
        return self._states

    def _model_versions(self, generation: PoolGeneration) -> dict[str, str]:
        """The versions of the generation that served the tick (cached per generation)."""
        if self._versions[0] != generation.number:
            self._versions = (generation.number, generation.versions)
        return self._versions[1]

    def stats(self) -> dict[str, Any]:
        """The serving figures for the status message and the periodic log line."""
        p50, p99 = self.latency.percentiles()
        return {
            "ticks_served": self.ticks_served,
            "ticks_skipped": self.ticks_skipped,
            "ticks_unpublished": self.unpublished,
            "inference_errors": self.inference_errors,
            "latency_p50_ms": p50,
            "latency_p99_ms": p99,
            "dropped": self.drops.snapshot(),
            "reload_failures": self.pool.reload_failures,
            "pool_generation": self.pool.current.number,
        }
