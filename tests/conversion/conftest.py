"""Fixtures: a checkpoint tree in the original trainer's format, and configs pointing at it."""

from __future__ import annotations

from pathlib import Path

import pytest

from blockmarket.core.config import Config, load_config
from tests.support.checkpoints import TREE, Written, write_config
from tests.support.original_format import make_network, write_original_checkpoint


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    return tmp_path / "models" / "trading_agents"


@pytest.fixture
def tree(model_dir: Path) -> list[Written]:
    written = []
    for seed, (relative, architecture, items) in enumerate(TREE):
        network = make_network(architecture, len(items), seed=seed)
        path = write_original_checkpoint(
            model_dir / relative, network, agent_id=Path(relative).stem, items=items, seed=seed
        )
        name = "__".join(Path(relative).with_suffix("").parts)
        written.append(Written(path, network, name, len(items)))
    return written


@pytest.fixture
def config_file(tmp_path: Path, model_dir: Path) -> Path:
    return write_config(tmp_path / "config.yaml", training={"model_save_path": str(model_dir)})


@pytest.fixture
def config(config_file: Path) -> Config:
    return load_config(config_file)
