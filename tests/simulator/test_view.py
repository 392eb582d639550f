"""The simulator's market view ({prefix}/view/market): contents, size bounds, decoding untrusted input."""

from __future__ import annotations

import asyncio

import msgpack
import numpy as np
import pytest

from blockmarket.core.config import parse_config
from blockmarket.market.rules import trade_step
from blockmarket.simulator.simulation import SimulationSummary
from blockmarket.simulator.view import (
    VIEW_MAX_AGENTS,
    VIEW_MAX_TRADES,
    ViewPublisher,
    decode_view,
    encode_view,
    view_topic,
)
from blockmarket.wire.limits import Limits, ProtocolError
from blockmarket.wire.transport import MqttLink
from tests.support.simulation import simulator
from tests.support.wire import wait_until


def test_a_view_holds_the_sampled_agents_and_the_trades_between_them() -> None:
    sim = simulator(40)
    for _ in range(5):
        sim.step()
    summary = sim.summary()
    view = decode_view(sim.view.encode(7, summary), Limits())
    pop = sim.population
    assert view.agent_ids == tuple(pop.agent_ids) and view.agents_total == 40  # small: every agent
    assert np.array_equal(view.positions, pop.positions)
    assert np.array_equal(view.desired, pop.desired)
    assert view.tick == 7 and view.market == "default" and view.items == sim.config.environment.items_list
    assert view.trades_total == sim.trades > 0  # all trades of the 5 steps
    assert len(view.trades) == min(sim.trades, VIEW_MAX_TRADES) and view.trades.max() < 40
    assert view.figures["fitness_mean"] == pytest.approx(float(view.fitness.mean()), abs=1e-3)


def test_ten_thousand_agents_are_sampled_to_fit_the_payload_limit() -> None:
    sim = simulator(10_000)
    sim.view.record(trade_step(sim.population, np.random.default_rng(0), sim.config.environment))
    payload = sim.view.encode(1, sim.summary())
    view = decode_view(payload, Limits())
    assert len(view.agent_ids) == VIEW_MAX_AGENTS and view.agents_total == 10_000
    assert len(payload) < 100_000  # ~30 bytes per sampled agent
    assert view.agent_ids[0] == "agent-0000" and view.agent_ids[-1] == "agent-9999"  # spread, not a prefix
    # A limit the simulator's own messages could not meet, as a safety net: the sample halves until it fits
    tight = parse_config({"mqtt": {"max_payload_bytes": 16 * 1024}}).config
    small = ViewPublisher(tight, sim.population, sim.population.inventory.copy())
    payload = small.encode(1, sim.summary())
    assert len(payload) <= 16 * 1024
    assert 100 < len(decode_view(payload, Limits()).agent_ids) < VIEW_MAX_AGENTS


def f4(values: list[float]) -> bytes:
    return np.array(values, dtype=np.float32).tobytes()


def test_a_bad_view_is_refused() -> None:
    sim = simulator(4)
    good = msgpack.unpackb(sim.view.encode(1, sim.summary()))
    for change, kind in (
        (
            {
                "trades": {
                    "dtype": "<f4",
                    "shape": [1, 2],
                    "data": f4([0, 9]),
                }
            },
            "range",
        ),
        (
            {
                "desired": {
                    "dtype": "<f4",
                    "shape": [4],
                    "data": f4([0, 1, 2, 99]),
                }
            },
            "range",
        ),
        ({"positions": {"dtype": "<f4", "shape": [3, 2], "data": bytes(24)}}, "shape"),
        ({"fitness_mean": float("nan")}, "non_finite"),
        ({"extra": 1}, "schema"),
        ({"v": 2}, "version"),
    ):
        with pytest.raises(ProtocolError) as refused:
            decode_view(msgpack.packb({**good, **change}), Limits())
        assert refused.value.kind == kind, change


@pytest.mark.mqtt
async def test_the_simulator_publishes_views_while_it_plays(prefix: str) -> None:
    sim = simulator(12, prefix=prefix)
    views = []
    link = MqttLink(
        sim.config.mqtt,
        client_id=f"view-test-{prefix}",
        subscriptions={view_topic(prefix): lambda payload, *_: views.append(decode_view(payload, Limits()))},
    )
    task = asyncio.create_task(link.run())
    try:
        await asyncio.wait_for(link.connected.wait(), 10)
        summary: SimulationSummary = await sim.run(ticks=30, rate_hz=40)
        await wait_until(lambda: len(views) == sim.view.published, 5, "every view published")
    finally:
        await link.disconnect()
        await task
    assert len(views) >= 2 and summary.ticks_sent == 30
    assert [v.tick for v in views] == sorted(v.tick for v in views)
    assert all(v.agent_ids == tuple(sim.population.agent_ids) for v in views)
    assert sum(v.trades_total for v in views) <= summary.trades


def test_a_decoded_view_encodes_to_the_same_bytes() -> None:
    sim = simulator(3)
    payload = sim.view.encode(0, sim.summary())
    assert encode_view(decode_view(payload, Limits())) == payload
    assert view_topic("blockmarket") == "blockmarket/view/market"
