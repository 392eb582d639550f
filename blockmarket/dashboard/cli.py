"""Watch the market live in a browser: the grid, curves, latency, ticks, models (a page, no internet needed).

Subscribes to the runtime's status, roster and answers and to the simulator's market view over MQTT,
scrapes the runtime's /metrics, and serves a page (every asset shipped with the package) that updates
live over server-sent events. It reads only MQTT and the metrics, so it works against a runtime on
another machine. Stop it with Ctrl-C.

Examples:
  blockmarket dashboard                                  # http://127.0.0.1:8650/ (dashboard.port)
  blockmarket dashboard --metrics-url http://gpu-box:9640/metrics --mqtt-host gpu-box
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys

from blockmarket.core import lifecycle
from blockmarket.core.command import given, run_command
from blockmarket.core.config import Config, ConfigError, Overrides
from blockmarket.dashboard.feed import DashboardFeed
from blockmarket.dashboard.server import DashboardServer


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="config file (default: ./config.yaml, else built-in)")
    parser.add_argument("--host", help="address the page listens on (default: dashboard.host)")
    parser.add_argument(
        "--port", type=int, help="port of the page (default: dashboard.port; 0: any free one)"
    )
    parser.add_argument(
        "--metrics-url", help="the runtime's /metrics (default: dashboard.metrics_url, else runtime.http's)"
    )
    parser.add_argument("--mqtt-host", help="MQTT broker host (default: mqtt.host)")
    parser.add_argument("--mqtt-port", type=int, help="MQTT broker port (default: mqtt.port)")
    parser.add_argument("--topic-prefix", help="MQTT topic prefix (default: mqtt.topic_prefix)")
    parser.add_argument(
        "--stop-on-stdin-close", action="store_true", help="also stop when standard input closes (`demo`)"
    )


def config_overrides(args: argparse.Namespace) -> Overrides:
    return given(
        {
            "dashboard.host": args.host,
            "dashboard.port": args.port,
            "dashboard.metrics_url": args.metrics_url,
            "mqtt.host": args.mqtt_host,
            "mqtt.port": args.mqtt_port,
            "mqtt.topic_prefix": args.topic_prefix,
        }
    )


def metrics_url(config: Config) -> str | None:
    """dashboard.metrics_url, else the runtime's own endpoint on this machine when its port is fixed."""
    if config.dashboard.metrics_url:
        return config.dashboard.metrics_url
    http = config.runtime.http
    if not http.enabled or http.port == 0:
        return None
    host = "127.0.0.1" if http.host in ("0.0.0.0", "") else http.host
    return f"http://{f'[{host}]' if ':' in host else host}:{http.port}/metrics"


async def watch(config: Config, stop_on_stdin_close: bool) -> int:
    feed = DashboardFeed(config, metrics_url(config))
    board = config.dashboard
    try:
        server = DashboardServer(feed, board.host, board.port)
    except OSError as exc:
        raise ConfigError(
            f"dashboard: cannot listen on {board.host}:{board.port} ({exc.strerror}); "
            "choose another dashboard.port (--port; 0: any free one)"
        ) from exc
    stopped = asyncio.Event()
    stop = stopped.set  # both stops call it on the loop
    url = server.start()
    print(f"dashboard: {url}  (metrics: {feed.metrics_url or 'none'}; MQTT prefix {feed.topics.prefix})",
          flush=True)  # fmt: skip
    running = asyncio.create_task(feed.run(), name="dashboard-feed")
    with contextlib.ExitStack() as stops:
        stops.enter_context(lifecycle.stop_on_signals(stop))
        if stop_on_stdin_close:
            stops.enter_context(lifecycle.stop_at_eof(sys.stdin.fileno(), stop))
        try:
            await asyncio.wait({running, asyncio.create_task(stopped.wait())}, return_when="FIRST_COMPLETED")
        finally:
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)
            await asyncio.to_thread(server.close)
    return 1 if running.done() and not running.cancelled() and running.exception() else 0


def main(args: argparse.Namespace) -> int:
    return run_command(
        "dashboard",
        args.config,
        lambda config: lifecycle.run(watch(config, args.stop_on_stdin_close)),
        config_overrides(args),
    )
