"""The issue's acceptance tests: runtime and game in separate processes over the real Mosquitto.

Every answer is checked against an offline recomputation of the same models from the recorded ticks, so
"agent state intact" (across broker restarts, bad input, skipped ticks) is checked, not assumed.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
from collections import Counter
from pathlib import Path

import msgpack
import numpy as np
import onnxruntime as ort
import pytest

from blockmarket.core.config import MqttConfig, load_config
from blockmarket.core.contract import PACK_TOLERANCE
from blockmarket.wire.messages import MarketTick, encode_tick
from tests.support.broker import SHARED_HOST, SHARED_PORT
from tests.support.serving import (
    ITEMS,
    CpuPressure,
    GameClient,
    OfflineMarket,
    check_matrices,
    running,
    runtime_process,
    stop_process,
    trading_weights,
    write_config,
    write_model,
)
from tests.support.wire import PrivateMosquitto, wait_until

pytestmark = [pytest.mark.mqtt, pytest.mark.slow]

AGENTS = 128
TICKS = 200
RATE_HZ = 10


@pytest.fixture
def twelve_models(tmp_path: Path) -> Path:
    """More distinct models than runtime.max_sessions (8): the runtime serves them as a population pack."""
    directory = tmp_path / "onnx"
    for i in range(12):
        write_model(directory, f"agent_{i:02d}", trading_weights(100 + i), desired_item=ITEMS[i % 5])
    return directory


def serving_config(
    tmp_path: Path, model_dir: Path, prefix: str, pack_precision: str = "fp32", **mqtt: object
) -> Path:
    """fp32 packs by default: their answers equal an fp32 recomputation (OfflineMarket.check)."""
    return write_config(
        tmp_path / "config.yaml",
        runtime={
            "num_agents": AGENTS,
            "model_dir": str(model_dir),
            "convert_on_startup": False,
            "status_interval_s": 0.3,
            "cpu_pack_precision": pack_precision,
        },
        training={"model_save_path": str(tmp_path / "no-checkpoints")},
        mqtt={"topic_prefix": prefix, "reconnect_max_backoff_s": 0.5, "max_payload_bytes": 65536, **mqtt},
        npu={"enabled": False},
    )


async def test_128_agents_200_ticks_with_the_simulator(
    tmp_path: Path, twelve_models: Path, prefix: str
) -> None:
    """Every tick answered on an idle machine; under CPU overload the runtime may skip a tick (latest wins).

    The simulator sends at a fixed rate without waiting for answers (as a game server does). When the
    runtime is starved of CPU for longer than a tick period, the ticks that arrived meanwhile are coalesced
    and only the newest is served (docs/runtime.md, Scheduler). Then every tick must still be accounted
    for: answered, or counted as skipped in the runtime's status, and never lost on the way.
    """
    config_path = serving_config(tmp_path, twelve_models, prefix)
    config = load_config(config_path)
    summary_path = tmp_path / "simulation.json"
    with running(config_path, tmp_path):
        async with GameClient(config.mqtt, len(ITEMS), record_ticks=True) as recorder:
            status = await recorder.online()
            assert status["agents"] == AGENTS and recorder.roster is not None
            assert len(recorder.roster.model_versions) == 12
            simulate = [
                *(sys.executable, "-m", "blockmarket.cli", "simulate", "--config", str(config_path)),
                *("--ticks", str(TICKS), "--rate", str(RATE_HZ), "--json", str(summary_path), "--quiet"),
            ]
            with CpuPressure() as pressure:
                simulator = await asyncio.create_subprocess_exec(
                    *simulate, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
                )
                output, _ = await asyncio.wait_for(simulator.communicate(), 120)
            assert simulator.returncode == 0, output.decode()[-3000:]
            await wait_until(
                lambda: accounted(recorder) == TICKS, 15, f"the runtime to account for {TICKS} ticks"
            )
    summary = json.loads(summary_path.read_text())
    served, skipped = recorder.status["ticks_served"], recorder.status["ticks_skipped"]
    assert recorder.status["ticks_received"] == TICKS == accounted(recorder)
    assert sorted(recorder.sent) == list(range(TICKS)) and summary["ticks_sent"] == TICKS
    assert len(recorder.answers) == summary["answered"] == served and summary["missing"] == skipped
    assert summary["rule_violations"] == 0 and summary["unknown_agents"] == 0
    for answer in recorder.answers.values():
        check_matrices(answer.matrices, AGENTS, len(ITEMS))
    assert OfflineMarket.check(config_path, recorder) == served  # a skipped tick left no trace in state
    unanswered = sorted(set(range(TICKS)) - set(recorder.answers))
    allowed = TICKS // 10 if pressure.overloaded else 0
    assert skipped <= allowed, f"{skipped} ticks skipped ({unanswered}) while {pressure}"
    log = (tmp_path / "run.log").read_text()
    assert (
        "pack:TradingNetwork-61x128" in log
        and f"{TICKS} ticks received, {served} served, {skipped} skipped" in log
    )


BUCKETS = ("ticks_served", "ticks_skipped", "ticks_unpublished", "inference_errors", "ticks_in_flight")


async def test_the_shipped_default_serves_int8_packs_within_their_tolerance(
    tmp_path: Path, twelve_models: Path, prefix: str
) -> None:
    """runtime.cpu_pack_precision: auto serves the 12-model pack with int8 weights where they validate (on
    every CPU, docs/npu.md); each answer is one fp32 step from the previous one, within the pack tolerance."""
    config_path = serving_config(tmp_path, twelve_models, prefix, pack_precision="auto")
    with running(config_path, tmp_path):
        async with GameClient(load_config(config_path).mqtt, len(ITEMS)) as game:
            await game.online()
            for number in range(20):
                await game.send(game.tick(number, market_mean=number % 2 == 0))
                await game.answer(number)
    assert OfflineMarket.check_int8(config_path, game, PACK_TOLERANCE["cpu_int8"]) == 20
    assert (
        "pack:TradingNetwork-61x128 (128 agents, CPUExecutionProvider, int8 weights)"
        in (tmp_path / "run.log").read_text()
    )


def accounted(game: GameClient) -> int:
    """Ticks in the runtime status's buckets (its counting invariant sums them to ``ticks_received``), once
    every served answer has arrived here (else -1)."""
    status = game.status
    if not status or len(game.answers) != status["ticks_served"] or status["ticks_in_flight"]:
        return -1
    return sum(status[bucket] for bucket in BUCKETS) + sum(status["dropped"].values())


async def test_broker_restart_keeps_serving_with_agent_state_intact(
    tmp_path: Path, model_dir: Path, prefix: str
) -> None:
    broker = PrivateMosquitto(tmp_path)
    broker.start()
    config_path = serving_config(tmp_path, model_dir, prefix, port=broker.port)
    config = load_config(config_path)
    try:
        with running(config_path, tmp_path):
            async with GameClient(config.mqtt, len(ITEMS)) as game:
                await game.online()
                for number in range(30):
                    await game.send(game.tick(number, market_mean=number % 2 == 0))
                    await game.answer(number)
                broker.stop()  # SIGKILL: both sides lose the connection
                await asyncio.sleep(1.0)
                broker.start()
                game.status.clear()
                await wait_until(game.link.connected.is_set, 15, "the test client to reconnect")
                await game.online(15)  # the runtime reconnected and re-published its status
                for number in range(30, 60):
                    await game.send(game.tick(number))
                    await game.answer(number)
    finally:
        broker.stop()
    assert OfflineMarket.check(config_path, game) == 60  # ticks 30.. continue from the pre-restart state
    assert "reconnected to MQTT broker" in (tmp_path / "run.log").read_text()


async def test_answers_resume_within_2_s_of_the_broker_returning_after_an_outage_longer_than_the_cap(
    tmp_path: Path, model_dir: Path, prefix: str
) -> None:
    """Issue 10.4: with the broker down 30 s, answers resumed 9.6 s after it came back (cap was 10 s).

    Both sides run the shipped reconnect settings; the broker stays down three backoff caps.
    """
    broker = PrivateMosquitto(tmp_path)
    broker.start()
    cap = MqttConfig().reconnect_max_backoff_s
    config_path = serving_config(tmp_path, model_dir, prefix, port=broker.port, reconnect_max_backoff_s=cap)
    config = load_config(config_path)
    try:
        with running(config_path, tmp_path):
            async with GameClient(config.mqtt, len(ITEMS)) as game:
                await game.online()
                await game.send(game.tick(0))
                await game.answer(0)
                broker.stop()
                await asyncio.sleep(3 * cap)
                broker.start()
                back = time.monotonic()
                number = 1
                while len(game.answers) == 1:  # a game server ticking at 20/s through the reconnect
                    assert time.monotonic() - back < 15, "no answer 15 s after the broker came back"
                    if await game.link.publish(game.topics.tick, encode_tick(game.tick(number))):
                        number += 1
                    await asyncio.sleep(0.05)
                resumed_s = time.monotonic() - back
    finally:
        broker.stop()
    assert resumed_s < 2.0, f"answers resumed {resumed_s:.1f} s after the broker came back"
    pauses = [float(p) for p in re.findall(r"retrying in ([0-9.]+) s", (tmp_path / "run.log").read_text())]
    assert len(pauses) >= 3 and max(pauses) < 2.0, pauses  # never a pause that outlasts the 2 s promise


async def test_two_runtimes_with_one_client_id_one_stops_with_a_clear_error_instead_of_flapping(
    tmp_path: Path, model_dir: Path, prefix: str
) -> None:
    """Issue 10.5: two runtimes with one mqtt.client_id kicked each other off ~45 times each in 20 s."""
    client_id = f"{prefix}-runtime"
    config_path = serving_config(tmp_path, model_dir, prefix, client_id=client_id)
    config = load_config(config_path)
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    processes = [runtime_process(config_path, logs[0])]
    try:
        async with GameClient(config.mqtt, len(ITEMS)) as game:
            await game.online()
            processes.append(runtime_process(config_path, logs[1]))
            await wait_until(lambda: any(p.poll() is not None for p in processes), 30, "one runtime to stop")
            stopped = next(k for k, p in enumerate(processes) if p.poll() is not None)
            survivor = processes[1 - stopped]
            log = logs[stopped].read_text()
            assert processes[stopped].returncode == 1 and "Traceback" not in log, log[-3000:]
            assert f"most likely another client is using client id '{client_id}'" in log
            assert "give each runtime its own mqtt.client_id" in log
            await asyncio.sleep(2.0)  # the survivor keeps its connection and serves
            assert survivor.poll() is None
            await wait_until(lambda: game.status.get("pid") == survivor.pid, 5, "the survivor's status")
            await game.send(game.tick(0))
            check_matrices((await game.answer(0)).matrices, AGENTS, len(ITEMS))
            assert stop_process(survivor) == 0
    finally:
        for process in processes:
            stop_process(process)
    survivor_log = logs[1 - stopped].read_text()
    assert survivor_log.count("reconnected to MQTT broker") <= 3, survivor_log[-3000:]  # no flapping


def bad_payloads(valid: MarketTick) -> dict[str, bytes]:
    """One payload per refusal kind; the expected kind is the key."""
    good = encode_tick(valid)
    count = len(valid.agent_ids)

    def tick_with(**fields: object) -> bytes:
        data = msgpack.unpackb(good)
        data.update(fields)
        return msgpack.packb(data, use_bin_type=True)

    nan_inventory = valid.inventory.copy()
    nan_inventory[0, 0] = np.nan
    wire = {"dtype": "<f4", "shape": [count, len(ITEMS)], "data": nan_inventory.tobytes()}
    return {
        "malformed": b"\xc1 this is not msgpack",
        "malformed_truncated": good[: len(good) // 2],
        "oversized": b"\x00" * 70_000,
        "schema": msgpack.packb({"v": 1, "type": "tick", "tick": "seven"}),
        "version": tick_with(v=99),
        "shape": tick_with(successful={"dtype": "<f4", "shape": [count + 1], "data": bytes(4 * (count + 1))}),
        "non_finite": tick_with(inventory=wire),
        "unknown_agent": tick_with(agent_ids=[*valid.agent_ids[:-1], "intruder"]),
    }


async def test_bad_input_never_stops_serving_and_is_counted(
    tmp_path: Path, model_dir: Path, prefix: str
) -> None:
    config_path = serving_config(tmp_path, model_dir, prefix)
    config = load_config(config_path)
    with running(config_path, tmp_path):
        async with GameClient(config.mqtt, len(ITEMS)) as game:
            await game.online()
            payloads = bad_payloads(game.tick(0))
            for number, payload in enumerate(payloads.values()):
                await game.send_raw(payload)
                await game.send(game.tick(number))  # a valid tick right after each bad one is served
                await game.answer(number)
            expected = dict(Counter(kind.removesuffix("_truncated") for kind in payloads))
            await wait_until(lambda: game.status.get("dropped") == expected, 5, f"dropped counts {expected}")
            assert game.status["ticks_served"] == len(payloads)
            assert game.status["ticks_received"] == 2 * len(payloads) == accounted(game)
    assert OfflineMarket.check(config_path, game) == len(payloads)


async def test_shell_clients_drive_a_tick(tmp_path: Path, model_dir: Path, prefix: str) -> None:
    """mosquitto_pub / mosquitto_sub, not our code, publish a tick and read the answer."""
    config_path = serving_config(tmp_path, model_dir, prefix)
    config = load_config(config_path)
    with running(config_path, tmp_path):
        async with GameClient(config.mqtt, len(ITEMS)) as game:
            await game.online()
            tick_file = tmp_path / "tick.msgpack"
            tick_file.write_bytes(encode_tick(game.tick(1)))
        subscriber = await asyncio.create_subprocess_exec(
            *(
                "mosquitto_sub",
                "-N",
                "-h",
                SHARED_HOST,
                "-p",
                str(SHARED_PORT),
                "-t",
                f"{prefix}/agents/matrices",
                "-C",
                "1",
                "-W",
                "10",
            ),
            stdout=asyncio.subprocess.PIPE,
        )
        await asyncio.sleep(0.5)  # let the subscription land before the tick
        publish = await asyncio.create_subprocess_exec(
            *(
                "mosquitto_pub",
                "-h",
                SHARED_HOST,
                "-p",
                str(SHARED_PORT),
                "-t",
                f"{prefix}/market/tick",
                "-f",
                str(tick_file),
            )
        )
        assert await publish.wait() == 0
        answer, _ = await asyncio.wait_for(subscriber.communicate(), 15)
    message = msgpack.unpackb(answer)
    assert message["v"] == 1 and message["tick"] == 1 and len(message["agent_ids"]) == AGENTS
    matrices = np.frombuffer(message["matrices"]["data"], "<f4").reshape(message["matrices"]["shape"])
    check_matrices(matrices, AGENTS, len(ITEMS))


async def test_hot_reload_in_a_serving_runtime(tmp_path: Path, model_dir: Path, prefix: str) -> None:
    """A reconverted model is swapped in between two ticks: no tick missed, each tick on one version."""
    config_path = serving_config(tmp_path, model_dir, prefix)
    text = config_path.read_text().replace("reload_poll_s: 2.0", "reload_poll_s: 0.2")
    config_path.write_text(text)
    config = load_config(config_path)
    assert config.runtime.reload_poll_s == 0.2 and config.runtime.hot_reload
    market = OfflineMarket(model_dir, config.runtime, ITEMS, config.learning.matrix_update_rate)
    with running(config_path, tmp_path):
        async with GameClient(config.mqtt, len(ITEMS)) as game:
            await game.online()
            assert game.roster is not None
            old = game.roster.model_versions["m1"]
            number = 0
            while game.roster.model_versions["m1"] == old or number < 40:
                if number == 20:
                    write_model(model_dir, "m1", trading_weights(99))
                await game.send(game.tick(number))
                await game.answer(number)
                number += 1
                assert number < 400, "the runtime never reloaded m1"
    versions = [game.answers[i].model_versions["m1"] for i in range(number)]
    switch = versions.index(next(v for v in versions if v != old))
    assert switch >= 20 and set(versions[switch:]) == {versions[-1]} != {old}
    for i in range(number):
        if i == switch:
            market.sessions["m1"] = ort.InferenceSession(str(model_dir / "m1.onnx"))
        expected = market.step(game.sent[i])
        np.testing.assert_allclose(
            game.answers[i].matrices, expected, rtol=1e-4, atol=1e-5, err_msg=f"tick {i}"
        )
    assert "hot reload: generation 2 serves m1@" in (tmp_path / "run.log").read_text()


async def test_a_new_checkpoint_joins_a_serving_runtime_as_a_new_agent(
    tmp_path: Path, model_dir: Path, prefix: str
) -> None:
    config_path = serving_config(tmp_path, model_dir, prefix)
    text = config_path.read_text().replace("reload_poll_s: 2.0", "reload_poll_s: 0.2")
    config_path.write_text(text.replace("assignment: round_robin", "assignment: one_per_checkpoint"))
    config = load_config(config_path)
    with running(config_path, tmp_path):
        async with GameClient(config.mqtt, len(ITEMS)) as game:
            await game.online()
            assert game.agent_ids == ("ckpt-0", "ckpt-1", "ckpt-2")
            write_model(model_dir, "m3", trading_weights(3), agent_id="newcomer", desired_item="emerald")
            number = 0
            while "newcomer" not in game.agent_ids:
                await game.send(game.tick(number))  # the old roster is served throughout
                check_matrices((await game.answer(number)).matrices, 3, len(ITEMS))
                number += 1
                assert number < 300, "the new agent never joined"
            assert game.roster is not None and game.roster.desired[-1] == "emerald"
            assert (
                game.roster.models[-1] == "m3"
                and game.roster.pool_generation == game.status["pool_generation"]
            )
            await game.send(game.tick(number))  # the game server now ticks the grown roster
            answer = await game.answer(number)
    assert answer.agent_ids[-1] == "newcomer"
    check_matrices(answer.matrices, 4, len(ITEMS))
