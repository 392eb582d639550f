"""Inbound ticks: decoded on arrival, counted exactly once, and only the newest valid tick waits.

The transport hands every message on the tick topic to :meth:`TickIntake.receive` as soon as paho has
read it: there is no queue in between that could overflow unseen. A retained tick (the broker replaying
the past), and anything the codec or the roster refuses, is counted as dropped by kind and never touches
the :class:`TickSlot`, so garbage cannot displace a valid tick. A valid tick goes into the slot, where a
newer valid tick overtakes it (counted as skipped). :class:`TickLedger` holds the buckets, so that at
every moment ``received == served + skipped + unpublished + inference_errors + dropped + in_flight``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal, Protocol

from blockmarket.core.state import IntArray
from blockmarket.wire.limits import PROTOCOL_VERSION, DropCounter, Limits, ProtocolError
from blockmarket.wire.messages import MarketTick
from blockmarket.wire.protocol import decode_tick
from runtime.agents import RosterError

log = logging.getLogger(__name__)

Outcome = Literal["served", "unpublished", "inference_errors"]


@dataclass(frozen=True)
class AcceptedTick:
    """A tick that passed every check, with its population rows and its receipt time (perf_counter)."""

    tick: MarketTick
    rows: IntArray
    received_at: float
    reply_to: tuple[str, bytes] | None = None  # MQTT 5: the tick's response topic and correlation data


class Roster(Protocol):
    """Who a tick may name: the agents of one market (runtime.markets.Market, or a population)."""

    def __len__(self) -> int: ...

    def rows_for(self, agent_ids: tuple[str, ...]) -> IntArray: ...


class TickSlot:
    """A one-place mailbox: put never blocks and replaces what is unread; the scheduler, told by
    ``on_put``, takes the newest (runtime.markets.MarketRegistry.take_batch)."""

    def __init__(self, on_put: Callable[[], None] | None = None) -> None:
        self._item: AcceptedTick | None = None
        self.on_put = on_put  # told of every put: the scheduler waits for any market's slot

    def put(self, item: AcceptedTick) -> AcceptedTick | None:
        """Hold ``item``; returns the unread tick it overtook, if any."""
        overtaken, self._item = self._item, item
        if self.on_put is not None:
            self.on_put()
        return overtaken

    def take_now(self) -> AcceptedTick | None:
        """The waiting tick, if any (it is gone from the slot)."""
        item, self._item = self._item, None
        return item


class TickLedger:
    """Where every message received on one tick topic went: each lands in exactly one bucket."""

    def __init__(self, drops: DropCounter) -> None:
        self.drops = drops  # refused on arrival, by kind
        self.received = 0
        self.skipped = 0  # valid, overtaken by a newer valid tick before being served
        self.in_flight = 0  # valid, waiting in the slot or being served
        self.outcomes: dict[Outcome, int] = {"served": 0, "unpublished": 0, "inference_errors": 0}

    def accept(self, overtook: bool) -> None:
        """A valid tick entered the slot (``overtook``: replacing an unread one, which is now skipped)."""
        if overtook:
            self.skipped += 1
        else:
            self.in_flight += 1

    def skip_waiting(self) -> None:
        """A tick taken from the slot will never be served (its market closed): skipped."""
        self.in_flight -= 1
        self.skipped += 1

    def finish(self, outcome: Outcome) -> None:
        """A tick taken from the slot was served, could not be published, or failed in inference."""
        self.in_flight -= 1
        self.outcomes[outcome] += 1

    def unaccounted(self) -> int:
        """Messages in no bucket: 0 unless the accounting itself is broken."""
        return self.received - self.skipped - self.in_flight - sum(self.outcomes.values()) - self.drops.total

    def stats(self) -> dict[str, Any]:
        """The buckets under the names the status uses (docs/protocol.md §6)."""
        return {
            "ticks_received": self.received,
            "ticks_served": self.outcomes["served"],
            "ticks_skipped": self.skipped,
            "ticks_unpublished": self.outcomes["unpublished"],
            "inference_errors": self.outcomes["inference_errors"],
            "ticks_in_flight": self.in_flight,
            "dropped": self.drops.snapshot(),
        }


# (kind, tick number or None, detail) of a tick that will get no answer: the markets' notices
Refusal = Callable[[str, int | None, str], None]


class TickIntake:
    """Checks each tick on arrival: valid ones into the slot, everything else counted by kind."""

    def __init__(
        self,
        population: Roster,
        limits: Limits,
        topic: str,
        *,
        version: int = PROTOCOL_VERSION,
        on_put: Callable[[], None] | None = None,
    ) -> None:
        self.population = population
        self.limits = limits
        self.topic = topic
        self.version = version
        self.slot = TickSlot(on_put)
        self.ledger = TickLedger(DropCounter(log, what=f"tick on {topic}"))
        self.on_decoded: Callable[[float], None] | None = None  # seconds a valid tick took to check
        self.on_refused: Refusal | None = None  # told of every refused or overtaken tick (notices)
        self.carried_state = False  # replica mode: ticks must carry the agents' matrices (check_carried)

    def receive(
        self, payload: bytes, received_at: float, retained: bool, reply_to: tuple[str, bytes] | None = None
    ) -> None:
        """The transport's handler, run as each message arrives: never blocks, never raises."""
        ledger = self.ledger
        ledger.received += 1
        if retained:
            ledger.drops.record("retained", f"{self.topic}: a retained tick replays the past; not served")
            self._refused("retained", None, "a retained tick replays the past")
            return
        try:
            tick = decode_tick(payload, self._tick_limits(), self.version)
            rows = self.population.rows_for(tick.agent_ids)
            if self.carried_state:
                self._check_carried(tick)
        except ProtocolError as exc:
            ledger.drops.record_error(exc, self.topic)
            self._refused(exc.kind, None, exc.detail)
            return
        except RosterError as exc:
            ledger.drops.record("unknown_agent", f"{self.topic}: tick {tick.tick}: {exc}")
            self._refused("unknown_agent", tick.tick, str(exc))
            return
        except Exception as exc:  # a codec bug must not end the MQTT session: counted, logged with traceback
            ledger.drops.record("internal", f"{self.topic}: {exc!r}", exc_info=exc)
            self._refused("internal", None, "the runtime failed to read this tick (logged)")
            return
        overtaken = self.slot.put(AcceptedTick(tick, rows, received_at, reply_to))
        ledger.accept(overtook=overtaken is not None)
        if overtaken is not None:
            self._refused(
                "skipped", overtaken.tick.tick, f"overtaken by tick {tick.tick} before being served"
            )
        if self.on_decoded is not None:
            self.on_decoded(time.perf_counter() - received_at)

    def _check_carried(self, tick: MarketTick) -> None:
        """Replica mode: the answer must not depend on state one replica holds, so the tick carries its
        agents' matrices, and names all of the market's agents when the market mean is theirs."""
        if tick.matrices is None:
            raise ProtocolError(
                "schema", f"tick {tick.tick}: replicas serve this market: a tick carries its agents' matrices"
            )
        if tick.market_mean is None and len(tick.agent_ids) != len(self.population):
            raise ProtocolError(
                "shape",
                f"tick {tick.tick}: names {len(tick.agent_ids)} of the market's {len(self.population)} "
                "agents with market_mean nil: replicas need them all (or give market_mean)",
            )

    def _refused(self, kind: str, tick: int | None, detail: str) -> None:
        if self.on_refused is not None:
            self.on_refused(kind, tick, detail)

    def _tick_limits(self) -> Limits:
        """A tick names at most the agents served, and their number grows when new models join."""
        if self.limits.max_agents < len(self.population):
            self.limits = replace(self.limits, max_agents=len(self.population))
        return self.limits
