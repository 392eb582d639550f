"""Protocol version 2: the messages that open, change, read and restore a market (docs/protocol.md §13).

A game server sends a ``control`` request to its market's control topic; the runtime answers each one
with a ``reply`` (same ``request`` number) and tells of every tick it refused or skipped with a
``notice``. Ticks and answers keep the shape of version 1 (``v`` is 2). A market's state travels as a
:class:`MarketState`: what a snapshot returns and a restore sets, so a game can resume after either side
restarts.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal, cast

from blockmarket.core.state import MATRIX_MAX, MATRIX_MIN, FloatArray
from blockmarket.wire.codec import (
    agent_ids_field,
    array_field,
    check_within,
    int_field,
    str_field,
    strings_field,
    unpack,
)
from blockmarket.wire.limits import STATUS_MAX_STR_LEN, Limits, ProtocolError
from blockmarket.wire.messages import _wire_array, pack_message

VERSION: Final = 2
Op = Literal["open", "add", "remove", "close", "snapshot", "restore"]
# model selectors besides a model's name: the repository's model with the fewest live agents (ties: in
# repository order), or the model with the best training fitness in its metadata
ROUND_ROBIN: Final = "round_robin"
BEST: Final = "best"

_AGENTS = frozenset({"agent_ids", "desired", "models"})
_STATE = _AGENTS | {"matrices", "inventory", "success_rate"}
# op -> (required keys, optional keys) besides v, type, op, request
_OP_KEYS: Final[dict[str, tuple[frozenset[str], frozenset[str]]]] = {
    "open": (_AGENTS, frozenset({"matrices"})),
    "add": (_AGENTS, frozenset({"matrices"})),
    "remove": (frozenset({"agent_ids"}), frozenset()),
    "close": (frozenset(), frozenset()),
    "snapshot": (frozenset(), frozenset()),
    "restore": (_STATE, frozenset()),
}


@dataclass(frozen=True)
class ControlRequest:
    """One request of a game server to one of its markets (arrays are read-only payload views)."""

    op: Op
    request: int  # the game server's number for it, echoed in the reply
    agent_ids: tuple[str, ...] = ()
    desired: tuple[str, ...] = ()  # item names
    models: tuple[str, ...] = ()  # model names or selectors (ROUND_ROBIN, BEST)
    matrices: FloatArray | None = None  # [N, n, n] starting matrices (open, add) or the state (restore)
    inventory: FloatArray | None = None  # [N, n] (restore)
    success_rate: FloatArray | None = None  # [N] (restore)


@dataclass(frozen=True)
class MarketState:
    """A market's agents and everything the runtime keeps of them between ticks."""

    agent_ids: tuple[str, ...]
    desired: tuple[str, ...]
    models: tuple[str, ...]  # each agent's model (resolved: a name, never a selector)
    matrices: FloatArray  # [N, n, n]
    inventory: FloatArray  # [N, n] as of the agent's last tick
    success_rate: FloatArray  # [N]
    model_versions: Mapping[str, str] = field(default_factory=dict)
    last_tick: int | None = None  # the newest tick served; None before the first


def decode_control(payload: bytes, limits: Limits) -> ControlRequest:
    """Parse and check a control request; raises :class:`ProtocolError` (kinds as for ticks)."""
    data = unpack(payload, limits, "control", frozenset({"op", "request"}), None, VERSION)
    op = data["op"]
    if op not in _OP_KEYS:
        raise ProtocolError("schema", f"op {op!r} is not one of {sorted(_OP_KEYS)}")
    required, optional = _OP_KEYS[op]
    keys = set(data) - {"v", "type", "op", "request"}
    if missing := required - keys:
        raise ProtocolError("schema", f"{op} request lacks {sorted(missing)}")
    if unknown := keys - required - optional:
        raise ProtocolError("schema", f"{op} request has unknown keys {sorted(unknown, key=str)}")
    request = int_field(data, "request", limits.max_tick)
    if op in ("close", "snapshot"):
        return ControlRequest(cast(Op, op), request)
    ids = agent_ids_field(data)
    if op == "remove":
        return ControlRequest("remove", request, ids)
    count, arrays = len(ids), {}
    shapes = {"matrices": (count, None, None), "inventory": (count, None), "success_rate": (count,)}
    for name in ("matrices", "inventory", "success_rate"):
        if data.get(name) is not None:
            arrays[name] = array_field(data, name, shapes[name], limits)
    if "matrices" in arrays:
        check_within("matrices", arrays["matrices"], MATRIX_MIN, MATRIX_MAX)
    if "inventory" in arrays:
        check_within("inventory", arrays["inventory"], 0.0, limits.max_count)
    if "success_rate" in arrays:
        check_within("success_rate", arrays["success_rate"], 0.0, 1.0)
    return ControlRequest(
        cast(Op, op),
        request,
        ids,
        strings_field(data, "desired", count),
        strings_field(data, "models", count),
        arrays.get("matrices"),
        arrays.get("inventory"),
        arrays.get("success_rate"),
    )


def encode_control(request: ControlRequest) -> bytes:
    """Serialize a control request (what a game server or the simulator publishes)."""
    body: dict[str, Any] = {"op": request.op, "request": request.request}
    if request.op not in ("close", "snapshot"):
        body["agent_ids"] = list(request.agent_ids)
    if request.op in ("open", "add", "restore"):
        body["desired"] = list(request.desired)
        body["models"] = list(request.models)
    for name in ("matrices", "inventory", "success_rate"):
        value = getattr(request, name)
        if value is not None:
            body[name] = _wire_array(value)
    return pack_message("control", body, VERSION)


def restore_request(request: int, state: MarketState) -> ControlRequest:
    """The request that sets a market to ``state`` (what a snapshot returned)."""
    return ControlRequest(
        "restore",
        request,
        state.agent_ids,
        state.desired,
        state.models,
        state.matrices,
        state.inventory,
        state.success_rate,
    )


@dataclass(frozen=True)
class Reply:
    """The runtime's answer to one control request."""

    op: str
    request: int
    ok: bool
    error: str | None = None  # why it was refused ("limit: ...", "schema: ...", "unknown_agent: ...")
    state: MarketState | None = None  # snapshot: the whole state; open, add, restore: the market's roster


def encode_reply(reply: Reply) -> bytes:
    body: dict[str, Any] = {"op": reply.op, "request": reply.request, "ok": reply.ok, "error": reply.error}
    state = reply.state
    if state is not None:
        body.update(
            agent_ids=list(state.agent_ids),
            desired=list(state.desired),
            models=list(state.models),
            model_versions=dict(state.model_versions),
            matrices=_wire_array(state.matrices),
            inventory=_wire_array(state.inventory),
            success_rate=_wire_array(state.success_rate),
            last_tick=state.last_tick,
        )
    return pack_message("reply", body, VERSION)


def decode_reply(payload: bytes, limits: Limits) -> Reply:
    """Parse a reply (game-server side); raises :class:`ProtocolError`."""
    wordy = limits.wordy()
    data = unpack(payload, wordy, "reply", frozenset({"op", "request", "ok", "error"}), None, VERSION)
    state = None
    if "agent_ids" in data:
        ids = agent_ids_field(data)
        count = len(ids)
        last_tick = data.get("last_tick")
        state = MarketState(
            ids,
            strings_field(data, "desired", count),
            strings_field(data, "models", count),
            array_field(data, "matrices", (count, None, None), wordy),
            array_field(data, "inventory", (count, None), wordy),
            array_field(data, "success_rate", (count,), wordy),
            dict(data.get("model_versions") or {}),
            None if last_tick is None else int_field(data, "last_tick", limits.max_tick),
        )
    error = data["error"]
    return Reply(str_field(data, "op"), int_field(data, "request", limits.max_tick), bool(data["ok"]),
                 error if isinstance(error, str) else None, state)  # fmt: skip


@dataclass(frozen=True)
class Notice:
    """A tick (or request) of a market that got no answer, and why; at a bounded rate per market."""

    kind: str  # "skipped", a drop kind ("schema", "range", ...), "unpublished", "inference_errors", ...
    tick: int | None  # None when the message could not be read far enough to know its tick
    detail: str
    suppressed: int = 0  # notices not sent since the previous one (the rate limit)
    at: float = 0.0  # s since the epoch


def encode_notice(notice: Notice) -> bytes:
    body = {
        "kind": notice.kind,
        "tick": notice.tick,
        "detail": notice.detail[:STATUS_MAX_STR_LEN],
        "suppressed": notice.suppressed,
        "at": notice.at,
    }
    return pack_message("notice", body, VERSION)


def decode_notice(payload: bytes, limits: Limits) -> Notice:
    keys = frozenset({"kind", "tick", "detail", "suppressed", "at"})
    data = unpack(payload, limits.wordy(), "notice", keys, frozenset(), VERSION)
    tick = data["tick"]
    return Notice(
        str_field(data, "kind"),
        None if tick is None else int_field(data, "tick", limits.max_tick),
        str(data["detail"]),
        int_field(data, "suppressed", limits.max_tick),
        float(data["at"]),
    )


def encode_market_roster(
    owner: str, market: str, client_id: str, items: tuple[str, ...], state: MarketState, seq: int = 0
) -> bytes:
    """The market's retained roster: who its agents are and which model (and version) each runs.

    ``seq`` counts the market's roster changes: replicas take a roster newer than theirs (docs/deploy.md).
    """
    body = {
        "seq": seq,
        "owner": owner,
        "market": market,
        "client_id": client_id,
        "items": list(items),
        "agent_ids": list(state.agent_ids),
        "desired": list(state.desired),
        "models": list(state.models),
        "model_versions": dict(state.model_versions),
    }
    return pack_message("market_roster", body, VERSION)


def decode_market_roster(payload: bytes, limits: Limits) -> dict[str, Any]:
    keys = frozenset(
        {"owner", "market", "client_id", "items", "agent_ids", "desired", "models", "model_versions"}
    )
    data = unpack(payload, limits.wordy(), "market_roster", keys, frozenset({"seq"}), VERSION)
    count = len(agent_ids_field(data))
    if "seq" in data:
        int_field(data, "seq", limits.max_tick)
    str_field(data, "client_id")
    strings_field(data, "desired", count)
    strings_field(data, "models", count)
    return {k: v for k, v in data.items() if k not in ("v", "type")}
