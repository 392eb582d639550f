"""Fixtures for the NPU path: the real QNN HTP backend, NPU configs."""

from __future__ import annotations

import pytest

from blockmarket.core.config import Config, NpuConfig
from blockmarket.models.providers import qnn_available, qnn_unavailable_reason
from tests.support.qnn import require_qnn


@pytest.fixture
def htp() -> None:
    """The real QNN HTP backend must be there: a missing backend fails the test instead of skipping it."""
    require_qnn()
    if not qnn_available():
        pytest.fail(f"QNN HTP backend unavailable: {qnn_unavailable_reason()}")


@pytest.fixture
def npu() -> NpuConfig:
    return NpuConfig(context_cache=False)


@pytest.fixture
def npu_config() -> Config:
    """Defaults, with every NPU precision at a static batch of 4 and a short validation run."""
    config = Config()
    conversion = config.conversion.model_copy(
        update={
            "precisions": ("fp32", "fp16", "int8", "int16"),
            "static_batch_sizes": (4,),
            "validation_samples": 64,
        }
    )
    return config.model_copy(update={"conversion": conversion})
