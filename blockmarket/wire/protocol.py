"""The msgpack wire format between game servers and the runtime (spec: docs/protocol.md).

One batched message per market tick in each direction; float arrays travel as raw little-endian bytes
plus a shape so encoding and decoding stay vectorized. Everything inbound is untrusted: the size is
checked before unpacking, msgpack runs with hard limits, maps may not repeat a key, and every field is
type-, shape-, finiteness- and range-checked. Every failure is a :class:`ProtocolError` with a ``kind``
that :class:`DropCounter` counts and logs at a bounded rate.

This module decodes the messages. Beside it: limits.py (version, refusal kinds, limits, drop counter),
topics.py, messages.py (the messages and their encoding) and codec.py (safe unpacking and field checks);
callers import each name from its own module.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from blockmarket.core.state import MATRIX_MAX, MATRIX_MIN
from blockmarket.wire.codec import (
    agent_ids_field,
    array_field,
    check_item_count,
    check_market_rates,
    check_within,
    float_field,
    int_field,
    str_field,
    strings_field,
    unpack,
)
from blockmarket.wire.limits import PROTOCOL_VERSION, Limits, ProtocolError
from blockmarket.wire.messages import AgentMatrix, MarketTick, MatricesMessage, RosterMessage

_TICK_REQUIRED = frozenset({"tick", "sent_at", "agent_ids", "inventory", "successful", "attempted"})
_TICK_OPTIONAL = frozenset({"market_mean"})
_TICK_OPTIONAL_V2 = frozenset({"market_mean", "matrices"})  # a v2 tick may carry its agents' matrices


def decode_tick(payload: bytes, limits: Limits, version: int = PROTOCOL_VERSION) -> MarketTick:
    """Parse and check a tick from the game server; raises :class:`ProtocolError`.

    Version 2 ticks (a market's topic) have the keys of version 1 and may carry the agents' current
    matrices (``matrices``, [N, n, n] in [0.1, 10] with diagonal 1: the state replicas do not keep).
    """
    optional = _TICK_OPTIONAL if version == PROTOCOL_VERSION else _TICK_OPTIONAL_V2
    data = unpack(payload, limits, "tick", _TICK_REQUIRED, optional, version)
    ids = agent_ids_field(data)
    count = len(ids)
    inventory = array_field(data, "inventory", (count, None), limits)
    successful = array_field(data, "successful", (count,), limits)
    attempted = array_field(data, "attempted", (count,), limits)
    market_mean = None
    if data.get("market_mean") is not None:
        market_mean = array_field(data, "market_mean", (None, None), limits)
        check_item_count(inventory, market_mean, market_mean.T)
    for name, values in (("inventory", inventory), ("successful", successful), ("attempted", attempted)):
        check_within(name, values, 0.0, limits.max_count)
    if market_mean is not None:
        check_market_rates(market_mean)
    matrices = None
    if data.get("matrices") is not None:
        matrices = array_field(data, "matrices", (count, None, None), limits)
        check_item_count(inventory, matrices, matrices.transpose(0, 2, 1))
        check_within("matrices", matrices, MATRIX_MIN, MATRIX_MAX)
        if not (np.diagonal(matrices, axis1=1, axis2=2) == 1.0).all():
            raise ProtocolError("range", "matrices must have 1 on the diagonal")
    if (successful > attempted).any():
        rows = np.flatnonzero(successful > attempted)
        raise ProtocolError(
            "range", f"successful > attempted for {len(rows)} agent(s), e.g. {ids[rows[0]]!r}"
        )
    return MarketTick(
        tick=int_field(data, "tick", limits.max_tick),
        sent_at=float_field(data, "sent_at", limits.max_time_s),
        agent_ids=ids,
        inventory=inventory,
        successful=successful,
        attempted=attempted,
        market_mean=market_mean,
        matrices=matrices,
    )


_MATRICES_REQUIRED = frozenset({"tick", "sent_at", "served_at", "latency_ms", "agent_ids", "matrices"})
_MATRICES_OPTIONAL = frozenset({"model_versions"})


def _versions(data: Mapping[str, Any]) -> dict[str, str]:
    versions = data.get("model_versions") or {}
    if not isinstance(versions, dict) or not set(map(type, versions.values())) <= {str}:  # 10,000: 0.1 ms
        raise ProtocolError("schema", "model_versions must be a map of strings to strings")
    return versions


def decode_matrices(payload: bytes, limits: Limits, version: int = PROTOCOL_VERSION) -> MatricesMessage:
    """Parse and check the runtime's answer (game-server side); raises :class:`ProtocolError`."""
    data = unpack(payload, limits, "matrices", _MATRICES_REQUIRED, _MATRICES_OPTIONAL, version)
    ids = agent_ids_field(data)
    matrices = array_field(data, "matrices", (len(ids), None, None), limits)
    check_item_count(matrices, matrices.transpose(0, 2, 1))
    check_within("matrices", matrices, -math.inf, math.inf)
    return MatricesMessage(
        tick=int_field(data, "tick", limits.max_tick),
        sent_at=float_field(data, "sent_at"),
        served_at=float_field(data, "served_at"),
        agent_ids=ids,
        matrices=matrices,
        latency_ms=float_field(data, "latency_ms"),
        model_versions=_versions(data),
    )


_AGENT_MATRIX_KEYS = frozenset({"tick", "served_at", "agent_id", "matrix"})


def decode_agent_matrix(payload: bytes, limits: Limits) -> AgentMatrix:
    """Parse one per-agent matrix message; raises :class:`ProtocolError`."""
    data = unpack(payload, limits, "agent_matrix", _AGENT_MATRIX_KEYS, frozenset())
    matrix = array_field(data, "matrix", (None, None), limits)
    check_item_count(matrix, matrix.T)
    check_within("matrix", matrix, -math.inf, math.inf)
    return AgentMatrix(
        tick=int_field(data, "tick", limits.max_tick),
        served_at=float_field(data, "served_at"),
        agent_id=str_field(data, "agent_id"),
        matrix=matrix,
    )


def decode_status(payload: bytes, limits: Limits) -> dict[str, Any]:
    """Parse the runtime status (without ``v``/``type``); ``state`` is required, other keys are open."""
    data = unpack(payload, limits.wordy(), "status", frozenset({"state"}), None)
    if data["state"] not in ("online", "offline"):
        raise ProtocolError("schema", f"status state {data['state']!r} is not 'online' or 'offline'")
    return {k: v for k, v in data.items() if k not in ("v", "type")}


_ROSTER_KEYS = frozenset(
    {
        "client_id",
        "started_at",
        "pool_generation",
        "items",
        "agent_ids",
        "desired",
        "models",
        "model_versions",
        "initial_matrices",
    }
)


def decode_roster(payload: bytes, limits: Limits) -> RosterMessage:
    """Parse the runtime's roster (game-server side); raises :class:`ProtocolError`."""
    wordy = limits.wordy()
    data = unpack(payload, wordy, "roster", _ROSTER_KEYS, frozenset())
    ids = agent_ids_field(data)
    items = strings_field(data, "items")
    desired = strings_field(data, "desired", len(ids))
    models = strings_field(data, "models", len(ids))
    versions = _versions(data)
    if unknown := sorted(set(desired) - set(items)):
        raise ProtocolError("schema", f"desired items {unknown[:5]} are not in items {list(items)}")
    if unknown := sorted(set(models) - set(versions)):
        raise ProtocolError("schema", f"models {unknown[:5]} have no entry in model_versions")
    matrices = array_field(data, "initial_matrices", (len(ids), len(items), len(items)), wordy)
    check_within("initial_matrices", matrices, MATRIX_MIN, MATRIX_MAX)
    return RosterMessage(
        client_id=str_field(data, "client_id"),
        started_at=float_field(data, "started_at"),
        pool_generation=int_field(data, "pool_generation", limits.max_tick),
        items=items,
        agent_ids=ids,
        desired=desired,
        models=models,
        model_versions=versions,
        initial_matrices=matrices,
    )
