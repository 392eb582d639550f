"""What the dashboard knows of each market, fed from MQTT and the runtime's /metrics, and sent to pages.

Read only, from the outside, so it works against a runtime on another machine:

* MQTT (one connection): the runtime's retained status and roster, its answers (the newest kept, raw,
  decoded only when a page asks for an agent's matrix), and the simulator's market view
  (docs/protocol.md §12). Everything is untrusted and decoded with the protocol's checks; a refused
  message is counted by kind and skipped.
* The runtime's ``/metrics`` (``dashboard.metrics_url``), scraped every ``dashboard.scrape_interval_s``
  on a thread and summarised per market (counters, recent p50/p99 from the histograms' buckets, models,
  units and their execution providers).

Each update becomes a server-sent event for every open page (:class:`EventHub`); a page that connects
gets a snapshot of everything first. Markets are keyed by name: the view's ``market`` and the metrics'
``market`` label; the runtime's status, roster and answers go to the market its simulator names
(``default`` until one does).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import queue
import threading
import time
import urllib.request
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from blockmarket.core.config import Config
from blockmarket.simulator.view import decode_view, view_topic
from blockmarket.wire.limits import DropCounter, Limits, ProtocolError
from blockmarket.wire.protocol import decode_matrices, decode_roster, decode_status
from blockmarket.wire.topics import DEFAULT_MARKET, Topics
from blockmarket.wire.transport import MqttLink

log = logging.getLogger(__name__)

HISTORY = 600  # points per curve (5 minutes of views at 2 per second)
RELOADS = 100
CLIENT_QUEUE = 256  # events a slow page may lag behind before it misses some (it then reloads a snapshot)
RESYNC = b""  # in a page's queue: send it a new snapshot


class EventHub:
    """Fan-out of server-sent events to every open page; each page has a bounded queue of its own."""

    def __init__(self) -> None:
        self._clients: set[queue.Queue[bytes]] = set()
        self._lock = threading.Lock()

    def subscribe(self) -> queue.Queue[bytes]:
        client: queue.Queue[bytes] = queue.Queue(CLIENT_QUEUE)
        with self._lock:
            self._clients.add(client)
        return client

    def unsubscribe(self, client: queue.Queue[bytes]) -> None:
        with self._lock:
            self._clients.discard(client)

    @property
    def clients(self) -> int:
        return len(self._clients)

    def publish(self, event: str, data: Any) -> None:
        message = sse(event, data)
        with self._lock:
            clients = list(self._clients)
        for client in clients:
            try:
                client.put_nowait(message)
            except queue.Full:  # a stalled page: its backlog is replaced by a fresh snapshot
                with contextlib.suppress(queue.Empty):
                    while True:
                        client.get_nowait()
                client.put_nowait(RESYNC)


def sse(event: str, data: Any) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


@dataclass
class Market:
    """One market as the dashboard sees it (everything JSON-able except the raw answer)."""

    name: str
    status: dict[str, Any] | None = None
    roster: dict[str, Any] | None = None
    view: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None
    history: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=HISTORY))
    reloads: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=RELOADS))
    answer: bytes | None = None  # the newest matrices message, raw
    generation: int | None = None

    def snapshot(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status,
            "roster": self.roster,
            "view": self.view,
            "metrics": self.metrics,
            "history": list(self.history),
            "reloads": list(self.reloads),
        }


class DashboardFeed:
    """The markets, kept up to date from MQTT and /metrics; pages read snapshots and events."""

    def __init__(self, config: Config, metrics_url: str | None) -> None:
        self.config = config
        self.metrics_url = metrics_url
        self.topics = Topics(config.mqtt.topic_prefix)
        self.view_topic = view_topic(config.mqtt.topic_prefix)
        self.limits = Limits.from_config(config.mqtt, num_agents=None)
        self.hub = EventHub()
        self.drops = DropCounter(log, what=f"message on {self.topics.prefix}/#")
        self.markets: dict[str, Market] = {}
        self.prefix_market = DEFAULT_MARKET  # the market this prefix's runtime serves (the first view's)
        self._named = False
        self.metrics_error: str | None = None
        self._lock = threading.Lock()
        self._buckets: dict[str, list[tuple[float, float]]] = {}
        self.link = MqttLink(
            config.mqtt,
            client_id=f"blockmarket-dashboard-{os.getpid()}",
            subscriptions={
                self.topics.status: self._guarded(self.on_status),
                self.topics.roster: self._guarded(self.on_roster),
                self.topics.matrices: self._guarded(self.on_matrices),
                self.view_topic: self._guarded(self.on_view),
            },
        )

    # ------------------------------------------------------------------------ what pages read

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {
                "markets": {name: m.snapshot() for name, m in sorted(self.markets.items())},
                "metrics_url": self.metrics_url,
                "metrics_error": self.metrics_error,
                "prefix": self.topics.prefix,
            }

    def matrix(self, market: str, agent_id: str) -> dict[str, Any] | None:
        """The agent's trading matrix in the newest answer (decoded now, with the protocol's checks)."""
        with self._lock:
            found = self.markets.get(market)
            payload = found.answer if found is not None else None
            items = (found.roster or {}).get("items") if found is not None else None
        if payload is None:
            return None
        answer = decode_matrices(payload, self.limits)
        if agent_id not in answer.agent_ids:
            return None
        row = answer.agent_ids.index(agent_id)
        return {
            "market": market,
            "agent": agent_id,
            "tick": answer.tick,
            "items": items,
            "matrix": [[round(float(v), 4) for v in line] for line in answer.matrices[row]],
            "model_versions": answer.model_versions,
        }

    # ------------------------------------------------------------------------ MQTT (loop thread)

    def _guarded(self, handler: Callable[[bytes], None]) -> Callable[[bytes, float, bool], None]:
        def receive(payload: bytes, _received_at: float, _retained: bool) -> None:
            try:
                handler(payload)
            except ProtocolError as exc:
                self.drops.record_error(exc, self.topics.prefix)

        return receive

    def _market(self, name: str) -> Market:
        market = self.markets.get(name)
        if market is None:
            market = self.markets[name] = Market(name)
        return market

    def on_status(self, payload: bytes) -> None:
        if not payload:
            return
        status = decode_status(payload, self.limits)
        status.pop("limits", None)
        with self._lock:
            market = self._market(self.prefix_market)
            market.status = status
            if isinstance(status.get("pool_generation"), int):
                self._generation(market, status["pool_generation"])
        self.hub.publish("status", {"market": market.name, "status": status})

    def on_roster(self, payload: bytes) -> None:
        if not payload:
            return
        roster = decode_roster(payload, self.limits)
        data = {
            "agent_ids": list(roster.agent_ids),
            "desired": list(roster.desired),
            "models": list(roster.models),
            "model_versions": dict(roster.model_versions),
            "pool_generation": roster.pool_generation,
            "items": list(roster.items),
        }
        with self._lock:
            market = self._market(self.prefix_market)
            market.roster = data
            self._generation(market, roster.pool_generation)
        self.hub.publish("roster", {"market": market.name, "roster": data})

    def on_matrices(self, payload: bytes) -> None:
        with self._lock:
            self._market(self.prefix_market).answer = payload

    def on_view(self, payload: bytes) -> None:
        view = decode_view(payload, self.limits)
        data = view.to_json()
        with self._lock:
            if not self._named:  # the first view names the market this prefix's runtime serves
                self._named = True
                early = self.markets.pop(self.prefix_market, None)
                if early is not None:  # status and roster that came first (retained) move with it
                    early.name = view.market
                    self.markets[view.market] = early
                self.prefix_market = view.market
            market = self._market(view.market)
            previous, market.view = market.view, data
            ticks = view.ticks_sent - (previous["ticks_sent"] if previous else 0)
            point = {
                "tick": view.tick,
                "fitness_mean": view.figures["fitness_mean"],
                "trade_rate": round(view.trades_total / ticks, 3) if ticks > 0 else None,
                "latency_p50_ms": view.figures["latency_p50_ms"],
                "latency_p99_ms": view.figures["latency_p99_ms"],
            }
            market.history.append(point)
        self.hub.publish("view", {"market": view.market, "view": data, "point": point})

    def _generation(self, market: Market, generation: int) -> None:
        """A new pool generation after the first: a reload, marked on the curves at the current tick."""
        if market.generation is not None and generation > market.generation:
            event = {"generation": generation, "tick": (market.view or {}).get("tick"), "at": time.time()}
            market.reloads.append(event)
            self.hub.publish("reload", {"market": market.name, "reload": event})
        market.generation = generation if market.generation is None else max(market.generation, generation)

    # ------------------------------------------------------------------------ /metrics (a thread)

    def scrape(self) -> None:
        """One scrape of the runtime's /metrics, summarised per market and sent to the pages."""
        if self.metrics_url is None:
            return
        try:
            with urllib.request.urlopen(self.metrics_url, timeout=5) as response:
                text = response.read().decode()
        except (OSError, ValueError) as exc:
            self.metrics_error = f"{self.metrics_url}: {exc}"
            return
        self.metrics_error = None
        for name, summary in summarize(text, self._buckets).items():
            with self._lock:
                market = self._market(name)
                market.metrics = summary
                self._generation(market, int(summary.get("pool_generation", 0)))
            self.hub.publish("metrics", {"market": name, "metrics": summary})

    async def run(self) -> None:
        """MQTT and the scraper until cancelled."""
        connection = asyncio.create_task(self.link.run(), name="dashboard-mqtt")
        try:
            while True:
                await asyncio.to_thread(self.scrape)
                await asyncio.sleep(self.config.dashboard.scrape_interval_s)
        finally:
            await self.link.disconnect()
            connection.cancel()
            await asyncio.gather(connection, return_exceptions=True)


def summarize(text: str, previous: dict[str, list[tuple[float, float]]]) -> dict[str, dict[str, Any]]:
    """Per market: the counters, the models and units, and p50/p99 of the ticks since the last scrape
    (from tick_seconds' buckets; ``previous`` holds the last buckets per market and is updated)."""
    markets: dict[str, dict[str, Any]] = {}
    buckets: dict[str, list[tuple[float, float]]] = {}

    def of(labels: dict[str, str]) -> dict[str, Any]:
        return markets.setdefault(
            labels["market"], {"dropped": {}, "models": {}, "units": {}, "scraped_at": time.time()}
        )

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if "market" not in labels or not sample.name.startswith("blockmarket_"):
                continue
            name, entry = sample.name.removeprefix("blockmarket_"), of(labels)
            if name == "ticks_dropped_total":
                entry["dropped"][labels["kind"]] = sample.value
            elif name == "model_info":
                entry["models"][labels["model"]] = labels["version"]
            elif name in ("unit_info", "unit_agents", "unit_nodes"):
                unit = entry["units"].setdefault(labels["unit"], {"name": labels["unit"]})
                if name == "unit_info":
                    unit["provider"] = labels["provider"]
                elif name == "unit_agents":
                    unit["agents"] = sample.value
                else:
                    unit[f"nodes_{labels['provider'].lower()}"] = sample.value
            elif name == "tick_seconds_bucket":
                buckets.setdefault(labels["market"], []).append((float(labels["le"]), sample.value))
            elif "stage" not in labels and "unit" not in labels:
                entry[name.removesuffix("_total")] = sample.value
    for market, cumulative in buckets.items():
        cumulative.sort()
        before = dict(previous.get(market, []))
        recent = [(le, count - before.get(le, 0.0)) for le, count in cumulative]
        if recent and recent[-1][1] <= 0:  # no tick since the last scrape: the whole run's figures
            recent = cumulative
        previous[market] = cumulative
        markets[market]["tick_p50_ms"] = quantile_ms(recent, 0.5)
        markets[market]["tick_p99_ms"] = quantile_ms(recent, 0.99)
    for entry in markets.values():
        entry["units"] = sorted(entry["units"].values(), key=lambda u: u["name"])
    return markets


def quantile_ms(cumulative: list[tuple[float, float]], q: float) -> float | None:
    """Prometheus' histogram_quantile over cumulative (le, count) buckets, in milliseconds."""
    total = cumulative[-1][1] if cumulative else 0.0
    if total <= 0:
        return None
    rank, low, below = q * total, 0.0, 0.0
    for le, count in cumulative:
        if count >= rank:
            if math.isinf(le):
                return round(low * 1e3, 3)  # above the last finite bucket: its bound, as Prometheus does
            share = (rank - below) / (count - below) if count > below else 1.0
            return round((low + (le - low) * share) * 1e3, 3)
        low, below = le, count
    return round(low * 1e3, 3)
