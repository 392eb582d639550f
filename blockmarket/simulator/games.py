"""One game server's market in `blockmarket simulate --markets`: its agents (who come and go), its
protocol v2 requests and ticks, the answers it applies, and its view for the dashboard."""

from __future__ import annotations

import asyncio
import time
from array import array
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from blockmarket.core.config import Config, EnvironmentConfig
from blockmarket.core.state import initial_inventory, initial_matrices
from blockmarket.core.stats import percentiles
from blockmarket.market.rules import MarketPopulation, TradeStats, fitness, trade_step
from blockmarket.simulator.roster import SimulatorError
from blockmarket.simulator.simulation import obeys_update_rule
from blockmarket.simulator.view import ViewPublisher
from blockmarket.wire.markets import ROUND_ROBIN, ControlRequest, Reply, encode_control
from blockmarket.wire.messages import MarketTick, MatricesMessage, encode_tick
from blockmarket.wire.topics import MARKET_VERSION, MarketTopics
from blockmarket.wire.transport import MqttLink

REQUEST_TIMEOUT_S = 30.0  # an open may wait for the runtime to grow its session pool


@dataclass(frozen=True)
class GameFigures:
    """One market's live figures, for its view (blockmarket.simulator.view.Summary)."""

    ticks_sent: int
    answered: int
    fitness_mean: float
    fitness_max: float
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    runtime_latency_p50_ms: float | None


class Game:
    """One game server's market: its agents, its topics, what it sent and what came back."""

    def __init__(self, config: Config, topics: MarketTopics, agents: int, seed: int) -> None:
        env = config.environment
        self.config, self.topics = config, topics
        self.rng = np.random.default_rng(seed)
        self.population = MarketPopulation.random(self.rng, agents, env.num_items, env.world_size, "bot-")
        self.start_inventory = self.population.inventory.copy()  # fitness is measured from it
        self.view = self._viewer()
        self._ids: tuple[str, ...] = ()
        self._ids_of: MarketPopulation | None = None
        self.next_id = agents
        self.sent_at: dict[int, float] = {}
        self.latencies: array[float] = array("d")
        self.newest: MatricesMessage | None = None
        self.replies: dict[int, asyncio.Future[Reply]] = {}
        self.request_number = 0
        self.ticks_sent = self.answered = self.joins = self.leaves = self.refused = self.trades = 0
        self.violations = 0
        self.carry_matrices = False  # ticks carry the agents' matrices (runtime replicas keep none)

    @property
    def ids(self) -> tuple[str, ...]:
        """The market's agent ids as one tuple (rebuilt only when agents came or went)."""
        if self._ids_of is not self.population:
            self._ids, self._ids_of = tuple(self.population.agent_ids), self.population
        return self._ids

    def _viewer(self) -> ViewPublisher:
        """The market's view for the dashboard, named owner/market (rebuilt when agents come and go)."""
        return ViewPublisher(
            self.config,
            self.population,
            self.start_inventory,
            market=f"{self.topics.owner}/{self.topics.market}",
        )

    def figures(self) -> GameFigures:
        scores = fitness(self.population, self.start_inventory)
        p50, p99 = percentiles(self.latencies[-200:], (50, 99)) if self.latencies else (None, None)
        return GameFigures(
            self.ticks_sent, self.answered, float(scores.mean()), float(scores.max()), p50, p99, None
        )

    def on_answer(self, msg: MatricesMessage, received_at: float) -> None:
        sent = self.sent_at.pop(msg.tick, None)
        if sent is None:
            return
        self.answered += 1
        self.latencies.append((received_at - sent) * 1e3)
        if not obeys_update_rule(msg.matrices):
            self.violations += 1
        elif self.newest is None or msg.tick > self.newest.tick:
            self.newest = msg

    async def request(self, link: MqttLink, request: ControlRequest) -> Reply:
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self.replies[request.request] = future
        if not await link.publish(self.topics.control, encode_control(request)):
            raise SimulatorError(f"{self.topics.control}: not connected")
        try:
            reply = await asyncio.wait_for(future, REQUEST_TIMEOUT_S)
        except TimeoutError:
            raise SimulatorError(
                f"no reply to {request.op} on {self.topics.reply} within {REQUEST_TIMEOUT_S:.0f} s"
            ) from None
        finally:
            self.replies.pop(request.request, None)
        if not reply.ok:
            self.refused += 1
        return reply

    def _number(self) -> int:
        self.request_number += 1
        return self.request_number

    async def open(self, link: MqttLink) -> None:
        pop, items = self.population, self.config.environment.items_list
        reply = await self.request(
            link,
            ControlRequest(
                "open",
                self._number(),
                tuple(pop.agent_ids),
                tuple(items[int(d)] for d in pop.desired),
                (ROUND_ROBIN,) * pop.size,
                pop.matrices,
            ),
        )
        if not reply.ok:
            raise SimulatorError(f"the runtime refused to open {self.topics.base}: {reply.error}")

    async def churn(self, link: MqttLink) -> None:
        """One agent leaves and a new one joins (both between two ticks of this market)."""
        pop, items, env = self.population, self.config.environment.items_list, self.config.environment
        leaving = int(self.rng.integers(pop.size))
        gone = await self.request(link, ControlRequest("remove", self._number(), (pop.agent_ids[leaving],)))
        if gone.ok:
            keep = np.arange(pop.size) != leaving
            self.population = pop = _subset(pop, keep)
            self.start_inventory = self.start_inventory[keep]
            self.leaves += 1
        new_id, desired = f"bot-{self.next_id}", int(self.rng.integers(env.num_items))
        matrix = initial_matrices(self.rng, 1, env.num_items)
        joined = await self.request(
            link, ControlRequest("add", self._number(), (new_id,), (items[desired],), (ROUND_ROBIN,), matrix)
        )
        self.next_id += 1
        if joined.ok:
            self.population = _joined(pop, new_id, desired, matrix, self.rng, env.world_size)
            self.start_inventory = np.concatenate([self.start_inventory, self.population.inventory[-1:]])
            self.joins += 1
        next_view, self.view = self.view._next_at, self._viewer()
        self.view._next_at = next_view

    def apply_newest(self) -> None:
        """The newest answer's matrices into the market (agents that left since are skipped)."""
        msg, pop = self.newest, self.population
        if msg is None:
            return
        self.newest = None
        if msg.agent_ids == self.ids:  # the usual case: the answer names the market's agents, in order
            pop.matrices[:] = msg.matrices
            return
        row_of = {a: r for r, a in enumerate(pop.agent_ids)}
        for k, agent in enumerate(msg.agent_ids):
            row = row_of.get(agent)
            if row is not None:
                pop.matrices[row] = msg.matrices[k]

    def stepped(self, stats: TradeStats) -> None:
        """One market step of this market happened (alone, or in :func:`step_together`)."""
        self.view.record(stats)
        self.trades += stats.trades

    def tick_message(self, tick: int) -> bytes:
        pop = self.population
        return encode_tick(
            MarketTick(
                tick,
                time.time(),
                self.ids,
                pop.inventory,
                pop.successful.astype(np.float32),
                pop.attempted.astype(np.float32),
                matrices=pop.matrices if self.carry_matrices else None,
            ),
            MARKET_VERSION,
        )


def _subset(pop: MarketPopulation, keep: np.ndarray) -> MarketPopulation:
    return MarketPopulation(
        agent_ids=[a for a, k in zip(pop.agent_ids, keep, strict=True) if k],
        desired=pop.desired[keep],
        inventory=pop.inventory[keep],
        matrices=pop.matrices[keep],
        positions=pop.positions[keep],
        successful=pop.successful[keep],
        attempted=pop.attempted[keep],
    )


def _joined(
    pop: MarketPopulation,
    agent_id: str,
    desired: int,
    matrix: np.ndarray,
    rng: np.random.Generator,
    world: float,
) -> MarketPopulation:
    n = pop.num_items
    return MarketPopulation(
        agent_ids=[*pop.agent_ids, agent_id],
        desired=np.append(pop.desired, desired),
        inventory=np.concatenate([pop.inventory, initial_inventory(rng, 1, n)]),
        matrices=np.concatenate([pop.matrices, matrix]),
        positions=np.concatenate([pop.positions, rng.uniform(0.0, world, size=(1, 2)).astype(np.float32)]),
        successful=np.append(pop.successful, 0),
        attempted=np.append(pop.attempted, 0),
    )


def step_together(games: Sequence[Game], rng: np.random.Generator, env: EnvironmentConfig) -> None:
    """One market step of each game, all in one vectorized call: the training rules' ``markets`` blocks
    (games of equal size; otherwise each alone). Stepping 50 markets of 20 agents one by one costs a core
    of numpy call overhead at 20 Hz; together it is one call."""
    sizes = {g.population.size for g in games}
    for game in games:
        game.apply_newest()
    if len(games) == 1 or len(sizes) > 1:
        for game in games:
            game.stepped(trade_step(game.population, game.rng, env))
        return
    pops, size = [g.population for g in games], sizes.pop()
    together = MarketPopulation(
        agent_ids=[f"{k}/{a}" for k, pop in enumerate(pops) for a in pop.agent_ids],
        desired=np.concatenate([p.desired for p in pops]),
        inventory=np.concatenate([p.inventory for p in pops]),
        matrices=np.concatenate([p.matrices for p in pops]),
        positions=np.concatenate([p.positions for p in pops]),
        successful=np.concatenate([p.successful for p in pops]),
        attempted=np.concatenate([p.attempted for p in pops]),
        markets=len(pops),
    )
    attempted = together.attempted.copy()
    stats = trade_step(together, rng, env)
    block = stats.requester // size
    for k, (game, pop) in enumerate(zip(games, pops, strict=True)):
        rows = slice(k * size, (k + 1) * size)
        pop.inventory[:] = together.inventory[rows]
        pop.successful[:] = together.successful[rows]
        pop.attempted[:] = together.attempted[rows]
        mine = block == k
        game.stepped(
            TradeStats(
                int((together.attempted[rows] - attempted[rows]).sum()),
                stats.requester[mine] - k * size,
                stats.target[mine] - k * size,
                stats.give_item[mine],
                stats.want_item[mine],
                stats.given[mine],
                stats.received[mine],
            )
        )
