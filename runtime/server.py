"""Serve every agent over MQTT: one batched answer with all trading matrices per market tick.

Lifecycle, top to bottom: load and validate the config (and the MQTT credentials and TLS files it
names); convert new `.pth` checkpoints in a worker process (with no checkpoints and no models at all,
first train a small population, announced); build the agent population and the session pool; use the
configured MQTT broker (or start an embedded one on loopback when none answers); serve ticks, publish a
retained status and hot-reload converted models until SIGINT/SIGTERM (Ctrl-C/Ctrl-Break on Windows; a
second one forces the exit); then publish the "offline" status and exit 0. This process never imports torch.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from blockmarket.core import lifecycle
from blockmarket.core.command import run_command
from blockmarket.core.config import Config, ConfigError
from blockmarket.models.files import ModelError, ModelInfo, discover_models
from blockmarket.models.providers import ProviderError
from blockmarket.wire.broker import BrokerError, ensure_broker
from blockmarket.wire.connection import client_options, runtime_client_id
from blockmarket.wire.messages import RosterMessage, encode_roster, encode_status
from blockmarket.wire.runtime_link import RuntimeTransport
from blockmarket.wire.topics import DEFAULT_MARKET
from blockmarket.wire.transport import BrokerRefused
from runtime import announcements, replica
from runtime.agents import AgentPopulation, create_population
from runtime.arguments import add_config_arguments, config_overrides
from runtime.control import MarketControl
from runtime.housekeeping import cancel_all, freeze_startup_heap
from runtime.http import Telemetry
from runtime.markets import MarketRegistry, open_markets, with_spare_rows
from runtime.planning import PoolError
from runtime.reload import ModelReloader
from runtime.scheduler import TickScheduler
from runtime.sessions import SessionPool
from runtime.units import SessionFactory, default_session_factory, serve_on_npu
from runtime.watchers import WatchedFiles, model_watcher
from runtime.workers import (
    bootstrap_population,
    checkpoints,
    conversion_pending,
    convert_checkpoints,
    run_in_worker,
)

log = logging.getLogger("runtime.server")


class StartupError(RuntimeError):
    """The runtime cannot start serving (the message says what is missing and what to do)."""


# What stops a start with a one-line message instead of a traceback (each names the file or setting).
STARTUP_ERRORS = (StartupError, PoolError, ModelError, BrokerError, ProviderError, ConfigError)


class RuntimeServer:
    """One serving process: population + session pool + scheduler + MQTT transport, with a clean stop."""

    def __init__(
        self, config: Config, *, session_factory: SessionFactory | None = None, handle_signals: bool = True
    ) -> None:
        self.config = config
        self.session_factory = session_factory
        self.handle_signals = handle_signals
        self.ready = asyncio.Event()  # set once the pool serves and the broker connection is up
        self.started_at = time.time()
        self.client_id = runtime_client_id(config.mqtt)
        self.population: AgentPopulation | None = None
        self.pool: SessionPool | None = None
        self.scheduler: TickScheduler | None = None
        self.markets: MarketRegistry | None = None
        self.control: MarketControl | None = None
        self.transport: RuntimeTransport | None = None
        self.telemetry = Telemetry(config.runtime.http, DEFAULT_MARKET)  # /metrics, /healthz, /readyz
        self._stop = asyncio.Event()

    def stop(self) -> None:
        """Ask :meth:`serve` to shut down (signal handlers and the demo call this)."""
        self._stop.set()

    async def serve(self) -> int:
        """Run until stopped; returns the process exit code. The HTTP endpoints answer throughout."""
        async with self.telemetry.serving(self.not_ready):
            return await self._serve()

    def not_ready(self) -> str | None:
        """Why /readyz says 503 (None: ready). Called from the HTTP thread: reads flags only."""
        if self._stop.is_set():
            return "stopping"
        if self.pool is None:
            return "starting: converting models or building and validating the session pool"
        if self.transport is None:
            return "starting: connecting to the MQTT broker"
        if not self.transport.connected.is_set():
            return f"not connected to the MQTT broker at {self.transport.address}"
        return None

    async def _serve(self) -> int:
        mqtt = self.config.mqtt
        client_options(mqtt)  # first: MQTT credentials and TLS files are checked now, not after conversion
        if mqtt.shared_group is not None and not self.config.runtime.markets.enabled:
            raise StartupError("mqtt.shared_group shares the v2 markets: set runtime.markets.enabled: true")
        await self.prepare_models()
        population, pool = await self.build_pool()
        self._check_message_sizes(population, pool)
        broker = await ensure_broker(mqtt)
        if mqtt.shared_group is not None and broker is not None:
            await broker.stop()
            raise StartupError(
                f"mqtt.shared_group is set but no MQTT broker answers at {mqtt.host}:{mqtt.port}: replicas "
                "share a real broker (an embedded one would serve this process alone)"
            )
        transport, scheduler, control = self.serving_parts(pool, broker is not None)
        markets = self.config.runtime.markets
        reloader = self.reloader(pool) if self.config.runtime.hot_reload else None
        self.transport = transport
        self.telemetry.attach(scheduler, transport, reloader)
        if reloader is not None:  # watching before the status says online: no model written after is missed
            await reloader.start()
        log.debug("%d startup objects frozen out of garbage collection", freeze_startup_heap())
        connection = asyncio.create_task(transport.run(), name="mqtt")
        serving = [
            asyncio.create_task(scheduler.run(), name="scheduler"),
            asyncio.create_task(self.report_status(transport), name="status"),
            asyncio.create_task(self._announce_ready(transport), name="ready"),
        ]
        if markets.enabled:
            serving.append(asyncio.create_task(control.run(), name="markets"))
            serving.append(asyncio.create_task(control.close_idle(markets.idle_close_s), name="idle markets"))
        if reloader is not None:
            serving.append(asyncio.create_task(reloader.run(), name="reload"))
        with lifecycle.stop_on_signals(self.stop) if self.handle_signals else contextlib.nullcontext():
            try:
                return await self._until_stopped([connection, *serving])
            finally:
                if transport.replica and self._stop.is_set():
                    await replica.drain(transport, control, mqtt.shared_group)
                await cancel_all(serving)  # no tick is served after this: the offline status is final
                await transport.close(final_status=encode_status(self.status("offline")))
                await cancel_all([connection])
                if broker is not None:
                    await broker.stop()
                pool.close()
                log.info("runtime stopped: %s", announcements.summary(self.scheduler))

    def serving_parts(
        self, pool: SessionPool, embedded_broker: bool
    ) -> tuple[RuntimeTransport, TickScheduler, MarketControl]:
        """The MQTT connection, the tick scheduler over every market, and the markets' control side."""
        mqtt, markets, registry = self.config.mqtt, self.config.runtime.markets, self.markets
        assert registry is not None and registry.default is not None
        intake = registry.default.intake
        registry.carried_state = mqtt.shared_group is not None
        transport = RuntimeTransport(
            mqtt,
            on_tick=intake.receive,
            will_payload=encode_status(self.last_will()),
            client_id=self.client_id,
            on_market=self._on_market if markets.enabled else None,
            # MQTT 5 (request/response for v2 markets) unless the embedded broker, which speaks 3.1.1, serves
            mqtt5=mqtt.protocol == "5" or (mqtt.protocol == "auto" and not embedded_broker),
        )
        self.scheduler = TickScheduler(
            pool,
            transport,
            intake,
            alpha=self.config.learning.matrix_update_rate,
            per_agent_topics=mqtt.per_agent_topics,
            markets=registry,
            window_s=markets.batch_window_ms / 1e3,
            batching=markets.cross_market_batching,
        )
        self.control = MarketControl(
            registry,
            pool,
            transport,
            prefix=mqtt.topic_prefix,
            client_id=self.client_id,
            control_limits=replace(intake.limits, max_agents=markets.max_agents_per_market),
        )
        return transport, self.scheduler, self.control

    async def prepare_models(self) -> None:
        """Convert what is new (worker process); bootstrap a population when there is nothing at all."""
        cfg = self.config
        if not cfg.runtime.convert_on_startup:
            return
        if not checkpoints(cfg) and not (await self.discover())[0]:
            log.warning(
                "no checkpoints under %s and no models in %s: BOOTSTRAPPING a population first "
                "(training %d generations in a worker process)",
                cfg.training.model_save_path,
                cfg.model_dir,
                cfg.runtime.bootstrap_generations,
            )
            await run_in_worker(bootstrap_population, cfg, cfg.runtime.bootstrap_generations)
        if conversion_pending(cfg):
            await self.convert()

    async def convert(self) -> None:
        """Convert new or changed checkpoints in a worker process (torch stays out of this one)."""
        log.info(
            "converting new checkpoints under %s in a worker process", self.config.training.model_save_path
        )
        try:
            summary = await run_in_worker(convert_checkpoints, self.config)
        except ModuleNotFoundError as exc:  # a serving-only install has no torch/onnx export stack
            raise StartupError(
                f"converting checkpoints needs the '{exc.name}' package: pip install 'blockmarket[convert]', "
                "or set runtime.convert_on_startup: false to serve the converted models only"
            ) from exc
        for line in summary.failed:
            log.error("conversion failed: %s", line)
        log.info(
            "conversion: %d converted, %d unchanged, %d failed",
            summary.converted,
            summary.skipped,
            len(summary.failed),
        )

    async def build_pool(self) -> tuple[AgentPopulation, SessionPool]:
        """The agents and their sessions, created and validated off the event loop."""
        cfg = self.config
        models, problems = await self.discover()
        for problem in problems:
            log.warning("model skipped: %s", problem)
        if not models:
            raise StartupError(
                f"no servable models in {cfg.model_dir}: run `blockmarket convert` (or `blockmarket train`) "
                "first, or set runtime.convert_on_startup: true"
            )
        population = create_population(
            models,
            cfg.environment.items_list,
            num_agents=cfg.runtime.num_agents,
            assignment=cfg.runtime.assignment,
            seed=cfg.runtime.seed,
        )
        default_rows = with_spare_rows(population, models, cfg)
        use_npu = serve_on_npu(cfg.npu)
        pool = SessionPool(
            population,
            {m.key: m for m in models},
            factory=self.session_factory
            or default_session_factory(cfg.npu, cfg.runtime.intra_op_threads, cfg.runtime.allow_spinning),
            max_sessions=cfg.runtime.max_sessions,
            model_dir=cfg.model_dir,
            use_npu=use_npu,
            cpu_pack_precision=cfg.runtime.cpu_pack_precision,
        )
        pool.builder.batch_invariant = cfg.runtime.batch_invariant or cfg.mqtt.shared_group is not None
        pool.builder.select_models = cfg.runtime.select_models
        await pool.start()
        self.markets = open_markets(cfg, population, default_rows)
        log.info(
            "serving %d agents (%s; %d free rows for markets) with %d models in %d session(s) on %s",
            default_rows,
            cfg.runtime.assignment,
            len(population) - default_rows,
            len(models),
            len(pool.current.units),
            ", ".join(pool.current.providers),
        )
        self.population, self.pool = population, pool
        return population, pool

    def _spare_rows(self, models: list[str]) -> AgentPopulation:
        """runtime.markets.spare_rows free rows for each of these new models (hot reload)."""
        assert self.markets is not None
        return self.markets.spares(
            [key for key in models for _ in range(self.config.runtime.markets.spare_rows)]
        )

    def _on_market(self, *message: Any) -> None:
        """The transport's v2 handler (a PatternHandler): the control side exists once the transport does."""
        if self.control is not None:
            self.control.receive(*message)

    async def discover(self) -> tuple[list[ModelInfo], list[str]]:
        """The servable models, read and hashed on a thread (a large repository takes seconds)."""
        cfg = self.config
        return await asyncio.to_thread(discover_models, cfg.model_dir, cfg.environment.items_list)

    def reloader(self, pool: SessionPool) -> ModelReloader:
        cfg = self.config
        converts, markets = cfg.runtime.convert_on_startup, cfg.runtime.markets
        files = WatchedFiles(
            cfg.model_dir, Path(cfg.training.model_save_path) if converts else None, cfg.onnx_dir
        )
        return ModelReloader(
            pool,
            model_watcher(files, cfg.runtime.reload_watcher, cfg.runtime.reload_poll_s),
            convert=self.convert if converts else None,
            add_new_agents=cfg.runtime.assignment == "one_per_checkpoint",
            free_rows=self._spare_rows if markets.enabled and markets.spare_rows else None,
            seed=cfg.runtime.seed,
        )

    def last_will(self) -> dict[str, Any]:
        return announcements.last_will(self.client_id, self.started_at)

    def status(self, state: str) -> dict[str, Any]:
        return announcements.status(
            self.config, self.last_will(), state, self.population, self.pool, self.scheduler, self.control
        )

    def roster(self) -> RosterMessage:
        if (
            self.population is None
            or self.pool is None
            or self.markets is None
            or self.markets.default is None
        ):
            raise RuntimeError("the roster exists once the pool is built")
        self.markets.adopt_new_rows()
        rows = self.markets.default.rows
        return announcements.roster(self.client_id, self.started_at, self.population, self.pool, rows)

    def _check_message_sizes(self, population: AgentPopulation, pool: SessionPool) -> None:
        problem = announcements.oversized(self.config, population, pool, self.status("online"), self.roster())
        if problem is not None:
            raise StartupError(problem)

    async def report_status(self, transport: RuntimeTransport) -> None:
        """Publish the retained roster (again whenever the pool generation changes) and the retained
        status, once ready (a replica: once it takes ticks) and every runtime.status_interval_s, with a
        log line."""
        await self.ready.wait()
        announced = -1
        while True:
            if self.pool is not None and self.pool.current.number != announced and not transport.replica:
                announced = self.pool.current.number  # (replicas serve no v1 default market)
                await transport.publish_roster(encode_roster(self.roster()))
            await transport.publish_status(encode_status(self.status("online")))
            await asyncio.sleep(self.config.runtime.status_interval_s)
            log.info("%s", announcements.summary(self.scheduler))

    async def _announce_ready(self, transport: RuntimeTransport) -> None:
        await transport.connected.wait()
        if transport.replica and self.control is not None:
            await replica.join_group(transport, self.control, self.scheduler, self.config.mqtt.shared_group)
        self.ready.set()

    async def _until_stopped(self, tasks: list[asyncio.Task[None]]) -> int:
        """Wait for stop(); a serving task that dies is logged and ends the process with code 1.

        A broker that refuses us for good (credentials, our client id in use) is one error line.
        """
        stop = asyncio.create_task(self._stop.wait())
        pending: set[asyncio.Future[Any]] = {stop, *tasks}
        try:
            while not stop.done():
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done - {stop}:
                    error = None if task.cancelled() else task.exception()
                    if isinstance(error, BrokerRefused):
                        log.error("%s", error)
                        return 1
                    if error is not None:
                        log.error("%s task failed", task.get_name(), exc_info=error)  # type: ignore[attr-defined]
                        return 1
            return 0
        finally:
            stop.cancel()


def configure_parser(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument(
        "--no-convert",
        action="store_true",
        help="serve the existing models only (runtime.convert_on_startup)",
    )
    parser.add_argument(
        "--no-reload", action="store_true", help="do not watch the model directory (runtime.hot_reload)"
    )


def main(args: argparse.Namespace) -> int:
    return run_command("run", args.config, serve_command, config_overrides(args))


def serve_command(config: Config) -> int:
    """`blockmarket run` with its config loaded: serve until stopped; 1 when startup fails."""
    try:
        return lifecycle.run(RuntimeServer(config).serve())
    except STARTUP_ERRORS as exc:
        log.error("%s", exc)
        return 1
