"""Fixtures for the whole suite (helpers live in tests/support/); a folder's conftest.py may override one."""

from __future__ import annotations

import logging
import signal
import subprocess
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path

import onnx
import pytest

from blockmarket.core.config import MqttConfig
from tests.support.broker import SHARED_HOST, SHARED_PORT
from tests.support.serving import BIG_HIDDEN, trading_model, trading_weights, write_model
from tests.support.wire import PrivateMosquitto


@pytest.fixture(autouse=True)
def signal_handlers_restored() -> Iterator[None]:
    """Every test leaves SIGINT/SIGTERM as it found them. A test whose in-process server task is still
    pending when its event loop closes never runs stop_on_signals' restore, and asyncio's no-op handler
    would then swallow a later test's Ctrl-C: restored here, and reported as a warning naming the test."""
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in before.items():
        if signal.getsignal(sig) is not handler:
            warnings.warn(f"{sig.name} handler left changed by this test; restored", stacklevel=1)
            signal.signal(sig, handler)


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """Three converted models m0..m2 (desired items gold, none, apple)."""
    directory = tmp_path / "onnx"
    for i, desired in enumerate(("gold", None, "apple")):
        write_model(directory, f"m{i}", trading_weights(i), desired_item=desired, agent_id=f"ckpt-{i}")
    return directory


@pytest.fixture(scope="session")
def big_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A TradingNetwork ONNX file of ~200 MB (hidden width BIG_HIDDEN), written once per test session."""
    path = tmp_path_factory.mktemp("big") / "big.onnx"
    onnx.save_model(trading_model(trading_weights(404, hidden=BIG_HIDDEN, layers=2)), str(path))
    return path


@pytest.fixture
def prefix() -> Iterator[str]:
    """A unique topic prefix (tests share the broker, tests/support/broker.py); its retained messages
    are cleared."""
    value = f"bmtest-{uuid.uuid4().hex[:12]}"
    yield value
    for topic in ("runtime/status", "runtime/roster"):
        clear = [
            "mosquitto_pub",
            "-h",
            SHARED_HOST,
            "-p",
            str(SHARED_PORT),
            "-t",
            f"{value}/{topic}",
            "-r",
            "-n",
        ]
        subprocess.run(clear, check=True, timeout=10, capture_output=True)


@pytest.fixture
def root_logging() -> Iterator[logging.Logger]:
    """The root logger, put back as it was afterwards (a command under test sets it up for its process)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield root
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers[:] = handlers
    root.setLevel(level)


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
