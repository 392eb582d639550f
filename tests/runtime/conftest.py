"""Fixtures for the serving tests (helpers live in runtime_helpers.py)."""

from __future__ import annotations

import logging
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import onnx
import pytest

from tests.runtime.runtime_helpers import BIG_HIDDEN, trading_model, trading_weights, write_model


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
    """A unique topic prefix (tests share the broker at 127.0.0.1:1883); its retained messages are cleared."""
    value = f"bmtest-{uuid.uuid4().hex[:12]}"
    yield value
    for topic in ("runtime/status", "runtime/roster"):
        clear = ["mosquitto_pub", "-h", "127.0.0.1", "-p", "1883", "-t", f"{value}/{topic}", "-r", "-n"]
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
