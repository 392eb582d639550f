"""The convert command end to end: one run over a mixed tree, re-runs, --validate-only, user errors."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from conversion import cli
from conversion.validation import torch_outputs
from tests.support.checkpoints import Written, one_error_line_each, run_module, write_bad_files, write_config
from tests.support.original_format import write_original_checkpoint


def run_cli(*argv: str) -> int:
    """The command in-process (as `blockmarket convert` runs it)."""
    parser = argparse.ArgumentParser()
    cli.configure_parser(parser)
    return cli.main(parser.parse_args([*argv, "--no-progress"]))


def statuses(table: str) -> dict[str, str]:
    """name -> status, from the summary table's rows."""
    rows = (line.split() for line in table.splitlines())
    return {
        f[0]: f[3] for f in rows if len(f) == 6 and f[3] in ("converted", "skipped", "validated", "failed")
    }


def onnx_files(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in directory.glob("*.onnx")}


@pytest.fixture
def converted(
    model_dir: Path, tree: list[Written], config_file: Path, capsys: pytest.CaptureFixture[str]
) -> tuple[str, ...]:
    """The tree converted once; returns the command's common arguments."""
    common = ("--model-path", str(model_dir), "--config", str(config_file))
    assert run_cli(*common) == 0
    capsys.readouterr()
    return common


@pytest.mark.slow
def test_one_run_converts_the_tree_and_reports_each_bad_file_in_one_line(
    tmp_path: Path, model_dir: Path, tree: list[Written], config_file: Path
) -> None:
    marker = tmp_path / "pwned"
    bad = write_bad_files(model_dir, marker)

    done = run_module("--model-path", str(model_dir), "--config", str(config_file), "--no-progress")

    assert done.returncode == 1, done.stderr
    assert "refused" in one_error_line_each(done.stderr, bad.values())[bad["code"]]
    assert not marker.exists(), "the code-carrying pickle was executed"

    out = model_dir / "onnx"
    for item in tree:
        meta = json.loads((out / f"{item.name}_metadata.json").read_text())
        assert meta["model_info"]["input_dim"] == {5: 61, 8: 145}[item.num_items]
        assert meta["model_info"]["model_type"] == type(item.network).__name__
        assert meta["model_info"]["validation_passed"] is True
        assert meta["conversion_info"]["validation"]["samples"] >= 256
        # fresh states, not the ones validation used: ONNX Runtime vs PyTorch within 1e-5
        dim = meta["model_info"]["input_dim"]
        states = np.random.default_rng(1234).uniform(0, 10, (64, dim)).astype(np.float32)
        session = ort.InferenceSession(str(out / f"{item.name}.onnx"), providers=["CPUExecutionProvider"])
        expected = torch_outputs(item.network, states)
        got = dict(
            zip(meta["model_info"]["outputs"], session.run(None, {"state_vector": states}), strict=True)
        )
        for name, value in expected.items():
            np.testing.assert_allclose(got[name], value, atol=1e-5, rtol=0)
    assert {p.name for p in out.glob("*.onnx")} == {f"{item.name}.onnx" for item in tree}
    assert (out / "npu_inference_example.py").is_file()
    for item in tree:
        assert statuses(done.stdout)[item.name] == "converted"
    # the malicious file really carries code: the original's weights_only=False load would have run it
    torch.load(bad["code"], weights_only=False)
    assert marker.exists()


def test_second_run_skips_validate_only_converts_nothing_force_converts(
    converted: tuple[str, ...], model_dir: Path, tree: list[Written], capsys: pytest.CaptureFixture[str]
) -> None:
    common = converted
    out = model_dir / "onnx"
    first = onnx_files(out)
    metas = {p: p.read_text() for p in out.glob("*.json")}

    assert run_cli(*common) == 0
    assert statuses(capsys.readouterr().out) == {item.name: "skipped" for item in tree}
    assert onnx_files(out) == first

    assert run_cli(*common, "--validate-only") == 0
    assert statuses(capsys.readouterr().out) == {item.name: "validated" for item in tree}
    assert onnx_files(out) == first
    assert {p: p.read_text() for p in out.glob("*.json")} == metas

    assert run_cli(*common, "--force") == 0
    assert statuses(capsys.readouterr().out) == {item.name: "converted" for item in tree}


def test_a_changed_checkpoint_is_converted_again(
    converted: tuple[str, ...], model_dir: Path, tree: list[Written], capsys: pytest.CaptureFixture[str]
) -> None:
    common = converted
    changed = tree[0]
    with torch.no_grad():
        for parameter in changed.network.parameters():
            parameter.add_(0.01)
    write_original_checkpoint(changed.path, changed.network, agent_id="changed")
    assert run_cli(*common) == 0
    rows = statuses(capsys.readouterr().out)
    assert rows.pop(changed.name) == "converted"
    assert set(rows.values()) == {"skipped"}


def test_validate_only_fails_a_model_that_no_longer_matches_its_checkpoint(
    converted: tuple[str, ...], model_dir: Path, tree: list[Written], capsys: pytest.CaptureFixture[str]
) -> None:
    common = converted
    out = model_dir / "onnx"
    victim, intruder = tree[0], tree[3]  # both TradingNetworks: n=5 and n=8
    os.replace(out / f"{intruder.name}.onnx", out / f"{victim.name}.onnx")

    assert run_cli(*common, "--validate-only") == 1
    table = capsys.readouterr().out
    assert statuses(table) == {
        item.name: "failed" if item in (victim, intruder) else "validated" for item in tree
    }
    failures = [line for line in table.splitlines() if line.startswith("FAILED")]
    assert any(str(victim.path) in line and "needs 'state_vector' [*, 61]" in line for line in failures)
    assert any(str(intruder.path) in line and "convert it first" in line for line in failures)


def test_user_mistakes_give_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nowhere"
    assert run_cli("--model-path", str(missing)) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"blockmarket convert: --model-path {missing}: no such directory"

    bad = write_config(tmp_path / "bad.yaml", conversion={"opset_version": "seventeen"})
    assert run_cli("--model-path", str(tmp_path), "--config", str(bad)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"blockmarket convert: {bad}: conversion.opset_version:") and "\n" not in err


def test_module_help_lists_the_original_options() -> None:
    done = run_module("--help")
    assert done.returncode == 0
    for option in ("--model-path", "--pattern", "--config", "--validate-only", "--create-example", "--force"):
        assert option in done.stdout
    assert "--output-dir" in done.stdout


def test_pattern_selects_files_and_empty_dir_is_not_an_error(
    model_dir: Path, tree: list[Written], config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    common = ("--model-path", str(model_dir), "--config", str(config_file))
    assert run_cli(*common, "--pattern", "*_final.pth") == 0
    names = {p.stem for p in (model_dir / "onnx").glob("*.onnx")}
    assert names == {item.name for item in tree if item.name.endswith("_final")}
    assert run_cli(*common, "--pattern", "*.nothing") == 0
