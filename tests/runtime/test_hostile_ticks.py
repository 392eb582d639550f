"""Hostile clients and floods against `blockmarket run` over a real Mosquitto (issue 10, parts 1-3, 8, 9).

The broker is a private Mosquitto told to queue without limit for a slow subscriber
(max_queued_messages 0), so every message published reaches the runtime: a message missing from the
runtime's counts would have been lost inside it. The counting invariant is checked from the status:
ticks_received == served + skipped + unpublished + inference_errors + in_flight + every dropped kind.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from benchmarks.hostile_ticks import HostilePayloads
from blockmarket.core.config import load_config
from blockmarket.wire.limits import Limits
from blockmarket.wire.messages import MarketTick, encode_tick
from tests.support.serving import (
    ITEMS,
    GameClient,
    OfflineMarket,
    check_matrices,
    running,
    serving_config,
)
from tests.support.wire import PrivateMosquitto, blast, wait_until

pytestmark = [pytest.mark.mqtt, pytest.mark.slow]

AGENTS = 12
HOSTILE = 20_000
HOSTILE_PER_VALID = 100
FLOOD = 20_000
GARBAGE_EVERY = 4  # one garbage message after every 4th tick of the flood
SEED = 20_261_201
RUNTIME = {"num_agents": AGENTS, "status_interval_s": 0.3}
MQTT: dict[str, object] = {"max_payload_bytes": 65_536}
BUCKETS = ("ticks_served", "ticks_skipped", "ticks_unpublished", "inference_errors", "ticks_in_flight")


def accounted(status: dict) -> int:
    return sum(status[bucket] for bucket in BUCKETS) + sum(status["dropped"].values())


def settled(game: GameClient, received: int) -> bool:
    """The status counts ``received`` messages and nothing is waiting or being served."""
    status = game.status
    return status.get("ticks_received") == received and status.get("ticks_in_flight") == 0


def drop_log_lines(log: str) -> Counter[str]:
    """Warning lines about dropped ticks, per kind."""
    return Counter(re.findall(r"dropped tick on \S+ \[(\w+)\]", log))


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[PrivateMosquitto]:
    broker = PrivateMosquitto(tmp_path, settings=("max_queued_messages 0",))
    broker.start()
    yield broker
    broker.stop()


async def test_twenty_thousand_hostile_payloads_are_all_counted_and_never_touch_an_answer(
    tmp_path: Path, model_dir: Path, prefix: str, broker: PrivateMosquitto
) -> None:
    config_path = serving_config(tmp_path, model_dir, prefix, mqtt=MQTT | {"port": broker.port}, **RUNTIME)
    config = load_config(config_path)
    valid_count = HOSTILE // HOSTILE_PER_VALID
    async with GameClient(config.mqtt, len(ITEMS)) as game:
        # A tick left retained on the broker is replayed to the runtime when it subscribes: never served.
        one = np.ones((1, len(ITEMS)), np.float32)
        stale = MarketTick(999, time.time(), ("agent-0000",), one, one[:, 0] * 0, one[:, 0])
        assert await game.link.publish(game.topics.tick, encode_tick(stale), retain=True)
        started = time.monotonic()
        with running(config_path, tmp_path):
            await game.online()
            limits = Limits.from_announcement(game.status["limits"], num_items=len(ITEMS))
            hostile = HostilePayloads(game.tick(0), limits, set(game.agent_ids), seed=SEED)
            payloads = iter(hostile)
            expected: Counter[str] = Counter({"retained": 1})
            for number in range(valid_count):
                for _ in range(HOSTILE_PER_VALID):
                    payload, kind = next(payloads)
                    expected[kind] += 1
                    await game.send_raw(payload)
                await game.send(game.tick(number, market_mean=number % 3 == 0))
                check_matrices((await game.answer(number)).matrices, AGENTS, len(ITEMS))
            total = HOSTILE + valid_count + 1
            await wait_until(lambda: settled(game, total), 30, f"the status to count {total} messages")
            status = dict(game.status)
        await game.link.publish(game.topics.tick, b"", retain=True)  # delete the stored tick
    elapsed = time.monotonic() - started
    assert status["dropped"] == dict(expected), "every hostile payload counted once, under its kind"
    assert status["ticks_served"] == valid_count == len(game.answers)
    assert status["ticks_skipped"] == status["ticks_unpublished"] == status["inference_errors"] == 0
    assert accounted(status) == status["ticks_received"] == total
    assert status["guarded_outputs"] == 0
    assert OfflineMarket.check(config_path, game) == valid_count  # no hostile payload touched the state
    log = (tmp_path / "run.log").read_text()
    lines = drop_log_lines(log)
    assert set(lines) == set(expected) and "internal" not in lines
    windows = elapsed / 10 + 2  # DropCounter: each kind at most once per 10 s window
    assert all(count <= windows for count in lines.values()), (lines, elapsed)
    assert "Traceback" not in log
    assert not re.search(r"^WARNING forged line", log, re.MULTILINE), "an agent id started a log line"


async def test_a_flood_is_counted_whole_and_its_newest_tick_answered(
    tmp_path: Path, model_dir: Path, prefix: str, broker: PrivateMosquitto
) -> None:
    """The issue's flood: 20,000 valid ticks as fast as a client can publish, garbage in between.

    Then its other case: 500 garbage messages in front of each of 40 valid ticks, each answered.
    """
    config_path = serving_config(tmp_path, model_dir, prefix, mqtt=MQTT | {"port": broker.port}, **RUNTIME)
    config = load_config(config_path)
    with running(config_path, tmp_path):
        async with GameClient(config.mqtt, len(ITEMS)) as game:
            await game.online()
            flood: list[bytes] = []
            for number in range(FLOOD):
                tick = game.tick(number)
                game.sent[number] = tick
                flood.append(encode_tick(tick))
                if number % GARBAGE_EVERY == GARBAGE_EVERY - 1:
                    flood.append(b"\xc1 garbage %d" % number)
            garbage = len(flood) - FLOOD
            assert await asyncio.to_thread(blast, broker.port, game.topics.tick, flood) == len(flood)
            newest = await game.answer(FLOOD - 1, timeout=120)  # the newest tick of the burst
            check_matrices(newest.matrices, AGENTS, len(ITEMS))
            await wait_until(lambda: settled(game, len(flood)), 30, "the flood to be counted")
            after_flood = dict(game.status)

            rounds = 40
            for number in range(FLOOD, FLOOD + rounds):
                tick = game.tick(number)
                game.sent[number] = tick
                burst = [b"\xc1 junk %d" % i for i in range(500)] + [encode_tick(tick)]
                await asyncio.to_thread(blast, broker.port, game.topics.tick, burst)
                await game.answer(number, timeout=30)
            total = len(flood) + rounds * 501
            await wait_until(lambda: settled(game, total), 30, "the rounds to be counted")
            status = dict(game.status)
    assert after_flood["ticks_served"] + after_flood["ticks_skipped"] == FLOOD
    assert after_flood["dropped"] == {"malformed": garbage}
    assert accounted(after_flood) == after_flood["ticks_received"] == len(flood)
    assert status["ticks_served"] == after_flood["ticks_served"] + rounds  # every round's tick answered
    assert status["dropped"] == {"malformed": garbage + rounds * 500}
    assert accounted(status) == status["ticks_received"] == total
    assert OfflineMarket.check(config_path, game) == status["ticks_served"]  # skipped ticks left no trace
    log = (tmp_path / "run.log").read_text()
    assert "Message queue is full" not in log
    assert drop_log_lines(log)["malformed"] <= 10  # rate-limited, not one line per message
