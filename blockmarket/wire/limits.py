"""What the wire accepts: the protocol version, the refusal kinds, the size limits, and the counter of
refused messages (spec: docs/protocol.md)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Final

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

    def wordy(self) -> Limits:
        """These limits for messages whose strings may be longer than agent ids (status, rosters,
        replies and notices: EP names, model file names, error text)."""
        return replace(self, max_id_len=max(self.max_id_len, STATUS_MAX_STR_LEN))

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
