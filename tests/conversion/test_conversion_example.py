"""The generated npu_inference_example.py, executed as a user would run it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from blockmarket.core.config import Config
from conversion.converter import ONNXConverter
from conversion.example import EXAMPLE_NAME
from conversion.export import export_static
from conversion.metadata import metadata_path
from tests.support.checkpoints import Written


def run_example(
    directory: Path, *argv: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(directory / EXAMPLE_NAME), *argv],
        cwd=directory.parent,  # not its own directory: it must find the models by itself
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture
def converted(config: Config, tree: list[Written]) -> ONNXConverter:
    converter = ONNXConverter(config)
    assert all(r.ok for r in converter.convert_all_models())
    return converter


def test_example_runs_a_dynamic_model_on_cpu_and_says_why(converted: ONNXConverter) -> None:
    done = run_example(converted.output_dir)
    assert done.returncode == 0, done.stderr
    assert "QNN needs static input shapes" in done.stdout
    assert "on CPUExecutionProvider" in done.stdout
    assert "one agent: {'trading_matrix': (1, 25)}" in done.stdout  # a [1, D] state
    assert "8 agents in one call" in done.stdout  # and a batch
    assert "diamond" in done.stdout and "proposed trading matrix" in done.stdout


def test_example_finds_models_whose_metadata_was_written_on_windows(converted: ONNXConverter) -> None:
    for meta_file in converted.output_dir.glob("*_metadata.json"):
        meta = json.loads(meta_file.read_text())
        meta["model_info"]["onnx_path"] = "C:\\models\\onnx\\" + meta["model_info"]["onnx_path"]
        meta_file.write_text(json.dumps(meta))
    done = run_example(converted.output_dir)
    assert done.returncode == 0, done.stderr
    assert "proposed trading matrix" in done.stdout


def test_example_takes_a_model_path_and_prints_state_values(
    converted: ONNXConverter, tree: list[Written]
) -> None:
    actor_critic = converted.output_dir / f"{tree[5].name}.onnx"
    done = run_example(converted.output_dir, str(actor_critic))
    assert done.returncode == 0, done.stderr
    assert "8 items, state dim 145" in done.stdout and "lapis" in done.stdout
    assert "state values:" in done.stdout


def test_example_without_onnxruntime_qnn_falls_back_with_a_notice(
    converted: ONNXConverter, tmp_path: Path
) -> None:
    blocker = tmp_path / "block"
    blocker.mkdir()
    (blocker / "onnxruntime_qnn.py").write_text("raise ImportError('hidden for this test')\n")
    done = run_example(converted.output_dir, env={"PYTHONPATH": str(blocker)})
    assert done.returncode == 0, done.stderr
    assert "onnxruntime-qnn is not installed: running on the CPU" in done.stdout
    assert "proposed trading matrix" in done.stdout


@pytest.mark.qnn
def test_example_prefers_a_static_npu_variant_and_runs_it_on_htp(
    converted: ONNXConverter, tree: list[Written]
) -> None:
    item = tree[0]
    variant = export_static(item.network, converted.output_dir / f"{item.name}_fp32_b4.onnx", batch_size=4)
    meta_file = metadata_path(converted.output_dir / f"{item.name}.onnx")
    meta = json.loads(meta_file.read_text())
    meta["npu_optimization"]["variants"] = [
        {"onnx_path": variant.path.name, "precision": "fp32", "batch_size": 4, "passed": True}
    ]
    meta_file.write_text(json.dumps(meta))

    done = run_example(converted.output_dir, str(converted.output_dir / f"{item.name}.onnx"))
    assert done.returncode == 0, done.stderr
    assert f"model {variant.path.name} on QNNExecutionProvider" in done.stdout
    assert "static batch 4" in done.stdout and "proposed trading matrix" in done.stdout


def test_example_with_no_model_exits_with_a_message(tmp_path: Path) -> None:
    ONNXConverter(Config(), output_dir=tmp_path / "empty").save_inference_example()
    done = run_example(tmp_path / "empty")
    assert done.returncode != 0
    assert "no converted model here" in done.stderr and "Traceback" not in done.stderr
