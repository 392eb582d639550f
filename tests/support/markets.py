"""A game server of protocol version 2 in a test: opens its market, sends ticks and requests, records
answers, replies and notices; and an offline replay of a market's answers with plain CPU sessions."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from blockmarket.core.config import MqttConfig
from blockmarket.models.files import discover_models
from blockmarket.wire.limits import Limits
from blockmarket.wire.markets import (
    ControlRequest,
    MarketState,
    Notice,
    Reply,
    decode_notice,
    decode_reply,
    encode_control,
)
from blockmarket.wire.messages import MarketTick, MatricesMessage
from blockmarket.wire.protocol import decode_matrices
from blockmarket.wire.topics import MarketTopics
from blockmarket.wire.transport import MqttLink
from runtime.agents import AgentPopulation
from tests.support.serving import ITEMS, TickingClient, offline_step
from tests.support.wire import wait_until


class MarketClient(TickingClient):
    """One market of one game server (``owner``), over its own MQTT connection."""

    version = 2

    def __init__(self, mqtt: MqttConfig, owner: str, market: str, answers: bool = True) -> None:
        self.topics = MarketTopics(mqtt.topic_prefix, owner, market)
        self.limits = Limits(max_payload_bytes=mqtt.max_payload_bytes, num_items=len(ITEMS))
        self.answers: dict[int, MatricesMessage] = {}
        self.replies: dict[int, Reply] = {}
        self.notices: list[Notice] = []
        self.sent: dict[int, MarketTick] = {}
        self._request = 0
        subscriptions = {self.topics.reply: self._on_reply, self.topics.notice: self._on_notice}
        if answers:  # False: a flooding test's observer, which would spend its time decoding answers
            subscriptions[self.topics.matrices] = self._on_matrices
        self.link = MqttLink(
            mqtt, client_id=f"test-{owner}-{uuid.uuid4().hex[:8]}", subscriptions=subscriptions
        )

    def _on_matrices(self, payload: bytes, *_: object) -> None:
        msg = decode_matrices(payload, self.limits, 2)
        self.answers[msg.tick] = msg

    def _on_reply(self, payload: bytes, *_: object) -> None:
        reply = decode_reply(payload, self.limits)
        self.replies[reply.request] = reply

    def _on_notice(self, payload: bytes, *_: object) -> None:
        self.notices.append(decode_notice(payload, self.limits))

    async def request(self, op: str, timeout: float = 60.0, **fields: Any) -> Reply:
        """Send one control request and wait for its reply."""
        self._request += 1
        number = self._request
        payload = encode_control(ControlRequest(op, number, **fields))  # type: ignore[arg-type]
        assert await self.link.publish(self.topics.control, payload)
        await wait_until(lambda: number in self.replies, timeout, f"the reply to {op} #{number}")
        return self.replies[number]

    async def open(self, ids: list[str], models: list[str], seed: int = 0, **fields: Any) -> Reply:
        desired = [ITEMS[i % len(ITEMS)] for i in range(len(ids))]
        return await self.request(
            "open", agent_ids=tuple(ids), desired=tuple(desired), models=tuple(models), **fields
        )

    def tick(self, number: int, ids: tuple[str, ...], seed: int = 0) -> MarketTick:
        rng = np.random.default_rng(seed * 100_003 + number)
        successful = rng.integers(0, 5, size=len(ids))
        return MarketTick(
            tick=number,
            sent_at=time.time(),
            agent_ids=ids,
            inventory=rng.integers(0, 30, size=(len(ids), len(ITEMS))).astype(np.float32),
            successful=successful.astype(np.float32),
            attempted=(successful + rng.integers(0, 6, size=len(ids))).astype(np.float32),
        )


class MarketReplay:
    """One market recomputed offline from the state the runtime announced (a reply's), tick by tick."""

    def __init__(self, model_dir: Path, state: MarketState, alpha: float) -> None:
        models, _ = discover_models(model_dir, ITEMS)
        self.sessions = {m.key: ort.InferenceSession(str(m.onnx_path)) for m in models}
        self.alpha = alpha
        self.population = population_of(state)

    def add(self, state: MarketState) -> None:
        self.population.extend(population_of(state))

    def remove(self, agent_ids: set[str]) -> None:
        pop = self.population
        self.population = pop.subset([i for i, a in enumerate(pop.agent_ids) if a not in agent_ids])

    def step(self, tick: MarketTick) -> np.ndarray:
        return offline_step(self.population, self.sessions, tick, self.alpha)[0]


def population_of(state: MarketState) -> AgentPopulation:
    pop = AgentPopulation(
        state.agent_ids,
        ITEMS,
        [ITEMS.index(d) for d in state.desired],
        state.models,
        np.array(state.matrices),
        np.array(state.inventory),
    )
    pop.success_rate[:] = state.success_rate
    return pop
