"""Fixed-seed evaluation: trained agents against random-initialised agents on the same markets.

Seat i of every market is played by checkpoint i mod K (with that checkpoint's desired item) or by a
freshly initialised TradingNetwork; every run uses the same positions, inventories, desired items,
starting matrices and random stream, so only the policies differ. Two comparisons are printed:

  head to head   trained and random agents share each market (alternate seats), played twice with
                 the roles swapped so every seat is played once by each kind; mean fitness per kind.
  whole market   a market of only trained agents against the same market of only random ones.

Example:

    blockmarket evaluate --model-dir models/trading_agents --markets 64 --seed 0
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from blockmarket.core.command import run_command, usage_error
from blockmarket.core.config import Config
from training.cli import at_least

if TYPE_CHECKING:
    from training.episode import MarketResults

DEFAULT_PATTERN = "agent_*_final.pth"


class EvaluationError(ValueError):
    """The checkpoints cannot be evaluated (none found, wrong network, unknown desired item)."""


@dataclass(frozen=True)
class Comparison:
    """Mean fitness per agent of trained and random agents, and trades per market of each run."""

    trained: float
    random: float
    trades: float

    @property
    def margin(self) -> float:
        return self.trained - self.random


@dataclass(frozen=True)
class Evaluation:
    checkpoints: list[Path]
    head_to_head: Comparison
    whole_market: Comparison


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", default=None, help="config file (default: ./config.yaml, else built-in defaults)"
    )
    parser.add_argument("--model-dir", help="checkpoint directory (default: training.model_save_path)")
    parser.add_argument(
        "--pattern", default=DEFAULT_PATTERN, help=f"checkpoint glob (default: {DEFAULT_PATTERN})"
    )
    parser.add_argument(
        "--markets", type=at_least(1), default=64, help="independent markets played (default: 64)"
    )
    parser.add_argument(
        "--steps", type=at_least(1), help="steps per market (default: environment.generation_length)"
    )
    parser.add_argument(
        "--seats", type=at_least(2), help="agents per market (default: environment.population_size)"
    )
    parser.add_argument("--seed", type=int, default=0, help="market seed (default: 0)")


def evaluate(
    config: Config, checkpoints: list[Path], markets: int, steps: int, seats: int, seed: int
) -> Evaluation:
    """Play the trained checkpoints and random networks on identical fixed-seed markets."""
    import torch

    from blockmarket.market.rules import MarketPopulation
    from conversion.checkpoint import load_checkpoint
    from conversion.networks import ArchitectureError, TradingNetwork, load_network
    from training.episode import play
    from training.policy import PolicyPopulation, single_threaded

    env = config.environment
    items = list(env.items_list)
    weights, wants = [], []
    for path in checkpoints:
        checkpoint = load_checkpoint(path)
        try:
            network = load_network(checkpoint.network_state_dict, expected_items=len(items))
        except ArchitectureError as exc:
            raise EvaluationError(f"{path}: {exc}") from None
        if not isinstance(network, TradingNetwork):
            raise EvaluationError(f"{path}: a {type(network).__name__}, not a TradingNetwork; cannot trade")
        if checkpoint.desired_item not in items:
            raise EvaluationError(
                f"{path}: desired item {checkpoint.desired_item!r} is not in items_list {items}"
            )
        weights.append(checkpoint.network_state_dict)
        wants.append(items.index(checkpoint.desired_item))
    seat_of = np.arange(seats) % len(checkpoints)
    trained = PolicyPopulation.from_state_dicts(weights, len(items)).take(seat_of)
    random = PolicyPopulation.fresh(
        seats, len(items), trained.hidden_dim, torch.Generator().manual_seed(seed)
    )
    desired = np.asarray(wants, dtype=np.int64)[seat_of]

    def run(policies: PolicyPopulation) -> MarketResults:
        rng = np.random.default_rng(seed)
        market = MarketPopulation.random(rng, seats * markets, len(items), env.world_size, markets=markets)
        market.desired = np.tile(desired, markets)
        return play(market, policies, steps, config.learning.matrix_update_rate, env, rng)

    both = PolicyPopulation.concat([trained, random])
    seat, even = np.arange(seats), np.arange(seats) % 2 == 0
    with single_threaded():
        first = run(both.take(np.where(even, seat, seats + seat)))  # trained agents in the even seats
        swapped = run(both.take(np.where(even, seats + seat, seat)))  # ... and in the odd ones
        only_trained, only_random = run(trained), run(random)
    head_to_head = Comparison(
        trained=float(np.concatenate([first.fitness[:, even], swapped.fitness[:, ~even]]).mean()),
        random=float(np.concatenate([first.fitness[:, ~even], swapped.fitness[:, even]]).mean()),
        trades=(first.trades + swapped.trades) / (2 * markets),
    )
    whole_market = Comparison(
        trained=float(only_trained.fitness.mean()),
        random=float(only_random.fitness.mean()),
        trades=(only_trained.trades + only_random.trades) / (2 * markets),
    )
    return Evaluation(checkpoints, head_to_head, whole_market)


def main(args: argparse.Namespace) -> int:
    return run_command("evaluate", args.config, lambda config: evaluate_command(config, args))


def evaluate_command(config: Config, args: argparse.Namespace) -> int:
    """`blockmarket evaluate` with its config loaded: print both comparisons; 2 for unusable checkpoints."""
    from conversion.checkpoint import CheckpointError

    env = config.environment
    model_dir = Path(args.model_dir or config.training.model_save_path)
    checkpoints = sorted(model_dir.glob(args.pattern))
    if not checkpoints:
        return usage_error(
            "evaluate",
            f"no checkpoints matching {args.pattern} in {model_dir}; run `blockmarket train` first",
        )
    steps = args.steps or env.generation_length
    seats = args.seats or env.population_size
    try:
        result = evaluate(config, checkpoints, args.markets, steps, seats, args.seed)
    except (CheckpointError, EvaluationError) as exc:
        return usage_error("evaluate", exc)
    print(
        f"{len(checkpoints)} trained agents from {model_dir} ({args.pattern}) vs random-initialised networks"
    )
    print(
        f"{args.markets} markets x {seats} seats x {steps} steps, seed {args.seed}: same positions, "
        "inventories, desired items, starting matrices and random stream"
    )
    print(f"{'':14} {'trained':>8} {'random':>8} {'margin':>8} {'trades/market':>14}")
    for name, comparison in (("head to head", result.head_to_head), ("whole market", result.whole_market)):
        print(
            f"{name:14} {comparison.trained:8.2f} {comparison.random:8.2f} {comparison.margin:+8.2f} "
            f"{comparison.trades:14.1f}"
        )
    verdict = "beat" if result.head_to_head.margin > 0 else "do NOT beat"
    gain = result.head_to_head.margin / result.head_to_head.random * 100
    print(f"head to head, trained agents {verdict} random ones by {gain:+.1f}% mean fitness")
    return 0
