"""Fixtures for the serving tests: small TradingNetwork-shaped ONNX models written with onnx.helper.

The models have the converter's layout (Gemm/Relu layers, head -> Softplus + 0.1, input `state_vector`,
output `trading_matrix`) and a `<key>_metadata.json` next to them, so the runtime serves them exactly as
converted checkpoints, without torch.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from runtime.state import state_dim

ITEMS = ("diamond", "gold", "apple", "emerald", "redstone")
Weights = list[npt.NDArray[np.float32]]


def trading_weights(seed: int, num_items: int = len(ITEMS), hidden: int = 16, layers: int = 3) -> Weights:
    """[W, b] per layer in nn.Linear layout (W [out, in]); the head gives n^2 outputs."""
    rng = np.random.default_rng(seed)
    dims = [state_dim(num_items), *([hidden] * layers), num_items * num_items]
    weights: Weights = []
    for fan_in, fan_out in itertools.pairwise(dims):
        weights.append((rng.standard_normal((fan_out, fan_in)) / np.sqrt(fan_in)).astype(np.float32))
        weights.append((0.1 * rng.standard_normal(fan_out)).astype(np.float32))
    return weights


def reference_forward(weights: Weights, states: np.ndarray) -> np.ndarray:
    """The TradingNetwork forward pass in float64 numpy: ReLU MLP, softplus(head) + 0.1."""
    hidden = states.astype(np.float64)
    for layer in range(0, len(weights), 2):
        hidden = hidden @ weights[layer].T.astype(np.float64) + weights[layer + 1]
        if layer + 2 < len(weights):
            hidden = np.maximum(hidden, 0.0)
    return np.logaddexp(0.0, hidden) + 0.1


def trading_model(weights: Weights, batch: int | str = "batch") -> onnx.ModelProto:
    """The ONNX graph the converter exports for a TradingNetwork (dynamic or static batch)."""
    nodes, inits = [], []
    value = "state_vector"
    layers = len(weights) // 2
    for layer in range(layers):
        w, b = f"w{layer}", f"b{layer}"
        inits += [
            numpy_helper.from_array(weights[2 * layer], w),
            numpy_helper.from_array(weights[2 * layer + 1], b),
        ]
        nodes.append(helper.make_node("Gemm", [value, w, b], [f"gemm{layer}"], transB=1))
        value = f"gemm{layer}"
        if layer < layers - 1:
            nodes.append(helper.make_node("Relu", [value], [f"relu{layer}"]))
            value = f"relu{layer}"
    inits.append(numpy_helper.from_array(np.array(0.1, dtype=np.float32), "floor"))
    nodes.append(helper.make_node("Softplus", [value], ["softplus"]))
    nodes.append(helper.make_node("Add", ["softplus", "floor"], ["trading_matrix"]))
    graph = helper.make_graph(
        nodes,
        "trading_network",
        [helper.make_tensor_value_info("state_vector", TensorProto.FLOAT, [batch, weights[0].shape[1]])],
        [helper.make_tensor_value_info("trading_matrix", TensorProto.FLOAT, [batch, weights[-1].shape[0]])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.checker.check_model(model)
    return model


def write_model(
    model_dir: Path,
    key: str,
    weights: Weights,
    *,
    items: tuple[str, ...] = ITEMS,
    desired_item: str | None = None,
    agent_id: str | None = None,
    variants: Sequence[tuple[int, Weights]] = (),
) -> Path:
    """`<key>.onnx` + `<key>_metadata.json` as the converter writes them; returns the metadata path."""
    model_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = model_dir / f"{key}.onnx"
    onnx.save_model(trading_model(weights), str(onnx_path))
    variant_info = []
    for batch, variant_weights in variants:
        name = f"{key}_fp32_b{batch}.onnx"
        onnx.save_model(trading_model(variant_weights, batch=batch), str(model_dir / name))
        variant_info.append({"onnx_path": name, "precision": "fp32", "batch_size": batch})
    n = len(items)
    meta = {
        "model_info": {
            "onnx_path": onnx_path.name,
            "model_type": "TradingNetwork",
            "input_dim": state_dim(n),
            "output_dim": n * n,
            "items_list": list(items),
            "hidden_dim": int(weights[0].shape[0]),
        },
        "agent_info": {"agent_id": agent_id, "desired_item": desired_item},
        "npu_optimization": {"variants": variant_info},
        "conversion_info": {"onnx_sha256": hashlib.sha256(onnx_path.read_bytes()).hexdigest()},
    }
    path = model_dir / f"{key}_metadata.json"
    path.write_text(json.dumps(meta), encoding="utf-8")
    return path


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    """Three converted models m0..m2 (desired items gold, none, apple)."""
    directory = tmp_path / "onnx"
    for i, desired in enumerate(("gold", None, "apple")):
        write_model(directory, f"m{i}", trading_weights(i), desired_item=desired, agent_id=f"ckpt-{i}")
    return directory
