"""The shared test broker: BLOCKMARKET_TEST_BROKER="host:port" (default 127.0.0.1:1883), read here only."""

from __future__ import annotations

import os

BROKER_ENV = "BLOCKMARKET_TEST_BROKER"
DEFAULT_BROKER = "127.0.0.1:1883"


def broker_address(value: str) -> tuple[str, int]:
    """``host:port`` -> (host, port); the port is what follows the last colon."""
    host, separator, port = value.rpartition(":")
    if not separator or not host or not port.isdigit():
        raise ValueError(f"{BROKER_ENV}={value!r}: expected host:port")
    return host, int(port)


SHARED_HOST, SHARED_PORT = broker_address(os.environ.get(BROKER_ENV, DEFAULT_BROKER))
