"""The msgpack codec: round trips, and every kind of bad input refused with the right kind."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import msgpack
import numpy as np
import pytest

from blockmarket.core.config import MqttConfig
from blockmarket.wire.limits import LENGTH_SCAN_VALUES, PROTOCOL_VERSION, DropCounter, Limits, ProtocolError
from blockmarket.wire.messages import (
    MatricesMessage,
    RosterMessage,
    encode_agent_matrices,
    encode_matrices,
    encode_roster,
    encode_status,
    encode_tick,
    message_sizes,
    payload_shortfall,
)
from blockmarket.wire.protocol import (
    decode_agent_matrix,
    decode_matrices,
    decode_roster,
    decode_status,
    decode_tick,
)
from blockmarket.wire.topics import Topics
from tests.support.wire import make_tick

LIMITS = Limits(num_items=5)


def tampered(change: Callable[[dict[str, Any]], None]) -> bytes:
    """A valid tick, unpacked, changed by ``change``, packed again."""
    data = msgpack.unpackb(encode_tick(make_tick()))
    change(data)
    return msgpack.packb(data, use_bin_type=True)


def wire(array: np.ndarray, dtype: str = "<f4") -> dict[str, Any]:
    return {"dtype": dtype, "shape": list(array.shape), "data": np.ascontiguousarray(array, dtype).tobytes()}


def test_tick_round_trip_is_exact_and_copy_free() -> None:
    tick = make_tick(count=300)
    payload = encode_tick(tick)
    back = decode_tick(payload, LIMITS)
    assert back.tick == tick.tick and back.sent_at == tick.sent_at and back.agent_ids == tick.agent_ids
    for name in ("inventory", "successful", "attempted", "market_mean"):
        np.testing.assert_array_equal(getattr(back, name), getattr(tick, name))
        assert getattr(back, name).dtype == np.float32
    assert not back.inventory.flags.writeable  # a view of the payload, not a copy


def test_tick_without_market_mean() -> None:
    tick = make_tick()
    payload = encode_tick(
        type(tick)(tick.tick, tick.sent_at, tick.agent_ids, tick.inventory, tick.successful, tick.attempted)
    )
    assert decode_tick(payload, LIMITS).market_mean is None
    assert msgpack.unpackb(payload)["market_mean"] is None


def test_a_v2_tick_may_carry_its_agents_matrices_and_only_valid_ones() -> None:
    """Replica mode's state in the tick (docs/protocol.md §14): [N, n, n], in [0.1, 10], diagonal 1."""
    tick = make_tick(count=3)
    matrices = np.full((3, 5, 5), 2.0, np.float32)
    np.einsum("kii->ki", matrices)[:] = 1.0
    carried = replace(tick, matrices=matrices)
    back = decode_tick(encode_tick(carried, 2), LIMITS, 2)
    assert back.matrices is not None and back.matrices.tobytes() == matrices.tobytes()
    assert decode_tick(encode_tick(tick, 2), LIMITS, 2).matrices is None
    with pytest.raises(ProtocolError) as refused:  # version 1 has no such key
        decode_tick(encode_tick(carried), LIMITS)
    assert refused.value.kind == "schema"
    for bad, kind in (
        (matrices * 20, "range"),  # beyond 10
        (np.where(np.eye(5, dtype=bool), 2.0, matrices).astype(np.float32), "range"),  # diagonal not 1
        (matrices[:2], "shape"),  # not one per agent
        (matrices[:, :4, :4], "shape"),  # not the tick's items
    ):
        with pytest.raises(ProtocolError) as refused:
            decode_tick(encode_tick(replace(tick, matrices=bad), 2), LIMITS, 2)
        assert refused.value.kind == kind, (kind, refused.value)


def test_matrices_round_trip() -> None:
    matrices = np.random.default_rng(1).uniform(0.1, 10, (130, 5, 5)).astype(np.float32)
    msg = MatricesMessage(
        tick=9,
        sent_at=1.5,
        served_at=2.5,
        agent_ids=tuple(f"a{i}" for i in range(130)),
        matrices=matrices,
        latency_ms=3.25,
        model_versions={"agent_gen5_rank1": "3f2a"},
    )
    back = decode_matrices(encode_matrices(msg), LIMITS)
    np.testing.assert_array_equal(back.matrices, matrices)
    assert (back.tick, back.sent_at, back.served_at, back.latency_ms) == (9, 1.5, 2.5, 3.25)
    assert back.agent_ids == msg.agent_ids and dict(back.model_versions) == {"agent_gen5_rank1": "3f2a"}
    per_agent = dict(encode_agent_matrices(msg))
    assert list(per_agent) == list(msg.agent_ids)
    one = decode_agent_matrix(per_agent["a7"], LIMITS)
    assert one.agent_id == "a7" and one.tick == 9
    np.testing.assert_array_equal(one.matrix, matrices[7])


def test_status_round_trip_and_state_check() -> None:
    status = {"state": "online", "agent_ids": ["a", "b"], "desired": ["gold", "apple"], "ticks_served": 3}
    assert decode_status(encode_status(status), LIMITS) == status
    wordy = {"state": "online", "eps": ["QNNExecutionProvider " * 20]}  # longer than any agent id may be
    assert decode_status(encode_status(wordy), LIMITS) == wordy
    with pytest.raises(ValueError, match="state"):
        encode_status({"state": "sleeping"})
    bad = msgpack.packb({"v": PROTOCOL_VERSION, "type": "status", "state": "sleeping"})
    with pytest.raises(ProtocolError) as err:
        decode_status(bad, LIMITS)
    assert err.value.kind == "schema"


def roster(**changes: Any) -> RosterMessage:
    fields: dict[str, Any] = {
        "client_id": "rt-1",
        "started_at": 1_700_000_000.5,
        "pool_generation": 3,
        "items": ("diamond", "gold", "apple", "emerald", "redstone"),
        "agent_ids": ("a0", "a1", "a2"),
        "desired": ("gold", "apple", "gold"),
        "models": ("m0", "m1", "m0"),
        "model_versions": {"m0": "9c1e", "m1": "77aa"},
        "initial_matrices": np.random.default_rng(2).uniform(0.5, 2.0, (3, 5, 5)).astype(np.float32),
    }
    return RosterMessage(**{**fields, **changes})


def test_roster_round_trip_and_refusals() -> None:
    sent = roster()
    back = decode_roster(encode_roster(sent), LIMITS)
    np.testing.assert_array_equal(back.initial_matrices, sent.initial_matrices)
    assert (back.agent_ids, back.desired, back.models) == (sent.agent_ids, sent.desired, sent.models)
    assert dict(back.model_versions) == sent.model_versions and back.pool_generation == 3
    bad = {
        "desired items": roster(desired=("gold", "wood", "gold")),
        "no entry in model_versions": roster(models=("m0", "m2", "m0")),
        "entries, expected 3": roster(models=("m0", "m1")),
        "initial_matrices spans": roster(initial_matrices=np.full((3, 5, 5), 11.0, np.float32)),
        "unprintable": roster(agent_ids=("a0", "a1\n", "a2")),
    }
    for words, message in bad.items():
        with pytest.raises(ProtocolError, match=words):
            decode_roster(encode_roster(message), LIMITS)


def test_inbound_float64_and_int_arrays_become_float32() -> None:
    def to_other_dtypes(data: dict[str, Any]) -> None:
        data["inventory"] = wire(np.full((4, 5), 3.5), "<f8")
        data["successful"] = wire(np.arange(4), "<i8")
        data["attempted"] = wire(np.arange(4) + 2, "<i4")

    tick = decode_tick(tampered(to_other_dtypes), LIMITS)
    assert tick.inventory.dtype == tick.successful.dtype == tick.attempted.dtype == np.float32
    np.testing.assert_array_equal(tick.successful, [0, 1, 2, 3])
    assert float(tick.inventory[0, 0]) == 3.5


def test_topics() -> None:
    topics = Topics("game/eu")
    assert topics.tick == "game/eu/market/tick"
    assert topics.matrices == "game/eu/agents/matrices"
    assert topics.status == "game/eu/runtime/status"
    assert topics.roster == "game/eu/runtime/roster"
    assert topics.agent_matrix("a1") == "game/eu/agents/a1/matrix"
    for bad in ("", "game/#", "a/+/b", "trailing/"):
        with pytest.raises(ValueError, match="prefix"):
            Topics(bad)


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda data: data.__setitem__(key, value)


def _nan_inventory(data: dict[str, Any]) -> None:
    values = np.ones((4, 5), np.float32)
    values[2, 3] = np.nan
    data["inventory"] = wire(values)


def _packed_map(pairs: list[tuple[str, bytes]]) -> bytes:
    """A msgpack map from (key, already packed value) pairs, repeated keys and all."""
    return msgpack.Packer().pack_map_header(len(pairs)) + b"".join(msgpack.packb(k) + v for k, v in pairs)


def _duplicated(key: str, inside: str | None = None) -> bytes:
    """A valid tick whose map (the top level, or the array map ``inside``) has ``key`` twice."""
    data = msgpack.unpackb(encode_tick(make_tick()))

    def pack(value: Any) -> bytes:
        return msgpack.packb(value, use_bin_type=True)

    def twice(values: dict[str, Any]) -> bytes:
        return _packed_map([(k, pack(v)) for k, v in values.items()] + [(key, pack(values[key]))])

    if inside is None:
        return twice(data)
    return _packed_map([(k, twice(v) if k == inside else pack(v)) for k, v in data.items()])


def _truncated_after(header: bytes) -> bytes:
    """A tick map that ends right after ``header`` (a declared length, its bytes never sent)."""
    return b"\x83\xa1v\x01\xa4type\xa4tick\xa9agent_ids" + header + b"ab"


def _rates(value: float, rest: float | None = None) -> np.ndarray:
    rates = np.full((5, 5), value if rest is None else rest, np.float32)
    rates[1, 2] = value
    return rates


BAD_PAYLOADS: dict[str, tuple[str, bytes]] = {
    "garbage": ("malformed", b"\xc1\x00garbage"),
    "empty": ("malformed", b""),
    "truncated": ("malformed", encode_tick(make_tick())[:-7]),
    "trailing bytes": ("malformed", encode_tick(make_tick()) + b"\x00"),
    "just a number": ("schema", msgpack.packb(42)),
    "not a map": ("schema", msgpack.packb([1, 2, 3])),
    "no version": ("version", tampered(lambda d: d.pop("v"))),
    "future version": ("version", tampered(_set("v", 2))),
    "string version": ("version", tampered(_set("v", "1"))),
    "float version": ("version", tampered(_set("v", 1.0))),
    "bool version": ("version", tampered(_set("v", True))),
    "duplicate key": ("schema", _duplicated("tick")),
    "duplicate key in an array map": ("schema", _duplicated("dtype", inside="inventory")),
    "non-string map key": ("schema", msgpack.packb({1: 2, "v": 1})),
    "ext type": ("malformed", msgpack.packb({"v": 1, "type": "tick", "x": msgpack.ExtType(5, b"abc")})),
    "timestamp ext": ("malformed", tampered(_set("sent_at", msgpack.Timestamp(1_700_000_000)))),
    "huge declared bin length": ("oversized", _truncated_after(b"\xc6\xff\xff\xff\xf0")),
    "huge declared str length": ("oversized", _truncated_after(b"\xdb\x7f\xff\xff\xff")),
    "huge declared array length": ("oversized", _truncated_after(b"\xdd\x7f\xff\xff\xff")),
    "declared length past the end": ("malformed", _truncated_after(b"\xc4\x40abc")),
    "nested too deep": ("oversized", b"\x81\xa1x" + b"\x91" * 100_000 + b"\xc0"),
    "wrong type": ("schema", tampered(_set("type", "matrices"))),
    "missing key": ("schema", tampered(lambda d: d.pop("attempted"))),
    "unknown key": ("schema", tampered(_set("market_means", None))),
    "tick is a string": ("schema", tampered(_set("tick", "7"))),
    "negative tick": ("range", tampered(_set("tick", -1))),
    "tick beyond 2**53 - 1": ("range", tampered(_set("tick", 2**53))),
    "float tick": ("schema", tampered(_set("tick", 7.0))),
    "negative sent_at": ("range", tampered(_set("sent_at", -1.0))),
    "sent_at in the year 5000": ("range", tampered(_set("sent_at", 1e11))),
    "bool sent_at": ("schema", tampered(_set("sent_at", True))),
    "agent id not a string": ("schema", tampered(_set("agent_ids", ["a", 2, "c", "d"]))),
    "duplicate agent ids": ("schema", tampered(_set("agent_ids", ["a", "b", "a", "d"]))),
    "empty agent id": ("schema", tampered(_set("agent_ids", ["a", "", "c", "d"]))),
    "newline in an agent id": ("schema", tampered(_set("agent_ids", ["a", "b\nWARNING forged", "c", "d"]))),
    "bidi override in an agent id": ("schema", tampered(_set("agent_ids", ["a", "b\u202e", "c", "d"]))),
    "NUL in an agent id": ("schema", tampered(_set("agent_ids", ["a", "b\x00", "c", "d"]))),
    "no agents": ("schema", tampered(_set("agent_ids", []))),
    "array not a map": ("schema", tampered(_set("inventory", [1.0, 2.0]))),
    "unsupported dtype": ("schema", tampered(_set("inventory", wire(np.ones((4, 5)), ">f4")))),
    "data as text": (
        "schema",
        tampered(_set("successful", {"dtype": "<f4", "shape": [4], "data": "abcd" * 4})),
    ),
    "negative inventory": ("range", tampered(_set("inventory", wire(-np.ones((4, 5)))))),
    "inventory above max_count": ("range", tampered(_set("inventory", wire(np.full((4, 5), 2e9))))),
    "successful > attempted": ("range", tampered(_set("successful", wire(np.full(4, 11.0))))),
    "extreme finite market rate": ("range", tampered(_set("market_mean", wire(_rates(3.4e38))))),
    "market rate below 0.1": ("range", tampered(_set("market_mean", wire(_rates(0.05))))),
    "market rates partly zero": ("range", tampered(_set("market_mean", wire(_rates(0.0, 1.0))))),
    "nan market rate": ("non_finite", tampered(_set("market_mean", wire(_rates(np.nan))))),
    "nan inventory": ("non_finite", tampered(_nan_inventory)),
    "inf sent_at": ("non_finite", tampered(_set("sent_at", float("inf")))),
    "huge float64": ("non_finite", tampered(_set("attempted", wire(np.full(4, 1e300), "<f8")))),
    "wrong item count": ("shape", tampered(_set("inventory", wire(np.ones((4, 6)))))),
    "rows != agents": ("shape", tampered(_set("successful", wire(np.ones(3))))),
    "extra axis": ("shape", tampered(_set("attempted", wire(np.ones((4, 1)))))),
    "non-square market": ("shape", tampered(_set("market_mean", wire(np.ones((5, 4)))))),
    "data length lies": (
        "shape",
        tampered(_set("inventory", {"dtype": "<f4", "shape": [4, 5], "data": b"\x00" * 76})),
    ),
}


@pytest.mark.parametrize("case", BAD_PAYLOADS, ids=list(BAD_PAYLOADS))
def test_bad_tick_raises_the_right_kind(case: str) -> None:
    kind, payload = BAD_PAYLOADS[case]
    with pytest.raises(ProtocolError) as err:
        decode_tick(payload, LIMITS)
    assert err.value.kind == kind, err.value


def test_refusals_name_what_was_wrong() -> None:
    named = {
        "duplicate key": "repeats the key(s) ['tick']",
        "duplicate key in an array map": "repeats the key(s) ['dtype']",
        "huge declared bin length": "a bin declares 4294967280 bytes",
        "huge declared str length": "a str declares 2147483647 bytes (limit 128)",
        "ext type": "extension types",
        "float version": "protocol version 1.0",
        "newline in an agent id": "U+000A",
        "successful > attempted": "e.g. 'agent-0000'",
    }
    for case, words in named.items():
        with pytest.raises(ProtocolError) as err:
            decode_tick(BAD_PAYLOADS[case][1], LIMITS)
        assert words in err.value.detail, (case, err.value.detail)
    assert msgpack.unpackb(BAD_PAYLOADS["duplicate key"][1])["tick"] == 7  # plain msgpack: the last one wins


def test_the_declared_length_scan_is_bounded() -> None:
    """A lying length beyond the first LENGTH_SCAN_VALUES values is reported as the truncation it also is."""

    def lying_after(values: int) -> bytes:  # {"v": 1, "x": [0] * values, "y": <str of 2**31 - 1 bytes>}
        array = b"\xdc" + values.to_bytes(2, "big") + b"\x00" * values
        return b"\x83\xa1v\x01\xa1x" + array + b"\xa1y\xdb\x7f\xff\xff\xff"

    for values, kind in ((8, "oversized"), (LENGTH_SCAN_VALUES + 10, "malformed")):
        with pytest.raises(ProtocolError) as err:
            decode_tick(lying_after(values), LIMITS)
        assert err.value.kind == kind


def test_oversized_refused_before_unpacking_and_by_msgpack_limits() -> None:
    payload = encode_tick(make_tick(count=50))
    with pytest.raises(ProtocolError) as err:
        decode_tick(payload, Limits(max_payload_bytes=len(payload) - 1))
    assert err.value.kind == "oversized" and str(len(payload)) in err.value.detail
    with pytest.raises(ProtocolError) as err:
        decode_tick(payload, Limits(max_agents=49))
    assert err.value.kind == "oversized" and "max_array_len" in err.value.detail
    long_id = tampered(_set("agent_ids", ["x" * 200, "b", "c", "d"]))
    with pytest.raises(ProtocolError) as err:
        decode_tick(long_id, LIMITS)
    assert err.value.kind == "oversized"
    many_items = tampered(lambda d: d.update(inventory=wire(np.ones((4, 70))), market_mean=None))
    with pytest.raises(ProtocolError) as err:
        decode_tick(many_items, Limits())
    assert err.value.kind == "shape" and "70" in err.value.detail
    assert decode_tick(payload, Limits(max_payload_bytes=len(payload))).agent_ids[0] == "agent-0000"


def test_limits_from_the_config_admit_the_agents_configured_beyond_ten_thousand() -> None:
    payload = encode_tick(make_tick(count=12_000))
    mqtt = MqttConfig()
    assert (
        len(decode_tick(payload, Limits.from_config(mqtt, num_agents=12_000, num_items=5)).agent_ids)
        == 12_000
    )
    with pytest.raises(ProtocolError) as err:
        decode_tick(payload, Limits.from_config(mqtt, num_agents=11_999, num_items=5))
    assert err.value.kind == "oversized" and "max_array_len(11999)" in err.value.detail
    roster_unknown = Limits.from_config(mqtt, num_agents=None)  # bounded by the payload size alone
    assert roster_unknown.max_agents == mqtt.max_payload_bytes
    assert len(decode_tick(payload, roster_unknown).agent_ids) == 12_000


def test_message_sizes_bound_the_messages_a_roster_needs() -> None:
    tick = make_tick(count=12_000)
    versions = {"m0": "0123456789abcdef"}
    answer = MatricesMessage(
        tick=tick.tick, sent_at=tick.sent_at, served_at=tick.sent_at, agent_ids=tick.agent_ids,
        matrices=np.ones((12_000, 5, 5), np.float32), latency_ms=1.5, model_versions=versions,
    )  # fmt: skip
    sizes = message_sizes(tick.agent_ids, 5, versions)
    for kind, actual in (("tick", len(encode_tick(tick))), ("answer", len(encode_matrices(answer)))):
        assert actual <= sizes[kind] <= actual + 16, kind  # only the tick number's width differs


def test_payload_shortfall_names_the_key_and_the_size_it_needs() -> None:
    assert payload_shortfall({"tick": 480_000, "answer": 1_000_000}, 1_000_000) is None
    assert payload_shortfall({"tick": 480_000, "answer": 1_345_000}, 1_048_576) == (
        "answer messages of 1,345,000 bytes exceed mqtt.max_payload_bytes (1,048,576): "
        "raise mqtt.max_payload_bytes to at least 1345000"
    )


def test_any_item_count_accepted_without_a_fixed_one() -> None:
    tick = decode_tick(encode_tick(make_tick(items=8)), Limits())
    assert tick.inventory.shape == (4, 8) and tick.market_mean is not None


def test_random_and_mutated_payloads_only_ever_raise_protocol_error() -> None:
    rng = np.random.default_rng(42)
    valid = bytearray(encode_tick(make_tick()))
    outcomes: dict[str, int] = {}
    for trial in range(3000):
        if trial % 2:
            payload = bytes(rng.integers(0, 256, int(rng.integers(0, 400)), dtype=np.uint8))
        else:
            mutated = bytearray(valid)
            for pos in rng.integers(0, len(mutated), int(rng.integers(1, 6))):
                mutated[pos] = int(rng.integers(0, 256))
            payload = bytes(mutated)
        try:
            decode_tick(payload, LIMITS)
            outcomes["accepted"] = outcomes.get("accepted", 0) + 1
        except ProtocolError as err:
            outcomes[err.kind] = outcomes.get(err.kind, 0) + 1
    assert outcomes.get("malformed", 0) > 500  # random bytes are mostly not msgpack
    assert len(outcomes) >= 3


def test_protocol_error_kinds_are_closed() -> None:
    with pytest.raises(ValueError, match="unknown protocol error kind"):
        ProtocolError("typo", "x")


def test_drop_counter_counts_everything_and_logs_each_kind_once_per_window(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [100.0]
    counter = DropCounter(logging.getLogger("test.drops"), window_s=10.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="test.drops"):
        for _ in range(50):
            counter.record_error(ProtocolError("malformed", "bad bytes"), "x/market/tick")
        counter.record_error(ProtocolError("oversized", "too big"), "x/market/tick")
        assert len(caplog.records) == 2
        now[0] += 10.5
        counter.record_error(ProtocolError("malformed", "bad bytes"), "x/market/tick")
    assert counter.snapshot() == {"malformed": 51, "oversized": 1} and counter.total == 52
    assert len(caplog.records) == 3
    last = caplog.records[-1].getMessage()
    assert "49 more since the last report" in last and "51 dropped" in last and "x/market/tick" in last
