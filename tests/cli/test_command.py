"""The one command prologue: every subcommand loads its config the same way, reports config errors as
`blockmarket <command>: ...` with exit code 2, and sets up logging (with the loader's notices)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from blockmarket.cli import SUBCOMMANDS, main
from blockmarket.core.logs import StderrHandler
from tests.support.serving import REPO, write_config


@pytest.mark.parametrize("command", list(SUBCOMMANDS))
def test_every_command_names_the_file_and_key_of_a_config_error_and_exits_2(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], root_logging: logging.Logger
) -> None:
    bad = write_config(tmp_path / "bad.yaml", mqtt={"port": "1883"}, runtime={"num_agent": 3})
    assert main([command, "--config", str(bad)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"blockmarket {command}: {bad}: runtime.num_agent: unknown key (did you mean num_agents?); "
        "config.yaml in the repository lists every key"
    ]
    bad = write_config(tmp_path / "bad.yaml", mqtt={"port": "1883"})
    assert main([command, "--config", str(bad)]) == 2
    assert (
        capsys.readouterr().err
        == f"blockmarket {command}: {bad}: mqtt.port: Input should be a valid integer\n"
    )


AT_LEAST = "Input should be greater than or equal to"


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["run", "--agents", "0"], f"runtime.num_agents=0: {AT_LEAST} 1"),
        (["demo", "--agents", "-5"], f"runtime.num_agents=-5: {AT_LEAST} 1"),
        (["simulate", "--ticks", "-1"], f"simulator.ticks=-1: {AT_LEAST} 0"),
        (["simulate", "--rate", "inf"], "simulator.tick_rate_hz=inf: Input should be a finite number"),
        (["simulate", "--port", "70000"], "mqtt.port=70000: Input should be less than or equal to 65535"),
        (["train", "--generations", "0"], f"training.max_generations=0: {AT_LEAST} 1"),
        (["train", "--population", "1"], f"environment.population_size=1: {AT_LEAST} 2"),
    ],
)
def test_command_line_overrides_are_validated_by_the_config_model(
    argv: list[str], error: str, capsys: pytest.CaptureFixture[str], root_logging: logging.Logger
) -> None:
    config = str(REPO / "config.yaml")
    assert main([*argv, "--config", config]) == 2
    assert capsys.readouterr().err == f"blockmarket {argv[0]}: override {error}\n"


def test_evaluate_sets_up_logging_and_logs_what_loading_noticed(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    root_logging: logging.Logger,
) -> None:
    """The original trainer's last config: its log_file (trading.log, relative) receives the notices."""
    monkeypatch.chdir(tmp_path)
    original = REPO / "tests" / "conversion" / "original_config_v8.yaml"
    assert main(["evaluate", "--config", str(original), "--model-dir", str(tmp_path)]) == 2
    assert "blockmarket evaluate: no checkpoints matching" in capsys.readouterr().err
    assert any(isinstance(h, StderrHandler) for h in root_logging.handlers)
    lines = (tmp_path / "trading.log").read_text().splitlines()
    assert len(lines) == 2
    assert (
        " - blockmarket.core.config - INFO - " in lines[0]
        and "shipped defaults apply to sections conversion" in lines[0]
    )
    assert " - blockmarket.core.config - WARNING - " in lines[1] and "ignored: server" in lines[1]


def test_a_log_file_that_cannot_be_opened_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], root_logging: logging.Logger
) -> None:
    log_file = tmp_path / "missing" / "run.log"
    config = write_config(tmp_path / "c.yaml", logging={"log_file": str(log_file)})
    assert main(["evaluate", "--config", str(config), "--model-dir", str(tmp_path)]) == 2
    assert capsys.readouterr().err.startswith(
        f"blockmarket evaluate: logging.log_file: cannot open {log_file}"
    )


def test_a_setting_found_unusable_at_startup_is_a_usage_error_too(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], root_logging: logging.Logger
) -> None:
    ca_file = tmp_path / "ca.pem"
    config = write_config(tmp_path / "c.yaml", mqtt={"tls": True, "ca_file": str(ca_file)})
    assert main(["simulate", "--config", str(config), "--wait", "0", "--ticks", "1", "--quiet"]) == 2
    last = capsys.readouterr().err.splitlines()[-1]
    assert last == f"blockmarket simulate: mqtt.ca_file: {ca_file}: no such file (the CA bundle for TLS)"
