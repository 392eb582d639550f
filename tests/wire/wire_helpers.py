"""Helpers shared by the wire tests (fixtures live in conftest.py; helpers are imported by name)."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from runtime.protocol import MarketTick
from runtime.transport import MqttLink

SHARED_HOST, SHARED_PORT = "127.0.0.1", 1883


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((host, port)) == 0


def make_tick(count: int = 4, items: int = 5, tick: int = 7, seed: int = 0) -> MarketTick:
    rng = np.random.default_rng(seed)
    return MarketTick(
        tick=tick,
        sent_at=1_700_000_000.25,
        agent_ids=tuple(f"agent-{i:04d}" for i in range(count)),
        inventory=rng.integers(0, 15, (count, items)).astype(np.float32),
        successful=rng.integers(0, 5, count).astype(np.float32),
        attempted=rng.integers(5, 10, count).astype(np.float32),
        market_mean=rng.uniform(0.1, 10, (items, items)).astype(np.float32),
    )


class PrivateMosquitto:
    """A Mosquitto of our own on a free loopback port: tests may kill and restart it freely."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.config = workdir / "mosquitto.conf"
        self.config.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["mosquitto", "-c", str(self.config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 5
        while not port_open(self.port):
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"private mosquitto did not start on port {self.port}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=5)
        self.process = None


class Inbox:
    """Collects payloads delivered to an MqttLink handler, for awaiting in tests."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[bytes, float]] = asyncio.Queue()

    def __call__(self, payload: bytes, received_at: float) -> None:
        self.queue.put_nowait((payload, received_at))

    async def next(self, timeout: float = 5.0) -> bytes:
        payload, _ = await asyncio.wait_for(self.queue.get(), timeout)
        return payload


async def started(link: MqttLink, timeout: float = 5.0) -> asyncio.Task[None]:
    """Run ``link`` in a task and wait until it is connected and subscribed."""
    task = asyncio.create_task(link.run())
    await asyncio.wait_for(link.connected.wait(), timeout)
    return task


async def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)
