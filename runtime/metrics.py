"""Prometheus metrics of one serving process, on a registry of its own (never the global one).

Two kinds of figures:

* **Counters read at scrape time** from what the runtime already counts (the tick ledger, the pool, the
  reloader, the MQTT link): they are the same numbers as the retained status, never a second count that
  could drift from it. :class:`ServingCollector` reads them when /metrics is scraped, from the HTTP
  thread: plain int reads and dict copies, atomic under the GIL, so a stalled event loop does not block
  a scrape.
* **Latency histograms** observed as ticks are served: receive -> publish per tick, and per pipeline stage
  (decode on arrival, states, inference, update, encode, publish), plus inference per unit (session),
  observed on the executor thread that ran it.

Every per-market series carries ``market``: one market today, named :data:`DEFAULT_MARKET`; the
markets work (issue 12) gives each its own name. Metric names and meanings: docs/runtime.md.
"""

from __future__ import annotations

import itertools
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from blockmarket.wire.topics import DEFAULT_MARKET

if TYPE_CHECKING:
    from runtime.inference import InferenceUnit
    from runtime.intake import TickLedger
    from runtime.sessions import PoolGeneration, SessionPool

log = logging.getLogger(__name__)

NAMESPACE = "blockmarket"
STAGES = ("decode", "states", "inference", "update", "encode", "publish")
# Seconds: 50 µs (decoding a small tick) .. 2.5 s (a tick stuck behind a reload on a starved machine).
LATENCY_BUCKETS = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)
QNN_EP = "QNNExecutionProvider"
CPU_EP = "CPUExecutionProvider"


class RuntimeMetrics:
    """The metrics of one runtime process serving one market: the registry /metrics exposes."""

    def __init__(self, market: str = DEFAULT_MARKET, *, process: bool = True) -> None:
        self.market = market
        self.registry = CollectorRegistry(auto_describe=True)
        self.tick_seconds = self._histogram(
            "tick_seconds", "Tick receive -> answer published, seconds (status latency_p50_ms/p99_ms)"
        )
        self.stage_seconds = self._histogram(
            "tick_stage_seconds", "Seconds per tick in each pipeline stage (decode: on arrival)", "stage"
        )
        self.unit_seconds = self._histogram(
            "unit_inference_seconds", "Seconds one inference unit (session) took for one tick", "unit"
        )
        self._stages = [self.stage_seconds.labels(market, stage) for stage in STAGES]
        self._tick = self.tick_seconds.labels(market)
        self._units: dict[str, Any] = {}
        self._units_lock = threading.Lock()
        self.collector = ServingCollector(market)
        self.registry.register(self.collector)
        if process:
            register_process_metrics(self.registry)

    def _histogram(self, name: str, documentation: str, *labels: str) -> Histogram:
        return Histogram(
            name,
            documentation,
            ["market", *labels],
            namespace=NAMESPACE,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )

    # ---------------------------------------------------------------- observed while serving

    def decoded(self, seconds: float) -> None:
        """A valid tick was decoded and checked on arrival (runtime.intake)."""
        self._stages[0].observe(seconds)

    def served(self, received_at: float, marks: Sequence[float]) -> None:
        """A tick was served: ``marks`` are perf_counter readings at the start and after states,
        inference, update, encode and publish (runtime.scheduler)."""
        for stage, (start, end) in enumerate(itertools.pairwise(marks), start=1):
            self._stages[stage].observe(end - start)
        self._tick.observe(marks[-1] - received_at)

    def unit_ran(self, unit: str, seconds: float) -> None:
        """One unit's inference for one tick (called on the executor thread that ran it)."""
        child = self._units.get(unit)
        if child is None:
            with self._units_lock:
                child = self._units[unit] = self.unit_seconds.labels(self.market, unit)
        child.observe(seconds)

    def forget_units(self, keep: set[str]) -> None:
        """Drop the series of units no longer served (a reload renamed or removed them)."""
        with self._units_lock:
            for name in [u for u in self._units if u not in keep]:
                del self._units[name]
                self.unit_seconds.remove(self.market, name)


class ServingCollector(Collector):
    """Counters and gauges read at scrape time from the runtime's own state (see the module doc).

    The runtime fills in what exists as it starts: before the pool is built there is nothing to read,
    and the metrics are absent rather than zero.
    """

    def __init__(self, market: str) -> None:
        self.market = market
        self.ledger: TickLedger | None = None
        self.guarded: Any = None  # the scheduler (guarded_outputs)
        self.pool: SessionPool | None = None
        self.reloader: Any = None  # runtime.reload.ModelReloader (reloads)
        self.link: Any = None  # blockmarket.wire.transport.MqttLink (connected, connections)
        self.heartbeat: Any = None  # runtime.http.LoopHeartbeat (lag)
        self.on_generation: Callable[[set[str]], None] | None = None  # told the units of a new generation
        self._nodes: tuple[int, dict[str, dict[str, int]]] = (-1, {})

    def describe(self) -> Iterator[Metric]:
        return iter(())  # collected lazily: the names exist once the runtime serves

    def collect(self) -> Iterator[Metric]:
        market = self.market
        if self.link is not None:
            yield _gauge(
                "broker_connected",
                "1 while connected to the MQTT broker",
                market,
                1.0 if self.link.connected.is_set() else 0.0,
            )
            yield _counter(
                "broker_reconnects",
                "Connections to the broker after the first one",
                market,
                max(self.link.connections - 1, 0),
            )
        if self.heartbeat is not None:
            yield _gauge(
                "loop_lag_seconds",
                "Seconds since the event loop last ran its heartbeat",
                market,
                self.heartbeat.lag(),
            )
        if self.ledger is not None:
            yield from self._ticks(self.ledger)
        if self.guarded is not None:
            yield _counter(
                "guarded_outputs",
                "Agent answers the output guard refused",
                market,
                self.guarded.guarded_outputs,
            )
        if self.reloader is not None:
            yield _counter(
                "reloads",
                "Hot reloads applied (new models or versions swapped in)",
                market,
                self.reloader.reloads,
            )
        if self.pool is not None:
            yield from self._pool(self.pool)

    def _ticks(self, ledger: TickLedger) -> Iterator[Metric]:
        market = self.market
        outcomes = dict(ledger.outcomes)
        yield _counter(
            "ticks_received",
            "Messages received on the tick topic (status ticks_received)",
            market,
            ledger.received,
        )
        yield _counter("ticks_served", "Ticks answered (status ticks_served)", market, outcomes["served"])
        yield _counter(
            "ticks_skipped",
            "Valid ticks overtaken by a newer one under load (ticks_skipped)",
            market,
            ledger.skipped,
        )
        yield _counter(
            "ticks_unpublished",
            "Ticks computed but lost: the broker was unreachable at publish (ticks_unpublished)",
            market,
            outcomes["unpublished"],
        )
        yield _counter(
            "inference_errors",
            "Ticks whose inference failed (status inference_errors)",
            market,
            outcomes["inference_errors"],
        )
        dropped = CounterMetricFamily(
            f"{NAMESPACE}_ticks_dropped",
            "Messages refused on arrival, by kind (status dropped)",
            labels=["market", "kind"],
        )
        for kind, count in sorted(ledger.drops.snapshot().items()):
            dropped.add_metric([market, kind], count)
        yield dropped
        yield _gauge(
            "ticks_in_flight",
            "Valid ticks waiting or being served (status ticks_in_flight)",
            market,
            ledger.in_flight,
        )

    def _pool(self, pool: SessionPool) -> Iterator[Metric]:
        market, generation = self.market, pool.current
        yield _counter(
            "reload_failures",
            "Hot reloads that failed; the previous models kept serving",
            market,
            pool.reload_failures,
        )
        yield _gauge(
            "pool_generation",
            "The session pool generation serving ticks (status pool_generation)",
            market,
            generation.number,
        )
        yield _gauge("agents", "Agents served", market, len(pool.population))
        models = InfoMetricFamily(
            f"{NAMESPACE}_model",
            "The version (content hash) of each model served",
            labels=["market", "model", "unit"],
        )
        units = InfoMetricFamily(
            f"{NAMESPACE}_unit", "Each inference unit: its execution provider", labels=["market", "unit"]
        )
        agents = GaugeMetricFamily(
            f"{NAMESPACE}_unit_agents", "Agents each inference unit answers for", labels=["market", "unit"]
        )
        nodes = GaugeMetricFamily(
            f"{NAMESPACE}_unit_nodes",
            "Graph nodes of each unit per execution provider (QNN = on the NPU)",
            labels=["market", "unit", "provider"],
        )
        for unit in generation.units:
            units.add_metric([market, unit.name], {"provider": unit.provider})
            agents.add_metric([market, unit.name], len(unit.rows))
            for key, info in sorted(unit.models.items()):
                models.add_metric([market, key, unit.name], {"version": info.version})
        for unit_name, counts in self._node_counts(generation).items():
            for provider in ("QNN", "CPU"):
                nodes.add_metric([market, unit_name, provider], counts.get(provider, 0))
        yield from (models, units, agents, nodes)

    def _node_counts(self, generation: PoolGeneration) -> dict[str, dict[str, int]]:
        """Nodes per EP of each unit, as ONNX Runtime assigned them (read once per pool generation)."""
        if self._nodes[0] != generation.number:
            self._nodes = (generation.number, {u.name: unit_nodes(u) for u in generation.units})
            if self.on_generation is not None:
                self.on_generation(set(self._nodes[1]))
        return self._nodes[1]


def unit_nodes(unit: InferenceUnit) -> dict[str, int]:
    """{"QNN": n, "CPU": m}: where ONNX Runtime put the unit's nodes (the sessions record it:
    blockmarket.models.providers). A session that does not say (a test double) counts nothing."""
    counts = {"QNN": 0, "CPU": 0}
    try:
        assignment = unit.session.get_provider_graph_assignment_info()
    except Exception:  # not recorded, or not an ORT session
        return counts
    for subgraph in assignment:
        counts["QNN" if subgraph.ep_name == QNN_EP else "CPU"] += len(subgraph.get_nodes())
    return counts


def _counter(name: str, documentation: str, market: str, value: float) -> CounterMetricFamily:
    family = CounterMetricFamily(f"{NAMESPACE}_{name}", documentation, labels=["market"])
    family.add_metric([market], value)
    return family


def _gauge(name: str, documentation: str, market: str, value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(f"{NAMESPACE}_{name}", documentation, labels=["market"])
    family.add_metric([market], value)
    return family


def register_process_metrics(registry: CollectorRegistry) -> str:
    """process_resident_memory_bytes, process_cpu_seconds_total, ...: prometheus_client's collector
    where /proc exists (Linux); elsewhere (Windows, macOS) the same two from psutil when it is
    installed, else none (logged once). Returns which."""
    if os.path.exists("/proc/self/stat"):
        ProcessCollector(registry=registry)
        return "procfs"
    try:
        import psutil
    except ImportError:
        log.info("process RSS/CPU metrics need psutil on %s (pip install psutil); not exported", sys.platform)
        return "none"
    registry.register(PsutilProcessCollector(psutil.Process()))
    return "psutil"


class PsutilProcessCollector(Collector):
    """The portable subset of prometheus_client's process metrics, from psutil."""

    def __init__(self, process: Any) -> None:
        self.process = process
        self.started = process.create_time()

    def describe(self) -> Iterator[Metric]:
        return iter(())

    def collect(self) -> Iterator[Metric]:
        with self.process.oneshot():
            memory, cpu = self.process.memory_info(), self.process.cpu_times()
        yield GaugeMetricFamily("process_resident_memory_bytes", "Resident memory size in bytes.", memory.rss)
        yield GaugeMetricFamily("process_virtual_memory_bytes", "Virtual memory size in bytes.", memory.vms)
        yield CounterMetricFamily(
            "process_cpu_seconds", "Total user and system CPU time spent in seconds.", cpu.user + cpu.system
        )
        yield GaugeMetricFamily(
            "process_start_time_seconds",
            "Start time of the process since unix epoch in seconds.",
            self.started,
        )
