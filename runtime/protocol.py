"""The msgpack wire format between game servers and the runtime (spec: docs/protocol.md).

One batched message per market tick in each direction; float arrays travel as raw little-endian bytes
plus a shape so encoding and decoding stay vectorized. Everything inbound is untrusted: the size is
checked before unpacking, msgpack runs with hard limits, and every field is type-, shape- and
finiteness-checked. Every failure is a :class:`ProtocolError` with a ``kind`` that :class:`DropCounter`
counts and logs at a bounded rate.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final

import msgpack
import numpy as np
import numpy.typing as npt

from runtime.config import MqttConfig

PROTOCOL_VERSION: Final = 1
WIRE_DTYPE: Final = "<f4"  # what the runtime sends
# What inbound arrays may carry; every one is converted to float32 on decode.
ACCEPTED_DTYPES: Final = frozenset({"<f4", "<f8", "<i4", "<i8"})

STATUS_MAX_STR_LEN: Final = 4096  # status strings (EP names, versions) may be longer than agent ids
ERROR_KINDS: Final = ("oversized", "malformed", "version", "schema", "shape", "non_finite", "unknown_agent")

FloatArray = npt.NDArray[np.float32]


class ProtocolError(ValueError):
    """An inbound message was refused; ``kind`` is one of :data:`ERROR_KINDS` (counted per kind)."""

    def __init__(self, kind: str, detail: str) -> None:
        if kind not in ERROR_KINDS:
            raise ValueError(f"unknown protocol error kind {kind!r} (expected one of {ERROR_KINDS})")
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


@dataclass(frozen=True)
class Limits:
    """Bounds on what an inbound message may contain (anything bigger is refused before work is done).

    The runtime and the simulator derive theirs from the config with :meth:`from_config`; the defaults
    are for tools and tests.
    """

    max_payload_bytes: int = 4 * 1024 * 1024
    max_agents: int = 10_000
    max_items: int = 64
    num_items: int | None = None  # when set, every item axis must have exactly this length
    max_id_len: int = 128  # longest agent id (and any other string) in bytes

    @classmethod
    def from_config(cls, mqtt: MqttConfig, *, num_agents: int | None, num_items: int | None = None) -> Limits:
        """What a receiver expecting ``num_agents`` agents accepts (None: any roster that fits in
        mqtt.max_payload_bytes, e.g. a runtime's status read before its roster is known)."""
        max_agents = mqtt.max_payload_bytes if num_agents is None else num_agents
        return cls(max_payload_bytes=mqtt.max_payload_bytes, max_agents=max_agents, num_items=num_items)


@dataclass(frozen=True)
class Topics:
    """The MQTT topic names under one prefix."""

    prefix: str

    def __post_init__(self) -> None:
        if not self.prefix or any(c in self.prefix for c in "+#\0") or self.prefix.endswith("/"):
            raise ValueError(
                f"MQTT topic prefix {self.prefix!r} must be non-empty, without '+', '#' or a trailing '/'"
            )

    @property
    def tick(self) -> str:
        return f"{self.prefix}/market/tick"

    @property
    def matrices(self) -> str:
        return f"{self.prefix}/agents/matrices"

    @property
    def status(self) -> str:
        return f"{self.prefix}/runtime/status"

    def agent_matrix(self, agent_id: str) -> str:
        return f"{self.prefix}/agents/{agent_id}/matrix"


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


# --------------------------------------------------------------------------------------------- encode


def _wire_array(array: npt.ArrayLike) -> dict[str, Any]:
    data = np.ascontiguousarray(array, dtype=WIRE_DTYPE)
    return {"dtype": WIRE_DTYPE, "shape": list(data.shape), "data": data.data.cast("B")}


def _pack(kind: str, body: Mapping[str, Any]) -> bytes:
    return msgpack.packb({"v": PROTOCOL_VERSION, "type": kind, **body}, use_bin_type=True)


def encode_tick(tick: MarketTick) -> bytes:
    """Serialize a tick (what a game server or the simulator publishes)."""
    return _pack(
        "tick",
        {
            "tick": int(tick.tick),
            "sent_at": float(tick.sent_at),
            "agent_ids": list(tick.agent_ids),
            "inventory": _wire_array(tick.inventory),
            "successful": _wire_array(tick.successful),
            "attempted": _wire_array(tick.attempted),
            "market_mean": None if tick.market_mean is None else _wire_array(tick.market_mean),
        },
    )


def encode_matrices(msg: MatricesMessage) -> bytes:
    """Serialize the one batched answer for a tick."""
    return _pack(
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
    )


def encode_agent_matrices(msg: MatricesMessage) -> Iterator[tuple[str, bytes]]:
    """(agent_id, payload) per agent for the optional per-agent topics (costly at 1000+ agents)."""
    matrices = np.ascontiguousarray(msg.matrices, dtype=WIRE_DTYPE)
    for agent_id, matrix in zip(msg.agent_ids, matrices, strict=True):
        yield (
            agent_id,
            _pack(
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
    return _pack("status", status)


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


# --------------------------------------------------------------------------------------------- decode


def _unpack(
    payload: bytes, limits: Limits, kind: str, required: frozenset[str], optional: frozenset[str] | None
) -> dict[str, Any]:
    """Size check, bounded unpack, version and key check (``optional`` None: any other keys allowed)."""
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise ProtocolError("malformed", f"payload is {type(payload).__name__}, not bytes")
    if len(payload) > limits.max_payload_bytes:
        raise ProtocolError("oversized", f"{len(payload)} bytes > limit {limits.max_payload_bytes}")
    try:
        data = msgpack.unpackb(
            payload,
            raw=False,
            strict_map_key=True,
            max_bin_len=limits.max_payload_bytes,
            max_str_len=limits.max_id_len,
            max_array_len=limits.max_agents,
            max_map_len=max(limits.max_agents, 32),
            max_ext_len=0,
        )
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        text = str(exc) or type(exc).__name__
        if "exceeds max_" in text:
            raise ProtocolError("oversized", f"msgpack limit: {text}") from None
        raise ProtocolError("malformed", f"not a single valid msgpack value ({text})") from None
    if not isinstance(data, dict):
        raise ProtocolError("schema", f"top level is a msgpack {type(data).__name__}, not a map")
    version = data.get("v")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            "version", f"protocol version {version!r}, this runtime speaks {PROTOCOL_VERSION}"
        )
    if data.get("type") != kind:
        raise ProtocolError("schema", f"message type {data.get('type')!r}, expected {kind!r}")
    keys = set(data) - {"v", "type"}
    if missing := required - keys:
        raise ProtocolError("schema", f"{kind} message lacks {sorted(missing)}")
    if optional is not None and (unknown := keys - required - optional):
        raise ProtocolError("schema", f"{kind} message has unknown keys {sorted(unknown)}")
    return data


def _int(data: Mapping[str, Any], key: str) -> int:
    value = data[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ProtocolError("schema", f"{key} must be a non-negative integer, got {value!r}")
    return value


def _float(data: Mapping[str, Any], key: str) -> float:
    value = data[key]
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise ProtocolError("schema", f"{key} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ProtocolError("non_finite", f"{key} is {value}")
    return float(value)


def _str(data: Mapping[str, Any], key: str) -> str:
    value = data[key]
    if not isinstance(value, str) or not value:
        raise ProtocolError("schema", f"{key} must be a non-empty string, got {value!r}")
    return value


def _agent_ids(data: Mapping[str, Any]) -> tuple[str, ...]:
    ids = data["agent_ids"]
    if not isinstance(ids, list) or not ids:
        raise ProtocolError("schema", "agent_ids must be a non-empty array of strings")
    if set(map(type, ids)) != {str}:
        raise ProtocolError("schema", "agent_ids must all be strings")
    unique = set(ids)
    if "" in unique:
        raise ProtocolError("schema", "agent_ids has an empty string")
    if len(unique) != len(ids):
        raise ProtocolError("schema", f"agent_ids has {len(ids) - len(unique)} duplicates")
    return tuple(ids)


def _array(data: Mapping[str, Any], key: str, shape: tuple[int | None, ...], limits: Limits) -> FloatArray:
    """A wire array as float32 (a read-only view of the payload for "<f4"); None in ``shape`` = item axis."""
    value = data[key]
    if not isinstance(value, dict) or set(value) != {"dtype", "shape", "data"}:
        raise ProtocolError("schema", f"{key} must be a map with exactly dtype, shape, data")
    dtype, got, raw = value["dtype"], value["shape"], value["data"]
    if dtype not in ACCEPTED_DTYPES:
        raise ProtocolError("schema", f"{key}.dtype {dtype!r} not one of {sorted(ACCEPTED_DTYPES)}")
    if not isinstance(got, list) or not all(type(d) is int and d >= 0 for d in got):
        raise ProtocolError("schema", f"{key}.shape must be an array of non-negative integers")
    if not isinstance(raw, bytes):
        raise ProtocolError("schema", f"{key}.data must be msgpack bin (raw bytes), got {type(raw).__name__}")
    items = limits.num_items
    expected = tuple(items if d is None else d for d in shape)
    if len(got) != len(shape) or any(e is not None and g != e for g, e in zip(got, expected, strict=True)):
        want = "x".join("n" if e is None else str(e) for e in expected)
        raise ProtocolError("shape", f"{key} has shape {got}, expected [{want}]")
    if any(g > limits.max_items for g, s in zip(got, shape, strict=True) if s is None):
        raise ProtocolError("shape", f"{key} has shape {got}: more than {limits.max_items} items")
    needed = math.prod(got) * np.dtype(dtype).itemsize
    if len(raw) != needed:
        raise ProtocolError(
            "shape", f"{key}.data has {len(raw)} bytes, shape {got} of {dtype} needs {needed}"
        )
    with np.errstate(over="ignore"):  # a float64 beyond float32 range becomes inf, refused just below
        out = np.frombuffer(raw, dtype=dtype).reshape(got).astype(np.float32, copy=False)
    if not np.isfinite(out).all():
        raise ProtocolError("non_finite", f"{key} has {int((~np.isfinite(out)).sum())} non-finite values")
    return out


def _item_count(*arrays: FloatArray) -> None:
    """All item axes of one message must agree."""
    sizes = {a.shape[-1] for a in arrays}
    if len(sizes) > 1:
        raise ProtocolError("shape", f"item axes disagree: {sorted(sizes)}")


_TICK_REQUIRED = frozenset({"tick", "sent_at", "agent_ids", "inventory", "successful", "attempted"})
_TICK_OPTIONAL = frozenset({"market_mean"})


def decode_tick(payload: bytes, limits: Limits) -> MarketTick:
    """Parse and check a tick from the game server; raises :class:`ProtocolError`."""
    data = _unpack(payload, limits, "tick", _TICK_REQUIRED, _TICK_OPTIONAL)
    ids = _agent_ids(data)
    count = len(ids)
    inventory = _array(data, "inventory", (count, None), limits)
    successful = _array(data, "successful", (count,), limits)
    attempted = _array(data, "attempted", (count,), limits)
    market_mean = None
    if data.get("market_mean") is not None:
        market_mean = _array(data, "market_mean", (None, None), limits)
        _item_count(inventory, market_mean, market_mean.T)
    for name, values in (("inventory", inventory), ("successful", successful), ("attempted", attempted)):
        if (values < 0).any():
            raise ProtocolError("schema", f"{name} has negative values")
    return MarketTick(
        tick=_int(data, "tick"),
        sent_at=_float(data, "sent_at"),
        agent_ids=ids,
        inventory=inventory,
        successful=successful,
        attempted=attempted,
        market_mean=market_mean,
    )


_MATRICES_REQUIRED = frozenset({"tick", "sent_at", "served_at", "latency_ms", "agent_ids", "matrices"})
_MATRICES_OPTIONAL = frozenset({"model_versions"})


def decode_matrices(payload: bytes, limits: Limits) -> MatricesMessage:
    """Parse and check the runtime's answer (game-server side); raises :class:`ProtocolError`."""
    data = _unpack(payload, limits, "matrices", _MATRICES_REQUIRED, _MATRICES_OPTIONAL)
    ids = _agent_ids(data)
    matrices = _array(data, "matrices", (len(ids), None, None), limits)
    _item_count(matrices, matrices.transpose(0, 2, 1))
    versions = data.get("model_versions") or {}
    if not isinstance(versions, dict) or not all(isinstance(v, str) for v in versions.values()):
        raise ProtocolError("schema", "model_versions must be a map of strings to strings")
    return MatricesMessage(
        tick=_int(data, "tick"),
        sent_at=_float(data, "sent_at"),
        served_at=_float(data, "served_at"),
        agent_ids=ids,
        matrices=matrices,
        latency_ms=_float(data, "latency_ms"),
        model_versions=versions,
    )


_AGENT_MATRIX_KEYS = frozenset({"tick", "served_at", "agent_id", "matrix"})


def decode_agent_matrix(payload: bytes, limits: Limits) -> AgentMatrix:
    """Parse one per-agent matrix message; raises :class:`ProtocolError`."""
    data = _unpack(payload, limits, "agent_matrix", _AGENT_MATRIX_KEYS, frozenset())
    matrix = _array(data, "matrix", (None, None), limits)
    _item_count(matrix, matrix.T)
    return AgentMatrix(
        tick=_int(data, "tick"),
        served_at=_float(data, "served_at"),
        agent_id=_str(data, "agent_id"),
        matrix=matrix,
    )


def decode_status(payload: bytes, limits: Limits) -> dict[str, Any]:
    """Parse the runtime status (without ``v``/``type``); ``state`` is required, other keys are open."""
    data = _unpack(
        payload,
        replace(limits, max_id_len=max(limits.max_id_len, STATUS_MAX_STR_LEN)),
        "status",
        frozenset({"state"}),
        None,
    )
    if data["state"] not in ("online", "offline"):
        raise ProtocolError("schema", f"status state {data['state']!r} is not 'online' or 'offline'")
    return {k: v for k, v in data.items() if k not in ("v", "type")}


# --------------------------------------------------------------------------------------------- drops


class DropCounter:
    """Counts refused messages per kind and logs each kind at most once per window (a flood stays quiet)."""

    def __init__(
        self,
        logger: logging.Logger,
        what: str = "inbound message",
        window_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.counts: dict[str, int] = {}
        self._logger = logger
        self._what = what
        self._window_s = window_s
        self._clock = clock
        self._last_logged: dict[str, float] = {}
        self._unlogged: dict[str, int] = {}

    def record(self, kind: str, detail: str) -> None:
        """Count one drop; log it unless this kind was logged less than ``window_s`` ago."""
        self.counts[kind] = self.counts.get(kind, 0) + 1
        now = self._clock()
        last = self._last_logged.get(kind)
        if last is not None and now - last < self._window_s:
            self._unlogged[kind] = self._unlogged.get(kind, 0) + 1
            return
        self._last_logged[kind] = now
        suppressed = self._unlogged.pop(kind, 0)
        more = f" ({suppressed} more since the last report)" if suppressed else ""
        self._logger.warning(
            "dropped %s [%s]: %s%s; %d dropped of this kind so far",
            self._what,
            kind,
            detail,
            more,
            self.counts[kind],
        )

    def record_error(self, error: ProtocolError, source: str) -> None:
        """Count a refused message from ``source`` (a topic name)."""
        self.record(error.kind, f"{source}: {error.detail}")

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def snapshot(self) -> dict[str, int]:
        return dict(self.counts)
