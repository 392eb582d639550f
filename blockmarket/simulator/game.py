"""Play the game server over MQTT: publish market ticks, apply the runtime's matrices, trade, report.

Every tick (at simulator.tick_rate_hz) the simulator applies the newest matrices the runtime sent, runs
one market step (blockmarket.market.rules.trade_step: the same rules as training), and publishes the agents'
inventories and trade counters on <prefix>/market/tick. It learns which agents to play from the
runtime's retained roster on <prefix>/runtime/roster (agent_ids, desired items), once the retained status
on <prefix>/runtime/status says that runtime is online; without one it plays --agents N agents named
agent-0000, agent-0001, ... with random desired items.

A live line every second shows ticks answered, trades, fitness and the latency seen from the game
side (publish -> matrices received). With --ticks N it stops by itself and prints a final summary
(--json PATH also writes it); the exit status is 1 when no tick was answered at all. Ctrl-C (SIGTERM,
Ctrl-Break) stops it after the current tick, still with the final summary; a second one exits at once.

Examples:
  blockmarket simulate --ticks 200                      # against `blockmarket run` on this machine
  blockmarket simulate --rate 50 --ticks 1000 --json out/sim.json
  blockmarket simulate --agents 128 --wait 0            # no runtime roster: assume agent-0000..0127
  blockmarket simulate --markets 50 --agents 20 --ticks 600   # 50 game servers' markets (protocol v2),
                                                        # agents joining and leaving (--churn)

Wire format: docs/protocol.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from pathlib import Path

from blockmarket.core import lifecycle
from blockmarket.core.command import given, run_command
from blockmarket.core.config import Config, Overrides
from blockmarket.simulator.markets import MarketsSimulation, MarketsSummary
from blockmarket.simulator.roster import (
    SimulatorError,
    default_roster,
    discover_roster,
)
from blockmarket.simulator.simulation import (
    MarketSimulator,
    SimulationSummary,
)
from blockmarket.wire.topics import Topics
from blockmarket.wire.transport import BrokerRefused

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------- CLI


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", type=Path, default=None, help="config file (default: ./config.yaml if present)"
    )
    parser.add_argument(
        "--ticks",
        type=int,
        default=None,
        help="stop after N ticks (default: simulator.ticks; 0 = until Ctrl-C)",
    )
    parser.add_argument(
        "--rate", type=float, default=None, help="ticks per second (default: simulator.tick_rate_hz)"
    )
    parser.add_argument(
        "--agents", type=int, default=None,
        help="agents to play when no runtime roster is found (default: simulator.num_agents)",
    )  # fmt: skip
    parser.add_argument(
        "--wait", type=float, default=10.0, help="seconds to wait for the runtime's roster (default 10)"
    )
    parser.add_argument(
        "--markets", type=int, default=0,
        help="play M independent markets over protocol v2 (each opened on the runtime with --agents agents, "
        "its own seed, agents joining and leaving); 0 (default): the runtime's v1 default market",
    )  # fmt: skip
    parser.add_argument(
        "--churn", type=float, default=5.0,
        help="with --markets: every this many seconds on average, per market, one agent leaves and one "
        "joins (0: a fixed roster; default 5)",
    )  # fmt: skip
    parser.add_argument(
        "--carry-matrices", action="store_true",
        help="with --markets: every tick carries its agents' current matrices, the state that runtime "
        "replicas (mqtt.shared_group) do not keep (docs/deploy.md)",
    )  # fmt: skip
    parser.add_argument("--owner", default=None, help="with --markets: the game server's name in the topics "
                        "(default sim-<pid>; with a broker ACL, the MQTT user name)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=None, help="market seed (default: simulator.seed)")
    parser.add_argument("--host", default=None, help="MQTT broker host (default: mqtt.host)")
    parser.add_argument("--port", type=int, default=None, help="MQTT broker port (default: mqtt.port)")
    parser.add_argument("--topic-prefix", default=None, help="MQTT topic prefix (default: mqtt.topic_prefix)")
    parser.add_argument("--json", type=Path, default=None, help="also write the final summary as JSON here")
    parser.add_argument("--quiet", action="store_true", help="no live line, only the final summary")
    parser.add_argument(
        "--stop-on-stdin-close",
        action="store_true",
        help="also stop (with the final summary) when standard input closes: how `blockmarket demo` "
        "stops it, on every OS",
    )


def config_overrides(args: argparse.Namespace) -> Overrides:
    """The command line's settings as dotted config keys (validated with the file)."""
    return given(
        {
            "simulator.ticks": args.ticks,
            "simulator.tick_rate_hz": args.rate,
            "simulator.num_agents": args.agents,
            "simulator.seed": args.seed,
            "mqtt.host": args.host,
            "mqtt.port": args.port,
            "mqtt.topic_prefix": args.topic_prefix,
        }
    )


async def simulate(config: Config, args: argparse.Namespace) -> SimulationSummary | MarketsSummary:
    if args.markets > 0:
        return await simulate_markets(config, args)
    roster = await discover_roster(config, args.wait) if args.wait > 0 else None
    if roster is None:
        count = args.agents or config.simulator.num_agents
        seed = config.simulator.seed if args.seed is None else args.seed
        roster = default_roster(count, config.environment.num_items, seed)
        logger.warning(
            "no runtime roster on %s: playing %d agents agent-0000.. (random desired items)",
            Topics(config.mqtt.topic_prefix).roster,
            count,
        )
    elif roster.state != "online":
        logger.warning(
            "the runtime's retained status says %r: ticks go unanswered until it is back", roster.state
        )
    simulator = MarketSimulator(config, roster.agent_ids, roster.desired, seed=args.seed)
    ticks = config.simulator.ticks if args.ticks is None else args.ticks
    report = None if args.quiet else (lambda s: print(s.line(), flush=True))
    with contextlib.ExitStack() as stops:  # each stops after the current tick and still reports
        stops.enter_context(lifecycle.stop_on_signals(simulator.stop))
        if args.stop_on_stdin_close:
            stops.enter_context(lifecycle.stop_at_eof(sys.stdin.fileno(), simulator.stop))
        logger.info(
            "simulating %d agents at %.1f ticks/s on %s (%s)",
            len(roster.agent_ids), args.rate or config.simulator.tick_rate_hz, simulator.topics.tick,
            f"{ticks} ticks" if ticks else "until Ctrl-C",
        )  # fmt: skip
        return await simulator.run(ticks, rate_hz=args.rate, on_report=report)


async def simulate_markets(config: Config, args: argparse.Namespace) -> MarketsSummary:
    """`--markets M`: M game servers' markets on one connection (blockmarket.simulator.markets)."""
    agents = args.agents or config.simulator.num_agents
    seed = config.simulator.seed if args.seed is None else args.seed
    simulation = MarketsSimulation(
        config, args.markets, agents, owner=args.owner, churn_s=args.churn, seed=seed,
        carry_matrices=args.carry_matrices,
    )  # fmt: skip
    ticks = config.simulator.ticks if args.ticks is None else args.ticks
    report = None if args.quiet else (lambda s: print(s.line(), flush=True))
    with contextlib.ExitStack() as stops:
        stops.enter_context(lifecycle.stop_on_signals(simulation.stop))
        if args.stop_on_stdin_close:
            stops.enter_context(lifecycle.stop_at_eof(sys.stdin.fileno(), simulation.stop))
        logger.info(
            "simulating %d markets of %d agents at %.1f ticks/s each (%s)",
            args.markets, agents, args.rate or config.simulator.tick_rate_hz,
            f"{ticks} ticks" if ticks else "until Ctrl-C",
        )  # fmt: skip
        return await simulation.run(ticks, rate_hz=args.rate, on_report=report)


def main(args: argparse.Namespace) -> int:
    return run_command(
        "simulate", args.config, lambda config: simulate_command(config, args), config_overrides(args)
    )


def simulate_command(config: Config, args: argparse.Namespace) -> int:
    """`blockmarket simulate` with its config loaded: play, print the summary; 1 if nothing was answered."""
    try:
        summary = lifecycle.run(simulate(config, args))
    except (SimulatorError, BrokerRefused) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print("final: " + summary.line())
    print(json.dumps(summary.to_dict(), indent=2))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary.to_dict(), indent=2) + "\n", encoding="utf-8")
    if summary.ticks_sent and not summary.answered:
        print(
            f"no tick was answered: is `blockmarket run` serving on prefix {config.mqtt.topic_prefix!r}?",
            file=sys.stderr,
        )
        return 1
    return 0
