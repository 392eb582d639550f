"""`convert --precisions`: NPU variants listed in the metadata, validated on HTP or (without QNN) CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from blockmarket.models.providers import DISABLE_QNN_ENV
from conversion.checkpoint import save_checkpoint
from tests.support.npu import NUM_ITEMS, trading_network

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def checkpoint_dir(tmp_path: Path) -> Path:
    models = tmp_path / "models"
    save_checkpoint(
        models / "agent_gen5_rank1.pth",
        network_state_dict=trading_network(seed=11).state_dict(),
        optimizer_state_dict={},
        agent_id="a1",
        desired_item="gold",
        inventory={"diamond": 5, "gold": 6, "apple": 7, "emerald": 8, "redstone": 9},
        trading_matrix=np.ones((NUM_ITEMS, NUM_ITEMS)),
        position=np.zeros(2),
        reward_history=[],
    )
    return models


def convert(models: Path, *extra: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "conversion", "--model-path", str(models), "--no-progress", *extra]
    return subprocess.run(
        command, cwd=REPO, capture_output=True, text=True, env={**os.environ, **(env or {})}
    )


def variants(models: Path) -> list[dict]:
    meta = json.loads((models / "onnx" / "agent_gen5_rank1_metadata.json").read_text())
    return meta["npu_optimization"]["variants"]


@pytest.mark.qnn
@pytest.mark.usefixtures("htp")
def test_convert_builds_validated_htp_variants_and_context_binaries(checkpoint_dir: Path) -> None:
    done = convert(
        checkpoint_dir, "--precisions", "fp16,int16", "--static-batch-sizes", "2", "--context-cache"
    )

    assert done.returncode == 0, done.stderr
    built = variants(checkpoint_dir)
    assert [(v["precision"], v["batch_size"]) for v in built] == [("fp16", 2), ("int16", 2)]
    for entry in built:
        assert entry["passed"] and entry["backend"] == "htp" and entry["placement"]["on_npu"], entry
        assert entry["max_abs_error"] <= entry["atol"]
        context = checkpoint_dir / "onnx" / entry["context_model"]
        assert context.is_file() and context.with_name(f"{context.stem}_qnn.bin").is_file()

    again = convert(checkpoint_dir, "--precisions", "fp16,int16", "--static-batch-sizes", "2")
    assert again.returncode == 0 and "1 skipped" in again.stdout, again.stdout


def test_convert_without_qnn_validates_on_cpu_and_says_so_once(checkpoint_dir: Path) -> None:
    done = convert(checkpoint_dir, "--precisions", "fp16,int8", env={DISABLE_QNN_ENV: "1"})

    assert done.returncode == 0, done.stderr
    assert done.stderr.count("QNN disabled by BLOCKMARKET_DISABLE_QNN: running on CPU") == 1
    built = variants(checkpoint_dir)
    assert [v["precision"] for v in built] == ["fp16", "int8"]
    assert all(v["passed"] and v["backend"] == "cpu" for v in built)
    assert all(v["placement"]["provider"] == "CPUExecutionProvider" for v in built)


def test_unknown_precision_is_a_usage_error(checkpoint_dir: Path) -> None:
    done = convert(checkpoint_dir, "--precisions", "fp16,int4")

    assert done.returncode == 2
    assert "'fp16,int4': choose from fp32, fp16, int8, int16" in done.stderr
