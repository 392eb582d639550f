"""The per-tick pipeline: newest valid tick, one inference per model group, one answer message per tick.

Ticks are checked on arrival by :class:`runtime.intake.TickIntake`, which keeps only the newest valid
one in a one-place slot, so a slow tick never builds a queue and garbage never displaces a valid tick.
One serving task takes the newest tick and runs states [N, D] -> pool inference -> output guard and
update rule -> encode -> publish, all vectorized over agents, and records the receive -> publish latency.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from blockmarket.core.state import PROPOSAL_MAX, PROPOSAL_MIN, FloatArray, IntArray, state_dim
from blockmarket.core.stats import percentiles
from blockmarket.wire.limits import PROTOCOL_VERSION, DropCounter
from blockmarket.wire.messages import MatricesMessage, encode_agent_matrices, encode_matrices
from blockmarket.wire.topics import MARKET_VERSION
from runtime import batching
from runtime.intake import AcceptedTick, TickIntake
from runtime.markets import Market, MarketRegistry
from runtime.sessions import PoolGeneration, SessionPool

log = logging.getLogger(__name__)

LATENCY_WINDOW = 1024  # ticks in the sliding latency window


class Publisher(Protocol):
    """The outbound half of the transport (blockmarket.wire.runtime_link.RuntimeTransport satisfies it)."""

    async def publish_matrices(self, payload: bytes) -> bool: ...

    async def publish_agent_matrix(self, agent_id: str, payload: bytes) -> bool: ...

    async def publish_answer(self, topic: str, payload: bytes, reply_to: tuple[str, bytes] | None) -> bool:
        """A v2 market's answer: on the tick's MQTT 5 response topic when it named one, else ``topic``."""
        ...


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
    """Serves market ticks through one session pool: the ticks of every market waiting together share one
    inference per unit (``batching``), after waiting at most ``window_s`` for more to arrive."""

    def __init__(
        self,
        pool: SessionPool,
        publisher: Publisher,
        intake: TickIntake,
        *,
        alpha: float,
        per_agent_topics: bool = False,
        markets: MarketRegistry | None = None,
        window_s: float = 0.0,
        batching: bool = True,
    ) -> None:
        self.population = pool.population  # the arena: every market's agents
        self.pool = pool
        self.publisher = publisher
        self.intake = intake  # the v1 default market's
        self.markets = markets or MarketRegistry.single(intake)
        self.alpha = alpha
        self.per_agent_topics = per_agent_topics
        self.window_s = window_s
        self.batching = batching
        self.latency = LatencyWindow()
        self.batches = 0  # inferences run (one per unit each): the markets benchmark's session.run rate
        self.guarded_outputs = 0  # agent answers the output guard refused (the agent kept its matrix)
        self._guard_log = DropCounter(log, what="network proposal")
        self._states = np.empty((len(self.population), 0), dtype=np.float32)
        self._versions: tuple[int, dict[str, str]] = (-1, {})
        self.observer: TickObserver | None = None  # per-stage timings (runtime.metrics)

    async def run(self) -> None:
        """Serve the newest valid ticks, forever (until cancelled)."""
        while True:
            await self.serve_next()

    async def warm_up(self) -> None:
        """One inference of the whole arena, answering nothing: fresh sessions' first run (allocations,
        thread start) is slow, and should not fall on a tick."""
        async with self.markets.lock:
            self.markets.adopt_new_rows()
            await self.pool.infer(self._state_buffer())

    async def serve_next(self) -> MatricesMessage | None:
        """Wait for waiting ticks and serve them together; the first market's answer (None: not served)."""
        answers = await self.serve_batch(await self.markets.take_batch(self.window_s, self.batching))
        return answers[0] if answers else None

    async def serve_batch(self, batch: Sequence[tuple[Market, AcceptedTick]]) -> list[MatricesMessage | None]:
        """Ticks of several markets: one inference, then each market's update and answer. A failed
        inference is counted for every tick of the batch and logged, never raised."""
        async with self.markets.lock:  # requests change rows between two batches, never during one
            return await self._serve_batch(batch)

    async def _serve_batch(
        self, batch: Sequence[tuple[Market, AcceptedTick]]
    ) -> list[MatricesMessage | None]:
        population = self.population
        self.markets.adopt_new_rows()
        marks = [time.perf_counter()]  # stage boundaries: states, inference, update, encode, publish
        generation = self.pool.current  # a swap during this batch serves the next one
        states = self._state_buffer()
        batching.observe(population, batch)
        batching.states(population, batch, states)
        marks.append(time.perf_counter())
        try:
            proposals = await self.pool.infer(states, generation, batching.ticked_rows(batch))
        except Exception:  # an ORT failure on one batch must not stop serving the next
            for market, accepted in batch:
                market.intake.ledger.finish("inference_errors")
                self.markets.notify(market, "inference_errors", accepted.tick.tick, "inference failed")
            log.exception(
                "ticks %s: inference failed; agents keep their matrices", [a.tick.tick for _, a in batch]
            )
            return [None] * len(batch)
        self.batches += 1
        marks.append(time.perf_counter())
        answers, payloads, encode_s = [], [], 0.0
        updated, refused = batching.update(population, batch, proposals, self.alpha)
        if len(refused):
            self._guarded(batch, refused)
        for (market, accepted), matrices in zip(batch, updated, strict=True):  # each market's answer ...
            tick = accepted.tick
            msg = MatricesMessage(
                tick=tick.tick,
                sent_at=tick.sent_at,
                served_at=time.time(),
                agent_ids=tick.agent_ids,
                matrices=matrices,
                latency_ms=(time.perf_counter() - accepted.received_at) * 1e3,
                model_versions=self._model_versions(generation, market, accepted),
            )
            answers.append(msg)
            encoding = time.perf_counter()
            payloads.append(encode_matrices(msg, MARKET_VERSION if market.topics else PROTOCOL_VERSION))
            encode_s += time.perf_counter() - encoding
        done = time.perf_counter()
        marks += [done - encode_s, done]  # update (and answers built), encode: summed over the markets
        # ... then all answers published together: one write to the broker, not one loop round trip each
        published = await asyncio.gather(
            *(self._publish(market, accepted, msg, payload)
              for (market, accepted), msg, payload in zip(batch, answers, payloads, strict=True))
        )  # fmt: skip
        marks.append(time.perf_counter())
        for (market, accepted), sent in zip(batch, published, strict=True):
            market.intake.ledger.finish("served" if sent else "unpublished")
            market.last_tick = accepted.tick.tick
            if not sent:
                self.markets.notify(market, "unpublished", accepted.tick.tick, "the broker was unreachable")
                continue
            self.latency.add((marks[-1] - accepted.received_at) * 1e3)
            if self.observer is not None:
                self.observer.served(accepted.received_at, marks)
        return list(answers)

    async def _publish(
        self, market: Market, accepted: AcceptedTick, msg: MatricesMessage, payload: bytes
    ) -> bool:
        """Publish one market's answer: a v2 market's on its topic (or the tick's MQTT 5 response topic),
        the default market's on the v1 topic (and per agent, when configured)."""
        if market.topics is not None:
            return await self.publisher.publish_answer(market.topics.matrices, payload, accepted.reply_to)
        published = await self.publisher.publish_matrices(payload)
        if self.per_agent_topics:
            for agent_id, agent_payload in encode_agent_matrices(msg):
                await self.publisher.publish_agent_matrix(agent_id, agent_payload)
        return published

    def _guarded(self, batch: Sequence[tuple[Market, AcceptedTick]], rows: IntArray) -> None:
        """Count and log (rate-limited) the agents whose proposal the output guard refused."""
        self.guarded_outputs += len(rows)
        row = int(rows[0])
        agent, model = self.population.agent_ids[row], self.population.model_keys[row]
        ticks = ", ".join(f"{m.name} {a.tick.tick}" for m, a in batch[:3]) + (
            " ..." if len(batch) > 3 else ""
        )
        self._guard_log.record(
            "refused",
            f"tick(s) {ticks}: {len(rows)} agent(s) keep their matrix, e.g. {agent!r} (model {model}): "
            f"a proposal non-finite or outside [{PROPOSAL_MIN:g}, {PROPOSAL_MAX:g}]",
        )

    def _state_buffer(self) -> FloatArray:
        """Reuse one [N, D] buffer across ticks (reallocated, zeroed, only when the arena grows)."""
        dim = state_dim(self.population.num_items)
        if self._states.shape != (len(self.population), dim):
            self._states = np.zeros((len(self.population), dim), dtype=np.float32)
        return self._states

    def _model_versions(
        self, generation: PoolGeneration, market: Market, accepted: AcceptedTick
    ) -> dict[str, str]:
        """The versions of the models that answered this tick's agents (cached per generation, and per
        market while it ticks the same agents): 20 agents of a market say 20 versions, not the pool's."""
        if self._versions[0] != generation.number:
            self._versions = (generation.number, generation.versions)
        key = (generation.number, accepted.tick.agent_ids)
        cached = market.versions_cache
        if cached is not None and cached[0] == key[0] and cached[1] == key[1]:
            return cached[2]
        keys = self.population.model_keys
        every = self._versions[1]
        versions = {k: every[k] for k in sorted({keys[int(r)] for r in accepted.rows}) if k in every}
        market.versions_cache = (key[0], key[1], versions)
        return versions

    def stats(self) -> dict[str, Any]:
        """The serving figures for the status message and the periodic log line (the default market's
        counters at the top level, as in protocol version 1)."""
        p50, p99 = self.latency.percentiles()
        return {
            **self.intake.ledger.stats(),
            "guarded_outputs": self.guarded_outputs,
            "latency_p50_ms": p50,
            "latency_p99_ms": p99,
            "reload_failures": self.pool.reload_failures,
            "pool_generation": self.pool.current.number,
            "inference_batches": self.batches,  # each ran every unit with a ticked agent once
            "units": len(self.pool.current.units),
        }
