"""Validation: the comparison's verdicts, and that a failed validation fails the model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from blockmarket.core.config import Config
from conversion.converter import ONNXConverter
from conversion.export import convert_to_onnx, export_static
from conversion.validation import ValidationError, compare_outputs, validate_onnx, validation_states
from tests.support.checkpoints import Written
from tests.support.original_format import make_network


def test_compare_outputs_reports_errors_and_verdict() -> None:
    reference = {"trading_matrix": np.array([[1.0, 2.0], [3.0, 4.0]], np.float32)}
    close = {"trading_matrix": reference["trading_matrix"] + np.float32(1e-6)}
    far = {"trading_matrix": reference["trading_matrix"] * np.float32(1.01)}

    ok = compare_outputs(reference, close, atol=1e-5, rtol=0.0)
    assert ok.passed and ok.samples == 2
    assert ok.max_abs_error == pytest.approx(1e-6, rel=0.1)
    bad = compare_outputs(reference, far, atol=1e-5, rtol=1e-3)
    assert not bad.passed and bad.worst_output == "trading_matrix"
    assert bad.max_abs_error == pytest.approx(0.04, rel=1e-3)
    assert bad.max_rel_error == pytest.approx(0.01, rel=1e-3)
    assert compare_outputs(reference, far, atol=1e-5, rtol=0.02).passed  # rtol scales with |reference|
    assert set(bad.to_dict()) >= {"samples", "atol", "rtol", "max_abs_error", "max_rel_error", "passed"}


def test_nan_and_missing_outputs_never_pass() -> None:
    reference = {"state_value": np.zeros((3, 1), np.float32)}
    nan = {"state_value": np.array([[0.0], [np.nan], [0.0]], np.float32)}
    assert not compare_outputs(reference, nan, atol=1.0, rtol=1.0).passed
    with pytest.raises(ValueError, match="state_value"):
        compare_outputs(reference, {}, atol=1.0, rtol=1.0)


def test_validation_states_are_realistic_and_include_edge_cases() -> None:
    states = validation_states(5, 256, seed=0)
    assert states.shape == (256, 61) and states.dtype == np.float32
    assert np.all(states[:, :5] <= 1.0) and np.all(states[0, :5] == 0.0)  # normalised; zero inventory
    assert np.all(states[:, 5:10].sum(axis=1) == 1.0)  # one-hot desired item
    own = states[:, 10:35]
    assert own.min() >= 0.1 - 1e-6 and own.max() <= 10.0 + 1e-6 and own[1].max() == 10.0


def test_another_networks_onnx_fails_validation(tmp_path: Path) -> None:
    convert_to_onnx(make_network("TradingNetwork", 5, seed=1), tmp_path / "other.onnx")
    report = validate_onnx(
        make_network("TradingNetwork", 5, seed=2), tmp_path / "other.onnx", Config().conversion
    )
    assert not report.passed and report.max_abs_error > 1e-3


def test_static_models_are_validated_in_chunks(tmp_path: Path) -> None:
    network = make_network("ActorCriticNetwork", 5)
    export_static(network, tmp_path / "b5.onnx", batch_size=5)  # 256 is not a multiple of 5
    report = validate_onnx(network, tmp_path / "b5.onnx", Config().conversion)
    assert report.passed and report.samples == 256


def test_garbage_onnx_is_a_validation_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "junk.onnx"
    path.write_bytes(b"not a model")
    with pytest.raises(ValidationError, match=str(path)):
        validate_onnx(make_network("TradingNetwork", 5), path, Config().conversion)


def test_a_failed_validation_fails_the_model_and_leaves_nothing_behind(
    config: Config, tree: list[Written], model_dir: Path
) -> None:
    strict = config.model_copy(
        update={"conversion": config.conversion.model_copy(update={"atol": 1e-12, "rtol": 0.0})}
    )
    result = ONNXConverter(strict).convert_single_model(tree[0].path)

    assert result.status == "failed" and not result.ok
    assert result.error is not None and str(tree[0].path) in result.error and "disagrees" in result.error
    assert "\n" not in result.error
    out = model_dir / "onnx"
    assert not out.exists() or not any(out.iterdir())
