"""`blockmarket evaluate`: a fair fixed-seed comparison, and clear errors."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch

from blockmarket.core.config import Config
from conversion.checkpoint import save_checkpoint
from conversion.networks import TradingNetwork
from training import evaluate as evaluate_cli
from training.evaluate import evaluate

ITEMS = ("diamond", "gold", "apple", "emerald", "redstone")


def protector(path: Path, desired: int) -> Path:
    """A hand-made agent that never sells its desired item (asks 10 of anything for it), 0.79 elsewhere."""
    network = TradingNetwork(61, 16, 5)
    with torch.no_grad():
        for param in network.parameters():
            param.zero_()
        rates = torch.full((5, 5), 0.79)
        rates[desired, :] = 10.0
        network.trading_matrix_head.bias.copy_(torch.log(torch.expm1(rates - 0.1)).flatten())
    return save_checkpoint(
        path,
        network_state_dict=network.state_dict(),
        optimizer_state_dict={},
        agent_id=path.stem,
        desired_item=ITEMS[desired],
        inventory=dict.fromkeys(ITEMS, 10.0),
        trading_matrix=np.ones((5, 5)),
        position=np.zeros(2),
        reward_history=[],
    )


def test_an_agent_that_protects_its_desired_item_beats_random_head_to_head(tmp_path: Path) -> None:
    checkpoints = [protector(tmp_path / f"agent_p{d}_final.pth", d) for d in range(5)]
    result = evaluate(Config(), checkpoints, markets=12, steps=60, seats=10, seed=0)
    assert result.head_to_head.margin > 1.0
    assert result.head_to_head.trades > 0 and result.whole_market.trades > 0
    again = evaluate(Config(), checkpoints, markets=12, steps=60, seats=10, seed=0)
    assert again == result  # fixed seed: the same numbers


def test_the_command_prints_both_comparisons(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    protector(tmp_path / "agent_p0_final.pth", 0)
    parser = argparse.ArgumentParser()
    evaluate_cli.configure_parser(parser)
    args = parser.parse_args(["--model-dir", str(tmp_path), "--markets", "2", "--steps", "5"])
    assert evaluate_cli.main(args) == 0
    out = capsys.readouterr().out
    assert "head to head" in out and "whole market" in out and "seed 0" in out


def test_the_command_explains_missing_or_unusable_checkpoints(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parser = argparse.ArgumentParser()
    evaluate_cli.configure_parser(parser)
    assert evaluate_cli.main(parser.parse_args(["--model-dir", str(tmp_path)])) == 2
    assert "no checkpoints matching agent_*_final.pth" in capsys.readouterr().err
    (tmp_path / "agent_x_final.pth").write_bytes(b"not a checkpoint")
    assert evaluate_cli.main(parser.parse_args(["--model-dir", str(tmp_path)])) == 2
    assert "agent_x_final.pth" in capsys.readouterr().err
