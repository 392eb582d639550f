"""Fixtures for the wire tests: unique topic prefixes on the shared broker, and a private Mosquitto."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from wire_helpers import SHARED_HOST, SHARED_PORT, PrivateMosquitto

from blockmarket.core.config import MqttConfig


@pytest.fixture
def prefix() -> str:
    return f"bmtest-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def mqtt_cfg(prefix: str) -> MqttConfig:
    return MqttConfig(
        host=SHARED_HOST, port=SHARED_PORT, topic_prefix=prefix, keepalive_s=5, reconnect_max_backoff_s=0.5
    )


@pytest.fixture
def private_broker(tmp_path: Path) -> Iterator[PrivateMosquitto]:
    broker = PrivateMosquitto(tmp_path)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()
