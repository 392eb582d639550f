"""A small, fast training configuration and one shared short training run."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from blockmarket.core.config import Config, dump_default_config, parse_config


def small_config_data(output: Path, **training: Any) -> dict[str, Any]:
    data = dump_default_config()
    data["environment"].update(population_size=6, generation_length=8)
    data["network"]["hidden_dim"] = 16
    data["training"].update(
        max_generations=4,
        model_save_frequency=2,
        model_save_path=str(output),
        top_k_saved=2,
        seed=0,
        markets_per_generation=2,
        **training,
    )
    return data


def small_config(output: Path, **training: Any) -> Config:
    return parse_config(small_config_data(output, **training)).config


ConfigData = Callable[..., dict[str, Any]]
ConfigFactory = Callable[..., Config]


@pytest.fixture
def config_data() -> ConfigData:
    """``config_data(output, **training_overrides)``: a small config as YAML-able data."""
    return small_config_data


@pytest.fixture
def make_config() -> ConfigFactory:
    """``make_config(output, **training_overrides)``: a small validated Config."""
    return small_config


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Output of one 4-generation run (periodic checkpoints at generations 2 and 4)."""
    from training.evolution import train

    output = tmp_path_factory.mktemp("trained")
    train(small_config(output), progress=False)
    return output
