"""The tick pipeline: newest valid tick wins, bad input is counted and dropped, swaps fall between ticks."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest

from blockmarket.core.config import MqttConfig
from blockmarket.core.state import MATRIX_MAX, MATRIX_MIN, apply_update, build_states
from blockmarket.models.files import discover_models, read_model
from blockmarket.wire.limits import Limits
from blockmarket.wire.messages import MarketTick, encode_tick
from runtime import intake as intake_module
from runtime.agents import Assignment, create_population, new_agents
from runtime.intake import AcceptedTick, TickIntake, TickSlot
from runtime.scheduler import TickScheduler
from runtime.sessions import SessionPool
from tests.support.pools import CountingFactory
from tests.support.serving import (
    ITEMS,
    RecordingPublisher,
    reference_forward,
    runaway_weights,
    trading_weights,
    write_model,
)

ALPHA = 0.04
LIMITS = Limits(max_payload_bytes=64 * 1024, num_items=len(ITEMS))
BUCKETS = ("ticks_served", "ticks_skipped", "ticks_unpublished", "inference_errors", "ticks_in_flight")


def make_tick(number: int, agent_ids: tuple[str, ...], seed: int = 0, market_mean=None) -> MarketTick:
    rng = np.random.default_rng(seed + number)
    count = len(agent_ids)
    successful = rng.integers(0, 4, size=count)
    return MarketTick(
        tick=number,
        sent_at=time.time(),
        agent_ids=agent_ids,
        inventory=rng.integers(0, 20, size=(count, len(ITEMS))).astype(np.float32),
        successful=successful.astype(np.float32),
        attempted=(successful + rng.integers(0, 5, size=count)).astype(np.float32),
        market_mean=market_mean,
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
    intake = TickIntake(pop, limits, "test/market/tick")
    return TickScheduler(pool, publisher, intake, alpha=ALPHA, **kwargs), publisher


def arrive(scheduler: TickScheduler, payload: bytes, retained: bool = False) -> None:
    """What the transport does with each message as it is read."""
    scheduler.intake.receive(payload, time.perf_counter(), retained)


def accounted(stats: dict) -> int:
    """The buckets of the counting invariant, summed from the published figures."""
    return sum(stats[bucket] for bucket in BUCKETS) + sum(stats["dropped"].values())


def offline_step(matrices: np.ndarray, desired, seeds, tick: MarketTick) -> np.ndarray:
    """Recompute one tick with numpy only (agent i's weights are trading_weights(seeds[i]))."""
    rate = np.clip(tick.successful / np.maximum(tick.attempted, 1), 0, 1)
    states = build_states(tick.inventory, desired, matrices, rate)
    out = np.concatenate(
        [reference_forward(trading_weights(seed), s[None]) for seed, s in zip(seeds, states, strict=True)]
    )
    return apply_update(matrices.copy(), out.astype(np.float32), ALPHA)


def test_slot_keeps_only_the_newest_tick_and_says_what_it_overtook() -> None:
    puts: list[int] = []
    slot = TickSlot(on_put=lambda: puts.append(1))
    ticks = [AcceptedTick(make_tick(i, ("a",)), np.zeros(1, np.int64), float(i)) for i in range(6)]
    assert slot.put(ticks[0]) is None
    for i in range(1, 5):
        assert slot.put(ticks[i]) is ticks[i - 1]
    assert len(puts) == 5  # the scheduler is told of every put
    assert slot.take_now() is ticks[4]
    assert slot.take_now() is None  # nothing queued behind the newest
    assert slot.put(ticks[5]) is None and slot.take_now() is ticks[5]


async def test_ticks_are_answered_with_the_update_rule(model_dir: Path) -> None:
    scheduler, publisher = await make_scheduler(model_dir, per_agent_topics=True)
    pop = scheduler.population
    expected = pop.matrices.copy()
    for number in range(3):
        tick = make_tick(number, pop.agent_ids)
        expected = offline_step(expected, pop.desired, [int(k[1]) for k in pop.model_keys], tick)
        arrive(scheduler, encode_tick(tick))
        assert await scheduler.serve_next() is not None
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
    assert stats["ticks_served"] == stats["ticks_received"] == 3 and stats["latency_p50_ms"] > 0
    assert accounted(stats) == 3 and stats["guarded_outputs"] == 0


async def test_bad_payloads_are_counted_on_arrival_and_serving_goes_on(model_dir: Path) -> None:
    scheduler, publisher = await make_scheduler(model_dir)
    ids = scheduler.population.agent_ids
    good = encode_tick(make_tick(1, ids))
    wrong_schema = msgpack.packb({"v": 1, "type": "tick", "tick": "x"})
    unknown = encode_tick(make_tick(2, (*ids[:-1], "intruder")))
    for payload in (b"\xc1garbage", good[: len(good) // 2], b"\x00" * 100_000, wrong_schema, unknown, good):
        arrive(scheduler, payload)
    arrive(scheduler, good, retained=True)  # the broker replaying a stored tick: never served
    drops = scheduler.stats()["dropped"]
    assert drops == {"malformed": 2, "oversized": 1, "schema": 1, "unknown_agent": 1, "retained": 1}
    assert await scheduler.serve_next() is not None
    assert [m.tick for m in publisher.decoded()] == [1]
    stats = scheduler.stats()
    assert stats["ticks_received"] == 7 == accounted(stats) and stats["ticks_served"] == 1


async def test_garbage_never_displaces_the_newest_valid_tick(model_dir: Path) -> None:
    """The issue's case: 10 garbage messages next to each valid tick used to leave valid ticks unanswered."""
    scheduler, publisher = await make_scheduler(model_dir)
    ids = scheduler.population.agent_ids
    server = asyncio.create_task(scheduler.run())
    try:
        for number in range(20):
            arrive(scheduler, encode_tick(make_tick(number, ids)))
            for junk in range(10):  # all arrive before the serving task runs again
                arrive(scheduler, bytes([0xC1, junk]))
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)
    finally:
        server.cancel()
    assert [m.tick for m in publisher.decoded()] == list(range(20))
    stats = scheduler.stats()
    assert stats["dropped"] == {"malformed": 200} and stats["ticks_skipped"] == 0
    assert stats["ticks_received"] == 220 == accounted(stats)


async def test_a_slow_tick_makes_newer_ticks_win(model_dir: Path) -> None:
    scheduler, publisher = await make_scheduler(model_dir)
    ids = scheduler.population.agent_ids
    server = asyncio.create_task(scheduler.run())
    try:
        for number in range(6):  # a burst: no await between arrivals
            arrive(scheduler, encode_tick(make_tick(number, ids)))
            arrive(scheduler, b"\xc1 garbage after every tick")
        for _ in range(100):
            await asyncio.sleep(0.01)
            if publisher.messages:
                break
        served = [m.tick for m in publisher.decoded()]
        assert served == [5]  # the newest valid tick, though garbage arrived after it
        stats = scheduler.stats()
        assert stats["ticks_skipped"] == 5 and stats["ticks_served"] == 1
        assert stats["ticks_received"] == 12 == accounted(stats) and stats["ticks_in_flight"] == 0
    finally:
        server.cancel()


async def test_extreme_market_rates_are_refused_and_cannot_poison_the_agents(model_dir: Path) -> None:
    """The issue's reproduction: finite extremes in market_mean, then a tick with market_mean nil."""
    scheduler, publisher = await make_scheduler(model_dir)
    ids = scheduler.population.agent_ids
    extremes = np.array([3.4e38, -3.4e38, 1e38, -1e38, 0, 1, 5], np.float32)
    for number in range(5):
        rates = np.resize(np.roll(extremes, number), (5, 5)).astype(np.float32)
        arrive(scheduler, encode_tick(make_tick(number, ids, market_mean=rates)))
    assert scheduler.stats()["dropped"] == {"range": 5}
    arrive(scheduler, encode_tick(make_tick(5, ids)))  # market_mean nil: the mean of the other agents
    arrive(scheduler, encode_tick(make_tick(6, ids, market_mean=np.zeros((5, 5), np.float32))))  # "no data"
    await scheduler.serve_next()
    rates = np.full((5, 5), MATRIX_MAX, np.float32)
    arrive(scheduler, encode_tick(make_tick(7, ids, market_mean=rates)))  # the range's edge is accepted
    await scheduler.serve_next()
    for answer in publisher.decoded():
        assert np.isfinite(answer.matrices).all()
        assert answer.matrices.min() >= MATRIX_MIN and answer.matrices.max() <= MATRIX_MAX
    assert [m.tick for m in publisher.decoded()] == [6, 7]
    assert np.isfinite(scheduler.population.matrices).all()
    stats = scheduler.stats()
    assert stats["ticks_skipped"] == 1 and stats["inference_errors"] == stats["guarded_outputs"] == 0


async def test_the_output_guard_keeps_the_matrices_a_runaway_model_would_break(tmp_path: Path) -> None:
    model_dir = tmp_path / "onnx"
    write_model(model_dir, "m0", trading_weights(0))
    write_model(model_dir, "m9", runaway_weights(trigger=8.0))
    scheduler, publisher = await make_scheduler(model_dir, agents=6)
    pop = scheduler.population
    runaway = [row for row, key in enumerate(pop.model_keys) if key == "m9"]
    arrive(scheduler, encode_tick(make_tick(0, pop.agent_ids)))
    await scheduler.serve_next()  # market rates from the agents' own matrices (< 8): every agent served
    before = pop.matrices.copy()
    rates = np.full((5, 5), 9.5, np.float32)  # accepted (within [0.1, 10]), and it trips m9
    arrive(scheduler, encode_tick(make_tick(1, pop.agent_ids, market_mean=rates)))
    await scheduler.serve_next()
    answer = publisher.decoded()[-1]
    assert answer.tick == 1 and np.isfinite(answer.matrices).all()
    np.testing.assert_array_equal(answer.matrices[runaway], before[runaway])  # kept, not NaN
    healthy = [row for row in range(len(pop)) if row not in runaway]
    assert not np.array_equal(answer.matrices[healthy], before[healthy])  # the others moved on
    stats = scheduler.stats()
    assert stats["guarded_outputs"] == len(runaway) == 3 and stats["ticks_served"] == 2


async def test_a_bug_in_the_checks_is_counted_and_logged_not_raised_into_paho(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An exception escaping the handler would end the MQTT session; a codec bug is counted instead."""
    scheduler, _ = await make_scheduler(model_dir)

    def broken(payload: bytes, limits: Limits, version: int = 1) -> MarketTick:
        raise IndexError("a bug in the codec")

    monkeypatch.setattr(intake_module, "decode_tick", broken)
    with caplog.at_level(logging.WARNING, logger="runtime.intake"):
        arrive(scheduler, encode_tick(make_tick(0, scheduler.population.agent_ids)))
    stats = scheduler.stats()
    assert stats["dropped"] == {"internal": 1} and stats["ticks_received"] == 1 == accounted(stats)
    (record,) = [r for r in caplog.records if r.name == "runtime.intake"]
    assert "a bug in the codec" in record.getMessage() and record.exc_info is not None


async def test_a_failed_inference_is_its_own_bucket(model_dir: Path) -> None:
    scheduler, publisher = await make_scheduler(model_dir)
    arrive(scheduler, encode_tick(make_tick(0, scheduler.population.agent_ids)))
    scheduler.pool.close()  # the inference threads are gone: this tick's inference fails
    assert await scheduler.serve_next() is None
    stats = scheduler.stats()
    assert stats["inference_errors"] == 1 and stats["ticks_served"] == 0 and publisher.messages == []
    assert stats["ticks_received"] == 1 == accounted(stats) and stats["ticks_in_flight"] == 0


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
        arrive(scheduler, encode_tick(tick))
        await scheduler.serve_next()
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
    arrive(scheduler, encode_tick(make_tick(0, scheduler.population.agent_ids)))
    await scheduler.serve_next()
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

    arrive(scheduler, encode_tick(make_tick(0, pop.agent_ids)))
    msg = await scheduler.serve_next()

    assert len(pop) == 4 and msg is not None and msg.agent_ids == pop.agent_ids
    assert scheduler.stats()["dropped"] == {}
