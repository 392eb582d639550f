"""The wire and simulator tests' topic prefix: unique, nothing retained to clear afterwards."""

from __future__ import annotations

import uuid

import pytest


@pytest.fixture
def prefix() -> str:
    return f"bmtest-{uuid.uuid4().hex[:12]}"
