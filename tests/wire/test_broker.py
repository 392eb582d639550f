"""The embedded amqtt broker: started only when allowed and needed, and it really carries messages."""

from __future__ import annotations

import logging

import pytest

from blockmarket.core.config import MqttConfig
from blockmarket.wire.broker import BrokerError, broker_answers, ensure_broker, is_loopback
from blockmarket.wire.limits import Limits
from blockmarket.wire.messages import encode_status, encode_tick
from blockmarket.wire.protocol import decode_status, decode_tick
from blockmarket.wire.runtime_link import RuntimeTransport
from blockmarket.wire.transport import MqttLink
from tests.support.broker import SHARED_HOST, SHARED_PORT
from tests.support.wire import Inbox, free_port, make_tick, started


async def test_embedded_broker_round_trips_ticks_and_retained_status(
    prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = MqttConfig(port=free_port(), topic_prefix=prefix, embedded_broker="auto")
    assert not await broker_answers(cfg.host, cfg.port)
    with caplog.at_level(logging.WARNING, logger="blockmarket.wire.broker"):
        broker = await ensure_broker(cfg)
    assert broker is not None
    assert any("EMBEDDED" in r.getMessage() and str(cfg.port) in r.getMessage() for r in caplog.records)
    try:
        assert await broker_answers(cfg.host, cfg.port)
        ticks, status = Inbox(), Inbox()
        runtime = RuntimeTransport(cfg, on_tick=ticks, will_payload=encode_status({"state": "offline"}))
        game = MqttLink(cfg, client_id="game-embedded", subscriptions={runtime.topics.status: status})
        tasks = [await started(runtime), await started(game)]
        await runtime.publish_status(encode_status({"state": "online"}))
        assert decode_status(await status.next(), Limits())["state"] == "online"
        await game.publish(runtime.topics.tick, encode_tick(make_tick(count=200, tick=5)))
        tick = decode_tick(await ticks.next(), Limits(num_items=5))
        assert tick.tick == 5 and len(tick.agent_ids) == 200
        await runtime.close()
        await game.disconnect()
        for task in tasks:
            await task
    finally:
        await broker.stop()
    assert not await broker_answers(cfg.host, cfg.port)


@pytest.mark.mqtt
async def test_no_embedded_broker_when_one_answers_or_when_forbidden() -> None:
    assert await ensure_broker(MqttConfig(host=SHARED_HOST, port=SHARED_PORT, embedded_broker="auto")) is None
    assert await ensure_broker(MqttConfig(port=free_port(), embedded_broker="never")) is None


async def test_never_embeds_off_loopback() -> None:
    # 192.0.2.0/24 is TEST-NET-1: nothing answers there, and it is not ours to serve on.
    assert await ensure_broker(MqttConfig(host="192.0.2.1", port=free_port(), embedded_broker="auto")) is None
    with pytest.raises(BrokerError, match="loopback"):
        await ensure_broker(MqttConfig(host="192.0.2.1", embedded_broker="always"))
    assert is_loopback("localhost") and is_loopback("127.0.0.1") and is_loopback("::1")
    assert not is_loopback("broker.example.com")


@pytest.mark.mqtt
async def test_always_on_a_taken_port_is_a_clear_error() -> None:
    with pytest.raises(BrokerError, match="embedded_broker: never"):
        await ensure_broker(MqttConfig(host=SHARED_HOST, port=SHARED_PORT, embedded_broker="always"))
