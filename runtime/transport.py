"""MQTT connections that survive broker restarts (aiomqtt): reconnect with backoff, resubscribe, re-retain.

:class:`MqttLink` is one connection with a fixed set of subscriptions; it never gives up while running,
so the agent state held by its owner outlives any broker outage. :class:`RuntimeTransport` is the
runtime's link (tick topic in; matrices, per-agent matrices and retained status out; last will
"offline"). The simulator builds its own :class:`MqttLink` for the game-server side.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import aiomqtt

from runtime.config import ConfigError, MqttConfig
from runtime.protocol import DropCounter, Topics

logger = logging.getLogger(__name__)

TickHandler = Callable[[bytes, float], None]  # (payload, time.perf_counter() at receipt)

INITIAL_BACKOFF_S = 0.2
MAX_QUEUED_INCOMING = 1024  # aiomqtt's inbound queue; handlers are cheap, so this only bounds memory
# Retained statuses are published at QoS 0: TCP already delivers them in order on a live connection and
# they are republished after every reconnect. At QoS 1 each periodic status stalled the next matrices
# answer by ~40 ms (measured: the game-side p99 at 100 agents fell from 32 ms to 4.6 ms at QoS 0).
STATUS_QOS = 0
WILL_QOS = 1  # the broker publishes the will itself, on a connection the runtime no longer has
MAX_WILL_BYTES = 65_535  # MQTT encodes the will payload's length in two bytes (paho fails at connect beyond)


def runtime_client_id(cfg: MqttConfig) -> str:
    """The runtime's MQTT client id: ``mqtt.client_id`` or one per process (named in its status and will)."""
    return cfg.client_id or f"blockmarket-runtime-{os.getpid()}"


def client_options(cfg: MqttConfig) -> dict[str, object]:
    """aiomqtt.Client keyword arguments for auth and TLS (the password comes from ``cfg.password_env``).

    A missing CA file is a :class:`ConfigError` now rather than an endless reconnect loop later.
    """
    # TCP_NODELAY: ticks and answers are latency-bound single writes; Nagle's algorithm may hold a write
    # that follows an unacknowledged one until the peer's delayed ACK (up to 40 ms on Linux).
    options: dict[str, object] = {
        "keepalive": cfg.keepalive_s,
        "socket_options": ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),),
    }
    if cfg.username:
        password = os.environ.get(cfg.password_env)
        if password is None:
            logger.warning(
                "MQTT user %r configured but $%s is not set: connecting without a password",
                cfg.username,
                cfg.password_env,
            )
        options.update(username=cfg.username, password=password)
    if cfg.tls:
        if cfg.ca_file is not None and not Path(cfg.ca_file).is_file():
            raise ConfigError(f"mqtt.ca_file: {cfg.ca_file}: no such file (the CA bundle for TLS)")
        options["tls_params"] = aiomqtt.TLSParameters(ca_certs=cfg.ca_file)
    return options


def _cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class MqttLink:
    """One MQTT connection kept alive by :meth:`run` until :meth:`disconnect`; publishes fail fast while down.

    ``subscriptions`` maps exact topics to handlers called as ``handler(payload, perf_counter_at_receipt)``
    on the event loop; they must be cheap and must not raise. Retained publishes are remembered and
    published again after every reconnect (a restarted broker has forgotten them, or fired our will).
    """

    def __init__(
        self,
        cfg: MqttConfig,
        *,
        client_id: str,
        subscriptions: Mapping[str, TickHandler],
        will: aiomqtt.Will | None = None,
    ) -> None:
        self.cfg = cfg
        self.client_id = client_id
        self.connected = asyncio.Event()
        self.connections = 0  # successful connects (1 + reconnects)
        self.unsent = DropCounter(logger, what=f"outbound message from {client_id}")
        self._subscriptions = dict(subscriptions)
        self._will = will
        self._options = client_options(cfg)
        self._client: aiomqtt.Client | None = None
        self._retained: dict[str, bytes] = {}
        self._stopping = asyncio.Event()
        self._finished = asyncio.Event()
        self._finished.set()

    @property
    def address(self) -> str:
        return f"{self.cfg.host}:{self.cfg.port}"

    async def run(self) -> None:
        """Connect, subscribe and dispatch messages; on any connection loss back off and start over."""
        self._stopping.clear()
        self._finished.clear()
        backoff = INITIAL_BACKOFF_S
        try:
            while not self._stopping.is_set():
                connections = self.connections
                try:
                    await self._session()
                except aiomqtt.MqttError as exc:
                    if self._stopping.is_set():
                        break
                    if _cancelling():  # aiomqtt's disconnect on the way out raised over our cancellation
                        raise asyncio.CancelledError from exc
                    if self.connections > connections:  # this session had connected: a fresh outage
                        backoff = INITIAL_BACKOFF_S
                    delay = backoff * random.uniform(0.8, 1.2)
                    state = "lost the connection to" if self.connections else "cannot reach"
                    logger.warning(
                        "%s %s MQTT broker at %s (%s); retrying in %.1f s",
                        self.client_id, state, self.address, exc, delay,
                    )  # fmt: skip
                    backoff = min(backoff * 2, self.cfg.reconnect_max_backoff_s)
                    with contextlib.suppress(TimeoutError):  # a timeout is the normal end of the pause
                        await asyncio.wait_for(self._stopping.wait(), timeout=delay)
        finally:
            self._client = None
            self.connected.clear()
            self._finished.set()

    async def _session(self) -> None:
        """One connection: subscribe, re-publish retained messages, dispatch until lost or closing."""
        async with aiomqtt.Client(
            self.cfg.host,
            self.cfg.port,
            identifier=self.client_id,
            will=self._will,
            max_queued_incoming_messages=MAX_QUEUED_INCOMING,
            **self._options,  # type: ignore[arg-type]
        ) as client:
            for topic in self._subscriptions:
                await client.subscribe(topic, qos=self.cfg.qos)
            self.connections += 1
            self._client = client
            self.connected.set()
            for topic in list(self._retained):  # read at call time: a concurrent newer publish stays last
                await client.publish(topic, self._retained[topic], qos=STATUS_QOS, retain=True)
            logger.info(
                "%s %s MQTT broker at %s; subscribed to %s",
                self.client_id, "connected to" if self.connections == 1 else "reconnected to", self.address,
                ", ".join(self._subscriptions) or "nothing",
            )  # fmt: skip
            receiving = asyncio.create_task(self._dispatch(client))
            stopping = asyncio.create_task(self._stopping.wait())
            try:
                await asyncio.wait({receiving, stopping}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                self._client = None
                self.connected.clear()
                receiving.cancel()
                stopping.cancel()
            if receiving.done() and not receiving.cancelled():
                receiving.result()  # re-raises the MqttError that ended the session

    async def _dispatch(self, client: aiomqtt.Client) -> None:
        handlers = self._subscriptions
        async for message in client.messages:
            handler = handlers.get(message.topic.value)
            if handler is not None:
                handler(message.payload, time.perf_counter())

    async def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> bool:
        """Publish now, or return False (counted) when not connected; retained messages survive reconnects."""
        if retain:
            self._retained[topic] = payload
        client = self._client
        if client is None:
            self.unsent.record("not_connected", f"{topic}: no connection to {self.address}")
            return False
        try:
            await client.publish(topic, payload, qos=STATUS_QOS if retain else self.cfg.qos, retain=retain)
        except aiomqtt.MqttError as exc:
            self.unsent.record("publish_failed", f"{topic}: {exc}")
            return False
        return True

    async def disconnect(self, final: tuple[str, bytes] | None = None, timeout_s: float = 5.0) -> None:
        """Publish ``final`` (topic, payload; retained) if connected, then disconnect cleanly (no will)."""
        if final is not None:
            await self.publish(*final, retain=True)
        self._stopping.set()
        try:
            await asyncio.wait_for(self._finished.wait(), timeout=timeout_s)
        except TimeoutError:
            logger.warning("%s: MQTT connection did not close within %.1f s", self.client_id, timeout_s)


class RuntimeTransport(MqttLink):
    """The runtime's MQTT side: ticks in, one matrices message per tick out, retained status + last will."""

    def __init__(
        self,
        cfg: MqttConfig,
        *,
        on_tick: TickHandler,
        will_payload: bytes,
        client_id: str | None = None,
    ) -> None:
        self.topics = Topics(cfg.topic_prefix)
        if len(will_payload) > MAX_WILL_BYTES:  # refused here, not as a struct.error inside every connect
            raise ValueError(
                f"the last will for {self.topics.status} is {len(will_payload)} bytes, "
                f"MQTT allows {MAX_WILL_BYTES}: keep it to the state and the process's identity"
            )
        super().__init__(
            cfg,
            client_id=client_id or runtime_client_id(cfg),
            subscriptions={self.topics.tick: on_tick},
            will=aiomqtt.Will(self.topics.status, will_payload, qos=WILL_QOS, retain=True),
        )

    async def publish_matrices(self, payload: bytes) -> bool:
        return await self.publish(self.topics.matrices, payload)

    async def publish_agent_matrix(self, agent_id: str, payload: bytes) -> bool:
        return await self.publish(self.topics.agent_matrix(agent_id), payload)

    async def publish_status(self, payload: bytes) -> bool:
        """Retained: a client that subscribes later (the simulator) reads the roster from it."""
        return await self.publish(self.topics.status, payload, retain=True)

    async def close(self, final_status: bytes | None = None, timeout_s: float = 5.0) -> None:
        """Publish the final (offline) status, retained, then disconnect cleanly."""
        await self.disconnect(None if final_status is None else (self.topics.status, final_status), timeout_s)
