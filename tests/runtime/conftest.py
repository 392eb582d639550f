"""Fixtures for the serving tests (helpers live in runtime_helpers.py)."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.runtime.runtime_helpers import trading_weights, write_model


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """Three converted models m0..m2 (desired items gold, none, apple)."""
    directory = tmp_path / "onnx"
    for i, desired in enumerate(("gold", None, "apple")):
        write_model(directory, f"m{i}", trading_weights(i), desired_item=desired, agent_id=f"ckpt-{i}")
    return directory


@pytest.fixture
def prefix() -> Iterator[str]:
    """A unique topic prefix (tests share the broker at 127.0.0.1:1883); its retained status is cleared."""
    value = f"bmtest-{uuid.uuid4().hex[:12]}"
    yield value
    clear = ["mosquitto_pub", "-h", "127.0.0.1", "-p", "1883", "-t", f"{value}/runtime/status", "-r", "-n"]
    subprocess.run(clear, check=True, timeout=10, capture_output=True)
