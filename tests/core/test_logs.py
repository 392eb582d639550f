"""Logging setup: records follow sys.stderr as it is replaced, and the configured log file gets them."""

from __future__ import annotations

import io
import logging
import sys
from pathlib import Path

import pytest

from blockmarket.core.config import ConfigError, LoggingConfig
from blockmarket.core.logs import setup_logging


def test_records_reach_the_current_stderr_after_the_first_one_was_closed(
    monkeypatch: pytest.MonkeyPatch, root_logging: logging.Logger
) -> None:
    """pytest's capture (and any redirect) replaces sys.stderr and closes the old stream: a handler bound
    to it at setup failed on every later record with "I/O operation on closed file"."""
    first = io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    setup_logging(LoggingConfig(format="%(levelname)s %(message)s"))
    first.close()
    second = io.StringIO()
    monkeypatch.setattr(sys, "stderr", second)
    logging.getLogger("tests.logs").warning("still heard")
    assert second.getvalue() == "WARNING still heard\n"


def test_the_log_file_gets_the_records_at_the_configured_level(
    tmp_path: Path, root_logging: logging.Logger, capsys: pytest.CaptureFixture[str]
) -> None:
    log_file = tmp_path / "trading.log"
    setup_logging(LoggingConfig(level="WARNING", format="%(name)s|%(message)s", log_file=str(log_file)))
    logging.getLogger("tests.logs").info("not at WARNING")
    logging.getLogger("tests.logs").warning("kept")
    assert log_file.read_text() == "tests.logs|kept\n"
    assert capsys.readouterr().err == "tests.logs|kept\n"


def test_a_log_file_that_cannot_be_opened_is_a_config_error(
    tmp_path: Path, root_logging: logging.Logger
) -> None:
    missing = tmp_path / "no-such-dir" / "trading.log"
    with pytest.raises(ConfigError, match=rf"^logging\.log_file: cannot open {missing} \(No such file"):
        setup_logging(LoggingConfig(log_file=str(missing)))
