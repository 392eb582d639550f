"""The runtime's MQTT connection: ticks in (v1 topic and v2 markets), answers out, retained status and
roster, and the last will that says "offline" for it."""

from __future__ import annotations

import aiomqtt

from blockmarket.core.config import MqttConfig
from blockmarket.wire.connection import runtime_client_id
from blockmarket.wire.topics import INBOUND, MarketTopics, Topics
from blockmarket.wire.transport import Handler, MqttLink, PatternHandler

WILL_QOS = 1  # the broker publishes the will itself, on a connection the runtime no longer has
MAX_WILL_BYTES = 65_535  # MQTT encodes the will payload's length in two bytes (paho fails at connect beyond)


class RuntimeTransport(MqttLink):
    """The runtime's MQTT side: ticks in, one matrices message per tick out, retained status + last will."""

    def __init__(
        self,
        cfg: MqttConfig,
        *,
        on_tick: Handler,
        will_payload: bytes,
        client_id: str | None = None,
        on_market: PatternHandler | None = None,
        mqtt5: bool = False,
    ) -> None:
        """``cfg.shared_group`` set (replica mode): the v2 markets' ticks and requests come through a shared
        subscription, the v1 tick topic is not served, and the status is this replica's own topic."""
        self.topics = Topics(cfg.topic_prefix)
        client_id = client_id or runtime_client_id(cfg)
        self.replica = cfg.shared_group is not None
        self.status_topic = self.topics.replica_status(client_id) if self.replica else self.topics.status
        patterns = MarketTopics.patterns(cfg.topic_prefix, cfg.shared_group) if on_market else {}
        self.shared = [patterns[leaf] for leaf in INBOUND] if self.replica and patterns else []
        if len(will_payload) > MAX_WILL_BYTES:  # refused here, not as a struct.error inside every connect
            raise ValueError(
                f"the last will for {self.status_topic} is {len(will_payload)} bytes, "
                f"MQTT allows {MAX_WILL_BYTES}: keep it to the state and the process's identity"
            )
        super().__init__(
            cfg,
            client_id=client_id,
            subscriptions={} if self.replica else {self.topics.tick: on_tick},
            will=aiomqtt.Will(self.status_topic, will_payload, qos=WILL_QOS, retain=True),
            patterns={pattern: on_market for pattern in patterns.values()} if on_market else None,
            deferred=self.shared,  # join_group subscribes them once this replica knows the markets
            mqtt5=mqtt5,
        )

    async def publish_matrices(self, payload: bytes) -> bool:
        return await self.publish(self.topics.matrices, payload)

    async def publish_agent_matrix(self, agent_id: str, payload: bytes) -> bool:
        return await self.publish(self.topics.agent_matrix(agent_id), payload)

    async def publish_answer(self, topic: str, payload: bytes, reply_to: tuple[str, bytes] | None) -> bool:
        """A v2 market's answer, reply or notice: to the request's MQTT 5 response topic if it named one."""
        if reply_to is not None and self.mqtt5:
            return await self.publish(reply_to[0], payload, correlation=reply_to[1])
        return await self.publish(topic, payload)

    async def publish_retained(self, topic: str, payload: bytes) -> bool:
        """A market's roster. Replicas do not publish it again after a reconnect: another replica may have
        changed the market since (the broker keeps the newest)."""
        return await self.publish(topic, payload, retain=True, remember=not self.replica)

    async def clear_retained(self, topic: str) -> bool:
        return await self.unretain(topic)

    async def publish_status(self, payload: bytes) -> bool:
        """Retained: a client that subscribes later learns at once whether the runtime is online."""
        return await self.publish(self.status_topic, payload, retain=True)

    async def publish_roster(self, payload: bytes) -> bool:
        """Retained: a client that subscribes later (the simulator) reads the agents from it."""
        return await self.publish(self.topics.roster, payload, retain=True)

    async def close(self, final_status: bytes | None = None, timeout_s: float = 5.0) -> None:
        """Publish the final (offline) status, retained, then disconnect cleanly."""
        await self.disconnect(None if final_status is None else (self.status_topic, final_status), timeout_s)

    async def join_group(self) -> None:
        """Replica mode, once the markets' retained rosters are applied: take ticks and requests."""
        await self.subscribe(self.shared)

    async def leave_group(self) -> None:
        """Replica mode, stopping: no new ticks or requests for this replica (the group's others take
        them); what was already delivered is still served (drain)."""
        await self.unsubscribe(self.shared)
