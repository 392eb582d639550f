"""Seeded hostile tick payloads, each with the refusal kind the runtime must count it under.

Shared by the hostile-tick tests (tests/runtime/test_hostile_ticks.py) and the soak benchmark
(benchmarks/soak.py), which both check the runtime's count of every kind against what was sent.

Every generator turns a valid tick into something a hostile or broken client could send: random bytes,
truncations, byte flips, wrong types, msgpack extension types, lying lengths, deep nesting, repeated
keys, other versions, unprintable ids, NaN and infinities, extreme finite values, unknown agents, bad
shapes, oversized payloads. A candidate that happens to decode as a valid tick (a byte flip inside a
float, say) is not hostile and is discarded, so each payload kept has exactly one expected kind.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import msgpack
import numpy as np

from blockmarket.wire.limits import Limits, ProtocolError
from blockmarket.wire.messages import MarketTick, encode_tick
from blockmarket.wire.protocol import decode_tick

Tick = dict[str, Any]
UNPRINTABLE = ("\n", "\r\n", "\x00", "\x1b[31m", "\x7f", "\u202e", "\u2028", "\x85")
EXTREME = (3.4e38, -3.4e38, 1e38, -1e38, -1.0, 2e9, 1e-45, 0.05, 10.5)


def packed(data: Any) -> bytes:
    return msgpack.packb(data, use_bin_type=True)


def wire(values: np.ndarray, dtype: str = "<f4") -> dict[str, Any]:
    array = np.ascontiguousarray(values, dtype=dtype)
    return {"dtype": dtype, "shape": list(array.shape), "data": array.tobytes()}


def packed_map(pairs: list[tuple[str, bytes]]) -> bytes:
    """A msgpack map from (key, already packed value) pairs, repeated keys and all."""
    return msgpack.Packer().pack_map_header(len(pairs)) + b"".join(packed(k) + v for k, v in pairs)


class HostilePayloads:
    """Draws hostile payloads from one seed, against a valid ``template`` tick of the runtime's roster."""

    def __init__(self, template: MarketTick, limits: Limits, roster: set[str], seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.limits, self.roster = limits, roster
        self.valid = encode_tick(template)
        self.data: Tick = msgpack.unpackb(self.valid)
        self.discarded = 0  # candidates that were in fact valid ticks
        self.kinds: list[Callable[[], bytes]] = [
            self.random_bytes,
            self.truncated,
            self.flipped,
            self.wrong_type,
            self.extension,
            self.lying_length,
            self.nested,
            self.repeated_key,
            self.other_version,
            self.unprintable_id,
            self.non_finite,
            self.extreme,
            self.unknown_agent,
            self.bad_shape,
            self.oversized,
        ]

    def __iter__(self) -> Iterator[tuple[bytes, str]]:
        """Endless (payload, expected kind) pairs, cycling through the generators in random order."""
        while True:
            for index in self.rng.permutation(len(self.kinds)):
                payload = self.kinds[index]()
                kind = self.refusal(payload)
                if kind is None:
                    self.discarded += 1
                    continue
                yield payload, kind

    def refusal(self, payload: bytes) -> str | None:
        """The kind the runtime must count ``payload`` under; None for a valid tick of its roster."""
        try:
            tick = decode_tick(payload, self.limits)
        except ProtocolError as exc:
            return exc.kind
        return None if set(tick.agent_ids) <= self.roster else "unknown_agent"

    # ------------------------------------------------------------------------------------ helpers

    def pick(self, options: tuple[Any, ...] | list[Any]) -> Any:
        return options[int(self.rng.integers(len(options)))]

    def field(self) -> str:
        return str(self.pick([k for k in self.data if k not in ("v", "type")]))

    def tick_with(self, **changes: Any) -> bytes:
        return packed({**self.data, **changes})

    def array_field(self) -> str:
        return str(self.pick(("inventory", "successful", "attempted", "market_mean")))

    def values_of(self, name: str) -> np.ndarray:
        value = self.data[name]
        if value is None:  # market_mean nil in the template
            return np.ones((5, 5), np.float32)
        return np.frombuffer(value["data"], value["dtype"]).reshape(value["shape"]).copy()

    # ------------------------------------------------------------------------------------ kinds

    def random_bytes(self) -> bytes:
        return self.rng.bytes(int(self.rng.integers(0, 400)))

    def truncated(self) -> bytes:
        return self.valid[: int(self.rng.integers(0, len(self.valid)))]

    def flipped(self) -> bytes:
        payload = bytearray(self.valid)
        for pos in self.rng.integers(0, len(payload), int(self.rng.integers(1, 6))):
            payload[pos] = int(self.rng.integers(0, 256))
        return bytes(payload)

    def wrong_type(self) -> bytes:
        bad = self.pick(("7", 7.5, None, [], {}, True, b"bytes", -(2**63), {"dtype": "<f4"}, [1.0, 2.0]))
        return self.tick_with(**{self.field(): bad})

    def extension(self) -> bytes:
        ext = self.pick((msgpack.ExtType(int(self.rng.integers(0, 128)), b"xyz"), msgpack.Timestamp(1, 2)))
        return self.tick_with(**{self.field(): ext})

    def lying_length(self) -> bytes:
        """A declared length far beyond the payload, at the top level or inside agent_ids."""
        length = int(self.rng.integers(2**20, 2**32)).to_bytes(4, "big")
        header = self.pick((b"\xc6", b"\xdb", b"\xdd", b"\xdf")) + length  # bin32, str32, array32, map32
        ids = self.data["agent_ids"]
        inside = b"\xdc" + len(ids).to_bytes(2, "big") + packed(ids[0]) + header
        start = [("v", packed(1)), ("type", packed("tick"))]
        return packed_map([*start, ("agent_ids", self.pick((header, inside)))])

    def nested(self) -> bytes:
        """The tick number inside arrays nested 50 to 5,000 deep (msgpack's own limit is 1,024)."""
        deep = b"\x91" * int(self.pick((50, 600, 2_000, 5_000))) + b"\xc0"
        return packed_map([(k, deep if k == "tick" else packed(v)) for k, v in self.data.items()])

    def repeated_key(self) -> bytes:
        if self.rng.random() < 0.5:
            key = self.field()
            pairs = [(k, packed(v)) for k, v in self.data.items()]
            return packed_map([*pairs, (key, packed(self.data[key]))])
        name = self.pick(("inventory", "successful", "attempted"))
        inner = self.data[name]
        twice = packed_map([(k, packed(v)) for k, v in inner.items()] + [("shape", packed(inner["shape"]))])
        return packed_map([(k, twice if k == name else packed(v)) for k, v in self.data.items()])

    def other_version(self) -> bytes:
        return self.tick_with(v=self.pick((1.0, True, 2, 0, "1", None, -1, [1])))

    def unprintable_id(self) -> bytes:
        ids = list(self.data["agent_ids"])
        k = int(self.rng.integers(len(ids)))
        ids[k] = ids[k] + self.pick(UNPRINTABLE) + "WARNING forged line"
        return self.tick_with(agent_ids=ids)

    def non_finite(self) -> bytes:
        if self.rng.random() < 0.2:
            return self.tick_with(sent_at=float(self.pick((np.nan, np.inf, -np.inf))))
        name = self.array_field()
        values = self.values_of(name)
        values.flat[int(self.rng.integers(values.size))] = self.pick((np.nan, np.inf, -np.inf))
        return self.tick_with(**{name: wire(values, self.pick(("<f4", "<f8")))})

    def extreme(self) -> bytes:
        choice = int(self.rng.integers(4))
        if choice == 0:
            return self.tick_with(tick=int(self.pick((2**53, 2**64 - 1, -1))))
        if choice == 1:
            return self.tick_with(sent_at=float(self.pick((-5.0, 1e12, 3.4e38))))
        if choice == 2:  # more successful trades than attempted ones
            attempted = self.values_of("attempted")
            return self.tick_with(successful=wire(attempted + 1 + self.rng.integers(0, 5, attempted.shape)))
        name = self.array_field()
        values = self.values_of(name)
        values.flat[int(self.rng.integers(values.size))] = self.pick(EXTREME)
        if name == "market_mean" and self.rng.random() < 0.3:
            values.flat[0] = 0.0  # partly "no data", partly rates: refused too
        return self.tick_with(**{name: wire(values)})

    def unknown_agent(self) -> bytes:
        ids = list(self.data["agent_ids"])
        ids[int(self.rng.integers(len(ids)))] = f"intruder-{int(self.rng.integers(1_000_000))}"
        return self.tick_with(agent_ids=ids)

    def bad_shape(self) -> bytes:
        name = self.pick(("inventory", "successful", "attempted"))
        values = self.values_of(name)
        if self.rng.random() < 0.5:
            return self.tick_with(**{name: wire(values.reshape(-1)[: values.size - 1])})
        array = wire(values)
        array["data"] = array["data"][: -int(self.rng.integers(1, 4))]
        return self.tick_with(**{name: array})

    def oversized(self) -> bytes:
        """Mostly an id over the length limit; sometimes a payload over the size limit (they are big)."""
        if self.rng.random() < 0.05:
            return self.valid + b"\x00" * (self.limits.max_payload_bytes - len(self.valid) + 1)
        ids = list(self.data["agent_ids"])
        ids[0] = "x" * (self.limits.max_id_len + int(self.rng.integers(1, 100)))
        return self.tick_with(agent_ids=ids)
