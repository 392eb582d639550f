"""A game server with many markets in a test of replica mode: every tick carries its agents' matrices (the
newest answered, or the starting ones), and every tick sent and every answer is recorded, so the answers
can be checked against one single-process runtime fed the very same ticks."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from blockmarket.core.config import MqttConfig
from blockmarket.wire.limits import Limits
from blockmarket.wire.markets import (
    ControlRequest,
    Notice,
    Reply,
    decode_notice,
    decode_reply,
    encode_control,
)
from blockmarket.wire.messages import MarketTick, MatricesMessage, encode_tick
from blockmarket.wire.protocol import decode_matrices, decode_status
from blockmarket.wire.topics import MarketTopics, Topics
from blockmarket.wire.transport import MqttLink
from tests.support.serving import ITEMS
from tests.support.wire import LinkedClient, wait_until


@dataclass
class GameMarket:
    """One market of the game: its agents, the matrices it holds, what it sent and what came back."""

    topics: MarketTopics
    agent_ids: tuple[str, ...]
    models: tuple[str, ...]
    matrices: np.ndarray  # [N, n, n]: the newest answer's (the state a replica does not keep)
    newest: int = -1  # the newest tick answered
    sent: dict[int, tuple[float, bytes]] = field(default_factory=dict)  # tick -> (sent at, payload)
    answers: dict[int, MatricesMessage] = field(default_factory=dict)


class ReplicaGame(LinkedClient):
    """Markets ``m0..m{count-1}`` of owner ``owner`` on one MQTT connection, with the replicas' statuses."""

    def __init__(self, mqtt: MqttConfig, owner: str = "game") -> None:
        self.prefix, self.owner = mqtt.topic_prefix, owner
        self.limits = Limits(max_payload_bytes=mqtt.max_payload_bytes, num_items=len(ITEMS))
        self.markets: dict[str, GameMarket] = {}
        self.replies: dict[tuple[str, int], Reply] = {}
        self.notices: list[tuple[str, Notice]] = []
        self.statuses: dict[str, dict[str, Any]] = {}  # replica client id -> its status
        self.served: dict[str, int] = {}  # replica client id -> the most ticks its status said it served
        self._request = 0
        every = f"{self.prefix}/v2/{owner}/+"
        patterns = {
            f"{every}/matrices": self._on_market,
            f"{every}/reply": self._on_market,
            f"{every}/notice": self._on_market,
            f"{self.prefix}/runtime/replicas/+/status": self._on_status,
        }
        single = {Topics(self.prefix).status: self._on_single_status}  # a runtime serving alone
        self.link = MqttLink(
            mqtt, client_id=f"test-game-{uuid.uuid4().hex[:8]}", subscriptions=single, patterns=patterns
        )

    def _on_market(self, topic: str, payload: bytes, *_: object) -> None:
        market, leaf = topic.split("/")[-2:]
        if leaf == "matrices":
            msg = decode_matrices(payload, self.limits, 2)
            game = self.markets[market]
            game.answers[msg.tick] = msg
            if msg.tick > game.newest:
                game.newest, game.matrices = msg.tick, np.array(msg.matrices)
        elif leaf == "reply":
            reply = decode_reply(payload, self.limits)
            self.replies[(market, reply.request)] = reply
        else:
            self.notices.append((market, decode_notice(payload, self.limits)))

    def _on_status(self, topic: str, payload: bytes, *_: object) -> None:
        if payload:
            client, status = topic.split("/")[-2], decode_status(payload, self.limits.wordy())
            self.statuses[client] = status
            if "replica" in status:  # (a last will has no figures)
                self.served[client] = max(self.served.get(client, 0), status["replica"]["ticks_served"])

    def _on_single_status(self, payload: bytes, *_: object) -> None:
        if payload:
            self.statuses["runtime"] = decode_status(payload, self.limits.wordy())

    def online(self) -> list[str]:
        """The client ids of the replicas whose status says online ("runtime": a single process)."""
        return sorted(c for c, s in self.statuses.items() if s.get("state") == "online")

    async def request(self, market: str, op: str, **fields: Any) -> Reply:
        self._request += 1
        number, topics = self._request, MarketTopics(self.prefix, self.owner, market)
        assert await self.link.publish(topics.control, encode_control(ControlRequest(op, number, **fields)))  # type: ignore[arg-type]
        await wait_until(lambda: (market, number) in self.replies, 60, f"the reply to {op} #{number}")
        return self.replies[(market, number)]

    async def open(self, market: str, agents: int, models: tuple[str, ...]) -> None:
        ids = tuple(f"bot-{k}" for k in range(agents))
        chosen = tuple(models[k % len(models)] for k in range(agents))
        desired = tuple(ITEMS[k % len(ITEMS)] for k in range(agents))
        reply = await self.request(market, "open", agent_ids=ids, desired=desired, models=chosen)
        assert reply.ok and reply.state is not None, reply.error
        topics = MarketTopics(self.prefix, self.owner, market)
        self.markets[market] = GameMarket(topics, ids, chosen, np.array(reply.state.matrices))

    async def tick(self, market: str, number: int) -> None:
        """Publish tick ``number`` of ``market``, carrying the matrices of its newest answer."""
        game = self.markets[market]
        rng = np.random.default_rng(hash((market, number)) % 2**32)
        count = len(game.agent_ids)
        successful = rng.integers(0, 5, size=count).astype(np.float32)
        tick = MarketTick(
            tick=number,
            sent_at=time.time(),
            agent_ids=game.agent_ids,
            inventory=rng.integers(0, 30, size=(count, len(ITEMS))).astype(np.float32),
            successful=successful,
            attempted=successful + rng.integers(0, 6, size=count).astype(np.float32),
            matrices=game.matrices,
        )
        payload = encode_tick(tick, 2)
        game.sent[number] = (time.monotonic(), payload)
        assert await self.link.publish(game.topics.tick, payload)

    def unanswered(self) -> dict[str, list[tuple[int, float]]]:
        """Per market, the ticks sent that got no answer, with when they were sent."""
        return {
            name: [(n, at) for n, (at, _) in sorted(game.sent.items()) if n not in game.answers]
            for name, game in self.markets.items()
        }
