"""RuntimeTransport against real Mosquitto: round trips, retained status, last will, reconnect."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from blockmarket.core.config import ConfigError, MqttConfig, dump_default_config, parse_config
from blockmarket.wire.connection import client_options
from blockmarket.wire.limits import Limits
from blockmarket.wire.messages import MatricesMessage, encode_matrices, encode_status, encode_tick
from blockmarket.wire.protocol import decode_matrices, decode_status, decode_tick
from blockmarket.wire.runtime_link import RuntimeTransport
from blockmarket.wire.topics import Topics
from blockmarket.wire.transport import BrokerRefused, MqttLink
from tests.support.broker import SHARED_HOST, SHARED_PORT
from tests.support.wire import Inbox, PrivateMosquitto, blast, make_tick, started, wait_until

pytestmark = pytest.mark.mqtt

LIMITS = Limits(num_items=5)
FLOOD = 20_000
OFFLINE = encode_status({"state": "offline"})


def answer_for(tick_number: int, count: int = 4) -> MatricesMessage:
    return MatricesMessage(
        tick=tick_number,
        sent_at=1.0,
        served_at=2.0,
        agent_ids=tuple(f"agent-{i:04d}" for i in range(count)),
        matrices=np.full((count, 5, 5), 1.5, np.float32),
        latency_ms=0.5,
    )


async def clear_retained(cfg: MqttConfig) -> None:
    """Leave the shared broker as we found it (an empty retained payload deletes the message)."""
    link = MqttLink(cfg, client_id=f"cleaner-{os.getpid()}", subscriptions={})
    task = await started(link)
    await link.publish(Topics(cfg.topic_prefix).status, b"", retain=True)
    await link.disconnect()
    await task


async def test_tick_in_matrices_out_round_trip(mqtt_cfg: MqttConfig) -> None:
    ticks, answers = Inbox(), Inbox()
    runtime = RuntimeTransport(mqtt_cfg, on_tick=ticks, will_payload=OFFLINE, client_id="rt-roundtrip")
    topics = runtime.topics
    game = MqttLink(mqtt_cfg, client_id="game-roundtrip", subscriptions={topics.matrices: answers})
    runtime_task, game_task = await started(runtime), await started(game)

    sent = make_tick(count=128)
    before = time.perf_counter()
    assert await game.publish(topics.tick, encode_tick(sent))
    payload, received_at, retained = await asyncio.wait_for(ticks.queue.get(), 5)
    assert before < received_at <= time.perf_counter() and not retained
    tick = decode_tick(payload, LIMITS)
    assert tick.agent_ids == sent.agent_ids
    np.testing.assert_array_equal(tick.inventory, sent.inventory)

    assert await runtime.publish_matrices(encode_matrices(answer_for(tick.tick)))
    answer = decode_matrices(await answers.next(), LIMITS)
    assert answer.tick == sent.tick and answer.matrices.shape == (4, 5, 5)

    await runtime.close(OFFLINE)
    await game.disconnect()
    await asyncio.gather(runtime_task, game_task)
    assert not runtime.connected.is_set()
    await clear_retained(mqtt_cfg)


async def test_close_leaves_a_retained_offline_status_and_publish_then_fails(mqtt_cfg: MqttConfig) -> None:
    runtime = RuntimeTransport(mqtt_cfg, on_tick=Inbox(), will_payload=OFFLINE, client_id="rt-close")
    task = await started(runtime)
    assert await runtime.publish_status(encode_status({"state": "online", "agent_ids": ["a"]}))
    await runtime.close(encode_status({"state": "offline", "ticks_served": 12}))
    await asyncio.wait_for(task, 5)
    assert not await runtime.publish_matrices(b"x")
    assert runtime.unsent.snapshot() == {"not_connected": 1}

    status = Inbox()
    late = MqttLink(mqtt_cfg, client_id="late-close", subscriptions={runtime.topics.status: status})
    late_task = await started(late)
    assert decode_status(await status.next(), LIMITS) == {"state": "offline", "ticks_served": 12}
    await late.disconnect()
    await late_task
    await clear_retained(mqtt_cfg)


KILLED_RUNTIME = textwrap.dedent(
    """
    import asyncio, sys
    from blockmarket.core.config import ConfigError, MqttConfig
    from blockmarket.wire.messages import encode_status
    from blockmarket.wire.runtime_link import RuntimeTransport

    async def main() -> None:
        cfg = MqttConfig(topic_prefix=sys.argv[1], keepalive_s=5)
        will = encode_status({"state": "offline", "reason": "connection lost"})
        transport = RuntimeTransport(cfg, on_tick=lambda payload, at, retained: None, will_payload=will)
        task = asyncio.create_task(transport.run())
        await transport.connected.wait()
        await transport.publish_status(encode_status({"state": "online", "agent_ids": ["a", "b"]}))
        print("online", flush=True)
        await task

    asyncio.run(main())
    """
)


async def test_retained_status_and_last_will_when_the_process_dies(mqtt_cfg: MqttConfig) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_RUNTIME, mqtt_cfg.topic_prefix], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        assert await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 20) == "online\n"
        status = Inbox()
        observer = MqttLink(
            mqtt_cfg, client_id="observer-will", subscriptions={Topics(mqtt_cfg.topic_prefix).status: status}
        )
        task = await started(observer)
        assert decode_status(await status.next(), LIMITS) == {"state": "online", "agent_ids": ["a", "b"]}
        proc.send_signal(signal.SIGKILL)  # no DISCONNECT packet: the broker must publish the will
        assert decode_status(await status.next(), LIMITS) == {"state": "offline", "reason": "connection lost"}
        await observer.disconnect()
        await task
    finally:
        proc.kill()
        proc.wait()

    late = Inbox()  # the will was retained: a client arriving afterwards still learns the runtime is gone
    later = MqttLink(
        mqtt_cfg, client_id="observer-late", subscriptions={Topics(mqtt_cfg.topic_prefix).status: late}
    )
    task = await started(later)
    assert decode_status(await late.next(), LIMITS)["state"] == "offline"
    await later.disconnect()
    await task
    await clear_retained(mqtt_cfg)


@pytest.mark.slow
async def test_reconnects_and_resubscribes_after_the_broker_restarts(
    private_broker: PrivateMosquitto, prefix: str
) -> None:
    cfg = MqttConfig(
        port=private_broker.port, topic_prefix=prefix, keepalive_s=5, reconnect_max_backoff_s=1.6
    )
    ticks, status = Inbox(), Inbox()
    runtime = RuntimeTransport(cfg, on_tick=ticks, will_payload=OFFLINE, client_id="rt-restart")
    game = MqttLink(cfg, client_id="game-restart", subscriptions={runtime.topics.status: status})
    runtime_task, game_task = await started(runtime), await started(game)
    assert await runtime.publish_status(encode_status({"state": "online", "ticks_served": 1}))
    assert decode_status(await status.next(), LIMITS)["state"] == "online"

    private_broker.stop()
    await wait_until(lambda: not runtime.connected.is_set(), 5, "the transport to notice the broker is gone")
    assert not await runtime.publish_matrices(b"lost")
    assert runtime.unsent.counts["not_connected"] == 1
    await asyncio.sleep(1.0)  # failed attempts after ~0.2, 0.6 s: the backoff has grown to 0.8 s
    private_broker.start()  # same port, persistence off: subscriptions and retained status are gone

    await asyncio.wait_for(runtime.connected.wait(), 5)
    await asyncio.wait_for(game.connected.wait(), 5)
    assert runtime.connections == 2 and game.connections == 2
    # The runtime re-published its retained status by itself after reconnecting.
    assert decode_status(await status.next(), LIMITS) == {"state": "online", "ticks_served": 1}
    # ...and resubscribed to ticks by itself.
    await game.publish(runtime.topics.tick, encode_tick(make_tick(tick=99)))
    assert decode_tick(await ticks.next(), LIMITS).tick == 99

    # A second, short outage starts again from the initial backoff (0.2 s), not from where the first ended.
    private_broker.stop()
    await wait_until(lambda: not runtime.connected.is_set(), 5, "the second outage to be noticed")
    lost = time.monotonic()
    private_broker.start()
    await asyncio.wait_for(runtime.connected.wait(), 5)
    assert runtime.connections == 3 and time.monotonic() - lost < 1.1  # without the reset: >= 1.28 s

    await runtime.close(OFFLINE)
    await game.disconnect()
    await asyncio.gather(runtime_task, game_task)


async def test_first_connection_waits_for_a_broker_that_is_not_up_yet(tmp_path: Path, prefix: str) -> None:
    broker = PrivateMosquitto(tmp_path)
    cfg = MqttConfig(port=broker.port, topic_prefix=prefix, reconnect_max_backoff_s=0.3)
    runtime = RuntimeTransport(cfg, on_tick=Inbox(), will_payload=OFFLINE, client_id="rt-early")
    task = asyncio.create_task(runtime.run())
    await asyncio.sleep(0.6)
    assert not runtime.connected.is_set() and not task.done()
    broker.start()
    try:
        await asyncio.wait_for(runtime.connected.wait(), 5)
        await runtime.close()
        await asyncio.wait_for(task, 5)
    finally:
        broker.stop()


async def test_mosquitto_clients_drive_a_tick_and_read_matrices(mqtt_cfg: MqttConfig, tmp_path: Path) -> None:
    """A client that is not ours: mosquitto_pub sends an encoded tick, mosquitto_sub reads the answer."""
    ticks = Inbox()
    runtime = RuntimeTransport(mqtt_cfg, on_tick=ticks, will_payload=OFFLINE, client_id="rt-cli")
    task = await started(runtime)
    topics = runtime.topics
    tick_file = tmp_path / "tick.msgpack"
    tick_file.write_bytes(encode_tick(make_tick(count=3, tick=41)))
    pub = [
        "mosquitto_pub", "-h", SHARED_HOST, "-p", str(SHARED_PORT), "-t", topics.tick, "-f", str(tick_file),
    ]  # fmt: skip
    await asyncio.to_thread(subprocess.run, pub, check=True, timeout=10)
    tick = decode_tick(await ticks.next(), LIMITS)
    assert tick.tick == 41 and tick.agent_ids == ("agent-0000", "agent-0001", "agent-0002")

    sub = subprocess.Popen(
        [
            "mosquitto_sub",
            "-h",
            SHARED_HOST,
            "-p",
            str(SHARED_PORT),
            "-t",
            topics.matrices,
            "-C",
            "1",
            "-W",
            "10",
        ],
        stdout=subprocess.PIPE,
    )
    try:
        # mosquitto_sub prints nothing until subscribed: publish until its one message arrives.
        async def answer_until_read() -> bytes:
            while sub.poll() is None:
                await runtime.publish_matrices(encode_matrices(answer_for(41, count=3)))
                await asyncio.sleep(0.1)
            assert sub.stdout is not None
            return sub.stdout.read()

        raw = await asyncio.wait_for(answer_until_read(), 15)
    finally:
        sub.kill()
        sub.wait()
    answer = decode_matrices(raw.removesuffix(b"\n"), LIMITS)  # mosquitto_sub ends each payload with \n
    assert answer.tick == 41 and answer.matrices.shape == (3, 5, 5)
    await runtime.close()
    await task


def test_client_options_take_credentials_from_the_environment_and_tls_from_config(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    plain = client_options(MqttConfig())
    assert plain["keepalive"] == 30 and "username" not in plain and "tls_params" not in plain
    assert (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1) in plain["socket_options"]  # type: ignore[operator]
    monkeypatch.setenv("BM_TEST_SECRET", "s3cret")
    ca_file = tmp_path / "ca.pem"
    ca_file.write_text("-----BEGIN CERTIFICATE-----\n")
    options = client_options(
        MqttConfig(username="game", password_env="BM_TEST_SECRET", tls=True, ca_file=str(ca_file))
    )
    assert options["username"] == "game" and options["password"] == "s3cret"
    assert getattr(options["tls_params"], "ca_certs", None) == str(ca_file)
    with pytest.raises(ConfigError, match=r"mqtt\.ca_file"):
        client_options(MqttConfig(tls=True, ca_file=str(tmp_path / "missing.pem")))


def test_a_user_without_its_password_in_the_environment_is_a_config_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Not a warning and a connect without a password: the link is never built."""
    monkeypatch.delenv("BM_TEST_UNSET", raising=False)
    cfg = MqttConfig(username="game", password_env="BM_TEST_UNSET")
    with pytest.raises(
        ConfigError, match=r"mqtt\.username is 'game' but \$BM_TEST_UNSET \(named by mqtt\.password_env\)"
    ):
        MqttLink(cfg, client_id="no-password", subscriptions={})
    monkeypatch.setenv("BM_TEST_UNSET", "")  # set but empty is a password (MQTT allows an empty one)
    assert client_options(cfg)["password"] == ""


def test_reconnect_backoff_cap_defaults_low_and_its_range_is_checked() -> None:
    """The cap bounds how long serving takes to resume after an outage (1.2 x cap at most, with jitter)."""
    assert MqttConfig().reconnect_max_backoff_s * 1.2 < 2.0
    for value in (0.0, 0.05, 61.0):
        data = dump_default_config()
        data["mqtt"]["reconnect_max_backoff_s"] = value
        with pytest.raises(ConfigError, match=r"^cfg\.yaml: mqtt\.reconnect_max_backoff_s: Input should be"):
            parse_config(data, source="cfg.yaml")
    data = dump_default_config()
    data["mqtt"]["max_auth_failures"] = 0
    with pytest.raises(
        ConfigError, match=r"mqtt\.max_auth_failures: Input should be greater than or equal to 1"
    ):
        parse_config(data, source="cfg.yaml")


@pytest.mark.slow
async def test_two_links_with_one_client_id_stop_with_a_clear_error_instead_of_flapping(
    mqtt_cfg: MqttConfig,
) -> None:
    """The broker hands the id to whoever connects last; one of the two must give up, naming the id."""
    client_id = f"{mqtt_cfg.topic_prefix}-same-id"
    first = RuntimeTransport(mqtt_cfg, on_tick=Inbox(), will_payload=OFFLINE, client_id=client_id)
    second = RuntimeTransport(mqtt_cfg, on_tick=Inbox(), will_payload=OFFLINE, client_id=client_id)
    tasks = [await started(first)]
    tasks.append(asyncio.create_task(second.run()))
    done, _ = await asyncio.wait(tasks, timeout=10, return_when=asyncio.FIRST_COMPLETED)
    assert done, "both links still running after 10 s: they are taking the connection from each other"
    (ended,) = done
    with pytest.raises(BrokerRefused, match=rf"most likely another client is using client id '{client_id}'"):
        ended.result()
    assert "mqtt.client_id" in str(ended.exception())
    survivor = first if ended is tasks[1] else second
    await asyncio.wait_for(survivor.connected.wait(), 5)
    connections = survivor.connections
    await asyncio.sleep(1.5)  # no flapping left: the survivor keeps its one connection
    assert survivor.connected.is_set() and survivor.connections == connections <= 4
    await survivor.close(OFFLINE)
    await asyncio.wait_for(tasks[0] if survivor is first else tasks[1], 5)
    await clear_retained(mqtt_cfg)


@pytest.mark.parametrize("broker", ["up", "dead", "frozen"])
async def test_cancelling_run_ends_it(private_broker: PrivateMosquitto, prefix: str, broker: str) -> None:
    """Cancelling run() ends it whatever the broker is doing (never turned into another reconnect)."""
    cfg = MqttConfig(port=private_broker.port, topic_prefix=prefix, reconnect_max_backoff_s=0.3)
    runtime = RuntimeTransport(cfg, on_tick=Inbox(), will_payload=OFFLINE, client_id="rt-cancel")
    task = await started(runtime)
    assert private_broker.process is not None
    if broker == "dead":
        private_broker.stop()
    elif broker == "frozen":  # the socket stays open, nothing answers
        private_broker.process.send_signal(signal.SIGSTOP)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 20)
    assert not runtime.connected.is_set()


async def test_retained_messages_are_flagged_and_live_ones_are_not(mqtt_cfg: MqttConfig) -> None:
    """A tick stored with the retain flag is replayed to every new subscriber: the handler must know."""
    topics = Topics(mqtt_cfg.topic_prefix)
    writer = MqttLink(mqtt_cfg, client_id=f"retainer-{mqtt_cfg.topic_prefix}", subscriptions={})
    writer_task = await started(writer)
    stored = encode_tick(make_tick(tick=1))
    assert await writer.publish(topics.tick, stored, retain=True)
    ticks = Inbox()
    runtime = RuntimeTransport(mqtt_cfg, on_tick=ticks, will_payload=OFFLINE, client_id="rt-retained")
    runtime_task = await started(runtime)
    try:
        payload, _, retained = await asyncio.wait_for(ticks.queue.get(), 5)
        assert payload == stored and retained
        live = encode_tick(make_tick(tick=2))
        assert await writer.publish(topics.tick, live)
        payload, _, retained = await asyncio.wait_for(ticks.queue.get(), 5)
        assert payload == live and not retained
    finally:
        await writer.publish(topics.tick, b"", retain=True)  # delete the stored tick
        await runtime.close()
        await writer.disconnect()
        await asyncio.gather(runtime_task, writer_task)


async def test_a_raising_handler_is_counted_and_delivery_goes_on(mqtt_cfg: MqttConfig) -> None:
    seen: list[bytes] = []

    def fragile(payload: bytes, received_at: float, retained: bool) -> None:
        seen.append(payload)
        if payload == b"boom":
            raise RuntimeError("handler bug")

    runtime = RuntimeTransport(mqtt_cfg, on_tick=fragile, will_payload=OFFLINE, client_id="rt-fragile")
    game = MqttLink(mqtt_cfg, client_id="game-fragile", subscriptions={})
    runtime_task, game_task = await started(runtime), await started(game)
    for payload in (b"one", b"boom", b"two"):
        await game.publish(runtime.topics.tick, payload)
    await wait_until(lambda: len(seen) == 3, 5, "all three messages")
    assert seen == [b"one", b"boom", b"two"] and runtime.connections == 1  # no reconnect
    assert runtime.unhandled.snapshot() == {"handler_error": 1}
    await runtime.close()
    await game.disconnect()
    await asyncio.gather(runtime_task, game_task)


@pytest.mark.slow
async def test_a_flood_reaches_the_handler_whole_and_quietly(
    tmp_path: Path, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """aiomqtt's 1,024-message queue used to discard a flood, with one warning per discarded message.

    The broker is told to keep everything for a slow subscriber (max_queued_messages 0), so every
    message that does not arrive would have been lost inside this process.
    """
    broker = PrivateMosquitto(tmp_path, settings=("max_queued_messages 0",))
    broker.start()
    try:
        cfg = MqttConfig(port=broker.port, topic_prefix=prefix, keepalive_s=30)
        count = 0

        def handler(payload: bytes, received_at: float, retained: bool) -> None:
            nonlocal count
            count += 1

        runtime = RuntimeTransport(cfg, on_tick=handler, will_payload=OFFLINE, client_id="rt-flood")
        task = await started(runtime)
        flood = (i.to_bytes(4, "little") * 16 for i in range(FLOOD))
        with caplog.at_level(logging.WARNING):
            sent = await asyncio.to_thread(blast, broker.port, runtime.topics.tick, flood)
            await wait_until(lambda: count == sent, 60, f"all {sent} messages to arrive (got {count})")
        assert sent == FLOOD and runtime.connections == 1
        assert not [r for r in caplog.records if r.name == "mqtt"], "aiomqtt logged about its queue"
        await runtime.close()
        await task
    finally:
        broker.stop()
