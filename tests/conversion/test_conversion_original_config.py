"""`python -m conversion --config config.yaml` with the original trainer's own config.yaml, as its README
told users to run it (from the directory holding models/trading_agents/), on original-format checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.checkpoints import REPO, run_module
from tests.support.original_format import ITEMS_5, ITEMS_8, make_network, write_original_checkpoint

ITEMS_V1 = ("wood", "stone", "iron", "gold", "food")
ORIGINAL_CONFIG = {
    version: REPO / "tests" / "conversion" / f"original_config_v{version}.yaml" for version in (1, 8)
}


def items_written(onnx_dir: Path, name: str) -> list[str]:
    meta = json.loads((onnx_dir / f"{name}_metadata.json").read_text())
    return list(meta["model_info"]["items_list"])


@pytest.mark.slow
def test_the_first_original_config_converts_checkpoints_and_says_what_it_filled_in(tmp_path: Path) -> None:
    """Version 1 trades wood..food: a checkpoint with those items converts quietly; one trained on other
    items (five, or eight) converts with a warning naming both lists, and its metadata keeps its own."""
    models = tmp_path / "models" / "trading_agents"  # the original's training.model_save_path
    for name, items, seed in (("own", ITEMS_V1, 0), ("other", ITEMS_5, 1), ("eight", ITEMS_8, 2)):
        network = make_network("TradingNetwork", len(items), seed=seed)
        write_original_checkpoint(models / f"agent_{name}_final.pth", network, agent_id=name, items=items)

    done = run_module("--config", str(ORIGINAL_CONFIG[1]), "--no-progress", cwd=tmp_path)

    assert done.returncode == 0, done.stderr
    onnx_dir = models / "onnx"
    assert items_written(onnx_dir, "agent_own_final") == list(ITEMS_V1)
    assert items_written(onnx_dir, "agent_other_final") == list(ITEMS_5)
    assert items_written(onnx_dir, "agent_eight_final") == list(ITEMS_8)
    warnings = [line for line in done.stderr.splitlines() if "trained on items" in line]
    assert len(warnings) == 2 and not any("agent_own_final" in line for line in warnings)
    assert all(str(list(ITEMS_V1)) in line for line in warnings)
    log = (tmp_path / "trading.log").read_text()  # the original's logging.log_file, relative to the cwd
    assert log.count("the shipped defaults apply to sections conversion, npu, mqtt, runtime, simulator") == 1
    assert log.count("not used by this product, ignored: server (the original's Flask web page)") == 1
    assert "3 converted" in done.stdout


@pytest.mark.slow
def test_the_last_original_config_converts_a_checkpoint_of_its_items(tmp_path: Path) -> None:
    models = tmp_path / "models" / "trading_agents"
    network = make_network("TradingNetwork", len(ITEMS_5), seed=3)
    write_original_checkpoint(models / "agent_gen10_rank1.pth", network, agent_id="a1", items=ITEMS_5)

    done = run_module("--config", str(ORIGINAL_CONFIG[8]), "--no-progress", cwd=tmp_path)

    assert done.returncode == 0, done.stderr
    assert items_written(models / "onnx", "agent_gen10_rank1") == list(ITEMS_5)
    assert "trained on items" not in done.stderr
    assert "ignored: server (the original's Flask web page), socket (the original's Socket.IO client)" in (
        done.stderr
    )
