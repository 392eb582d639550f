"""The per-tick pipeline: newest valid tick, one inference per model group, one answer message per tick.

Ticks are checked on arrival by :class:`runtime.intake.TickIntake`, which keeps only the newest valid
one in a one-place slot, so a slow tick never builds a queue and garbage never displaces a valid tick.
One serving task takes the newest tick and runs states [N, D] -> pool inference -> output guard and
update rule -> encode -> publish, all vectorized over agents, and records the receive -> publish latency.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from blockmarket.core.state import PROPOSAL_MAX, PROPOSAL_MIN, FloatArray, IntArray, state_dim
from blockmarket.core.stats import percentiles
from blockmarket.wire.limits import DropCounter
from blockmarket.wire.messages import MatricesMessage, encode_agent_matrices, encode_matrices
from runtime.intake import AcceptedTick, TickIntake
from runtime.sessions import PoolGeneration, SessionPool

log = logging.getLogger(__name__)

LATENCY_WINDOW = 1024  # ticks in the sliding latency window


class Publisher(Protocol):
    """The outbound half of the transport (blockmarket.wire.transport.RuntimeTransport satisfies it)."""

    async def publish_matrices(self, payload: bytes) -> bool: ...

    async def publish_agent_matrix(self, agent_id: str, payload: bytes) -> bool: ...


class TickObserver(Protocol):
    """Told about every served tick (runtime.metrics.RuntimeMetrics satisfies it)."""

    def served(self, received_at: float, marks: Sequence[float]) -> None: ...


class LatencyWindow:
    """Receive -> publish latencies of the last ticks, for p50/p99 in logs and status."""

    def __init__(self, size: int = LATENCY_WINDOW) -> None:
        self._samples: deque[float] = deque(maxlen=size)

    def add(self, latency_ms: float) -> None:
        self._samples.append(latency_ms)

    def percentiles(self) -> tuple[float | None, float | None]:
        if not self._samples:
            return None, None
        p50, p99 = percentiles(self._samples)
        return p50, p99


class TickScheduler:
    """Serves market ticks for one population through one session pool."""

    def __init__(
        self,
        pool: SessionPool,
        publisher: Publisher,
        intake: TickIntake,
        *,
        alpha: float,
        per_agent_topics: bool = False,
    ) -> None:
        self.population = intake.population
        self.pool = pool
        self.publisher = publisher
        self.intake = intake
        self.alpha = alpha
        self.per_agent_topics = per_agent_topics
        self.latency = LatencyWindow()
        self.guarded_outputs = 0  # agent answers the output guard refused (the agent kept its matrix)
        self._guard_log = DropCounter(log, what="network proposal")
        self._states = np.empty((len(self.population), 0), dtype=np.float32)
        self._versions: tuple[int, dict[str, str]] = (-1, {})
        self.observer: TickObserver | None = None  # per-stage timings (runtime.metrics)

    async def run(self) -> None:
        """Serve the newest valid tick, forever (until cancelled)."""
        while True:
            await self.serve_next()

    async def serve_next(self) -> MatricesMessage | None:
        """Wait for the newest valid tick and serve it."""
        return await self.serve(await self.intake.slot.take())

    async def serve(self, accepted: AcceptedTick) -> MatricesMessage | None:
        """One tick end to end; a failed inference is counted and logged, never raised."""
        population, ledger, tick = self.population, self.intake.ledger, accepted.tick
        marks = [time.perf_counter()]  # stage boundaries: states, inference, update, encode, publish
        population.observe(accepted.rows, tick.inventory, tick.successful, tick.attempted)
        states = population.states(tick.market_mean, out=self._state_buffer())
        marks.append(time.perf_counter())
        try:
            generation = self.pool.current  # a swap during this tick serves the next one
            proposals = await self.pool.infer(states, generation)
        except Exception:  # an ORT failure on one tick must not stop serving the next
            ledger.finish("inference_errors")
            log.exception("tick %d: inference failed; agents keep their matrices", tick.tick)
            return None
        marks.append(time.perf_counter())
        matrices, refused = population.update(accepted.rows, proposals, self.alpha)
        if len(refused):
            self._guarded(tick.tick, refused)
        marks.append(time.perf_counter())
        msg = MatricesMessage(
            tick=tick.tick,
            sent_at=tick.sent_at,
            served_at=time.time(),
            agent_ids=tick.agent_ids,
            matrices=matrices,
            latency_ms=(time.perf_counter() - accepted.received_at) * 1e3,
            model_versions=self._model_versions(generation),
        )
        payload = encode_matrices(msg)
        marks.append(time.perf_counter())
        published = await self.publisher.publish_matrices(payload)
        if self.per_agent_topics:
            for agent_id, agent_payload in encode_agent_matrices(msg):
                await self.publisher.publish_agent_matrix(agent_id, agent_payload)
        marks.append(time.perf_counter())
        ledger.finish("served" if published else "unpublished")
        if published:
            self.latency.add((marks[-1] - accepted.received_at) * 1e3)
            if self.observer is not None:
                self.observer.served(accepted.received_at, marks)
        return msg

    def _guarded(self, tick: int, rows: IntArray) -> None:
        """Count and log (rate-limited) the agents whose proposal the output guard refused."""
        self.guarded_outputs += len(rows)
        row = int(rows[0])
        agent, model = self.population.agent_ids[row], self.population.model_keys[row]
        self._guard_log.record(
            "refused",
            f"tick {tick}: {len(rows)} agent(s) keep their matrix, e.g. {agent} (model {model}): "
            f"a proposal non-finite or outside [{PROPOSAL_MIN:g}, {PROPOSAL_MAX:g}]",
        )

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
            **self.intake.ledger.stats(),
            "guarded_outputs": self.guarded_outputs,
            "latency_p50_ms": p50,
            "latency_p99_ms": p99,
            "reload_failures": self.pool.reload_failures,
            "pool_generation": self.pool.current.number,
        }
