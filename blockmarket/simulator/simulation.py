"""The market side of one simulation: publish ticks, apply the runtime's matrices, trade, summarize."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from blockmarket.core.config import Config
from blockmarket.core.state import MATRIX_MAX, MATRIX_MIN, initial_inventory, initial_matrices
from blockmarket.core.stats import percentiles
from blockmarket.market.rules import MarketPopulation, TradeStats, desired_holdings, fitness, trade_step
from blockmarket.simulator.roster import CONNECT_TIMEOUT_S, SimulatorError, _connected
from blockmarket.simulator.view import ViewPublisher
from blockmarket.wire.limits import DropCounter, Limits, ProtocolError
from blockmarket.wire.messages import (
    MarketTick,
    MatricesMessage,
    encode_tick,
    message_sizes,
    payload_shortfall,
)
from blockmarket.wire.protocol import decode_matrices
from blockmarket.wire.topics import Topics
from blockmarket.wire.transport import MqttLink

logger = logging.getLogger(__name__)

REPORT_INTERVAL_S = 1.0
LIVE_WINDOW = 1000  # answers the live latency percentiles are taken over
RULE_TOLERANCE = 1e-5  # float32 slack when checking diagonal 1 and the [0.1, 10] bounds


@dataclass(frozen=True)
class SimulationSummary:
    """What the game side saw; latencies are publish -> matrices received, in milliseconds."""

    agents: int
    ticks_sent: int
    ticks_unsent: int  # could not be published (broker connection down)
    answered: int
    missing: int  # sent but not answered within reply_timeout_s (a later answer is dropped as stale)
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    latency_max_ms: float | None
    runtime_latency_p50_ms: float | None  # the runtime's own receive -> publish figure
    rule_violations: int  # answers with a matrix off the diagonal-1 / [0.1, 10] rule
    unknown_agents: int  # agent ids in answers that this market does not have
    dropped: dict[str, int]  # refused answers by kind (ProtocolError kinds, off_rule, unexpected_tick)
    trades: int
    volume: float
    fitness_mean: float
    fitness_max: float
    desired_held_mean: float
    duration_s: float
    tick_rate_hz: float  # achieved

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        """The one-line live report."""
        return (
            f"tick {self.ticks_sent:>6}  answered {self.answered}/{self.ticks_sent} "
            f"(missing {self.missing})  "
            f"trades {self.trades} ({self.trades / max(self.ticks_sent, 1):.1f}/tick)  "
            f"fitness mean {self.fitness_mean:.2f} max {self.fitness_max:.2f}  "
            f"latency p50 {_ms(self.latency_p50_ms)} p99 {_ms(self.latency_p99_ms)}"
        )


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} ms"


def _percentiles(samples: array[float]) -> tuple[float | None, float | None, float | None]:
    if not samples:
        return None, None, None
    p50, p99, worst = percentiles(samples, (50, 99, 100))
    return p50, p99, worst


class MarketSimulator:
    """The game server in-process: a market of the runtime's agents, driven by its MQTT answers."""

    def __init__(
        self,
        config: Config,
        agent_ids: Sequence[str],
        desired: npt.ArrayLike,
        *,
        seed: int | None = None,
        client_id: str | None = None,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
    ) -> None:
        env = config.environment
        rng = np.random.default_rng(config.simulator.seed if seed is None else seed)
        count, n = len(agent_ids), env.num_items
        self.config = config
        self.topics = Topics(config.mqtt.topic_prefix)
        self.client_id = client_id or f"blockmarket-simulator-{os.getpid()}"
        self.connect_timeout_s = connect_timeout_s
        self.population = MarketPopulation(
            agent_ids=list(agent_ids),
            desired=np.asarray(desired, dtype=np.int64),
            inventory=initial_inventory(rng, count, n),
            matrices=initial_matrices(rng, count, n),
            positions=rng.uniform(0.0, env.world_size, size=(count, 2)).astype(np.float32),
        )
        self._rng = rng
        self._start_inventory = self.population.inventory.copy()
        self.view = ViewPublisher(config, self.population, self._start_inventory)  # for the dashboard
        self._limits = Limits.from_config(config.mqtt, num_agents=max(count, 1), num_items=n)
        shortfall = payload_shortfall(message_sizes(agent_ids, n), config.mqtt.max_payload_bytes)
        if shortfall is not None:
            raise SimulatorError(
                f"{count} agents: {shortfall}, or play fewer agents (simulator.num_agents, or the runtime's "
                "runtime.num_agents when it announces its roster)"
            )
        self._ids = tuple(self.population.agent_ids)  # one tuple for every tick (not rebuilt per tick)
        self._row_of = {agent_id: row for row, agent_id in enumerate(self._ids)}
        self._rows_cache: tuple[tuple[str, ...], npt.NDArray[np.int64]] = ((), np.zeros(0, np.int64))
        self.drops = DropCounter(logger, what=f"answer on {self.topics.matrices}")
        self._sent_at: dict[int, float] = {}  # tick -> perf_counter at publish, until answered or expired
        self._latencies: array[float] = array("d")
        self._runtime_latencies: array[float] = array("d")
        self._newest: MatricesMessage | None = None
        self._applied_tick = -1
        self._stop = asyncio.Event()
        self._started = time.perf_counter()
        self.ticks_sent = 0
        self.ticks_unsent = 0
        self.answered = 0
        self.unknown_agents = 0
        self.trades = 0
        self.volume = 0.0

    # ------------------------------------------------------------------------------------ receiving

    def on_matrices(self, payload: bytes, received_at: float, _retained: bool) -> None:
        """MqttLink handler: check and time an answer; the newest is applied at the next tick."""
        try:
            msg = decode_matrices(payload, self._limits)
        except ProtocolError as exc:
            self.drops.record_error(exc, self.topics.matrices)
            return
        sent = self._sent_at.pop(msg.tick, None)
        if sent is None:
            self.drops.record("unexpected_tick", f"answer for tick {msg.tick}, which is not outstanding")
            return
        self.answered += 1
        self._latencies.append((received_at - sent) * 1e3)
        self._runtime_latencies.append(msg.latency_ms)
        if not obeys_update_rule(msg.matrices):
            self.drops.record(
                "off_rule", f"tick {msg.tick}: matrices break diagonal 1 / [0.1, 10]; not applied"
            )
            return
        if self._newest is None or msg.tick > self._newest.tick:
            self._newest = msg

    def _rows(self, agent_ids: tuple[str, ...]) -> npt.NDArray[np.int64]:
        """Market rows for an answer's agents (-1: not ours); cached, answers repeat the same ids."""
        cached_ids, rows = self._rows_cache
        if agent_ids != cached_ids:
            rows = np.fromiter((self._row_of.get(a, -1) for a in agent_ids), np.int64, len(agent_ids))
            self._rows_cache = (agent_ids, rows)
        return rows

    # ------------------------------------------------------------------------------------ playing

    def _apply_newest(self) -> None:
        msg = self._newest
        if msg is None or msg.tick <= self._applied_tick:
            return
        rows = self._rows(msg.agent_ids)
        known = rows >= 0
        if not known.all():
            self.unknown_agents += int((~known).sum())
        self.population.matrices[rows[known]] = msg.matrices[known]
        self._applied_tick = msg.tick

    def step(self) -> TradeStats:
        """Apply the newest answer, then one market step."""
        self._apply_newest()
        stats = trade_step(self.population, self._rng, self.config.environment)
        self.view.record(stats)
        self.trades += stats.trades
        self.volume += stats.volume
        return stats

    def tick_message(self, tick: int) -> MarketTick:
        pop = self.population
        return MarketTick(
            tick=tick,
            sent_at=time.time(),
            agent_ids=self._ids,
            inventory=pop.inventory,
            successful=pop.successful.astype(np.float32),
            attempted=pop.attempted.astype(np.float32),
        )

    @property
    def applied_tick(self) -> int:
        """The tick whose answer the market now trades with (-1: none yet)."""
        return self._applied_tick

    def stop(self) -> None:
        """End :meth:`run` after the current tick (for runs without a tick limit)."""
        self._stop.set()

    async def run(
        self,
        ticks: int = 0,
        *,
        rate_hz: float | None = None,
        on_report: Callable[[SimulationSummary], None] | None = None,
        report_interval_s: float = REPORT_INTERVAL_S,
    ) -> SimulationSummary:
        """Play ``ticks`` ticks (0: until :meth:`stop` or cancellation); returns the final summary."""
        period = 1.0 / (rate_hz or self.config.simulator.tick_rate_hz)
        link = MqttLink(
            self.config.mqtt, client_id=self.client_id, subscriptions={self.topics.matrices: self.on_matrices}
        )
        link_task = asyncio.create_task(link.run())
        try:
            await _connected(link, link_task, self.config.mqtt, self.connect_timeout_s)
            gc.collect()  # setup's heap out of later collections: a full one would delay the answers' timing
            gc.freeze()
            self._started = next_at = next_report = time.perf_counter()
            tick = 0
            while not self._stop.is_set() and (ticks == 0 or tick < ticks) and not link_task.done():
                if tick:  # in a thread: answers keep being received (and timed) during a long step
                    await asyncio.to_thread(self.step)
                await self._publish(link, tick)
                await self.view.publish_due(link, tick, self.summary)
                tick += 1
                now = time.perf_counter()
                if on_report is not None and now >= next_report:
                    on_report(self.summary())
                    next_report = now + report_interval_s
                next_at = max(next_at + period, now)  # fell behind: carry on, do not burst to catch up
                await asyncio.sleep(next_at - now)
            await self._await_outstanding()
        finally:
            await link.disconnect()
            await link_task
        return self.summary(final=True)

    async def _publish(self, link: MqttLink, tick: int) -> None:
        payload = encode_tick(self.tick_message(tick))
        now = time.perf_counter()
        expired = now - self.config.simulator.reply_timeout_s
        while self._sent_at and next(iter(self._sent_at.values())) < expired:  # oldest first
            del self._sent_at[next(iter(self._sent_at))]  # unanswered in time: missing; bounded memory
        self._sent_at[tick] = now
        if await link.publish(self.topics.tick, payload):
            self.ticks_sent += 1
        else:
            del self._sent_at[tick]
            self.ticks_unsent += 1

    async def _await_outstanding(self) -> None:
        """Give the last ticks up to reply_timeout_s to be answered."""
        deadline = time.perf_counter() + self.config.simulator.reply_timeout_s
        while self._sent_at and time.perf_counter() < deadline:
            await asyncio.sleep(0.01)

    def summary(self, final: bool = False) -> SimulationSummary:
        """The figures so far: live ones over the last answers and without ticks still in flight;
        final ones over the whole run, every unanswered tick missing."""
        pop = self.population
        window = slice(None) if final else slice(-LIVE_WINDOW, None)
        p50, p99, worst = _percentiles(self._latencies[window])
        runtime_p50 = _percentiles(self._runtime_latencies[window])[0]
        scores = fitness(pop, self._start_inventory)
        in_flight = 0 if final else len(self._sent_at)
        duration = time.perf_counter() - self._started
        return SimulationSummary(
            agents=pop.size,
            ticks_sent=self.ticks_sent,
            ticks_unsent=self.ticks_unsent,
            answered=self.answered,
            missing=self.ticks_sent - self.answered - in_flight,
            latency_p50_ms=p50,
            latency_p99_ms=p99,
            latency_max_ms=worst,
            runtime_latency_p50_ms=runtime_p50,
            rule_violations=self.drops.counts.get("off_rule", 0),
            unknown_agents=self.unknown_agents,
            dropped=self.drops.snapshot(),
            trades=self.trades,
            volume=round(self.volume, 3),
            fitness_mean=round(float(scores.mean()), 3),
            fitness_max=round(float(scores.max()), 3),
            desired_held_mean=round(float(desired_holdings(pop).mean()), 3),
            duration_s=round(duration, 3),
            tick_rate_hz=round(self.ticks_sent / duration, 2) if duration > 0 else 0.0,
        )


def obeys_update_rule(matrices: npt.NDArray[np.float32]) -> bool:
    """Every matrix has diagonal 1 and all entries within [0.1, 10] (the runtime's update rule)."""
    diagonal = np.diagonal(matrices, axis1=1, axis2=2)
    return bool(
        np.abs(diagonal - 1.0).max(initial=0.0) <= RULE_TOLERANCE
        and matrices.min(initial=MATRIX_MIN) >= MATRIX_MIN - RULE_TOLERANCE
        and matrices.max(initial=MATRIX_MAX) <= MATRIX_MAX + RULE_TOLERANCE
    )
