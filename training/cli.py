"""Evolutionary training on the market simulation; writes checkpoints in the original format.

Every generation each agent plays `training.markets_per_generation` markets of
`environment.generation_length` steps; the fittest `environment.survival_rate` survive, the rest is
refilled with mutated survivors and fresh random agents. Written to `training.model_save_path`:
`agent_gen{G}_rank{K}.pth` (top `training.top_k_saved`, every `training.model_save_frequency`
generations), `agent_{agent_id}_final.pth` (top `training.top_k_saved` of the last generation) and
`training_summary.json` (per-generation statistics). Example:

    blockmarket train --generations 10 --seed 1 --convert
"""

from __future__ import annotations

import argparse
import sys

from blockmarket.core.command import given, run_command
from blockmarket.core.config import Config, Overrides


def at_least(minimum: int) -> type[int]:
    """An argparse type: an int no smaller than ``minimum``."""

    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse  # type: ignore[return-value]


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", default=None, help="config file (default: ./config.yaml, else built-in defaults)"
    )
    parser.add_argument("--generations", type=int, help="override training.max_generations")
    parser.add_argument("--population", type=int, help="override environment.population_size")
    parser.add_argument("--seed", type=int, help="override training.seed (same seed, same run)")
    parser.add_argument("--output", help="override training.model_save_path (where checkpoints go)")
    parser.add_argument(
        "--convert",
        action="store_true",
        help="convert the checkpoints to ONNX afterwards (also on with training.convert_after_training)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")


def config_overrides(args: argparse.Namespace) -> Overrides:
    """The command line's settings as dotted config keys (validated with the file)."""
    return given(
        {
            "training.max_generations": args.generations,
            "environment.population_size": args.population,
            "training.seed": args.seed,
            "training.model_save_path": args.output,
        }
    )


def main(args: argparse.Namespace) -> int:
    return run_command(
        "train", args.config, lambda config: train_command(config, args), config_overrides(args)
    )


def train_command(config: Config, args: argparse.Namespace) -> int:
    """`blockmarket train` with its config loaded: train, print the summary, convert if asked."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    from training.evolution import train

    with logging_redirect_tqdm():
        summary = train(config, progress=not args.no_progress)
    last = summary.generations[-1]
    print(
        f"run {summary.run_id} (seed {summary.seed}): {summary.stop_reason} in {summary.seconds:.1f} s\n"
        f"  best fitness {summary.best_fitness:.2f}; last generation best {last.best_fitness:.2f}, "
        f"mean {last.mean_fitness:.2f}, {last.trades_per_market:.0f} trades/market\n"
        f"  {len(summary.checkpoints)} periodic + {len(summary.final_checkpoints)} final checkpoints "
        f"in {summary.output_dir}\n  summary: {summary.summary_path}"
    )
    if args.convert or config.training.convert_after_training:
        from conversion.converter import ONNXConverter

        results = ONNXConverter(config).convert_all_models(progress=not args.no_progress)
        failed = [r for r in results if not r.ok]
        print(f"  conversion: {len(results) - len(failed)} of {len(results)} checkpoints ok")
        for result in failed:
            print(f"  failed: {result.error}", file=sys.stderr)
        return 1 if failed else 0
    return 0
