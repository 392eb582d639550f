"""Many game servers' markets in one process (`blockmarket simulate --markets M`), over protocol v2.

Each market opens itself on the runtime (``{prefix}/v2/{owner}/{market}/control``) with its own roster,
seed and positions, then plays at the tick rate: apply the newest answer, one market step (the training
rules), publish its tick. Agents come and go during the run: every ``churn_s`` seconds (on average, per
market) one agent leaves and a new one joins with the ``round_robin`` model selector, each between two
ticks of that market, as bots leave and join a Minecraft server. All markets share one MQTT connection.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import time
from array import array
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from blockmarket.core.config import Config
from blockmarket.core.stats import percentiles
from blockmarket.simulator.games import Game, step_together
from blockmarket.simulator.roster import CONNECT_TIMEOUT_S, _connected
from blockmarket.wire.limits import DropCounter, Limits, ProtocolError
from blockmarket.wire.markets import (
    ControlRequest,
    decode_notice,
    decode_reply,
)
from blockmarket.wire.protocol import decode_matrices
from blockmarket.wire.topics import MARKET_VERSION, MarketTopics
from blockmarket.wire.transport import MqttLink

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MarketsSummary:
    """What the game servers saw: latencies are publish -> matrices received, in milliseconds."""

    markets: int
    agents: int  # at the end, in all markets
    ticks_sent: int
    answered: int
    missing: int
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    worst_market_p99_ms: float | None  # the highest per-market p99
    joins: int
    leaves: int
    refused_requests: int
    notices: dict[str, int]  # the runtime's notices by kind
    rule_violations: int
    trades: int
    duration_s: float
    tick_rate_hz: float  # market ticks per second, all markets together

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        return (
            f"{self.markets} markets, {self.agents} agents: answered {self.answered}/{self.ticks_sent} "
            f"(missing {self.missing}), p50 {_ms(self.latency_p50_ms)} p99 {_ms(self.latency_p99_ms)} "
            f"(worst market p99 {_ms(self.worst_market_p99_ms)}), {self.joins} joined, {self.leaves} left"
        )


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} ms"


class MarketsSimulation:
    """M games on one MQTT connection, each its own market on the runtime."""

    def __init__(
        self,
        config: Config,
        markets: int,
        agents: int,
        *,
        owner: str | None = None,
        churn_s: float = 5.0,
        seed: int = 0,
        connect_timeout_s: float = CONNECT_TIMEOUT_S,
        carry_matrices: bool = False,
    ) -> None:
        """``carry_matrices``: every tick carries its agents' matrices (what runtime replicas need)."""
        self.config = config
        self.owner = owner or f"sim-{os.getpid()}"
        prefix = config.mqtt.topic_prefix
        self.games = {
            f"game-{i:03d}": Game(config, MarketTopics(prefix, self.owner, f"game-{i:03d}"), agents, seed + i)
            for i in range(markets)
        }
        for game in self.games.values():
            game.carry_matrices = carry_matrices
        self.churn_s = churn_s
        self.seed = seed
        self.connect_timeout_s = connect_timeout_s
        self.limits = Limits(
            max_payload_bytes=config.mqtt.max_payload_bytes, num_items=config.environment.num_items
        )
        self.drops = DropCounter(logger, what="v2 message to the simulator")
        self.notices: dict[str, int] = {}
        self._stop = asyncio.Event()
        self._started = time.perf_counter()

    def stop(self) -> None:
        self._stop.set()

    def on_message(
        self, topic: str, payload: bytes, received_at: float, _retained: bool, _reply_to: object
    ) -> None:
        """Answers, replies and notices of every game (one wildcard subscription)."""
        leaf = topic.rsplit("/", 1)[-1]
        game = self.games.get(topic.rsplit("/", 2)[-2])
        if game is None or not payload:
            return
        try:
            if leaf == "matrices":
                game.on_answer(decode_matrices(payload, self.limits, MARKET_VERSION), received_at)
            elif leaf == "reply":
                reply = decode_reply(payload, self.limits)
                future = game.replies.get(reply.request)
                if future is not None and not future.done():
                    future.set_result(reply)
            elif leaf == "notice":
                kind = decode_notice(payload, self.limits).kind
                self.notices[kind] = self.notices.get(kind, 0) + 1
        except ProtocolError as exc:
            self.drops.record_error(exc, topic)

    async def run(
        self,
        ticks: int,
        *,
        rate_hz: float | None = None,
        on_report: Callable[[MarketsSummary], None] | None = None,
        close: bool = True,
    ) -> MarketsSummary:
        prefix = self.config.mqtt.topic_prefix
        patterns = {
            f"{prefix}/v{MARKET_VERSION}/{self.owner}/+/{leaf}": self.on_message
            for leaf in ("matrices", "reply", "notice")
        }
        link = MqttLink(
            self.config.mqtt,
            client_id=f"blockmarket-simulator-{os.getpid()}",
            subscriptions={},
            patterns=patterns,
        )
        running = asyncio.create_task(link.run())
        try:
            await _connected(link, running, self.config.mqtt, self.connect_timeout_s)
            await asyncio.gather(*(game.open(link) for game in self.games.values()))
            logger.info("%d markets open under %s/v2/%s", len(self.games), prefix, self.owner)
            period = 1.0 / (rate_hz or self.config.simulator.tick_rate_hz)
            gc.collect()  # what setting up left alive is kept out of later collections: a full collection
            gc.freeze()  # of it held the loop for tens of ms, and answers waiting behind it were timed late
            self._started = time.perf_counter()
            reporting = asyncio.create_task(self._report(on_report)) if on_report else None
            await self._play(link, ticks, period)
            if reporting is not None:
                reporting.cancel()
            await self._await_outstanding()
            if close:
                await asyncio.gather(
                    *(g.request(link, ControlRequest("close", g._number())) for g in self.games.values())
                )
        finally:
            await link.disconnect()
            await running
        return self.summary(final=True)

    async def _play(self, link: MqttLink, ticks: int, period: float) -> None:
        """Every period: one market step of every market (one vectorized call), then each market's tick,
        published at its own phase of the period (market k at k/M of it), so that ticks arrive spread
        out as independent game servers' would."""
        games = list(self.games.values())
        rng = np.random.default_rng([self.seed, 3])
        start = time.perf_counter()
        tick = 0
        while not self._stop.is_set() and (ticks == 0 or tick < ticks):
            period_at = start + tick * period
            if tick:  # in a thread: answers keep being received (and timed) during the step
                await asyncio.to_thread(step_together, games, rng, self.config.environment)
            for k, game in enumerate(games):
                await asyncio.sleep(max(0.0, period_at + period * k / len(games) - time.perf_counter()))
                if tick and self.churn_s > 0 and game.rng.random() < period / self.churn_s:
                    await game.churn(link)
                await self._publish(link, game, tick)
            tick += 1
            late = time.perf_counter() - (start + tick * period)
            if late > period:  # fell behind by more than a period: carry on, do not burst to catch up
                start += late
            await asyncio.sleep(max(0.0, start + tick * period - time.perf_counter()))

    async def _publish(self, link: MqttLink, game: Game, tick: int) -> None:
        game.sent_at[tick] = time.perf_counter()
        game.ticks_sent += 1
        if not await link.publish(game.topics.tick, game.tick_message(tick)):
            del game.sent_at[tick]
            game.ticks_sent -= 1
        await game.view.publish_due(link, tick, game.figures)
        expired = time.perf_counter() - self.config.simulator.reply_timeout_s
        for old in [t for t, at in game.sent_at.items() if at < expired]:
            del game.sent_at[old]

    async def _report(self, on_report: Callable[[MarketsSummary], None]) -> None:
        while True:
            await asyncio.sleep(1.0)
            on_report(self.summary())

    async def _await_outstanding(self) -> None:
        deadline = time.perf_counter() + self.config.simulator.reply_timeout_s
        while any(g.sent_at for g in self.games.values()) and time.perf_counter() < deadline:
            await asyncio.sleep(0.01)

    def summary(self, final: bool = False) -> MarketsSummary:
        games = list(self.games.values())
        every = array("d")
        worst: float | None = None
        for game in games:
            every.extend(game.latencies)
            if game.latencies:
                market_p99 = percentiles(game.latencies, (99,))[0]
                worst = market_p99 if worst is None else max(worst, market_p99)
        p50, p99 = percentiles(every, (50, 99)) if every else (None, None)
        sent = sum(g.ticks_sent for g in games)
        answered = sum(g.answered for g in games)
        in_flight = 0 if final else sum(len(g.sent_at) for g in games)
        duration = time.perf_counter() - self._started
        return MarketsSummary(
            markets=len(games),
            agents=sum(g.population.size for g in games),
            ticks_sent=sent,
            answered=answered,
            missing=sent - answered - in_flight,
            latency_p50_ms=p50,
            latency_p99_ms=p99,
            worst_market_p99_ms=worst,
            joins=sum(g.joins for g in games),
            leaves=sum(g.leaves for g in games),
            refused_requests=sum(g.refused for g in games),
            notices=dict(self.notices),
            rule_violations=sum(g.violations for g in games),
            trades=sum(g.trades for g in games),
            duration_s=round(duration, 3),
            tick_rate_hz=round(sent / duration, 2) if duration > 0 else 0.0,
        )
