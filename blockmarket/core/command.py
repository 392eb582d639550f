"""The prologue every subcommand shares: config + overrides (validated), logging, exit code 2 on bad input."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from pathlib import Path

from blockmarket.core.config import Config, ConfigError, Overrides, read_config
from blockmarket.core.logs import setup_logging

USAGE_ERROR = 2  # exit code of a mistake in the config file or on the command line


def usage_error(command: str, error: str | Exception) -> int:
    """Print ``blockmarket <command>: <line>`` for each line of the error; returns the usage exit code."""
    for line in str(error).splitlines():
        print(f"blockmarket {command}: {line}", file=sys.stderr)
    return USAGE_ERROR


def given(options: Mapping[str, object | None]) -> Overrides:
    """The overrides (dotted key -> value) of the options actually given; an option left out is None."""
    return {key: value for key, value in options.items() if value is not None}


def run_command(
    command: str,
    config_path: str | Path | None,
    body: Callable[[Config], int],
    overrides: Overrides | None = None,
) -> int:
    """Load the config with the command line's overrides, set up logging, log what loading noticed,
    then run ``body``; a config error (also one found at startup, e.g. mqtt.ca_file) is reported by
    :func:`usage_error` instead."""
    try:
        loaded = read_config(config_path, overrides)
        setup_logging(loaded.config.logging)
        loaded.log()
        return body(loaded.config)
    except ConfigError as exc:
        return usage_error(command, exc)
