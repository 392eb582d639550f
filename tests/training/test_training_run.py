"""A short training run writes original-format checkpoints, atomically, plus a readable summary."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from blockmarket.core.config import Config
from conversion.checkpoint import ORIGINAL_KEYS, load_checkpoint
from conversion.networks import TradingNetwork, load_network
from training import cli
from training.evolution import SUMMARY_FILE, Evolution, train

ConfigData = Callable[..., dict[str, Any]]  # the conftest fixtures' types
ConfigFactory = Callable[..., Config]


def test_run_writes_periodic_final_and_summary_files(trained_dir: Path) -> None:
    summary = json.loads((trained_dir / SUMMARY_FILE).read_text())
    assert summary == yaml.safe_load((trained_dir / SUMMARY_FILE).read_text())
    assert [g["generation"] for g in summary["generations"]] == [1, 2, 3, 4]
    assert summary["stop_reason"] == "completed 4 generations"
    periodic = {f"agent_gen{g}_rank{k}.pth" for g in (2, 4) for k in (1, 2)}
    finals = {f"agent_{a['agent_id']}_final.pth" for a in summary["final_agents"]}
    assert len(finals) == 2
    names = {p.name for p in trained_dir.iterdir()}
    assert names == periodic | finals | {SUMMARY_FILE}  # and no temp files left behind
    assert set(summary["checkpoints"]) == periodic
    fitness = [a["fitness"] for a in summary["final_agents"]]
    assert fitness == sorted(fitness, reverse=True)


def test_checkpoints_load_safely_and_with_the_original_unsafe_loader(trained_dir: Path) -> None:
    for path in sorted(trained_dir.glob("*.pth")):
        raw = torch.load(path, weights_only=False)
        assert set(raw) == set(ORIGINAL_KEYS)
        checkpoint = load_checkpoint(path)
        assert checkpoint.agent_id and checkpoint.desired_item in {
            "diamond",
            "gold",
            "apple",
            "emerald",
            "redstone",
        }
        assert isinstance(raw["trading_matrix"], np.ndarray) and raw["trading_matrix"].dtype == np.float64
        matrix = checkpoint.trading_matrix
        assert matrix is not None and matrix.shape == (5, 5)
        np.testing.assert_array_equal(np.diag(matrix), 1.0)
        assert ((matrix >= 0.1) & (matrix <= 10.0)).all()
        assert checkpoint.position is not None and checkpoint.position.shape == (2,)
        assert checkpoint.inventory is not None and set(checkpoint.inventory) == {
            "diamond",
            "gold",
            "apple",
            "emerald",
            "redstone",
        }
        assert checkpoint.reward_history and all(np.isfinite(checkpoint.reward_history))
        assert isinstance(load_network(checkpoint.network_state_dict, expected_items=5), TradingNetwork)
        network = TradingNetwork(61, 16, 5)
        torch.optim.Adam(network.parameters()).load_state_dict(raw["optimizer_state_dict"])


def test_final_agents_have_distinct_ids_and_match_their_file_names(trained_dir: Path) -> None:
    for path in trained_dir.glob("agent_*_final.pth"):
        assert path.name == f"agent_{load_checkpoint(path).agent_id}_final.pth"


def test_every_agent_ever_created_gets_a_new_id(tmp_path: Path, make_config: ConfigFactory) -> None:
    evolution = Evolution(make_config(tmp_path), seed=3, run_id="t")
    seen = set(evolution.lineages.agent_ids)
    for generation in range(2, 12):
        before = evolution.lineages.agent_ids
        fitness = np.random.default_rng(generation).random(len(before)).astype(np.float32)
        evolution.next_generation(generation, fitness, evolution.markets())
        ids = evolution.lineages.agent_ids
        assert len(ids) == len(before) == len(set(ids))
        survivors = [i for i in ids if i in before]
        assert len(survivors) == 3  # survival_rate 0.5 of 6
        newcomers = set(ids) - set(survivors)
        assert not newcomers & seen and all(i.startswith(f"t-g{generation}a") for i in newcomers)
        seen |= newcomers


def test_survivors_keep_their_network_and_offspring_are_mutated(
    tmp_path: Path, make_config: ConfigFactory
) -> None:
    evolution = Evolution(make_config(tmp_path), seed=4, run_id="t")
    old = evolution.lineages
    fitness = np.arange(6, dtype=np.float32)  # agent 5 is best
    evolution.next_generation(2, fitness, evolution.markets())
    new = evolution.lineages
    assert new.agent_ids[:3] == [old.agent_ids[i] for i in (5, 4, 3)]
    for name, tensor in new.policies.params.items():
        torch.testing.assert_close(tensor[0], old.policies.params[name][5])
    noise = new.policies.params["shared.0.weight"][3] - old.policies.params["shared.0.weight"][5]
    assert 0.03 < float(noise.std()) < 0.07  # N(0, mutation_rate = 0.05) on the best survivor's child
    assert list(new.desired[3:5]) == [old.desired[5], old.desired[4]]


def test_same_seed_same_run(tmp_path: Path, make_config: ConfigFactory) -> None:
    first = train(make_config(tmp_path / "a"), generations=2, progress=False)
    second = train(make_config(tmp_path / "b"), generations=2, progress=False)
    strip = [(g.best_fitness, g.mean_fitness, g.trades_per_market) for g in first.generations]
    assert strip == [(g.best_fitness, g.mean_fitness, g.trades_per_market) for g in second.generations]


def test_target_fitness_and_early_stopping_end_the_run(tmp_path: Path, make_config: ConfigFactory) -> None:
    reached = train(make_config(tmp_path / "t", target_fitness=0.0), progress=False)
    assert len(reached.generations) == 1 and "target fitness" in reached.stop_reason
    assert len(reached.final_checkpoints) == 2 and all(p.exists() for p in reached.final_checkpoints)
    patience = train(make_config(tmp_path / "p", early_stopping_patience=1), generations=50, progress=False)
    assert "early stopping" in patience.stop_reason and len(patience.generations) < 50


def test_cli_applies_overrides_and_reports(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], config_data: ConfigData
) -> None:
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(config_data(tmp_path / "unused")))
    parser = argparse.ArgumentParser()
    cli.configure_parser(parser)
    output = tmp_path / "out"
    args = parser.parse_args(
        [
            "--config",
            str(config_file),
            "--generations",
            "2",
            "--population",
            "3",
            "--seed",
            "5",
            "--output",
            str(output),
            "--no-progress",
        ]
    )
    assert cli.main(args) == 0
    summary = json.loads((output / SUMMARY_FILE).read_text())
    assert summary["seed"] == 5 and len(summary["generations"]) == 2
    assert summary["config"]["environment"]["population_size"] == 3
    assert "completed 2 generations" in capsys.readouterr().out
    assert not (tmp_path / "unused").exists()


def test_cli_rejects_a_bad_config_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], config_data: ConfigData
) -> None:
    data = config_data(tmp_path)
    data["training"]["markets_per_generation"] = 0
    config_file = tmp_path / "bad.yaml"
    config_file.write_text(yaml.safe_dump(data))
    parser = argparse.ArgumentParser()
    cli.configure_parser(parser)
    assert cli.main(parser.parse_args(["--config", str(config_file)])) == 2
    assert "training.markets_per_generation" in capsys.readouterr().err


def test_the_converter_converts_and_validates_what_training_wrote(trained_dir: Path, tmp_path: Path) -> None:
    from conversion.converter import ONNXConverter

    results = ONNXConverter(Config(), model_path=trained_dir, output_dir=tmp_path).convert_all_models()
    assert len(results) == len(list(trained_dir.glob("*.pth"))) == 6
    assert all(r.status == "converted" for r in results), [r.error for r in results]
