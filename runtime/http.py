"""The serving process's HTTP endpoints: /metrics, /healthz, /readyz (runtime.http in the config).

A stdlib ``ThreadingHTTPServer`` on a daemon thread of its own: portable (no POSIX assumption), and it
answers while the event loop is stalled, which is exactly when /healthz must say so.

* ``/metrics``: the process's :class:`runtime.metrics.RuntimeMetrics` registry, Prometheus text format.
* ``/healthz``: 200 while the process is alive and its event loop responsive: a heartbeat task stamps
  the time every :data:`HEARTBEAT_S`; a stamp older than ``runtime.http.max_loop_lag_s`` answers 503 with
  the lag.
* ``/readyz``: 200 only while the runtime is connected to the broker and a validated session pool serves
  ticks; 503 with the reason otherwise (starting, converting, broker lost, stopping).

Kubernetes' probe conventions: a liveness probe on /healthz restarts a stuck process, a readiness probe
on /readyz takes it out of service while it cannot answer. Bodies are small JSON objects.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from blockmarket.core.config import ConfigError, HttpConfig
from runtime.metrics import RuntimeMetrics

log = logging.getLogger(__name__)

HEARTBEAT_S = 0.25


class LoopHeartbeat:
    """The event loop's last sign of life (monotonic seconds), stamped by a task on that loop."""

    def __init__(self) -> None:
        self.beat_at = time.monotonic()

    def lag(self) -> float:
        return max(0.0, time.monotonic() - self.beat_at)

    async def run(self, interval_s: float = HEARTBEAT_S) -> None:
        while True:
            self.beat_at = time.monotonic()
            await asyncio.sleep(interval_s)


class SmallHandler(BaseHTTPRequestHandler):
    """Whole responses with a length, never cached; requests logged at DEBUG (not on stderr)."""

    server_version = "blockmarket"

    def _send(self, code: int, body: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)


class ProbeServer:
    """/metrics, /healthz and /readyz on a daemon thread; ``not_ready`` gives the reason or None."""

    def __init__(
        self,
        cfg: HttpConfig,
        metrics: RuntimeMetrics,
        heartbeat: LoopHeartbeat,
        not_ready: Callable[[], str | None],
    ) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.heartbeat = heartbeat
        self.not_ready = not_ready
        self._httpd = ThreadingHTTPServer((cfg.host, cfg.port), self._handler())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="http-probes", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        host = str(host)
        return f"http://{f'[{host}]' if ':' in host else host}:{port}"

    def start(self) -> str:
        self._thread.start()
        log.info("metrics and health: %s/metrics, /healthz, /readyz", self.url)
        return self.url

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def healthz(self) -> tuple[int, dict[str, Any]]:
        lag = self.heartbeat.lag()
        if lag > self.cfg.max_loop_lag_s:
            reason = f"event loop stalled: no heartbeat for {lag:.1f} s (max {self.cfg.max_loop_lag_s:g} s)"
            return 503, {"ok": False, "reason": reason, "loop_lag_s": round(lag, 3)}
        return 200, {"ok": True, "loop_lag_s": round(lag, 3)}

    def readyz(self) -> tuple[int, dict[str, Any]]:
        reason = self.not_ready()
        if reason is not None:
            return 503, {"ready": False, "reason": reason}
        return 200, {"ready": True}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        probes = self

        class Handler(SmallHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    self._send(200, generate_latest(probes.metrics.registry), CONTENT_TYPE_LATEST)
                elif path in ("/healthz", "/readyz"):
                    code, body = probes.healthz() if path == "/healthz" else probes.readyz()
                    self._send(code, json.dumps(body).encode() + b"\n", "application/json")
                else:
                    self._send(404, b"not found: /metrics, /healthz, /readyz\n", "text/plain")

        return Handler


class Telemetry:
    """What a runtime server exposes: its metrics, and (runtime.http.enabled) the probe server."""

    def __init__(self, cfg: HttpConfig, market: str) -> None:
        self.cfg = cfg
        self.metrics = RuntimeMetrics(market)
        self.heartbeat = LoopHeartbeat()
        self.metrics.collector.heartbeat = self.heartbeat
        self.metrics.collector.on_generation = self.metrics.forget_units
        self.url: str | None = None  # the bound base URL while serving (port 0: the ephemeral port)

    @contextlib.asynccontextmanager
    async def serving(self, not_ready: Callable[[], str | None]) -> AsyncIterator[Telemetry]:
        """The heartbeat and the HTTP endpoints, for the lifetime of the block."""
        if not self.cfg.enabled:
            yield self
            return
        try:
            probes = ProbeServer(self.cfg, self.metrics, self.heartbeat, not_ready)
        except OSError as exc:
            raise ConfigError(
                f"runtime.http: cannot listen on {self.cfg.host}:{self.cfg.port} ({exc.strerror}); "
                "choose another runtime.http.port (0: any free one) or runtime.http.enabled: false"
            ) from exc
        self.heartbeat.beat_at = time.monotonic()  # the loop runs now: fresh until its task takes over
        beating = asyncio.create_task(self.heartbeat.run(), name="heartbeat")
        self.url = probes.start()
        try:
            yield self
        finally:
            beating.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beating
            await asyncio.to_thread(probes.close)
            self.url = None

    def attach(self, scheduler: Any, link: Any, reloader: Any) -> None:
        """Read the serving counters from these, and time the pipeline's stages (small hooks); with
        runtime.http.enabled: false nothing is read or timed."""
        if not self.cfg.enabled:
            return
        collector, metrics = self.metrics.collector, self.metrics
        collector.ledger, collector.guarded, collector.pool = (
            scheduler.intake.ledger,
            scheduler,
            scheduler.pool,
        )
        collector.link, collector.reloader = link, reloader
        scheduler.observer = metrics
        scheduler.intake.on_decoded = metrics.decoded
        scheduler.pool.on_unit_run = metrics.unit_ran
