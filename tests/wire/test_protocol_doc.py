"""docs/protocol.md's worked example is the codec's real output, byte for byte."""

from __future__ import annotations

import re

import numpy as np

from blockmarket.wire.limits import ERROR_KINDS, Limits
from blockmarket.wire.messages import MarketTick, encode_tick
from blockmarket.wire.protocol import decode_tick
from blockmarket.wire.runtime_link import WILL_QOS
from blockmarket.wire.transport import STATUS_QOS
from tests.support.docs import DOC, section, table_rows


def documented_payload() -> bytes:
    """The hex of the annotated dump, read token by token until each line's comment starts."""
    text = DOC.read_text(encoding="utf-8")
    block = text.split("The complete 249-byte payload (hex), annotated:")[1].split("```")[1]
    hex_digits = []
    for line in block.splitlines():
        for token in line.split():
            if not re.fullmatch(r"(?:[0-9a-f]{2})+", token):
                break
            hex_digits.append(token)
    return bytes.fromhex("".join(hex_digits))


def test_worked_example_matches_the_encoder() -> None:
    example = MarketTick(
        tick=42,
        sent_at=1764238800.125,
        agent_ids=("agent-0000", "agent-0001"),
        inventory=np.array([[5, 12, 7, 0, 9], [14, 3, 8, 11, 6]], np.float32),
        successful=np.array([3, 0], np.float32),
        attempted=np.array([4, 2], np.float32),
    )
    payload = encode_tick(example)
    assert len(payload) == 249
    assert documented_payload() == payload
    assert decode_tick(documented_payload(), Limits(num_items=5)).inventory[1, 3] == 11.0


def test_section_7_names_every_refusal_kind_the_runtime_counts() -> None:
    kinds = {row[2].strip("`") for row in table_rows(section("7"))}
    assert kinds == set(ERROR_KINDS) | {"retained"}


def test_section_1_gives_the_qos_the_transport_uses() -> None:
    qos = {row[0]: row[3] for row in table_rows(section("1"))}
    assert qos["`{prefix}/runtime/status`"] == f"{STATUS_QOS} (the will: {WILL_QOS})"
    assert qos["`{prefix}/runtime/roster`"] == str(STATUS_QOS)
