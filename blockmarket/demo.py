"""The runtime against a live market simulation: what the README's quick start runs.

Starts the serving runtime in this process (converting new checkpoints first; with no checkpoints at
all it trains a small population first; with no MQTT broker on loopback it starts an embedded one) and
`blockmarket simulate` in a second process, which plays the game server and prints a live summary:
trades, fitness, and the latency the game side sees; and `blockmarket dashboard` in a third, the live
web view, whose URL it prints (open it in a browser; --no-dashboard leaves it out). Runs until Ctrl-C,
for --seconds, or for --ticks.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import subprocess
import sys
import time

from blockmarket.core import lifecycle
from blockmarket.core.command import run_command
from blockmarket.core.config import Config
from runtime.arguments import add_config_arguments, config_overrides
from runtime.server import STARTUP_ERRORS, RuntimeServer

log = logging.getLogger("blockmarket.demo")

SIMULATOR_START_TIMEOUT_S = 600.0  # bootstrap training + conversion on a slow machine
EXIT_POLL_S = 0.1
DASHBOARD_STOP_S = 10.0


def configure_parser(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--seconds", type=float, default=0.0, help="stop after this long (default: Ctrl-C)")
    parser.add_argument(
        "--ticks", type=int, default=0, help="stop after this many market ticks (0: no limit)"
    )
    parser.add_argument(
        "--rate", type=float, help="market ticks per second (default: simulator.tick_rate_hz)"
    )
    parser.add_argument(
        "--markets", type=int, default=0,
        help="play M game servers' markets over protocol v2 (agents joining and leaving; each is its own "
        "market in the live view) instead of the runtime's default market",
    )  # fmt: skip
    parser.add_argument(
        "--market-agents", type=int, default=20, help="with --markets: agents per market (default 20)"
    )
    parser.add_argument("--json", help="write the simulator's final summary here as JSON")
    parser.add_argument("--no-dashboard", action="store_true", help="do not start the live web view")


def simulator_command(config: Config, args: argparse.Namespace) -> list[str]:
    """`blockmarket simulate` against the same broker and topics as the runtime of this demo."""
    mqtt = config.mqtt
    command = [sys.executable, "-m", "blockmarket.cli", "simulate", "--stop-on-stdin-close"]
    command += ["--ticks", str(args.ticks), "--host", mqtt.host, "--port", str(mqtt.port)]
    command += ["--topic-prefix", mqtt.topic_prefix]
    if args.config:
        command += ["--config", args.config]
    if args.rate:
        command += ["--rate", str(args.rate)]
    if args.json:
        command += ["--json", args.json]
    if args.markets:
        command += ["--markets", str(args.markets)]
        command += ["--agents", str(args.market_agents)]
    return command


def dashboard_command(config: Config, args: argparse.Namespace, metrics_url: str | None) -> list[str]:
    """`blockmarket dashboard` on the demo's broker and topics, scraping this runtime's /metrics."""
    mqtt = config.mqtt
    command = [sys.executable, "-m", "blockmarket.cli", "dashboard", "--stop-on-stdin-close"]
    command += ["--mqtt-host", mqtt.host, "--mqtt-port", str(mqtt.port), "--topic-prefix", mqtt.topic_prefix]
    if args.config:
        command += ["--config", args.config]
    if metrics_url:
        command += ["--metrics-url", metrics_url]
    return command


async def run_demo(config: Config, args: argparse.Namespace) -> int:
    """Serve; once online start the simulator; stop both when it ends, on timeout or on Ctrl-C."""
    server = RuntimeServer(config, handle_signals=False)
    serving = asyncio.create_task(server.serve(), name="runtime")
    ready = asyncio.create_task(server.ready.wait())
    await asyncio.wait(
        {serving, ready}, timeout=SIMULATOR_START_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED
    )
    if not ready.done():
        ready.cancel()
        server.stop()
        code = await serving if not serving.done() else serving.result()
        log.error("the runtime did not come online; demo aborted")
        return code or 1
    dashboard = None
    if not args.no_dashboard:  # its URL is the first line it prints
        url = server.telemetry.url
        command = dashboard_command(config, args, f"{url}/metrics" if url else None)
        dashboard = subprocess.Popen(command, stdin=subprocess.PIPE)
    simulator = subprocess.Popen(simulator_command(config, args), stdin=subprocess.PIPE)
    try:
        # Ctrl-C / SIGTERM: the simulator prints its final summary, then the runtime stops
        with lifecycle.stop_on_signals(lambda: _ask_to_stop(simulator)):
            await _exit_code(simulator, timeout_s=args.seconds or None)
            _ask_to_stop(simulator)
            sim_code = await _exit_code(simulator)
    finally:
        if simulator.poll() is None:  # leaving on an error or a forced exit: do not leave it behind
            simulator.kill()
            simulator.wait()
        _ask_to_stop(simulator)
        if dashboard is not None:
            _ask_to_stop(dashboard)
            if await _exit_code(dashboard, timeout_s=DASHBOARD_STOP_S) is None:
                dashboard.kill()
                dashboard.wait()
        server.stop()
        serve_code = await serving
    return serve_code or sim_code or 0


def _ask_to_stop(simulator: subprocess.Popen[bytes]) -> None:
    """Close the simulator's stdin: it stops after the current tick (`--stop-on-stdin-close`), on every OS."""
    if simulator.stdin is not None and not simulator.stdin.closed:
        simulator.stdin.close()


async def _exit_code(process: subprocess.Popen[bytes], timeout_s: float | None = None) -> int | None:
    """The process's exit code once it ends, None after ``timeout_s``. Polled: asyncio subprocesses
    need the Proactor loop on Windows, and a thread blocked in wait() would hold up a forced exit."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while (code := process.poll()) is None:
        if deadline is not None and time.monotonic() >= deadline:
            return None
        await asyncio.sleep(EXIT_POLL_S)
    return code


def main(args: argparse.Namespace) -> int:
    return run_command("demo", args.config, lambda config: demo_command(config, args), config_overrides(args))


def demo_command(config: Config, args: argparse.Namespace) -> int:
    """`blockmarket demo` with its config loaded; 1 when the runtime cannot start."""
    try:
        return lifecycle.run(run_demo(config, args))
    except STARTUP_ERRORS as exc:
        log.error("%s", exc)
        return 1
