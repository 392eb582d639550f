"""Passwords, ACL and TLS against a private Mosquitto running the shipped deploy/mosquitto configuration."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import aiomqtt
import numpy as np
import pytest

from blockmarket.core.config import MqttConfig
from blockmarket.wire.connection import client_options
from blockmarket.wire.limits import Limits
from blockmarket.wire.markets import ControlRequest, encode_control
from blockmarket.wire.messages import encode_status, encode_tick
from blockmarket.wire.protocol import decode_status, decode_tick
from blockmarket.wire.runtime_link import RuntimeTransport
from blockmarket.wire.transport import BrokerRefused, MqttLink
from tests.support.markets import MarketClient
from tests.support.secure_mosquitto import GAME_USER, PREFIX, RUNTIME_USER, SecureMosquitto
from tests.support.serving import (
    ITEMS,
    GameClient,
    check_matrices,
    runtime_process,
    stop_process,
    trading_weights,
    write_config,
    write_model,
)
from tests.support.wire import Inbox, make_tick, started, wait_until

pytestmark = pytest.mark.slow

RUNTIME_PASSWORD_ENV, GAME_PASSWORD_ENV = "BM_TEST_RUNTIME_PASSWORD", "BM_TEST_GAME_PASSWORD"
LIMITS = Limits(num_items=5)
ONLINE = encode_status({"state": "online", "client_id": "acl-runtime"})
OFFLINE = encode_status({"state": "offline", "client_id": "acl-runtime"})


@pytest.fixture
def secure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SecureMosquitto]:
    """The broker, with both users' passwords in the environment variables their configs name."""
    broker = SecureMosquitto.start(tmp_path / "broker")
    monkeypatch.setenv(RUNTIME_PASSWORD_ENV, broker.passwords[RUNTIME_USER])
    monkeypatch.setenv(GAME_PASSWORD_ENV, broker.passwords[GAME_USER])
    try:
        yield broker
    finally:
        broker.broker.stop()


def serving_config(tmp_path: Path, mqtt: MqttConfig, **fields: object) -> Path:
    """A `blockmarket run` config serving two small models with ``mqtt`` (plus ``fields``)."""
    model_dir = tmp_path / "onnx"
    for i in range(2):
        write_model(model_dir, f"m{i}", trading_weights(i), desired_item=ITEMS[i])
    return write_config(
        tmp_path / "config.yaml",
        runtime={
            "num_agents": 4,
            "model_dir": str(model_dir),
            "convert_on_startup": False,
            "hot_reload": False,
        },
        training={"model_save_path": str(tmp_path / "no-checkpoints")},
        mqtt={**mqtt.model_dump(), **fields},
        npu={"enabled": False},
    )


async def test_runtime_over_tls_with_its_password_serves_a_game_server_user(
    tmp_path: Path, secure: SecureMosquitto
) -> None:
    runtime = secure.mqtt(RUNTIME_USER, RUNTIME_PASSWORD_ENV, tls=True)
    process = runtime_process(serving_config(tmp_path, runtime), tmp_path / "run.log")
    try:
        async with GameClient(secure.mqtt(GAME_USER, GAME_PASSWORD_ENV, tls=True), len(ITEMS)) as game:
            assert (await game.online())["agents"] == 4  # the runtime's status reached the game user
            for number in range(3):
                await game.send(game.tick(number))
                check_matrices((await game.answer(number)).matrices, 4, len(ITEMS))
            assert stop_process(process) == 0
    finally:
        stop_process(process)
    log = (tmp_path / "run.log").read_text()
    assert "runtime stopped: 4 agents: 3 ticks received, 3 served" in log, log[-3000:]


async def test_tls_refuses_a_broker_whose_certificate_the_ca_file_does_not_vouch_for(
    secure: SecureMosquitto, caplog: pytest.LogCaptureFixture
) -> None:
    """Without mqtt.ca_file the system CAs apply, and they do not know the test CA: never connected."""
    cfg = secure.mqtt(GAME_USER, GAME_PASSWORD_ENV, tls=True).model_copy(update={"ca_file": None})
    link = MqttLink(cfg, client_id="untrusting", subscriptions={})
    task = asyncio.create_task(link.run())
    await asyncio.sleep(1.0)
    assert not link.connected.is_set() and not task.done()  # a certificate problem is retried, not fatal
    await link.disconnect()
    await task
    assert "CERTIFICATE_VERIFY_FAILED" in caplog.text


async def test_a_wrong_password_ends_run_and_simulate_after_max_auth_failures_with_the_reason(
    tmp_path: Path, secure: SecureMosquitto, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(RUNTIME_PASSWORD_ENV, "not-the-password")
    runtime = secure.mqtt(RUNTIME_USER, RUNTIME_PASSWORD_ENV, max_auth_failures=2)
    process = runtime_process(serving_config(tmp_path, runtime), tmp_path / "run.log")
    try:
        code = await asyncio.to_thread(process.wait, 60)
    finally:
        stop_process(process)
    log = (tmp_path / "run.log").read_text()
    assert code == 1, log[-3000:]
    expected = f"refused user '{RUNTIME_USER}' 2 times in a row ([code:135] Not authorized)"
    assert expected in log and "Traceback" not in log, log[-3000:]
    assert "mqtt.max_auth_failures" in log and f"${RUNTIME_PASSWORD_ENV}" in log
    assert secure.refusals() == 2  # bounded: exactly the configured number of attempts reached the broker

    monkeypatch.setenv(GAME_PASSWORD_ENV, "not-the-password-either")
    game = write_config(tmp_path / "game.yaml", mqtt=secure.mqtt(GAME_USER, GAME_PASSWORD_ENV).model_dump())
    simulate = [sys.executable, "-m", "blockmarket.cli", "simulate", "--config", str(game), "--ticks", "5"]
    done = await asyncio.to_thread(subprocess.run, simulate, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr[-3000:]
    assert f"refused user '{GAME_USER}' 3 times in a row ([code:135] Not authorized)" in done.stderr
    assert secure.refusals() == 2 + 3


async def test_the_acl_keeps_each_user_to_its_own_topics_and_anonymous_clients_out(
    secure: SecureMosquitto,
) -> None:
    ticks, status, answers = Inbox(), Inbox(), Inbox()
    runtime_cfg = secure.mqtt(RUNTIME_USER, RUNTIME_PASSWORD_ENV)
    game_cfg = secure.mqtt(GAME_USER, GAME_PASSWORD_ENV)
    runtime = RuntimeTransport(runtime_cfg, on_tick=ticks, will_payload=OFFLINE, client_id="acl-runtime")
    topics = runtime.topics
    game = MqttLink(
        game_cfg, client_id="acl-game", subscriptions={topics.status: status, topics.matrices: answers}
    )
    tasks = [await started(runtime), await started(game)]

    # What each user is granted works: the runtime's status and a game server's tick get through.
    assert await runtime.publish_status(ONLINE)
    assert decode_status(await status.next(), LIMITS)["state"] == "online"
    assert await game.publish(topics.tick, encode_tick(make_tick(tick=1)))
    assert decode_tick(await ticks.next(), LIMITS).tick == 1

    # The reverse is dropped by the broker. QoS 1: the broker's PUBACK means it has dealt with each one.
    async with aiomqtt.Client(game_cfg.host, game_cfg.port, **client_options(game_cfg)) as forger:  # type: ignore[arg-type]
        await forger.publish(topics.status, OFFLINE, qos=1, retain=True)  # "the runtime is gone"
        await forger.publish(topics.matrices, b"forged answer", qos=1)
    async with aiomqtt.Client(runtime_cfg.host, runtime_cfg.port, **client_options(runtime_cfg)) as forger:  # type: ignore[arg-type]
        await forger.publish(topics.tick, encode_tick(make_tick(tick=666)), qos=1, retain=True)
    await asyncio.sleep(0.5)
    assert status.queue.empty(), "a game server user replaced the runtime's status"
    assert answers.queue.empty(), "a game server user published answers"
    assert ticks.queue.empty(), "the runtime user published a tick"
    late_status = Inbox()  # the retained status a game server joining now reads is still the runtime's
    late = MqttLink(game_cfg, client_id="acl-late", subscriptions={topics.status: late_status})
    tasks.append(await started(late))
    assert decode_status(await late_status.next(), LIMITS)["state"] == "online"

    # An anonymous client gets nowhere: refused at CONNECT, and our link gives up with the broker's reason.
    anonymous = MqttLink(secure.mqtt(None, "BM_TEST_UNUSED"), client_id="anonymous", subscriptions={})
    with pytest.raises(BrokerRefused, match=r"refused an anonymous client 3 times in a row \(\[code:135\]"):
        await asyncio.wait_for(anonymous.run(), 10)
    for listener in (
        ["-p", str(secure.broker.port)],
        ["-p", str(secure.tls_port), "--cafile", str(secure.ca_file)],
    ):
        sub = ["mosquitto_sub", "-h", "127.0.0.1", *listener, "-t", "#", "-C", "1", "-W", "5"]
        done = await asyncio.to_thread(subprocess.run, sub, capture_output=True, text=True, timeout=10)
        assert done.returncode != 0 and "not authorised" in done.stderr.lower(), (listener, done.stderr)

    for link in (runtime, game, late):
        await link.disconnect()
    await asyncio.gather(*tasks)


def test_a_user_without_its_password_variable_is_a_startup_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`run` and `simulate` stop before connecting (and `run` before loading any model) with one line."""
    monkeypatch.delenv(RUNTIME_PASSWORD_ENV, raising=False)
    mqtt = MqttConfig(username=RUNTIME_USER, password_env=RUNTIME_PASSWORD_ENV, embedded_broker="never")
    config = serving_config(tmp_path, mqtt)
    expected = f"mqtt.username is '{RUNTIME_USER}' but ${RUNTIME_PASSWORD_ENV} (named by mqtt.password_env)"
    for command, code in (("run", 1), ("simulate", 2)):
        done = subprocess.run(
            [sys.executable, "-m", "blockmarket.cli", command, "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == code and expected in done.stderr, done.stderr[-3000:]
        assert "Traceback" not in done.stderr and "serving" not in done.stderr


async def test_the_acl_keeps_each_game_server_to_its_own_markets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Protocol v2 (docs/protocol.md §13.8): with the shipped ACL's %u patterns, a game server user opens
    and plays markets under its own name, and another user can neither change, tick nor read them."""
    secure = SecureMosquitto.start(tmp_path / "broker", "acme", "rival")
    try:
        monkeypatch.setenv(RUNTIME_PASSWORD_ENV, secure.passwords[RUNTIME_USER])
        for name in ("acme", "rival"):
            monkeypatch.setenv(f"BM_TEST_{name.upper()}_PASSWORD", secure.passwords[name])
        runtime_cfg = secure.mqtt(RUNTIME_USER, RUNTIME_PASSWORD_ENV)
        acme_cfg = secure.mqtt("acme", "BM_TEST_ACME_PASSWORD")
        rival_cfg = secure.mqtt("rival", "BM_TEST_RIVAL_PASSWORD")
        process = runtime_process(serving_config(tmp_path, runtime_cfg), tmp_path / "run.log")
        try:
            status, game_cfg = Inbox(), secure.mqtt(GAME_USER, GAME_PASSWORD_ENV)
            monkeypatch.setenv(GAME_PASSWORD_ENV, secure.passwords[GAME_USER])
            watcher = MqttLink(
                game_cfg, client_id="acl-watch", subscriptions={f"{PREFIX}/runtime/status": status}
            )
            watching = await started(watcher)
            while decode_status(await asyncio.wait_for(status.next(), 60), LIMITS).get("state") != "online":
                pass
            async with (
                MarketClient(acme_cfg, "acme", "world") as acme,
                MarketClient(rival_cfg, "rival", "world") as own,
            ):
                opened = await acme.open(["a", "b"], ["m0", "m1"])
                assert opened.ok, opened.error
                assert (await own.open(["a"], ["m0"])).ok  # a user's own markets: granted
                # the rival addresses acme's market: every publish is dropped by the broker, every read empty
                spy = MarketClient(rival_cfg, "acme", "world")
                async with spy:
                    await spy.link.publish(spy.topics.control, encode_control(ControlRequest("close", 99)))
                    await spy.link.publish(spy.topics.tick, encode_tick(acme.tick(5, ("a", "b")), 2))
                    await acme.send(acme.tick(0, ("a", "b")))
                    answer = await acme.answer(0)
                    check_matrices(answer.matrices, 2, len(ITEMS))
                    await asyncio.sleep(0.5)
                    assert not spy.answers and not spy.replies, "the rival read acme's market"
                assert sorted(acme.answers) == [0], "a tick the rival forged was served"
                snapshot = await acme.request("snapshot")  # the rival's close never arrived
                assert snapshot.ok and snapshot.state is not None and snapshot.state.last_tick == 0
                # the acme user cannot reach into the rival's market either
                async with MarketClient(acme_cfg, "rival", "world") as reach:
                    await reach.link.publish(reach.topics.control, encode_control(ControlRequest("close", 7)))
                    await asyncio.sleep(0.5)
                    assert not reach.replies
                assert (await own.request("snapshot")).ok
            await watcher.disconnect()
            await watching
        finally:
            assert stop_process(process) == 0, (tmp_path / "run.log").read_text()[-3000:]
    finally:
        secure.broker.stop()


async def test_replicas_serve_a_game_server_under_the_shipped_acl(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Replica mode (docs/deploy.md "Replicas") with the shipped ACL: two replicas of the runtime user take
    a game server's requests and ticks through the shared subscriptions, and each follows the rosters the
    other publishes (a tick is answered whichever replica the broker hands it to)."""
    secure = SecureMosquitto.start(tmp_path / "broker", "acme")
    monkeypatch.setenv(RUNTIME_PASSWORD_ENV, secure.passwords[RUNTIME_USER])
    monkeypatch.setenv("BM_TEST_ACME_PASSWORD", secure.passwords["acme"])
    config = serving_config(
        tmp_path, secure.mqtt(RUNTIME_USER, RUNTIME_PASSWORD_ENV), shared_group="acl", protocol="5"
    )
    replicas = [runtime_process(config, tmp_path / f"run-{k}.log") for k in range(2)]
    try:
        statuses: dict[str, dict[str, object]] = {}

        def on_status(topic: str, payload: bytes, *_: object) -> None:
            statuses[topic] = decode_status(payload, LIMITS.wordy())

        game_cfg = secure.mqtt(GAME_USER, GAME_PASSWORD_ENV)
        monkeypatch.setenv(GAME_PASSWORD_ENV, secure.passwords[GAME_USER])
        pattern = f"{PREFIX}/runtime/replicas/+/status"
        watcher = MqttLink(game_cfg, client_id="acl-watch", subscriptions={}, patterns={pattern: on_status})
        watching = await started(watcher)
        await wait_until(
            lambda: sum(s.get("state") == "online" for s in statuses.values()) == 2, 60, "two replicas online"
        )
        async with MarketClient(secure.mqtt("acme", "BM_TEST_ACME_PASSWORD"), "acme", "world") as acme:
            opened = await acme.open(["a", "b"], ["m0", "m1"])
            assert opened.ok and opened.state is not None, opened.error
            matrices = np.array(opened.state.matrices)
            for number in range(6):  # the broker alternates them between the two replicas
                tick = replace(acme.tick(number, ("a", "b")), matrices=matrices)
                await acme.send(tick)
                matrices = np.array((await acme.answer(number)).matrices)
                check_matrices(matrices, 2, len(ITEMS))
            await acme.send(acme.tick(6, ("a", "b")))  # no matrices: refused with a notice, by either
            await wait_until(lambda: any(n.kind == "schema" for n in acme.notices), 10, "a schema notice")
            assert 6 not in acme.answers

        def served() -> list[int]:
            return [int(s["replica"]["ticks_served"]) for s in statuses.values() if "replica" in s]  # type: ignore[index]

        await wait_until(lambda: sum(served()) == 6, 30, "6 ticks served")
        assert len(served()) == 2 and min(served()) > 0, served()  # both replicas answered ticks
        await watcher.disconnect()
        await watching
    finally:
        for process in replicas:
            assert stop_process(process) == 0
        secure.broker.stop()
