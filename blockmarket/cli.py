"""`blockmarket` console script: one entry point, one subcommand per user (see --help)."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# name -> (module providing `configure_parser(parser)` and `main(args) -> int`, one-line help).
# Modules are imported lazily so `run` never imports torch and `--help` stays fast.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "convert": ("conversion.cli", "convert .pth checkpoints to validated ONNX (+ NPU variants)"),
    "train": ("training.cli", "evolutionary training on the market simulation; writes checkpoints"),
    "evaluate": ("training.evaluate", "compare trained agents with random ones on a fixed-seed market"),
    "run": ("runtime.server", "serve all agents over MQTT (converts what is new first)"),
    "simulate": (
        "blockmarket.simulator.game",
        "play the game server over MQTT: publish ticks, apply matrices",
    ),
    "demo": ("blockmarket.demo", "the runtime against a live market simulation (what the quick start runs)"),
    "dashboard": ("blockmarket.dashboard.cli", "watch the market live in a browser (MQTT + /metrics)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blockmarket",
        description="BlockMarket trading agents: convert checkpoints for the NPU, train, serve over MQTT.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        doc = (module.__doc__ or help_text).strip()
        sub_parser = sub.add_parser(
            name, help=help_text, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        module.configure_parser(sub_parser)
        sub_parser.set_defaults(_module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._module.main(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
