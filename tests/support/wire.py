"""Helpers shared by the wire tests (fixtures live in conftest.py; helpers are imported by name)."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Self

import numpy as np
import numpy.typing as npt
import paho.mqtt.client as mqtt

from blockmarket.core.config import MqttConfig
from blockmarket.wire.limits import Limits
from blockmarket.wire.messages import (
    MarketTick,
    MatricesMessage,
    RosterMessage,
    encode_matrices,
    encode_roster,
    encode_status,
)
from blockmarket.wire.protocol import decode_tick
from blockmarket.wire.runtime_link import RuntimeTransport
from blockmarket.wire.transport import MqttLink
from tests.support.broker import SHARED_HOST


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
    """A Mosquitto of our own on free loopback ports: tests may kill and restart it freely.

    By default anonymous and on one port, plus the mosquitto.conf lines in ``settings`` (e.g.
    ``max_queued_messages 0``: a slow subscriber's queue is unbounded, so a flood reaches it whole
    instead of the broker dropping its newest messages); ``config`` is a whole mosquitto.conf listening
    on ``ports``. Its log is ``mosquitto.log`` in ``workdir``.
    """

    def __init__(
        self,
        workdir: Path,
        config: str | None = None,
        ports: tuple[int, ...] = (),
        settings: tuple[str, ...] = (),
    ) -> None:
        self.ports = ports or (free_port(),)
        self.port = self.ports[0]
        self.config = workdir / "mosquitto.conf"
        default = [f"listener {self.port} 127.0.0.1", "allow_anonymous true", "persistence false", *settings]
        self.config.write_text(config or "\n".join(default) + "\n")
        self.log = workdir / "mosquitto.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                ["mosquitto", "-c", str(self.config)], stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 5
        while not all(port_open(port) for port in self.ports):
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"private mosquitto did not start on {self.ports}: {self.log.read_text()}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=5)
        self.process = None


def blast(port: int, topic: str, payloads: Iterable[bytes], host: str = SHARED_HOST) -> int:
    """Publish as fast as paho can (QoS 0, no waiting on anything): a flooding client. Returns the count.

    Blocking: run it in a thread. Returns once every message has left the socket.
    """
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"blast-{uuid.uuid4().hex[:8]}")
    client.connect(host, port)
    client.loop_start()
    try:
        count = 0
        for payload in payloads:
            client.publish(topic, payload, qos=0)
            count += 1
        while client.want_write():
            time.sleep(0.005)
    finally:
        client.disconnect()
        client.loop_stop()
    return count


class Inbox:
    """Collects payloads delivered to an MqttLink handler, for awaiting in tests."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[bytes, float, bool]] = asyncio.Queue()

    def __call__(self, payload: bytes, received_at: float, retained: bool) -> None:
        self.queue.put_nowait((payload, received_at, retained))

    async def next(self, timeout: float = 5.0) -> bytes:
        payload, _, _ = await asyncio.wait_for(self.queue.get(), timeout)
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


class EchoRuntime:
    """A stand-in for `blockmarket run`: answers every tick with the update rule towards all-ones.

    M <- (1 - alpha) M + alpha * 1, diagonal 1, clipped to [0.1, 10]: enough to check the game side.
    ``corrupt`` makes it answer with matrices that break the rule instead.
    """

    def __init__(
        self, cfg: MqttConfig, agent_ids: list[str], desired: list[str], items: list[str], alpha: float = 0.05
    ) -> None:
        self.agent_ids, self.desired, self.items, self.alpha = agent_ids, desired, items, alpha
        n = len(items)
        rng = np.random.default_rng(3)
        self.matrices = rng.uniform(0.5, 2.0, (len(agent_ids), n, n)).astype(np.float32)
        self.matrices[:, np.arange(n), np.arange(n)] = 1.0
        self.row_of = {a: k for k, a in enumerate(agent_ids)}
        self.corrupt = False
        self.served: list[int] = []
        self.answers: dict[int, npt.NDArray[np.float32]] = {}
        self.pending: asyncio.Queue[bytes] = asyncio.Queue()
        self.transport = RuntimeTransport(
            cfg,
            on_tick=lambda payload, at, retained: self.pending.put_nowait(payload),
            will_payload=encode_status({"state": "offline"}),
            client_id=f"echo-runtime-{cfg.topic_prefix}",
        )
        self.limits = Limits(num_items=n)
        self.started_at = time.time()

    def status(self) -> bytes:
        identity = {"client_id": self.transport.client_id, "started_at": self.started_at}
        return encode_status({"state": "online", **identity, "items": self.items})

    def roster(self) -> bytes:
        return encode_roster(
            RosterMessage(
                client_id=self.transport.client_id,
                started_at=self.started_at,
                pool_generation=1,
                items=tuple(self.items),
                agent_ids=tuple(self.agent_ids),
                desired=tuple(self.desired),
                models=("echo",) * len(self.agent_ids),
                model_versions={"echo": "1"},
                initial_matrices=self.matrices,
            )
        )

    async def serve(self) -> None:
        transport_task = await started(self.transport)
        await self.transport.publish_roster(self.roster())
        await self.transport.publish_status(self.status())
        try:
            while True:
                tick = decode_tick(await self.pending.get(), self.limits)
                rows = np.array([self.row_of[a] for a in tick.agent_ids])
                new = (1 - self.alpha) * self.matrices[rows] + self.alpha
                n = new.shape[-1]
                new[:, np.arange(n), np.arange(n)] = 1.0
                self.matrices[rows] = np.clip(new, 0.1, 10.0)
                answer = self.matrices[rows] * (20.0 if self.corrupt else 1.0)
                msg = MatricesMessage(tick.tick, tick.sent_at, time.time(), tick.agent_ids, answer, 0.1)
                await self.transport.publish_matrices(encode_matrices(msg))
                self.served.append(tick.tick)
                self.answers[tick.tick] = answer
        finally:
            await self.transport.close(encode_status({"state": "offline"}))
            await transport_task


class LinkedClient:
    """A test client owning an MqttLink (``self.link``): connected for the ``async with`` block."""

    link: MqttLink
    _task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        self._task = asyncio.create_task(self.link.run())
        await asyncio.wait_for(self.link.connected.wait(), 10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.link.disconnect()
        if self._task is not None:
            self._task.cancel()
