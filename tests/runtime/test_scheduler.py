"""The tick pipeline: latest tick wins, bad input is counted and dropped, swaps fall between ticks."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest

from runtime.agents import Assignment, create_population, new_agents
from runtime.config import MqttConfig
from runtime.models import discover_models, read_model
from runtime.protocol import Limits, MarketTick, decode_matrices, encode_tick
from runtime.scheduler import TickScheduler, TickSlot
from runtime.sessions import SessionPool
from runtime.state import apply_update, build_states
from tests.runtime.runtime_helpers import ITEMS, reference_forward, trading_weights, write_model
from tests.runtime.test_sessions import CountingFactory

ALPHA = 0.04
LIMITS = Limits(max_payload_bytes=64 * 1024, num_items=len(ITEMS))


class RecordingPublisher:
    def __init__(self) -> None:
        self.messages: list[bytes] = []
        self.agent_messages: list[tuple[str, bytes]] = []

    async def publish_matrices(self, payload: bytes) -> bool:
        self.messages.append(payload)
        return True

    async def publish_agent_matrix(self, agent_id: str, payload: bytes) -> bool:
        self.agent_messages.append((agent_id, payload))
        return True

    def decoded(self) -> list:
        return [decode_matrices(p, LIMITS) for p in self.messages]


def make_tick(number: int, agent_ids: tuple[str, ...], seed: int = 0) -> MarketTick:
    rng = np.random.default_rng(seed + number)
    count = len(agent_ids)
    return MarketTick(
        tick=number,
        sent_at=time.time(),
        agent_ids=agent_ids,
        inventory=rng.integers(0, 20, size=(count, len(ITEMS))).astype(np.float32),
        successful=rng.integers(0, 4, size=count).astype(np.float32),
        attempted=rng.integers(0, 8, size=count).astype(np.float32),
    )


async def make_scheduler(
    model_dir: Path,
    agents: int = 9,
    assignment: Assignment = "round_robin",
    limits: Limits = LIMITS,
    **kwargs,
) -> tuple[TickScheduler, RecordingPublisher]:
    models, _ = discover_models(model_dir, ITEMS)
    pop = create_population(models, ITEMS, num_agents=agents, assignment=assignment, seed=5)
    pool = SessionPool(
        pop, {m.key: m for m in models}, factory=CountingFactory(), max_sessions=8, model_dir=model_dir
    )
    await pool.start()
    publisher = RecordingPublisher()
    scheduler = TickScheduler(
        pop, pool, publisher, limits=limits, alpha=ALPHA, tick_topic="test/market/tick", **kwargs
    )
    return scheduler, publisher


def offline_step(matrices: np.ndarray, desired, seeds, tick: MarketTick) -> np.ndarray:
    """Recompute one tick with numpy only (agent i's weights are trading_weights(seeds[i]))."""
    rate = np.clip(tick.successful / np.maximum(tick.attempted, 1), 0, 1)
    states = build_states(tick.inventory, desired, matrices, rate)
    out = np.concatenate(
        [reference_forward(trading_weights(seed), s[None]) for seed, s in zip(seeds, states, strict=True)]
    )
    return apply_update(matrices.copy(), out.astype(np.float32), ALPHA)


async def test_slot_keeps_only_the_newest_tick_and_counts_the_rest() -> None:
    slot = TickSlot()
    for i in range(5):
        slot.put(f"t{i}".encode(), float(i))
    assert slot.overwritten == 4
    assert await slot.take() == (b"t4", 4.0)
    waiter = asyncio.create_task(slot.take())
    await asyncio.sleep(0.01)
    assert not waiter.done()  # nothing queued behind the newest
    slot.put(b"t5", 5.0)
    assert await asyncio.wait_for(waiter, 1) == (b"t5", 5.0)


async def test_ticks_are_answered_with_the_update_rule(model_dir: Path) -> None:
    scheduler, publisher = await make_scheduler(model_dir, per_agent_topics=True)
    pop = scheduler.population
    expected = pop.matrices.copy()
    for number in range(3):
        tick = make_tick(number, pop.agent_ids)
        expected = offline_step(expected, pop.desired, [int(k[1]) for k in pop.model_keys], tick)
        msg = await scheduler.serve(encode_tick(tick), time.perf_counter())
        assert msg is not None
    answers = publisher.decoded()
    assert [a.tick for a in answers] == [0, 1, 2]
    last = answers[-1]
    assert last.matrices.shape == (9, 5, 5) and last.agent_ids == pop.agent_ids
    np.testing.assert_allclose(last.matrices, expected, rtol=1e-5, atol=1e-6)
    assert (np.diagonal(last.matrices, axis1=1, axis2=2) == 1).all()
    assert last.matrices.min() >= 0.1 and last.matrices.max() <= 10
    assert set(last.model_versions) == {"m0", "m1", "m2"}
    assert len(publisher.agent_messages) == 27 and publisher.agent_messages[0][0] == "agent-0000"
    stats = scheduler.stats()
    assert stats["ticks_served"] == 3 and stats["latency_p50_ms"] > 0


async def test_bad_payloads_are_counted_and_serving_goes_on(model_dir: Path) -> None:
    scheduler, publisher = await make_scheduler(model_dir)
    ids = scheduler.population.agent_ids
    good = encode_tick(make_tick(1, ids))
    wrong_schema = msgpack.packb({"v": 1, "type": "tick", "tick": "x"})
    unknown = encode_tick(make_tick(2, (*ids[:-1], "intruder")))
    for payload in (b"\xc1garbage", good[: len(good) // 2], b"\x00" * 100_000, wrong_schema, unknown, good):
        await scheduler.serve(payload, time.perf_counter())
    drops = scheduler.stats()["dropped"]
    assert drops["malformed"] >= 1 and drops["oversized"] == 1 and drops["unknown_agent"] == 1
    assert sum(drops.values()) == 5
    assert [m.tick for m in publisher.decoded()] == [1]


async def test_a_slow_tick_makes_newer_ticks_win(model_dir: Path) -> None:
    scheduler, publisher = await make_scheduler(model_dir)
    ids = scheduler.population.agent_ids
    server = asyncio.create_task(scheduler.run())
    try:
        for number in range(6):  # a burst: no await between arrivals
            scheduler.on_tick(encode_tick(make_tick(number, ids)), time.perf_counter())
        for _ in range(100):
            await asyncio.sleep(0.01)
            if publisher.messages:
                break
        served = [m.tick for m in publisher.decoded()]
        assert served == [5]
        assert scheduler.ticks_skipped == 5 and scheduler.stats()["ticks_served"] == 1
    finally:
        server.cancel()


async def test_hot_reload_swaps_between_ticks_without_missing_one(model_dir: Path) -> None:
    scheduler, publisher = await make_scheduler(model_dir)
    pop, pool = scheduler.population, scheduler.pool
    ids = pop.agent_ids
    fresh = trading_weights(42)
    write_model(model_dir, "m1", fresh)
    changed = {"m1": read_model(model_dir / "m1_metadata.json")}
    reload_task: asyncio.Task | None = None
    generations: list[int] = []
    versions: list[str] = []
    for number in range(20):
        if number == 5:
            reload_task = asyncio.create_task(pool.reload(changed))
        generations.append(pool.current.number)
        before = pop.matrices.copy()
        tick = make_tick(number, ids)
        await scheduler.serve(encode_tick(tick), time.perf_counter())
        # each tick ran on exactly one generation: old or new weights for m1, never a mix
        seeds = {"m0": 0, "m1": 42 if generations[-1] == 2 else 1, "m2": 2}
        expected = offline_step(before, pop.desired, [seeds[k] for k in pop.model_keys], tick)
        np.testing.assert_allclose(pop.matrices, expected, rtol=1e-5, atol=1e-6)
        versions.append(publisher.decoded()[-1].model_versions["m1"])  # the version that served it
        await asyncio.sleep(0.005)
    assert reload_task is not None and await reload_task
    assert [m.tick for m in publisher.decoded()] == list(range(20))
    assert generations[0] == 1 and generations[-1] == 2
    assert generations == sorted(generations)
    assert [v == changed["m1"].version for v in versions] == [g == 2 for g in generations]


@pytest.mark.parametrize("agents", [1, 130])
async def test_population_sizes(model_dir: Path, agents: int) -> None:
    scheduler, publisher = await make_scheduler(model_dir, agents=agents)
    await scheduler.serve(encode_tick(make_tick(0, scheduler.population.agent_ids)), time.perf_counter())
    (answer,) = publisher.decoded()
    assert answer.matrices.shape == (agents, 5, 5) and np.isfinite(answer.matrices).all()


async def test_the_tick_limit_follows_the_roster_when_new_models_join(model_dir: Path) -> None:
    """A tick may name every agent served, also agents added after startup (one_per_checkpoint)."""
    limits = Limits.from_config(MqttConfig(), num_agents=3, num_items=len(ITEMS))
    scheduler, _ = await make_scheduler(model_dir, assignment="one_per_checkpoint", limits=limits)
    pop, pool = scheduler.population, scheduler.pool
    write_model(model_dir, "m3", trading_weights(3))
    info = read_model(model_dir / "m3_metadata.json")
    newcomer = new_agents([info], ["m3"], ITEMS, np.random.default_rng(0), first_row=len(pop))
    assert await pool.add_agents(newcomer, {"m3": info})

    msg = await scheduler.serve(encode_tick(make_tick(0, pop.agent_ids)), time.perf_counter())

    assert len(pop) == 4 and msg is not None and msg.agent_ids == pop.agent_ids
    assert scheduler.stats()["dropped"] == {}
