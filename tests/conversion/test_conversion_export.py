"""Export: names, shapes, opset read back, one self-contained file, numerics vs PyTorch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from blockmarket.core.state import realistic_states, state_dim
from conversion.export import convert_to_onnx, export_static
from conversion.networks import ARCHITECTURES
from conversion.validation import torch_outputs
from tests.support.original_format import make_network


def dims(value_info: onnx.ValueInfoProto) -> list[int | str]:
    return [
        d.dim_value if d.HasField("dim_value") else d.dim_param for d in value_info.type.tensor_type.shape.dim
    ]


@pytest.mark.parametrize("num_items", [5, 8])
@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_dynamic_export_matches_pytorch_on_fresh_states(
    tmp_path: Path, architecture: str, num_items: int
) -> None:
    network = make_network(architecture, num_items, seed=num_items)
    exported = convert_to_onnx(network, tmp_path / "model.onnx", opset_version=17)

    assert exported.batch_size is None and exported.opset_version == 17
    proto = onnx.load(str(exported.path))
    assert [i.name for i in proto.graph.input] == ["state_vector"]
    assert dims(proto.graph.input[0]) == ["batch", state_dim(num_items)]
    outputs = {o.name: dims(o) for o in proto.graph.output}
    expected = {"trading_matrix": ["batch", num_items * num_items], "state_value": ["batch", 1]}
    assert outputs == {name: expected[name] for name in ARCHITECTURES[architecture].output_names}
    session = ort.InferenceSession(str(exported.path), providers=["CPUExecutionProvider"])
    for batch in (1, 37):
        states = realistic_states(np.random.default_rng(batch + 1000), batch, num_items)
        got = session.run(None, {"state_vector": states})
        for value, (name, reference) in zip(got, torch_outputs(network, states).items(), strict=True):
            assert value.shape == reference.shape, name
            np.testing.assert_allclose(value, reference, atol=1e-5, rtol=0)


def test_file_is_self_contained_and_the_written_opset_is_reported(tmp_path: Path) -> None:
    network = make_network("ActorCriticNetwork", 5)
    exported = convert_to_onnx(network, tmp_path / "m.onnx", opset_version=13)

    assert exported.opset_version == 13
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]  # no external data, no temp file left
    proto = onnx.load(str(exported.path), load_external_data=False)
    assert all(t.data_location == onnx.TensorProto.DEFAULT for t in proto.graph.initializer)
    assert len(proto.graph.initializer) == len(network.state_dict())


def test_static_export_has_a_fixed_batch(tmp_path: Path) -> None:
    network = make_network("TradingNetwork", 5)
    exported = export_static(network, tmp_path / "s.onnx", batch_size=4, opset_version=17)

    assert exported.batch_size == 4
    proto = onnx.load(str(exported.path))
    assert dims(proto.graph.input[0]) == [4, 61]
    assert dims(proto.graph.output[0]) == [4, 25]
    session = ort.InferenceSession(str(exported.path), providers=["CPUExecutionProvider"])
    with pytest.raises(Exception, match=r"[Ii]nvalid dimensions|Got: 2"):
        session.run(None, {"state_vector": np.zeros((2, 61), np.float32)})
    with pytest.raises(ValueError, match="batch size"):
        export_static(network, tmp_path / "zero.onnx", batch_size=0)
