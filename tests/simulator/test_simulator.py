"""The market simulator: plays the game server against a runtime over the real broker."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from blockmarket.core.config import Config, MqttConfig
from blockmarket.simulator.roster import SimulatorError, discover_roster, roster_from_message
from blockmarket.simulator.simulation import MarketSimulator, obeys_update_rule
from blockmarket.wire.messages import RosterMessage
from blockmarket.wire.topics import Topics
from blockmarket.wire.transport import MqttLink
from tests.support.broker import SHARED_HOST, SHARED_PORT
from tests.support.wire import EchoRuntime, free_port, started, wait_until

pytestmark = pytest.mark.mqtt

ITEMS = ["diamond", "gold", "apple", "emerald", "redstone"]


def config_for(prefix: str, port: int = SHARED_PORT) -> Config:
    return Config().model_copy(
        update={
            "mqtt": MqttConfig(host=SHARED_HOST, port=port, topic_prefix=prefix, reconnect_max_backoff_s=0.5)
        }
    )


@contextlib.asynccontextmanager
async def echo_runtime(config: Config, count: int = 16) -> AsyncIterator[EchoRuntime]:
    runtime = EchoRuntime(
        config.mqtt,
        agent_ids=[f"agent-{i:04d}" for i in range(count)],
        desired=[ITEMS[i % 5] for i in range(count)],
        items=ITEMS,
    )
    task = asyncio.create_task(runtime.serve())
    await asyncio.wait_for(runtime.transport.connected.wait(), 5)
    try:
        yield runtime
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        cleaner = MqttLink(config.mqtt, client_id=f"cleaner-{config.mqtt.topic_prefix}", subscriptions={})
        cleaner_task = await started(cleaner)
        for topic in (Topics(config.mqtt.topic_prefix).status, Topics(config.mqtt.topic_prefix).roster):
            await cleaner.publish(topic, b"", retain=True)
        await cleaner.disconnect()
        await cleaner_task


async def test_every_tick_answered_and_the_answers_applied(prefix: str) -> None:
    config = config_for(prefix)
    async with echo_runtime(config) as runtime:
        roster = await discover_roster(config, wait_s=5)
        assert roster is not None and roster.state == "online"
        assert roster.agent_ids == tuple(runtime.agent_ids) and roster.desired[:6] == (0, 1, 2, 3, 4, 0)
        simulator = MarketSimulator(config, roster.agent_ids, roster.desired, seed=1)
        reports: list[str] = []
        summary = await simulator.run(40, rate_hz=100, on_report=lambda s: reports.append(s.line()))
    assert summary.ticks_sent == summary.answered == 40 and summary.missing == 0
    assert runtime.served == list(range(40))
    p50, p99 = summary.latency_p50_ms, summary.latency_p99_ms
    assert p50 is not None and p99 is not None and 0 < p50 <= p99
    assert summary.rule_violations == summary.unknown_agents == 0 and summary.dropped == {}
    assert summary.runtime_latency_p50_ms == pytest.approx(0.1)
    # The market ran with the runtime's matrices: the last applied answer is exactly what it sent.
    assert simulator.applied_tick >= 20  # answers kept being applied (a loaded machine may lag a few ticks)
    np.testing.assert_array_equal(simulator.population.matrices, runtime.answers[simulator.applied_tick])
    assert summary.trades > 0 and summary.agents == 16
    assert reports and "answered" in reports[0]
    assert 25 < summary.tick_rate_hz <= 110  # paced at the requested 100/s, not faster


async def test_unanswered_ticks_are_missing(prefix: str) -> None:
    config = config_for(prefix).model_copy(
        update={"simulator": Config().simulator.model_copy(update={"reply_timeout_s": 0.2})}
    )
    simulator = MarketSimulator(config, ["a", "b", "c"], [0, 1, 2])
    summary = await simulator.run(5, rate_hz=50)
    assert (summary.ticks_sent, summary.answered, summary.missing) == (5, 0, 5)
    assert summary.latency_p50_ms is None


async def test_bad_answers_are_counted_not_applied(prefix: str) -> None:
    config = config_for(prefix)
    async with echo_runtime(config, count=4) as runtime:
        runtime.corrupt = True
        simulator = MarketSimulator(config, runtime.agent_ids, [0, 1, 2, 3])
        before = simulator.population.matrices.copy()
        garbage = MqttLink(config.mqtt, client_id=f"garbage-{prefix}", subscriptions={})
        garbage_task = await started(garbage)
        run = asyncio.create_task(simulator.run(10, rate_hz=50))
        await wait_until(lambda: simulator.ticks_sent > 0, 5, "the simulator to be subscribed and ticking")
        for _ in range(5):
            await garbage.publish(Topics(prefix).matrices, b"\xc1 not msgpack")
            await asyncio.sleep(0.02)
        summary = await run
        await garbage.disconnect()
        await garbage_task
    assert summary.answered == 10 and summary.rule_violations == 10
    assert summary.dropped == {"malformed": 5, "off_rule": 10}
    np.testing.assert_array_equal(simulator.population.matrices, before)


def test_roster_must_fit_the_configured_items() -> None:
    announced = RosterMessage(
        client_id="rt",
        started_at=1.0,
        pool_generation=1,
        items=tuple(ITEMS),
        agent_ids=("a", "b"),
        desired=("gold", "apple"),
        models=("m", "m"),
        model_versions={"m": "1"},
        initial_matrices=np.ones((2, 5, 5), np.float32),
    )
    roster = roster_from_message(announced, "online", ITEMS)
    assert roster.agent_ids == ("a", "b") and roster.desired == (1, 2) and roster.state == "online"
    with pytest.raises(SimulatorError, match=r"environment\.items_list"):
        roster_from_message(announced, "online", ["wood", "stone"])


def test_a_roster_whose_messages_exceed_the_payload_limit_is_refused_at_startup() -> None:
    ids = [f"agent-{i:04d}" for i in range(12_000)]
    small = Config(mqtt=MqttConfig(max_payload_bytes=1_048_576))
    with pytest.raises(SimulatorError) as caught:
        MarketSimulator(small, ids, np.zeros(len(ids), np.int64))
    message = str(caught.value)
    assert message.startswith("12000 agents: answer messages of ") and "tick messages" not in message
    assert "raise mqtt.max_payload_bytes to at least" in message and "simulator.num_agents" in message
    assert MarketSimulator(Config(), ids, np.zeros(len(ids), np.int64)).population.size == 12_000


def test_obeys_update_rule() -> None:
    good = np.full((3, 5, 5), 2.0, np.float32)
    good[:, np.arange(5), np.arange(5)] = 1.0
    assert obeys_update_rule(good)
    for change in (lambda m: m.__setitem__((0, 1, 1), 1.5), lambda m: m.__setitem__((2, 0, 3), 10.5)):
        bad = good.copy()
        change(bad)
        assert not obeys_update_rule(bad)


async def run_cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "blockmarket.cli", "simulate", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.slow
async def test_cli_stops_by_itself_and_writes_the_summary(prefix: str, tmp_path: Path) -> None:
    config = config_for(prefix)
    report = tmp_path / "sim.json"
    async with echo_runtime(config, count=32) as runtime:
        code, out, err = await run_cli(
            "--ticks", "30", "--rate", "40", "--topic-prefix", prefix, "--json", str(report), "--wait", "5"
        )  # fmt: skip
    assert code == 0, err
    summary = json.loads(report.read_text())
    assert summary["ticks_sent"] == summary["answered"] == 30 and summary["missing"] == 0
    assert summary["agents"] == 32 and summary["latency_p99_ms"] is not None
    assert "final: tick" in out and runtime.served == list(range(30))


@pytest.mark.slow
async def test_cli_without_a_runtime_says_so(prefix: str, tmp_path: Path) -> None:
    report = tmp_path / "sim.json"
    code, _, err = await run_cli(
        "--ticks", "3", "--rate", "20", "--agents", "7", "--wait", "0", "--topic-prefix", prefix,
        "--json", str(report), "--quiet",
    )  # fmt: skip
    assert code == 1 and "no tick was answered" in err and "agent-0000" in err
    summary = json.loads(report.read_text())
    assert summary["agents"] == 7 and summary["ticks_sent"] == summary["missing"] == 3


async def test_no_broker_is_a_clear_error(tmp_path: Path) -> None:
    config = config_for("bmtest-nobroker", port=free_port())
    simulator = MarketSimulator(config, ["a"], [0], connect_timeout_s=1.0)
    with pytest.raises(SimulatorError, match="no MQTT broker reachable"):
        await asyncio.wait_for(simulator.run(1), 30)
