"""A converted TradingNetwork in fp16, int8 and int16 runs entirely on QNN HTP within its tolerance."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from blockmarket.core.config import Config
from conversion.networks import spec_of
from conversion.variants import TOLERANCES, build_variants, validate_variant
from tests.support.npu import trading_network

pytestmark = [pytest.mark.qnn, pytest.mark.usefixtures("htp")]


@pytest.mark.parametrize("head_scale", [1.0, 8.0], ids=["untrained-range", "wide-range"])
def test_every_precision_runs_on_htp_within_tolerance(
    tmp_path: Path, npu_config: Config, head_scale: float
) -> None:
    network = trading_network(seed=3, head_scale=head_scale)
    entries = build_variants(network, spec_of(network), tmp_path, "agent", npu_config)

    assert [e["precision"] for e in entries] == ["fp16", "int8", "int16"]
    for entry in entries:
        tolerance = TOLERANCES[entry["precision"]]
        assert entry["passed"], entry
        assert entry["backend"] == "htp"
        assert entry["placement"]["on_npu"] and entry["placement"]["nodes"].keys() == {"QNNExecutionProvider"}
        assert entry["batch_size"] == 4 and entry["samples"] == 64
        assert (entry["atol"], entry["rtol"]) == (tolerance.atol, tolerance.rtol)
        assert (
            0 < entry["max_abs_error"] <= tolerance.atol + tolerance.rtol * 10
        )  # not exact: it ran in low precision
        assert (tmp_path / entry["onnx_path"]).is_file()


def test_variant_files_hold_the_precision_they_claim(tmp_path: Path, npu_config: Config) -> None:
    network = trading_network(seed=4)
    entries = {
        e["precision"]: e for e in build_variants(network, spec_of(network), tmp_path, "agent", npu_config)
    }

    fp16 = onnx.load(str(tmp_path / entries["fp16"]["onnx_path"]))
    assert {init.data_type for init in fp16.graph.initializer if init.dims} == {onnx.TensorProto.FLOAT16}
    assert fp16.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # fp32 in, fp32 out
    assert [d.dim_value for d in fp16.graph.input[0].type.tensor_type.shape.dim] == [4, 61]
    for precision, activation in (("int8", onnx.TensorProto.UINT8), ("int16", onnx.TensorProto.UINT16)):
        model = onnx.load(str(tmp_path / entries[precision]["onnx_path"]))
        zero_points = {
            init.data_type
            for init in model.graph.initializer
            if init.name.endswith("zero_point") and not init.dims
        }
        assert activation in zero_points and onnx.TensorProto.UINT8 in zero_points, precision
        assert sum(node.op_type == "QuantizeLinear" for node in model.graph.node) >= 5


def test_validation_catches_a_variant_of_another_network(tmp_path: Path, npu_config: Config) -> None:
    network, impostor = trading_network(seed=5), trading_network(seed=6, head_scale=8.0)
    entry = build_variants(network, spec_of(network), tmp_path, "agent", npu_config)[0]

    verdict = validate_variant(
        impostor, spec_of(impostor), tmp_path / entry["onnx_path"], entry["precision"], 4, npu_config
    )
    assert verdict["backend"] == "htp" and not verdict["passed"]
    assert verdict["max_abs_error"] > 10 * TOLERANCES["fp16"].atol
    assert np.isfinite(verdict["max_rel_error"])
