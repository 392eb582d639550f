"""The command-line options `run` and `demo` share, and the config overrides they give."""

from __future__ import annotations

import argparse

from blockmarket.core.command import given
from blockmarket.core.config import Overrides


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """The options `run` and `demo` share: which config, and the overrides an operator reaches for."""
    parser.add_argument("--config", default=None, help="config file (default: ./config.yaml, else built-in)")
    parser.add_argument("--agents", type=int, help="override runtime.num_agents")
    parser.add_argument("--model-dir", help="override runtime.model_dir (the converted models to serve)")
    parser.add_argument(
        "--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="override logging.level"
    )


def config_overrides(args: argparse.Namespace) -> Overrides:
    """The options `run` and `demo` share, as dotted config keys (validated with the file)."""
    return given(
        {
            "runtime.num_agents": args.agents,
            "runtime.model_dir": args.model_dir,
            "runtime.convert_on_startup": False if getattr(args, "no_convert", False) else None,
            "runtime.hot_reload": False if getattr(args, "no_reload", False) else None,
            "logging.level": args.log_level,
        }
    )
