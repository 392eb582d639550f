"""The msgpack wire format between game servers and the runtime (spec: docs/protocol.md).

One batched message per market tick in each direction; float arrays travel as raw little-endian bytes
plus a shape so encoding and decoding stay vectorized. Everything inbound is untrusted: the size is
checked before unpacking, msgpack runs with hard limits, maps may not repeat a key, and every field is
type-, shape-, finiteness- and range-checked. Every failure is a :class:`ProtocolError` with a ``kind``
that :class:`DropCounter` counts and logs at a bounded rate.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final, cast

import msgpack
import numpy as np
import numpy.typing as npt

from blockmarket.core.config import MqttConfig
from blockmarket.core.state import MATRIX_MAX, MATRIX_MIN

PROTOCOL_VERSION: Final = 1
WIRE_DTYPE: Final = "<f4"  # what the runtime sends
# What inbound arrays may carry; every one is converted to float32 on decode.
ITEM_SIZES: Final = {"<f4": 4, "<f8": 8, "<i4": 4, "<i8": 8}
ACCEPTED_DTYPES: Final = frozenset(ITEM_SIZES)

STATUS_MAX_STR_LEN: Final = 4096  # status and roster strings (EP names, model keys) may be longer than ids
ERROR_KINDS: Final = (
    "oversized",
    "malformed",
    "version",
    "schema",
    "shape",
    "non_finite",
    "range",
    "unknown_agent",
)
LENGTH_SCAN_VALUES: Final = 1024  # values scanned for an over-limit declared length in an incomplete payload

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
    max_count: float = 1e9  # largest inventory amount and trade counter
    max_tick: int = 2**53 - 1  # largest tick number (exact in a float64 / JavaScript number)
    max_time_s: float = 1e10  # latest sent_at, s since the epoch (the year 2286)

    @classmethod
    def from_config(cls, mqtt: MqttConfig, *, num_agents: int | None, num_items: int | None = None) -> Limits:
        """What a receiver expecting ``num_agents`` agents accepts (None: any roster that fits in
        mqtt.max_payload_bytes, e.g. a runtime's status read before its roster is known)."""
        max_agents = mqtt.max_payload_bytes if num_agents is None else num_agents
        return cls(max_payload_bytes=mqtt.max_payload_bytes, max_agents=max_agents, num_items=num_items)

    def announce(self) -> dict[str, Any]:
        """The limits as the status announces them (docs/protocol.md §6, §7)."""
        return {
            "max_payload_bytes": self.max_payload_bytes,
            "max_agents": self.max_agents,
            "max_items": self.max_items,
            "max_id_len": self.max_id_len,
            "max_count": self.max_count,
            "max_tick": self.max_tick,
            "max_time_s": self.max_time_s,
            "matrix_range": [MATRIX_MIN, MATRIX_MAX],
        }

    @classmethod
    def from_announcement(cls, announced: Mapping[str, Any], num_items: int | None = None) -> Limits:
        """The limits a runtime announced (a game server can refuse on its side what the runtime would)."""
        return cls(
            max_payload_bytes=int(announced["max_payload_bytes"]),
            max_agents=int(announced["max_agents"]),
            max_items=int(announced["max_items"]),
            num_items=num_items,
            max_id_len=int(announced["max_id_len"]),
            max_count=float(announced["max_count"]),
            max_tick=int(announced["max_tick"]),
            max_time_s=float(announced["max_time_s"]),
        )


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

    @property
    def roster(self) -> str:
        return f"{self.prefix}/runtime/roster"

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


def encode_roster(roster: RosterMessage) -> bytes:
    """Serialize the retained roster (one wire array holds every agent's starting matrix)."""
    return _pack(
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


# --------------------------------------------------------------------------------------------- decode


class _DuplicateKey(Exception):
    """A msgpack map repeated a key (raised from inside the unpacker, turned into a ``schema`` refusal)."""


def _unique_map(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    """msgpack object_pairs_hook: a map, refused when a key repeats (no "last one wins")."""
    out = dict(pairs)
    if len(out) != len(pairs):
        repeated = sorted(str(k) for k, n in Counter(k for k, _ in pairs).items() if n > 1)
        raise _DuplicateKey(f"a map repeats the key(s) {repeated[:5]}")
    return out


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
            object_pairs_hook=_unique_map,
            max_bin_len=limits.max_payload_bytes,
            max_str_len=limits.max_id_len,
            max_array_len=limits.max_agents,
            max_map_len=max(limits.max_agents, 32),
            max_ext_len=0,  # every extension type "exceeds" it: refused as malformed below
        )
    except _DuplicateKey as exc:
        raise ProtocolError("schema", str(exc)) from None
    except msgpack.StackError:
        raise ProtocolError("oversized", "msgpack values nested deeper than the unpacker's limit") from None
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise _unpack_error(payload, limits, str(exc) or type(exc).__name__) from None
    if not isinstance(data, dict):
        raise ProtocolError("schema", f"top level is a msgpack {type(data).__name__}, not a map")
    version = data.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:  # 1.0 and True are not version 1
        raise ProtocolError(
            "version", f"protocol version {version!r}, this runtime speaks {PROTOCOL_VERSION}"
        )
    if data.get("type") != kind:
        raise ProtocolError("schema", f"message type {data.get('type')!r}, expected {kind!r}")
    keys = set(data) - {"v", "type"}
    if missing := required - keys:
        raise ProtocolError("schema", f"{kind} message lacks {sorted(missing)}")
    if optional is not None and (unknown := keys - required - optional):
        raise ProtocolError("schema", f"{kind} message has unknown keys {sorted(unknown, key=str)}")
    return data


def _unpack_error(payload: bytes, limits: Limits, text: str) -> ProtocolError:
    """The kind of an unpack failure: a declared length over its limit is oversized, the rest malformed."""
    if "exceeds max_ext_len" in text:
        return ProtocolError("malformed", "msgpack extension types are not part of the protocol")
    if "exceeds max_" in text:
        return ProtocolError("oversized", f"msgpack limit: {text}")
    if "is not allowed for map key" in text:
        return ProtocolError("schema", f"map keys must be strings ({text})")
    if "incomplete input" in text and (over := _declared_over_limit(payload, limits)):
        return ProtocolError("oversized", f"msgpack limit: {over}")
    return ProtocolError("malformed", f"not a single valid msgpack value ({text})")


# msgpack headers followed by a fixed number of bytes: float32/64, uint8..64, int8..64
_FIXED_WIDTH: Final = dict(zip(range(0xCA, 0xD4), (4, 8, 1, 2, 4, 8, 1, 2, 4, 8), strict=True))


def _declared_over_limit(payload: bytes, limits: Limits) -> str | None:
    """Slow path for a payload that ends early: a str or bin declaring more bytes than its limit.

    msgpack checks those lengths only once the bytes are there, so a huge declared length in a short
    payload reads as "incomplete". Scans the first :data:`LENGTH_SCAN_VALUES` values (bounded work).
    """
    data, pos, pending = bytes(payload), 0, 1
    for _ in range(LENGTH_SCAN_VALUES):
        if pending == 0 or pos >= len(data):
            return None
        head, pos, pending = data[pos], pos + 1, pending - 1
        if head <= 0x7F or head >= 0xE0 or head in (0xC0, 0xC2, 0xC3):
            continue
        if head <= 0x8F:
            pending += 2 * (head & 0x0F)
            continue
        if head <= 0x9F:
            pending += head & 0x0F
            continue
        if head in _FIXED_WIDTH:
            pos += _FIXED_WIDTH[head]
            continue
        if head <= 0xBF:
            what, width, size = "str", 0, head & 0x1F
        elif 0xC4 <= head <= 0xC6 or 0xD9 <= head <= 0xDB:
            what, width = ("bin", 1 << (head - 0xC4)) if head <= 0xC6 else ("str", 1 << (head - 0xD9))
            if pos + width > len(data):
                return None
            size = int.from_bytes(data[pos : pos + width], "big")
        elif 0xDC <= head <= 0xDF:  # array/map 16/32: msgpack checked their lengths already
            width = 2 if head in (0xDC, 0xDE) else 4
            count = int.from_bytes(data[pos : pos + width], "big")
            pos, pending = pos + width, pending + (count if head <= 0xDD else 2 * count)
            continue
        else:  # ext or the reserved 0xc1: malformed whatever the length
            return None
        limit = limits.max_id_len if what == "str" else limits.max_payload_bytes
        if size > limit:
            return f"a {what} declares {size} bytes (limit {limit})"
        pos += width + size
    return None


def _int(data: Mapping[str, Any], key: str, maximum: int) -> int:
    value = data[key]
    if type(value) is not int:
        raise ProtocolError("schema", f"{key} must be an integer, got {type(value).__name__}")
    if not 0 <= value <= maximum:
        raise ProtocolError("range", f"{key} {value} is outside [0, {maximum}]")
    return value


def _float(data: Mapping[str, Any], key: str, maximum: float = math.inf) -> float:
    value = data[key]
    if type(value) is not float and type(value) is not int:
        raise ProtocolError("schema", f"{key} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ProtocolError("non_finite", f"{key} is {value}")
    if not 0 <= value <= maximum:
        raise ProtocolError("range", f"{key} {value} is outside [0, {maximum:g}]")
    return float(value)


def _str(data: Mapping[str, Any], key: str) -> str:
    value = data[key]
    if not isinstance(value, str) or not value:
        raise ProtocolError("schema", f"{key} must be a non-empty string, got {value!r}")
    return value


def _strings(data: Mapping[str, Any], key: str, count: int | None = None) -> tuple[str, ...]:
    """A non-empty array of strings (of ``count`` entries when given)."""
    values = data[key]
    if not isinstance(values, list) or not values or set(map(type, values)) != {str}:
        raise ProtocolError("schema", f"{key} must be a non-empty array of strings")
    if count is not None and len(values) != count:
        raise ProtocolError("shape", f"{key} has {len(values)} entries, expected {count}")
    return tuple(values)


def _agent_ids(data: Mapping[str, Any], key: str = "agent_ids") -> tuple[str, ...]:
    ids = _strings(data, key)
    unique = set(ids)
    if "" in unique:
        raise ProtocolError("schema", f"{key} has an empty string")
    if len(unique) != len(ids):
        raise ProtocolError("schema", f"{key} has {len(ids) - len(unique)} duplicates")
    joined = "".join(ids)
    if not joined.isprintable():  # a newline in an id would forge log lines, a bidi override hide text
        bad = next(c for c in joined if not c.isprintable())
        raise ProtocolError("schema", f"{key} contain the unprintable character U+{ord(bad):04X}")
    return ids


def _array(data: Mapping[str, Any], key: str, shape: tuple[int | None, ...], limits: Limits) -> FloatArray:
    """A wire array as float32 (a read-only view of the payload for "<f4"); None in ``shape`` = item axis.

    Finiteness and ranges are the caller's: :func:`_within` checks them in two reductions.
    """
    value = data[key]
    if type(value) is not dict or len(value) != 3 or not {"dtype", "shape", "data"}.issuperset(value):
        raise ProtocolError("schema", f"{key} must be a map with exactly dtype, shape, data")
    dtype, got, raw = value["dtype"], value["shape"], value["data"]
    if dtype not in ACCEPTED_DTYPES:
        raise ProtocolError("schema", f"{key}.dtype {dtype!r} not one of {sorted(ACCEPTED_DTYPES)}")
    if type(got) is not list or any(type(d) is not int or d < 0 for d in got):
        raise ProtocolError("schema", f"{key}.shape must be an array of non-negative integers")
    if type(raw) is not bytes:
        raise ProtocolError("schema", f"{key}.data must be msgpack bin (raw bytes), got {type(raw).__name__}")
    expected = tuple(limits.num_items if s is None else s for s in shape)  # None: any item count >= 1
    if len(got) != len(shape) or not all(
        g >= 1 if e is None else g == e for g, e in zip(got, expected, strict=True)
    ):
        want = "x".join("n" if e is None else str(e) for e in expected)
        raise ProtocolError("shape", f"{key} has shape {got}, expected [{want}]")
    if any(g > limits.max_items for g, s in zip(got, shape, strict=True) if s is None):
        raise ProtocolError("shape", f"{key} has shape {got}: more than {limits.max_items} items")
    needed = math.prod(got) * ITEM_SIZES[dtype]
    if len(raw) != needed:
        raise ProtocolError(
            "shape", f"{key}.data has {len(raw)} bytes, shape {got} of {dtype} needs {needed}"
        )
    values = np.frombuffer(raw, dtype=dtype).reshape(got)
    if dtype == WIRE_DTYPE:
        return cast(FloatArray, values)
    with np.errstate(over="ignore"):  # a float64 beyond float32 range becomes inf, refused as non-finite
        return values.astype(np.float32)


def _within(key: str, values: FloatArray, low: float, high: float) -> None:
    """Every value finite and in [low, high] (NaN fails both reductions, so one fast path covers all)."""
    if values.size == 0 or (values.min() >= low and values.max() <= high):
        return
    if not np.isfinite(values).all():
        raise ProtocolError("non_finite", f"{key} has {int((~np.isfinite(values)).sum())} non-finite values")
    raise ProtocolError(
        "range",
        f"{key} spans [{float(values.min()):g}, {float(values.max()):g}], allowed [{low:g}, {high:g}]",
    )


def _item_count(*arrays: FloatArray) -> None:
    """All item axes of one message must agree."""
    sizes = {a.shape[-1] for a in arrays}
    if len(sizes) > 1:
        raise ProtocolError("shape", f"item axes disagree: {sorted(sizes)}")


def _market_rates(rates: FloatArray) -> None:
    """Market rates lie in the matrix range [0.1, 10], or are all zeros ("no market data")."""
    if not (rates.min() == 0.0 and rates.max() == 0.0):
        _within("market_mean", rates, MATRIX_MIN, MATRIX_MAX)


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
        _within(name, values, 0.0, limits.max_count)
    if market_mean is not None:
        _market_rates(market_mean)
    if (successful > attempted).any():
        rows = np.flatnonzero(successful > attempted)
        raise ProtocolError(
            "range", f"successful > attempted for {len(rows)} agent(s), e.g. {ids[rows[0]]!r}"
        )
    return MarketTick(
        tick=_int(data, "tick", limits.max_tick),
        sent_at=_float(data, "sent_at", limits.max_time_s),
        agent_ids=ids,
        inventory=inventory,
        successful=successful,
        attempted=attempted,
        market_mean=market_mean,
    )


_MATRICES_REQUIRED = frozenset({"tick", "sent_at", "served_at", "latency_ms", "agent_ids", "matrices"})
_MATRICES_OPTIONAL = frozenset({"model_versions"})


def _versions(data: Mapping[str, Any]) -> dict[str, str]:
    versions = data.get("model_versions") or {}
    if not isinstance(versions, dict) or not all(isinstance(v, str) for v in versions.values()):
        raise ProtocolError("schema", "model_versions must be a map of strings to strings")
    return versions


def decode_matrices(payload: bytes, limits: Limits) -> MatricesMessage:
    """Parse and check the runtime's answer (game-server side); raises :class:`ProtocolError`."""
    data = _unpack(payload, limits, "matrices", _MATRICES_REQUIRED, _MATRICES_OPTIONAL)
    ids = _agent_ids(data)
    matrices = _array(data, "matrices", (len(ids), None, None), limits)
    _item_count(matrices, matrices.transpose(0, 2, 1))
    _within("matrices", matrices, -math.inf, math.inf)
    return MatricesMessage(
        tick=_int(data, "tick", limits.max_tick),
        sent_at=_float(data, "sent_at"),
        served_at=_float(data, "served_at"),
        agent_ids=ids,
        matrices=matrices,
        latency_ms=_float(data, "latency_ms"),
        model_versions=_versions(data),
    )


_AGENT_MATRIX_KEYS = frozenset({"tick", "served_at", "agent_id", "matrix"})


def decode_agent_matrix(payload: bytes, limits: Limits) -> AgentMatrix:
    """Parse one per-agent matrix message; raises :class:`ProtocolError`."""
    data = _unpack(payload, limits, "agent_matrix", _AGENT_MATRIX_KEYS, frozenset())
    matrix = _array(data, "matrix", (None, None), limits)
    _item_count(matrix, matrix.T)
    _within("matrix", matrix, -math.inf, math.inf)
    return AgentMatrix(
        tick=_int(data, "tick", limits.max_tick),
        served_at=_float(data, "served_at"),
        agent_id=_str(data, "agent_id"),
        matrix=matrix,
    )


def _wordy(limits: Limits) -> Limits:
    """Status and roster strings may be longer than agent ids (EP names, model file names)."""
    return replace(limits, max_id_len=max(limits.max_id_len, STATUS_MAX_STR_LEN))


def decode_status(payload: bytes, limits: Limits) -> dict[str, Any]:
    """Parse the runtime status (without ``v``/``type``); ``state`` is required, other keys are open."""
    data = _unpack(payload, _wordy(limits), "status", frozenset({"state"}), None)
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
    wordy = _wordy(limits)
    data = _unpack(payload, wordy, "roster", _ROSTER_KEYS, frozenset())
    ids = _agent_ids(data)
    items = _strings(data, "items")
    desired = _strings(data, "desired", len(ids))
    models = _strings(data, "models", len(ids))
    versions = _versions(data)
    if unknown := sorted(set(desired) - set(items)):
        raise ProtocolError("schema", f"desired items {unknown[:5]} are not in items {list(items)}")
    if unknown := sorted(set(models) - set(versions)):
        raise ProtocolError("schema", f"models {unknown[:5]} have no entry in model_versions")
    matrices = _array(data, "initial_matrices", (len(ids), len(items), len(items)), wordy)
    _within("initial_matrices", matrices, MATRIX_MIN, MATRIX_MAX)
    return RosterMessage(
        client_id=_str(data, "client_id"),
        started_at=_float(data, "started_at"),
        pool_generation=_int(data, "pool_generation", limits.max_tick),
        items=items,
        agent_ids=ids,
        desired=desired,
        models=models,
        model_versions=versions,
        initial_matrices=matrices,
    )


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

    def record(self, kind: str, detail: str, exc_info: BaseException | None = None) -> None:
        """Count one drop; log it (with ``exc_info``'s traceback) unless this kind was logged less than
        ``window_s`` ago."""
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
            exc_info=exc_info,
        )

    def record_error(self, error: ProtocolError, source: str) -> None:
        """Count a refused message from ``source`` (a topic name)."""
        self.record(error.kind, f"{source}: {error.detail}")

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def snapshot(self) -> dict[str, int]:
        return dict(self.counts)
