"""The runtime against a live market simulation: what the README's quick start runs.

Starts the serving runtime in this process (converting new checkpoints first; with no checkpoints at
all it trains a small population first; with no MQTT broker on loopback it starts an embedded one) and
`blockmarket simulate` in a second process, which plays the game server and prints a live summary:
trades, fitness, and the latency the game side sees. Runs until Ctrl-C, for --seconds, or for --ticks.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys

from runtime.config import Config
from runtime.serve import STARTUP_ERRORS, RuntimeServer, add_config_arguments, configure

log = logging.getLogger("runtime.demo")

SIMULATOR_START_TIMEOUT_S = 600.0  # bootstrap training + conversion on a slow machine


def configure_parser(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser)
    parser.add_argument("--seconds", type=float, default=0.0, help="stop after this long (default: Ctrl-C)")
    parser.add_argument(
        "--ticks", type=int, default=0, help="stop after this many market ticks (0: no limit)"
    )
    parser.add_argument(
        "--rate", type=float, help="market ticks per second (default: simulator.tick_rate_hz)"
    )
    parser.add_argument("--json", help="write the simulator's final summary here as JSON")


def simulator_command(config: Config, args: argparse.Namespace) -> list[str]:
    """`blockmarket simulate` against the same broker and topics as the runtime of this demo."""
    mqtt = config.mqtt
    command = [sys.executable, "-m", "runtime.cli", "simulate", "--ticks", str(args.ticks)]
    command += ["--host", mqtt.host, "--port", str(mqtt.port), "--topic-prefix", mqtt.topic_prefix]
    if args.config:
        command += ["--config", args.config]
    if args.rate:
        command += ["--rate", str(args.rate)]
    if args.json:
        command += ["--json", args.json]
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
    simulator = await asyncio.create_subprocess_exec(*simulator_command(config, args))
    loop = asyncio.get_running_loop()

    def interrupt() -> None:  # Ctrl-C / SIGTERM: the simulator prints its final summary, then we stop
        if simulator.returncode is None:
            simulator.send_signal(signal.SIGINT)

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, interrupt)
    try:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(simulator.wait()), timeout=args.seconds or None)
        interrupt()
        sim_code = await simulator.wait()
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        server.stop()
        serve_code = await serving
    return serve_code or sim_code


def main(args: argparse.Namespace) -> int:
    from runtime.cli import setup_logging

    try:
        config = configure(args)
    except ValueError as exc:
        print(f"blockmarket demo: {exc}", file=sys.stderr)
        return 2
    setup_logging(config.logging.level, config.logging.format, config.logging.log_file)
    try:
        return asyncio.run(run_demo(config, args))
    except STARTUP_ERRORS as exc:
        log.error("%s", exc)
        return 1
