"""`blockmarket demo` on a fresh directory: no checkpoints, so it trains a population, converts, serves."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.serving import CpuPressure, write_config

pytestmark = [pytest.mark.mqtt, pytest.mark.slow]


def test_demo_bootstraps_a_population_and_serves_the_simulation(tmp_path: Path, prefix: str) -> None:
    config = write_config(
        tmp_path / "config.yaml",
        training={"model_save_path": "models/trading_agents", "seed": 1},
        runtime={"num_agents": 32, "bootstrap_generations": 1, "status_interval_s": 1.0},
        mqtt={"topic_prefix": prefix},
        npu={"enabled": False},
    )
    with CpuPressure() as pressure:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "blockmarket.cli",
                "demo",
                "--config",
                str(config),
                "--ticks",
                "20",
                "--json",
                "sim.json",
            ],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=240,
        )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "BOOTSTRAPPING a population first (training 1 generations in a worker process)" in done.stderr
    converted = re.search(r"conversion: (\d+) converted, 0 unchanged, 0 failed", done.stderr)
    assert converted is not None and int(converted[1]) > 0, done.stderr[-4000:]
    summary = json.loads((tmp_path / "sim.json").read_text())
    stopped = re.search(
        r"runtime stopped: 32 agents: (\d+) ticks received, (\d+) served, (\d+) skipped", done.stderr
    )
    assert stopped is not None, done.stderr[-4000:]
    received, served, skipped = int(stopped[1]), int(stopped[2]), int(stopped[3])
    assert received == served + skipped == 20, done.stderr[-4000:]  # every tick answered or skipped
    assert skipped <= (2 if pressure.overloaded else 0), f"{skipped} of 20 ticks skipped while {pressure}"
    assert summary["agents"] == 32 and summary["answered"] == served and summary["missing"] == skipped
    assert summary["rule_violations"] == 0
    assert f"final: tick     20  answered {served}/20" in done.stdout
    assert len(list((tmp_path / "models/trading_agents/onnx").glob("*_metadata.json"))) == int(converted[1])
