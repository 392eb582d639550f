"""Logging setup for every command and worker process (kept apart from the CLI so nothing imports it)."""

from __future__ import annotations

import logging
import sys
from typing import TextIO

from blockmarket.core.config import ConfigError, LoggingConfig


class StderrHandler(logging.StreamHandler[TextIO]):
    """Writes to whatever ``sys.stderr`` is when a record is emitted.

    A handler that captured the stream at setup keeps writing to it after it was replaced and closed (a
    test runner's capture, a redirect), and every record then fails with "I/O operation on closed file".
    """

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _replaced: TextIO) -> None:
        """StreamHandler.__init__ and setStream assign a stream; this handler always follows sys.stderr."""


def setup_logging(config: LoggingConfig) -> None:
    """Configure the root logger (stderr, plus ``logging.log_file`` when set); replaces earlier setup."""
    handlers: list[logging.Handler] = [StderrHandler()]
    if config.log_file:
        try:
            handlers.append(logging.FileHandler(config.log_file, encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(f"logging.log_file: cannot open {config.log_file} ({exc.strerror})") from None
    logging.basicConfig(level=config.level, format=config.format, handlers=handlers, force=True)
