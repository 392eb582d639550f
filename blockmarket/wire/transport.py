"""MQTT connections that survive broker restarts (aiomqtt): reconnect with backoff, resubscribe, re-retain.

:class:`MqttLink` is one connection with a fixed set of subscriptions. It never gives up on an outage, so
the agent state held by its owner outlives it, and it retries at least every
``mqtt.reconnect_max_backoff_s`` so serving resumes soon after the broker is back. It gives up
(:class:`BrokerRefused`) only when retrying cannot help: the broker keeps refusing our credentials, or
another client with our client id keeps taking the connection over. Inbound messages go to their
handler the moment paho reads them (:class:`DeliveringQueue`): no queue inside the process can drop one
unseen. :class:`RuntimeTransport` is the runtime's link (tick topic in; matrices, per-agent matrices,
retained status and roster out; last will "offline"). The simulator builds its own :class:`MqttLink` for
the game-server side.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import cast

import aiomqtt
from paho.mqtt import client as mqtt_client
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from blockmarket.core.config import MqttConfig
from blockmarket.wire.connection import client_options, refuses_credentials
from blockmarket.wire.limits import DropCounter

logger = logging.getLogger(__name__)


# handler(payload, time.perf_counter() at receipt, retained): retained is True for a message the broker
# replays because it was stored with the retain flag (sent on subscribing), False for a live one.
Handler = Callable[[bytes, float, bool], None]
# a wildcard subscription's handler: (topic, payload, perf_counter at receipt, retained, MQTT 5 response
# topic and correlation data when the publisher named one)
PatternHandler = Callable[[str, bytes, float, bool, "tuple[str, bytes] | None"], None]

INITIAL_BACKOFF_S = 0.2
# A client id in use elsewhere: each reconnect takes the connection over from the other client, so the
# broker closes ours again right after accepting it (MQTT 3.1.1 and Mosquitto 2.0 give no reason for it).
SHORT_SESSION_S = 2.0  # a connection the broker ends sooner than this after accepting it is suspect...
TAKEOVER_STREAK = 3  # ...and this many in a row, with no failed attempt between them, means a takeover
# Retained statuses are published at QoS 0: TCP already delivers them in order on a live connection and
# they are republished after every reconnect. At QoS 1 each periodic status stalled the next matrices
# answer by ~40 ms, which set the game-side p99 (docs/runtime.md, "Measured").
STATUS_QOS = 0


class BrokerRefused(RuntimeError):
    """The broker will not keep this client connected and retrying cannot change that (the message says
    what to change): its credentials, or another client connected with the same client id."""


class DeliveringQueue(asyncio.Queue[aiomqtt.Message]):
    """aiomqtt's inbound queue, replaced: every message is handed on the moment paho reads it.

    aiomqtt's own queue is emptied by its iterator one message per several loop iterations, and when full
    it discards each further message with a log line of its own. This one never holds a message, so
    nothing waits or is lost inside the process: a reader that falls behind pushes back on TCP, and the
    broker's queue for this client is what fills (docs/protocol.md §8).
    """

    def __init__(self, deliver: Callable[[aiomqtt.Message], None], maxsize: int = 0) -> None:
        super().__init__(maxsize)
        self._deliver = deliver

    def put_nowait(self, item: aiomqtt.Message) -> None:
        self._deliver(item)


def _response_route(message: aiomqtt.Message) -> tuple[str, bytes] | None:
    """An MQTT 5 request's response topic and correlation data (None: answer on the default topic)."""
    props = message.properties
    topic = getattr(props, "ResponseTopic", None) if props is not None else None
    if not isinstance(topic, str) or not topic or "+" in topic or "#" in topic:
        return None
    correlation = getattr(props, "CorrelationData", b"")
    return topic, bytes(correlation) if isinstance(correlation, bytes | bytearray) else b""


def _cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


class MqttLink:
    """One MQTT connection kept alive by :meth:`run` until :meth:`disconnect`; publishes fail fast while down.

    ``subscriptions`` maps exact topics to handlers called as ``handler(payload, perf_counter_at_receipt,
    retained)`` on the event loop as each message is read; they must be cheap and should not raise (an
    exception is counted and logged, and the next message is delivered as usual). Retained publishes are
    remembered and published again after every reconnect (a restarted broker has forgotten them, or fired
    our will).
    """

    def __init__(
        self,
        cfg: MqttConfig,
        *,
        client_id: str,
        subscriptions: Mapping[str, Handler],
        will: aiomqtt.Will | None = None,
        patterns: Mapping[str, PatternHandler] | None = None,
        mqtt5: bool = False,
        deferred: Sequence[str] = (),
    ) -> None:
        """``deferred``: patterns not subscribed at connect, only once :meth:`subscribe` names them."""
        self.cfg = cfg
        self.client_id = client_id
        self.connected = asyncio.Event()
        self.connections = 0  # successful connects (1 + reconnects)
        self.unsent = DropCounter(logger, what=f"outbound message from {client_id}")
        self.unhandled = DropCounter(logger, what=f"inbound message to {client_id}")
        self._subscriptions = dict(subscriptions)
        self._patterns = dict(patterns or {})
        self._matched: dict[str, PatternHandler | None] = {}  # topic -> its pattern's handler
        self._deferred = set(deferred)  # patterns not subscribed (yet)
        self.mqtt5 = mqtt5  # MQTT 5: request/response (response topic, correlation data) for v2 markets
        self._will = will
        self._options = client_options(cfg)
        self._client: aiomqtt.Client | None = None
        self._retained: dict[str, bytes] = {}
        self._stopping = asyncio.Event()
        self._finished = asyncio.Event()
        self._finished.set()
        self._accepted_at: float | None = None  # when the broker accepted the current attempt (CONNACK)
        self._auth_refusals = 0  # attempts refused for credentials since the last accepted one
        self._short_sessions = 0  # accepted connections in a row that the broker ended right away

    @property
    def address(self) -> str:
        return f"{self.cfg.host}:{self.cfg.port}"

    async def run(self) -> None:
        """Connect, subscribe and dispatch messages; on a connection loss back off and start over.

        Raises :class:`BrokerRefused` when the broker keeps refusing our credentials
        (``mqtt.max_auth_failures`` times) or another client keeps taking our client id over.
        """
        self._stopping.clear()
        self._finished.clear()
        backoff = INITIAL_BACKOFF_S
        try:
            while not self._stopping.is_set():
                self._accepted_at = None
                try:
                    await self._session()
                except aiomqtt.MqttError as exc:
                    if self._stopping.is_set():
                        break
                    if _cancelling():  # aiomqtt's disconnect on the way out raised over our cancellation
                        raise asyncio.CancelledError from exc
                    lived_s = None if self._accepted_at is None else time.monotonic() - self._accepted_at
                    refused = self._lasting_refusal(exc, lived_s)
                    if refused is not None:
                        raise refused from exc
                    if lived_s is not None:  # the broker had accepted us: a fresh outage starts from scratch
                        backoff, state = INITIAL_BACKOFF_S, "lost the connection to"
                    else:
                        state = "was refused by" if refuses_credentials(exc) else "cannot reach"
                    delay = backoff * random.uniform(0.8, 1.2)
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

    def _lasting_refusal(self, exc: aiomqtt.MqttError, lived_s: float | None) -> BrokerRefused | None:
        """Count this failed attempt; the refusal it completes (retrying cannot help), if any.

        ``lived_s``: how long the broker had kept the connection after accepting it (None: not accepted).
        """
        if lived_s is None:
            self._short_sessions = 0  # an outage between two connections: not a takeover
            if not refuses_credentials(exc):
                return None
            self._auth_refusals += 1
            if self._auth_refusals < self.cfg.max_auth_failures:
                return None
            who = f"user {self.cfg.username!r}" if self.cfg.username else "an anonymous client"
            return BrokerRefused(
                f"the MQTT broker at {self.address} refused {who} {self._auth_refusals} times in a row "
                f"({exc}): check mqtt.username and the password in "
                f"${self.cfg.password_env} (mqtt.password_env); mqtt.max_auth_failures sets how many "
                "refusals end the command"
            )
        self._auth_refusals = 0
        self._short_sessions = self._short_sessions + 1 if lived_s < SHORT_SESSION_S else 0
        if self._short_sessions < TAKEOVER_STREAK:
            return None
        return BrokerRefused(
            f"the MQTT broker at {self.address} closed our connection within {SHORT_SESSION_S:g} s of "
            f"accepting it {self._short_sessions} times in a row: most likely another client is using "
            f"client id {self.client_id!r} (two clients with one id take the connection from each other at "
            "every reconnect; if not, the broker's log says why it closes ours). Stopped instead of "
            "reconnecting for ever: give each runtime its own mqtt.client_id "
            "(null: blockmarket-runtime-<pid>)"
        )

    async def _session(self) -> None:
        """One connection: subscribe, re-publish retained messages, dispatch until lost or closing."""
        async with aiomqtt.Client(
            self.cfg.host,
            self.cfg.port,
            identifier=self.client_id,
            will=self._will,
            protocol=aiomqtt.ProtocolVersion.V5 if self.mqtt5 else aiomqtt.ProtocolVersion.V311,
            queue_type=cast(type[asyncio.Queue[aiomqtt.Message]], partial(DeliveringQueue, self._deliver)),
            **self._options,  # type: ignore[arg-type]
        ) as client:
            self._accepted_at = time.monotonic()
            self._client = client  # messages arrive during the subscribes below: their answers can go out
            for topic in [*self._subscriptions, *self._patterns]:
                if topic not in self._deferred:
                    await client.subscribe(topic, qos=self.cfg.qos)
            self.connections += 1
            self.connected.set()
            for topic in list(self._retained):  # read at call time: a concurrent newer publish stays last
                await client.publish(topic, self._retained[topic], qos=STATUS_QOS, retain=True)
            logger.info(
                "%s %s MQTT broker at %s; subscribed to %s",
                self.client_id, "connected to" if self.connections == 1 else "reconnected to", self.address,
                ", ".join(t for t in [*self._subscriptions, *self._patterns] if t not in self._deferred)
                or "nothing",
            )  # fmt: skip
            receiving = asyncio.create_task(self._until_disconnected(client))
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

    async def _until_disconnected(self, client: aiomqtt.Client) -> None:
        """Raise aiomqtt's MqttError when the connection ends (messages never reach its iterator)."""
        await anext(client.messages)

    def _deliver(self, message: aiomqtt.Message) -> None:
        """DeliveringQueue's callback, inside paho's read: hand the message to its topic's handler."""
        handler = self._subscriptions.get(message.topic.value)
        try:
            if handler is not None:
                handler(message.payload, time.perf_counter(), bool(message.retain))
                return
            receive = self._pattern_handler(message.topic)
            if receive is not None:
                receive(message.topic.value, message.payload, time.perf_counter(), bool(message.retain),
                        _response_route(message))  # fmt: skip
        except Exception as exc:  # raised into paho it would end the connection: counted and logged instead
            self.unhandled.record("handler_error", f"{message.topic.value}: {exc!r}", exc_info=exc)

    def _pattern_handler(self, topic: aiomqtt.Topic) -> PatternHandler | None:
        """The wildcard subscription's handler for ``topic``, remembered per topic (aiomqtt's matching
        costs ~20 us: at 1,000 messages a second it showed in profiles). Bounded: cleared at 10,000."""
        if topic.value in self._matched:
            return self._matched[topic.value]
        found = next((h for pattern, h in self._patterns.items() if topic.matches(pattern)), None)
        if len(self._matched) >= 10_000:
            self._matched.clear()
        self._matched[topic.value] = found
        return found

    async def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        retain: bool = False,
        correlation: bytes | None = None,
        remember: bool = True,
    ) -> bool:
        """Publish now, or return False (counted) when not connected; retained messages survive reconnects
        (published again after each one) unless ``remember`` is false.

        ``correlation``: MQTT 5 correlation data (the answer to a request that named a response topic).
        """
        if retain and remember:
            self._retained[topic] = payload
        client = self._client
        if client is None:
            self.unsent.record("not_connected", f"{topic}: no connection to {self.address}")
            return False
        properties = None
        if correlation is not None and self.mqtt5:
            properties = Properties(PacketTypes.PUBLISH)
            properties.CorrelationData = correlation
        qos = STATUS_QOS if retain else self.cfg.qos
        if qos == 0 and not retain:  # retained ones (status, roster) are few: awaited until written
            return self._publish_now(client, topic, payload, properties)
        try:
            await client.publish(
                topic,
                payload,
                qos=STATUS_QOS if retain else self.cfg.qos,
                retain=retain,
                properties=properties,
            )
        except aiomqtt.MqttError as exc:
            self.unsent.record("publish_failed", f"{topic}: {exc}")
            return False
        return True

    def _publish_now(
        self, client: aiomqtt.Client, topic: str, payload: bytes, properties: Properties | None
    ) -> bool:
        """A QoS 0 publish handed to paho, which writes it from the event loop: nothing to wait for (QoS 0
        has no acknowledgement). aiomqtt's publish waits one loop round trip for paho's "written" callback
        and costs ~0.3 ms a message; at 1,000 answers a second (50 markets at 20 Hz) that was a third of a
        core. Uses aiomqtt's paho client (``_client``), as aiomqtt's own publish does."""
        info = client._client.publish(topic, payload, 0, False, properties)
        if info.rc != mqtt_client.MQTT_ERR_SUCCESS:
            self.unsent.record("publish_failed", f"{topic}: {mqtt_client.error_string(info.rc)}")
            return False
        return True

    async def subscribe(self, patterns: list[str]) -> None:
        """Subscribe to these deferred patterns now (and after any reconnect)."""
        self._deferred.difference_update(patterns)
        client = self._client
        if client is None:
            return
        for pattern in patterns:
            try:
                await client.subscribe(pattern, qos=self.cfg.qos)
            except aiomqtt.MqttError as exc:  # the reconnect subscribes it
                logger.warning("%s: subscribing to %s failed: %s", self.client_id, pattern, exc)

    async def unsubscribe(self, patterns: list[str]) -> None:
        """Stop receiving these (wildcard) subscriptions, now and after any reconnect. Their handlers stay:
        what the broker sent before it unsubscribed us is still delivered."""
        self._deferred.update(patterns)
        client = self._client
        if client is not None and patterns:
            try:
                await client.unsubscribe(patterns)
            except aiomqtt.MqttError as exc:
                logger.warning("%s: unsubscribing from %s failed: %s", self.client_id, patterns, exc)

    async def unretain(self, topic: str) -> bool:
        """Clear a retained topic (an empty retained message) and stop re-publishing it."""
        self._retained.pop(topic, None)
        client = self._client
        if client is None:
            return False
        try:
            await client.publish(topic, b"", qos=STATUS_QOS, retain=True)
        except aiomqtt.MqttError:
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
