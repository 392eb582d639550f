"""`blockmarket train --config config.yaml` with the original trainer's first and last config.yaml."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conversion.checkpoint import load_checkpoint
from tests.support.serving import REPO, python_module
from training.evolution import SUMMARY_FILE

ORIGINAL = {
    1: ("wood", "stone", "iron", "gold", "food"),
    8: ("diamond", "gold", "apple", "emerald", "redstone"),
}


@pytest.mark.slow
@pytest.mark.parametrize("version", sorted(ORIGINAL))
def test_the_original_config_trains_with_its_items_and_population(tmp_path: Path, version: int) -> None:
    config = REPO / "tests" / "conversion" / f"original_config_v{version}.yaml"
    command = ["train", "--config", str(config), "--generations", "1", "--seed", "0", "--no-progress"]
    done = python_module("blockmarket.cli", *command, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    output = tmp_path / "models" / "trading_agents"  # the original's training.model_save_path
    summary = json.loads((output / SUMMARY_FILE).read_text())
    environment = summary["config"]["environment"]
    assert environment["items_list"] == list(ORIGINAL[version])
    assert environment["population_size"] == (50 if version == 1 else 10)
    assert summary["config"]["learning"]["matrix_update_rate"] == (0.1 if version == 1 else 0.04)
    assert len(summary["generations"]) == 1
    finals = sorted(output.glob("agent_*_final.pth"))
    assert len(finals) == 5
    assert tuple(load_checkpoint(finals[0]).inventory or ()) == ORIGINAL[version]
    log = (tmp_path / "trading.log").read_text()
    assert "the shipped defaults apply to sections conversion" in log and "ignored: server" in log
