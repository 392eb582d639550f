"""Market step: ms per market.rules.trade_step, enumerating every pair in range (the old step) vs
sampling each requester's target (O(agents)) vs the default that picks one of them per step.

For each case (agents, markets, world size) a fresh ``MarketPopulation.random`` market (n = 5 items,
config.yaml's trade distance and amount) is stepped ``--steps`` times per method, the methods
interleaved step by step on identical copies. ``enumerate`` makes every candidate pair in range
(runtime.neighbours: the dense mask up to DENSE_MAX_AGENTS agents per market, else the grid; O(pairs in
range)); ``sample`` draws targets ∝ 1/(1+distance) with rejection and stops at the first acceptor
(O(agents)); ``auto`` is trade_step's default (``sample`` where requesters have many agents nearby).
They follow the same rules from different random streams, so they agree in distribution, not bit for
bit: the run reports trades per step for each (``trades_ratio`` = sample / enumerate, near 1).
Enumerating is skipped above ``--enumerate-max`` agents in one market (10.6 M pairs at 10,000 agents
in the 100×100 world: ~0.5-0.8 s and ~1 GB per step).

The last default case keeps 10,000 agents at the density of 1000 in the 100×100 world (side 316).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from benchmarks._report import add_output_argument, command_line, machine_info, print_table, write_results
from blockmarket.core.config import Config, EnvironmentConfig
from blockmarket.core.stats import percentiles
from blockmarket.market.neighbours import DENSE_MAX_AGENTS, pairs_in_range
from blockmarket.market.rules import MarketPopulation, trade_step
from blockmarket.market.targets import ENUMERATE_MAX_SCANNED, Choice

METHODS: tuple[Choice, ...] = ("enumerate", "sample", "auto")
HEADERS = [
    "agents",
    "markets",
    "world",
    "pairs",
    "enumerate ms",
    "sample ms",
    "sample p99",
    "auto ms",
    "auto p99",
    "speedup",
    "trades s/e",
]
TARGET_MS = {1000: 10.0, 10000: 100.0}  # the brief's goals (simulator at 20 ticks/s needs << 50 ms)


@dataclass(frozen=True)
class Case:
    """One market shape: ``agents`` in all, split into ``markets``, in a square world of ``world``."""

    agents: int
    markets: int
    world: float

    @property
    def label(self) -> str:
        return f"{self.agents} ({self.markets} mkts)" if self.markets > 1 else str(self.agents)


DEFAULT_CASES = (
    Case(640, 64, 100.0),  # training-shaped: 64 markets of 10 agents
    Case(128, 1, 100.0),
    Case(1000, 1, 100.0),
    Case(10000, 1, 100.0),
    Case(10000, 1, 316.0),
)


def fresh_market(case: Case, seed: int) -> MarketPopulation:
    return MarketPopulation.random(
        np.random.default_rng(seed), case.agents, 5, case.world, markets=case.markets
    )


def time_case(
    case: Case, env: EnvironmentConfig, steps: int, enumerate_max: int, seed: int
) -> dict[str, Any]:
    """Median/p99 ms per step per method, trades per step, and the candidate pairs per step (first
    step; counted only where enumerating runs)."""
    enumerates = case.agents // case.markets <= enumerate_max
    methods = [m for m in METHODS if m != "enumerate" or enumerates]
    markets = {m: fresh_market(case, seed) for m in methods}
    rngs = {m: np.random.default_rng(seed + 1) for m in methods}
    times: dict[str, list[float]] = {m: [] for m in methods}
    trades: dict[str, int] = {m: 0 for m in methods}
    first = markets[methods[0]]
    in_range = (
        pairs_in_range(first.positions, first.market_size, env.max_trade_distance).requester.size
        if enumerates
        else None
    )
    for _ in range(steps):
        for method in methods:
            start = time.perf_counter()
            stats = trade_step(markets[method], rngs[method], env, pairs=method)
            times[method].append(time.perf_counter() - start)
            trades[method] += stats.trades
    result: dict[str, Any] = {
        "agents": case.agents,
        "markets": case.markets,
        "world_size": case.world,
        "pairs_in_range": None if in_range is None else int(in_range),
    }
    for method in METHODS:
        ms = np.asarray(times.get(method, []), dtype=np.float64) * 1e3
        result[f"{method}_p50_ms"] = round(float(np.median(ms)), 3) if ms.size else None
        result[f"{method}_p99_ms"] = percentiles(ms, (99,))[0] if ms.size else None
        result[f"{method}_trades_per_step"] = round(trades[method] / steps, 1) if method in trades else None
    old, new = result["enumerate_p50_ms"], result["auto_p50_ms"]
    result["speedup"] = round(old / new, 1) if old else None
    enumerated = result["enumerate_trades_per_step"]
    result["trades_ratio"] = round(result["sample_trades_per_step"] / enumerated, 3) if enumerated else None
    return result


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.market_step",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--agents", type=int, nargs="+", default=None,
        help="one market of each size in the 100×100 world instead of the default cases",
    )  # fmt: skip
    parser.add_argument("--steps", type=int, default=30, help="timed steps per method (default 30)")
    parser.add_argument(
        "--large-steps", type=int, default=5, help="timed steps for cases of >= 5000 agents (default 5)"
    )
    parser.add_argument(
        "--enumerate-max", type=int, default=20000,
        help="skip enumerating above this many agents per market (default 20000)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    add_output_argument(parser, "market_step")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    machine = machine_info()
    env = Config().environment
    cases = DEFAULT_CASES if args.agents is None else tuple(Case(n, 1, env.world_size) for n in args.agents)
    rows = []
    for case in cases:
        steps = args.large_steps if case.agents >= 5000 else args.steps
        print(f"... {case.label} agents, world {case.world:g}: {steps} steps", file=sys.stderr, flush=True)
        rows.append(time_case(case, env, steps, args.enumerate_max, args.seed))
    print_table(
        "ms per trade_step (p50; enumerate = every pair in range, sample = O(agents), auto = default)",
        HEADERS,
        [
            [r["agents"], r["markets"], r["world_size"], r["pairs_in_range"], r["enumerate_p50_ms"],
             r["sample_p50_ms"], r["sample_p99_ms"], r["auto_p50_ms"], r["auto_p99_ms"], r["speedup"],
             r["trades_ratio"]]
            for r in rows
        ],
    )  # fmt: skip
    settings = {
        "items": 5,
        "max_trade_distance": env.max_trade_distance,
        "max_trade_amount": env.max_trade_amount,
        "dense_max_agents": DENSE_MAX_AGENTS,
        "enumerate_max_scanned_auto": ENUMERATE_MAX_SCANNED,
        "steps": args.steps,
        "large_steps": args.large_steps,
        "targets_ms": TARGET_MS,
        "command": command_line("market_step", argv),
    }
    write_results(args.out, "market_step", machine, settings, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
