"""Many markets on one runtime (protocol v2), over the real MQTT broker, in separate processes.

Setup (once): --models random TradingNetwork checkpoints in the original trainer's format, converted with
``blockmarket convert``, and a model directory of 1000 + 20 *distinct* models derived from them (as
benchmarks/end_to_end.py does). ``blockmarket run`` serves it with the shipped config.yaml: the default
market's 20 agents (``runtime.num_agents``; round robin) take 20 models, and the other 1000 models wait as
free rows for markets to open.

Each runtime run then plays, one after the other on the same runtime process:
1. ``blockmarket simulate --markets 50 --agents 20 --rate 20``: 50 game servers' markets of 20 agents,
   each at 20 ticks/s (1000 agents, 1000 market ticks/s in all), every agent its own model (the
   ``round_robin`` selector spreads them over the unused models), a fixed roster (``--churn 0``);
2. ``blockmarket simulate --markets 1 --agents 1000 --rate 20``: the same 1000 agents as one market.

Both are run with cross-market batching on (the shipped default: the ticks of every market waiting
together share one ``session.run`` per unit) and off (``runtime.markets.cross_market_batching: false``:
one inference per market tick). Reported: game-side p50/p99 over all ticks and the worst market's p99,
ticks answered, ``session.run`` calls per second (from the runtime's status: inferences x units, at most:
a unit none of whose agents ticked is not run; these runs serve one pack), and the runtime's own receive ->
publish p50/p99 over its last 1,024 answered ticks.
Target (issue 12): p99 <= 30 ms for every market with 50 x 20 agents at 20 Hz, on the 2-core machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiomqtt

from benchmarks._harness import (
    HarnessError,
    ResourceSampler,
    add_run_arguments,
    add_setting_arguments,
    announce_settings,
    blockmarket,
    changed_settings,
    converted_checkpoints,
    distinct_models,
    run_command,
    running_runtime,
    serving_overrides,
    shipped_config,
    unique_prefix,
    wait_for_status,
    work_directory,
    write_config,
)
from benchmarks._report import add_output_argument, command_line, machine_info, print_table, write_results
from blockmarket.core.config import Config
from blockmarket.wire.limits import Limits
from blockmarket.wire.protocol import decode_status
from blockmarket.wire.topics import Topics

DEFAULT_AGENTS = 20  # the default market's (runtime.num_agents for these runs)
TARGET_P99_MS = 30.0
STATUS_LIMITS = Limits(max_payload_bytes=4 * 1024 * 1024, max_agents=100_000, max_id_len=4096)


async def status_after(config: Config, moment: float, timeout: float = 30.0) -> dict[str, Any]:
    """The first retained status the runtime publishes at or after ``moment`` (time.time())."""
    topic = Topics(config.mqtt.topic_prefix).status
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        async with aiomqtt.Client(config.mqtt.host, config.mqtt.port) as client:
            await client.subscribe(topic, qos=1)
            async for message in client.messages:
                status = decode_status(bytes(message.payload), STATUS_LIMITS)
                if status.get("published_at", 0) >= moment:
                    return status
                break
        await asyncio.sleep(0.5)
    raise HarnessError(f"no status published after {moment} on {topic} within {timeout:.0f} s")


def play(
    work: Path,
    config_path: Path,
    config: Config,
    name: str,
    markets: int,
    agents: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """One `simulate --markets` run against the runtime; the game side's figures and the runtime's
    session.run rate over it."""
    summary_path = work / f"simulate-{name}.json"
    command = [*blockmarket(), "simulate", "--config", str(config_path), "--markets", str(markets)]
    command += ["--agents", str(agents), "--ticks", str(args.ticks), "--rate", str(args.rate), "--churn", "0"]
    command += ["--json", str(summary_path), "--quiet", "--owner", name]
    before = asyncio.run(status_after(config, time.time()))
    game_usage = run_command(command, work / f"simulate-{name}.log", timeout=args.ticks / args.rate * 4 + 180)
    after = asyncio.run(status_after(config, time.time()))
    game = json.loads(summary_path.read_text())
    batches = after["inference_batches"] - before["inference_batches"]
    return {
        "markets": markets,
        "agents_per_market": agents,
        "ticks_sent": game["ticks_sent"],
        "answered": game["answered"],
        "missing": game["missing"],
        "latency_p50_ms": game["latency_p50_ms"],
        "latency_p99_ms": game["latency_p99_ms"],
        "worst_market_p99_ms": game["worst_market_p99_ms"],
        "market_ticks_per_s": game["tick_rate_hz"],
        "inferences": batches,
        "units": after["units"],
        "session_runs_per_s": round(batches * after["units"] / game["duration_s"], 1),
        "market_ticks_per_inference": round(game["answered"] / max(batches, 1), 2),
        # receive -> publish inside the runtime, over its last 1,024 answered ticks (the status's window)
        "runtime_p50_ms": after["latency_p50_ms"],
        "runtime_p99_ms": after["latency_p99_ms"],
        "rule_violations": game["rule_violations"],
        "simulator_cpu_percent": round(game_usage.cpu_percent, 1),
    }


def serve(
    args: argparse.Namespace, work: Path, models: Path, batching: bool, window_ms: float
) -> list[dict[str, Any]]:
    """One runtime (batching on, after ``window_ms``, or off) and the two plays against it."""
    overrides = serving_overrides(work, args, unique_prefix("markets"))
    overrides["runtime"].update(model_dir=str(models), assignment="round_robin", num_agents=DEFAULT_AGENTS)
    shipped = shipped_config()["runtime"]["markets"]
    overrides["runtime"]["markets"] = {
        **shipped,
        "batch_window_ms": window_ms,
        "cross_market_batching": batching,
    }
    label = f"batching-on-{window_ms:g}ms" if batching else "batching-off"
    config_path = work / f"config-{label}.yaml"
    config = write_config(config_path, overrides)
    changed = changed_settings(overrides)
    announce_settings(f"markets, {label}", changed)
    rows = []
    with running_runtime(config_path, work / f"run-{label}.log") as runtime:
        asyncio.run(wait_for_status(config, runtime, args.startup_timeout, "online"))
        with ResourceSampler(runtime.pid) as usage:
            for markets, agents in ((args.markets, args.agents), (1, args.markets * args.agents)):
                name = f"{label}-{markets}x{agents}"
                print(
                    f"... {name}: {args.ticks} ticks at {args.rate}/s per market", file=sys.stderr, flush=True
                )
                figures = play(work, config_path, config, name, markets, agents, args)
                rows.append({"batching": batching, "window_ms": window_ms, "overrides": changed, **figures})
        for row in rows:
            row["runtime_cpu_percent"] = round(usage.cpu_percent, 1)  # over both plays
            row["runtime_peak_rss_mb"] = round(usage.peak_rss / 2**20, 1)
    return rows


COLUMNS = (
    ("batching", "batching"),
    ("window ms", "window_ms"),
    ("markets", "markets"),
    ("agents each", "agents_per_market"),
    ("answered", "answered"),
    ("ticks", "ticks_sent"),
    ("p50 ms", "latency_p50_ms"),
    ("p99 ms", "latency_p99_ms"),
    ("worst market p99", "worst_market_p99_ms"),
    ("session.run/s", "session_runs_per_s"),
    ("ticks/inference", "market_ticks_per_inference"),
    ("rt p50 ms", "runtime_p50_ms"),
    ("rt p99 ms", "runtime_p99_ms"),
    ("rt CPU %", "runtime_cpu_percent"),
    ("sim CPU %", "simulator_cpu_percent"),
)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.markets",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--markets", type=int, default=50, help="markets in the first play (default 50)")
    parser.add_argument("--agents", type=int, default=20, help="agents per market (default 20)")
    parser.add_argument("--ticks", type=int, default=400, help="ticks per market (default 400: 20 s)")
    parser.add_argument("--rate", type=float, default=20.0, help="ticks per second per market (default 20)")
    parser.add_argument("--models", type=int, default=8, help="checkpoints converted for real (default 8)")
    parser.add_argument("--no-compare", action="store_true", help="only batching on (the shipped default)")
    parser.add_argument(
        "--windows", default="0",
        help="runtime.markets.batch_window_ms values to run with batching on, comma-separated (default 0: "
        "the shipped value)",
    )  # fmt: skip
    add_setting_arguments(parser)
    add_run_arguments(parser)
    add_output_argument(parser, "markets")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    machine = machine_info()
    with work_directory(args.keep, "markets") as work:
        overrides = serving_overrides(work, args)
        setup, convert_s = converted_checkpoints(work, overrides, args.models, args.seed)
        count = args.markets * args.agents + DEFAULT_AGENTS
        models = distinct_models(work / "models", work / "models-markets", count, args.seed)
        rows = []
        for window in (float(w) for w in args.windows.split(",")):
            rows += serve(args, work, models, True, window)
        if not args.no_compare:
            rows += serve(args, work, models, False, 0.0)
    print_table(
        f"Markets on one runtime (game side; target p99 <= {TARGET_P99_MS:g} ms for every market)",
        [header for header, _ in COLUMNS],
        [[row.get(key) for _, key in COLUMNS] for row in rows],
    )
    settings = {
        "models": count,
        "default_market_agents": DEFAULT_AGENTS,
        "rate_hz": args.rate,
        "ticks_per_market": args.ticks,
        "runtime": setup.runtime.model_dump(mode="json", exclude={"model_dir"}),
        "conversion_s": round(convert_s, 2),
        "command": command_line("markets", argv),
    }
    write_results(args.out, "markets", machine, settings, {"runs": rows, "target_p99_ms": TARGET_P99_MS})
    return 0


if __name__ == "__main__":
    sys.exit(main())
