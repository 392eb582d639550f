"""The messages of the wire and their msgpack encoding: float arrays travel as raw little-endian bytes
plus a shape, so encoding stays vectorized (spec: docs/protocol.md)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
import numpy.typing as npt

from blockmarket.wire.limits import (
    PROTOCOL_VERSION,
    WIRE_DTYPE,
    FloatArray,
)


@dataclass(frozen=True)
class MarketTick:
    """One market tick from the game server: the state of every agent it wants matrices for.

    Decoded arrays are read-only views of the payload (copy them into population arrays).
    """

    tick: int
    sent_at: float  # sender's time.time(), seconds
    agent_ids: tuple[str, ...]
    inventory: FloatArray  # [N, n]
    successful: FloatArray  # [N] successful trades so far
    attempted: FloatArray  # [N] attempted trades so far
    market_mean: FloatArray | None = None  # [n, n] market rates; None: the runtime uses the other agents'
    matrices: FloatArray | None = None  # [N, n, n] the agents' current matrices (v2 only; replicas need it)


@dataclass(frozen=True)
class MatricesMessage:
    """The runtime's answer to one tick: every served agent's new trading matrix."""

    tick: int
    sent_at: float  # echo of the tick's sent_at
    served_at: float  # runtime's time.time() at publish, seconds
    agent_ids: tuple[str, ...]
    matrices: FloatArray  # [N, n, n]
    latency_ms: float  # receive -> publish inside the runtime
    model_versions: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class AgentMatrix:
    """One agent's matrix on its own topic (optional per-agent output)."""

    tick: int
    served_at: float
    agent_id: str
    matrix: FloatArray  # [n, n]


@dataclass(frozen=True)
class RosterMessage:
    """Who the runtime serves (retained): enough for a game server to recompute every answer."""

    client_id: str
    started_at: float
    pool_generation: int  # the status's pool_generation when this roster was current
    items: tuple[str, ...]
    agent_ids: tuple[str, ...]
    desired: tuple[str, ...]  # desired item per agent
    models: tuple[str, ...]  # model key per agent
    model_versions: Mapping[str, str]  # model key -> content version
    initial_matrices: FloatArray  # [N, n, n]: each agent's matrix when it started (or joined)


# --------------------------------------------------------------------------------------------- encode


def _wire_array(array: npt.ArrayLike) -> dict[str, Any]:
    data = np.ascontiguousarray(array, dtype=WIRE_DTYPE)
    return {"dtype": WIRE_DTYPE, "shape": list(data.shape), "data": data.data.cast("B")}


def pack_message(kind: str, body: Mapping[str, Any], version: int = PROTOCOL_VERSION) -> bytes:
    return msgpack.packb({"v": version, "type": kind, **body}, use_bin_type=True)


def encode_tick(tick: MarketTick, version: int = PROTOCOL_VERSION) -> bytes:
    """Serialize a tick (what a game server or the simulator publishes)."""
    return pack_message(
        "tick",
        {
            "tick": int(tick.tick),
            "sent_at": float(tick.sent_at),
            "agent_ids": list(tick.agent_ids),
            "inventory": _wire_array(tick.inventory),
            "successful": _wire_array(tick.successful),
            "attempted": _wire_array(tick.attempted),
            "market_mean": None if tick.market_mean is None else _wire_array(tick.market_mean),
            **({} if tick.matrices is None else {"matrices": _wire_array(tick.matrices)}),
        },
        version,
    )


def encode_matrices(msg: MatricesMessage, version: int = PROTOCOL_VERSION) -> bytes:
    """Serialize the one batched answer for a tick."""
    return pack_message(
        "matrices",
        {
            "tick": int(msg.tick),
            "sent_at": float(msg.sent_at),
            "served_at": float(msg.served_at),
            "latency_ms": float(msg.latency_ms),
            "agent_ids": list(msg.agent_ids),
            "matrices": _wire_array(msg.matrices),
            "model_versions": dict(msg.model_versions),
        },
        version,
    )


def encode_agent_matrices(msg: MatricesMessage) -> Iterator[tuple[str, bytes]]:
    """(agent_id, payload) per agent for the optional per-agent topics (costly at 1000+ agents)."""
    matrices = np.ascontiguousarray(msg.matrices, dtype=WIRE_DTYPE)
    for agent_id, matrix in zip(msg.agent_ids, matrices, strict=True):
        yield (
            agent_id,
            pack_message(
                "agent_matrix",
                {
                    "tick": int(msg.tick),
                    "served_at": float(msg.served_at),
                    "agent_id": agent_id,
                    "matrix": _wire_array(matrix),
                },
            ),
        )


def encode_status(status: Mapping[str, Any]) -> bytes:
    """Serialize the retained runtime status (``state`` "online"/"offline" plus the fields in the spec)."""
    if status.get("state") not in ("online", "offline"):
        raise ValueError(f"status needs state 'online' or 'offline', got {status.get('state')!r}")
    return pack_message("status", status)


def message_sizes(
    agent_ids: Sequence[str], num_items: int, model_versions: Mapping[str, str] | None = None
) -> dict[str, int]:
    """Bytes of the largest tick and answer for this roster (float32 arrays, market_mean sent, counters
    and times at their widest encoding): what mqtt.max_payload_bytes must admit."""
    ids, count, n = tuple(agent_ids), len(agent_ids), num_items
    widest = 2**64 - 1  # a msgpack uint64: the widest tick number
    tick = MarketTick(
        tick=widest,
        sent_at=0.5,
        agent_ids=ids,
        inventory=np.zeros((count, n), np.float32),
        successful=np.zeros(count, np.float32),
        attempted=np.zeros(count, np.float32),
        market_mean=np.zeros((n, n), np.float32),
    )
    answer = MatricesMessage(
        tick=widest,
        sent_at=0.5,
        served_at=0.5,
        agent_ids=ids,
        matrices=np.zeros((count, n, n), np.float32),
        latency_ms=0.5,
        model_versions=model_versions or {},
    )
    return {"tick": len(encode_tick(tick)), "answer": len(encode_matrices(answer))}


def payload_shortfall(sizes: Mapping[str, int], limit: int) -> str | None:
    """Which of these message sizes exceed ``limit`` (mqtt.max_payload_bytes) and what it must be raised
    to, or None when all fit."""
    over = [f"{kind} messages of {size:,} bytes" for kind, size in sizes.items() if size > limit]
    if not over:
        return None
    return (
        f"{' and '.join(over)} exceed mqtt.max_payload_bytes ({limit:,}): "
        f"raise mqtt.max_payload_bytes to at least {max(sizes.values())}"
    )


def encode_roster(roster: RosterMessage) -> bytes:
    """Serialize the retained roster (one wire array holds every agent's starting matrix)."""
    return pack_message(
        "roster",
        {
            "client_id": roster.client_id,
            "started_at": float(roster.started_at),
            "pool_generation": int(roster.pool_generation),
            "items": list(roster.items),
            "agent_ids": list(roster.agent_ids),
            "desired": list(roster.desired),
            "models": list(roster.models),
            "model_versions": dict(roster.model_versions),
            "initial_matrices": _wire_array(roster.initial_matrices),
        },
    )
