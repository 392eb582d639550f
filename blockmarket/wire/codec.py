"""Safe unpacking of untrusted payloads: the size is checked before unpacking, msgpack runs with hard
limits, maps may not repeat a key, and every field is type-, shape-, finiteness- and range-checked.
Every failure is a :class:`~blockmarket.wire.limits.ProtocolError`."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping
from typing import Any, Final, cast

import msgpack
import numpy as np

from blockmarket.core.state import MATRIX_MAX, MATRIX_MIN
from blockmarket.wire.limits import (
    ACCEPTED_DTYPES,
    ITEM_SIZES,
    LENGTH_SCAN_VALUES,
    PROTOCOL_VERSION,
    WIRE_DTYPE,
    FloatArray,
    Limits,
    ProtocolError,
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


def unpack(
    payload: bytes,
    limits: Limits,
    kind: str,
    required: frozenset[str],
    optional: frozenset[str] | None,
    version: int = PROTOCOL_VERSION,
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
    found = data.get("v")
    if type(found) is not int or found != version:  # 1.0 and True are not version 1
        raise ProtocolError("version", f"protocol version {found!r}, expected {version} here")
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


def int_field(data: Mapping[str, Any], key: str, maximum: int) -> int:
    value = data[key]
    if type(value) is not int:
        raise ProtocolError("schema", f"{key} must be an integer, got {type(value).__name__}")
    if not 0 <= value <= maximum:
        raise ProtocolError("range", f"{key} {value} is outside [0, {maximum}]")
    return value


def float_field(data: Mapping[str, Any], key: str, maximum: float = math.inf) -> float:
    value = data[key]
    if type(value) is not float and type(value) is not int:
        raise ProtocolError("schema", f"{key} must be a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ProtocolError("non_finite", f"{key} is {value}")
    if not 0 <= value <= maximum:
        raise ProtocolError("range", f"{key} {value} is outside [0, {maximum:g}]")
    return float(value)


def str_field(data: Mapping[str, Any], key: str) -> str:
    value = data[key]
    if not isinstance(value, str) or not value:
        raise ProtocolError("schema", f"{key} must be a non-empty string, got {value!r}")
    return value


def strings_field(data: Mapping[str, Any], key: str, count: int | None = None) -> tuple[str, ...]:
    """A non-empty array of strings (of ``count`` entries when given)."""
    values = data[key]
    if not isinstance(values, list) or not values or set(map(type, values)) != {str}:
        raise ProtocolError("schema", f"{key} must be a non-empty array of strings")
    if count is not None and len(values) != count:
        raise ProtocolError("shape", f"{key} has {len(values)} entries, expected {count}")
    return tuple(values)


def agent_ids_field(data: Mapping[str, Any], key: str = "agent_ids") -> tuple[str, ...]:
    ids = strings_field(data, key)
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


def array_field(
    data: Mapping[str, Any], key: str, shape: tuple[int | None, ...], limits: Limits
) -> FloatArray:
    """A wire array as float32 (a read-only view of the payload for "<f4"); None in ``shape`` = item axis.

    Finiteness and ranges are the caller's: :func:`check_within` checks them in two reductions.
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


def check_within(key: str, values: FloatArray, low: float, high: float) -> None:
    """Every value finite and in [low, high] (NaN fails both reductions, so one fast path covers all)."""
    if values.size == 0 or (values.min() >= low and values.max() <= high):
        return
    if not np.isfinite(values).all():
        raise ProtocolError("non_finite", f"{key} has {int((~np.isfinite(values)).sum())} non-finite values")
    raise ProtocolError(
        "range",
        f"{key} spans [{float(values.min()):g}, {float(values.max()):g}], allowed [{low:g}, {high:g}]",
    )


def check_item_count(*arrays: FloatArray) -> None:
    """All item axes of one message must agree."""
    sizes = {a.shape[-1] for a in arrays}
    if len(sizes) > 1:
        raise ProtocolError("shape", f"item axes disagree: {sorted(sizes)}")


def check_market_rates(rates: FloatArray) -> None:
    """Market rates lie in the matrix range [0.1, 10], or are all zeros ("no market data")."""
    if not (rates.min() == 0.0 and rates.max() == 0.0):
        check_within("market_mean", rates, MATRIX_MIN, MATRIX_MAX)
