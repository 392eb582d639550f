"""Population packs: N agents with distinct weights in one static-shape ONNX graph, one call per tick.

Input ``state_vector`` [N*B, D] holds B consecutive rows per agent (agent i owns rows i*B .. i*B+B-1 and
is evaluated with its own weights); output ``trading_matrix`` [N*B, n^2] in the same row order.

Two equivalent formulations of the same MLP (ReLU hidden layers, head -> softplus + 0.1):

* ``"matmul"``: states as [N, B, D] times stacked weights [N, D, H] (3-D batched MatMul). For CPU.
* ``"conv"``: agents as channel groups, ``Conv(kernel 1x1, group=N)`` over [1, N*D, B, 1]. For QNN HTP,
  where the batched-MatMul form returned wrong results in fp16 and grouped Conv matched (DESIGN.md).

Weights are numpy arrays in PyTorch ``nn.Linear`` layout (``weight`` [out, in], ``bias`` [out]), so a
pack can be built both from checkpoints (conversion) and from already-converted fp32 ONNX files (runtime,
no torch) via :func:`extract_trading_weights`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import onnx
from onnx import helper, numpy_helper

PackForm = Literal["matmul", "conv"]
Weights = Sequence[npt.NDArray[np.floating]]

POLICY_FLOOR = 0.1  # TradingNetwork's output is softplus(head) + 0.1
INPUT_NAME = "state_vector"
OUTPUT_NAME = "trading_matrix"
OPSET = 17
IR_VERSION = 10  # readable by every ONNX Runtime >= 1.17
META_PREFIX = "blockmarket.pack."


class PackError(ValueError):
    """Weights that cannot be packed (wrong architecture, mismatched shapes, empty population)."""


def extract_trading_weights(onnx_path: str | Path) -> list[npt.NDArray[np.float32]]:
    """[W1, b1, ..., W_head, b_head] of a fp32 TradingNetwork ONNX file, in nn.Linear layout.

    The graph must be Gemm (+ReLU) layers ending in Gemm -> Softplus -> Add 0.1; anything else (a
    ValueNetwork, a quantized or fp16 variant, a context model) is refused with the file named.
    """
    path = Path(onnx_path)
    model = onnx.load(str(path))
    graph = model.graph
    consts = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            consts[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    ops = [node for node in graph.node if node.op_type not in ("Constant", "Identity")]
    kinds = [node.op_type for node in ops]
    layers = (len(kinds) - 1) // 2
    expected = ["Gemm", "Relu"] * (layers - 1) + ["Gemm", "Softplus", "Add"]
    if kinds != expected:
        raise PackError(f"{path}: not a fp32 TradingNetwork graph (ops {kinds}, expected {expected})")
    weights: list[npt.NDArray[np.float32]] = []
    for node in ops:
        if node.op_type == "Gemm":
            weights += _gemm_weights(path, node, consts)
    floor = [consts[name] for name in ops[-1].input if name in consts]
    if len(floor) != 1 or not np.allclose(floor[0], POLICY_FLOOR):
        raise PackError(f"{path}: output is not softplus(x) + {POLICY_FLOOR}")
    return weights


def _gemm_weights(
    path: Path, node: onnx.NodeProto, consts: dict[str, np.ndarray]
) -> list[npt.NDArray[np.float32]]:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
        raise PackError(f"{path}: Gemm {node.name} is not a plain Linear layer ({attrs})")
    if len(node.input) != 3 or node.input[1] not in consts or node.input[2] not in consts:
        raise PackError(f"{path}: Gemm {node.name} has no constant weight and bias")
    if consts[node.input[1]].dtype != np.float32:
        raise PackError(
            f"{path}: weights are {consts[node.input[1]].dtype}; packs are built from fp32 models"
        )
    weight = consts[node.input[1]] if attrs.get("transB", 0) else consts[node.input[1]].T
    return [np.ascontiguousarray(weight, dtype=np.float32), consts[node.input[2]].astype(np.float32)]


def _check_population(weight_sets: Sequence[Weights]) -> list[tuple[int, int]]:
    """All agents share one architecture; returns the (out, in) shape of each layer."""
    if not weight_sets:
        raise PackError("a population pack needs at least one agent")
    first = weight_sets[0]
    if len(first) < 2 or len(first) % 2:
        raise PackError(f"agent 0: expected [weight, bias] pairs, got {len(first)} arrays")
    shapes = [(int(w.shape[0]), int(w.shape[1])) for w in first[::2]]
    for layer, (out_dim, in_dim) in enumerate(shapes[1:], start=1):
        if in_dim != shapes[layer - 1][0]:
            raise PackError(
                f"agent 0: layer {layer} takes {in_dim} inputs but layer {layer - 1} gives {out_dim}"
            )
    for agent, weights in enumerate(weight_sets):
        got = [tuple(np.shape(w)) for w in weights]
        want = [s for out_dim, in_dim in shapes for s in ((out_dim, in_dim), (out_dim,))]
        if got != want:
            raise PackError(f"agent {agent}: weight shapes {got} differ from agent 0's {want}")
    return shapes


def build_pack(
    weight_sets: Sequence[Weights],
    *,
    form: PackForm,
    batch_per_agent: int = 1,
    dtype: type[np.floating] = np.float32,
) -> onnx.ModelProto:
    """One static-shape graph evaluating agent i's network on its own B rows, for all N agents at once."""
    if form not in _FORMS:
        raise PackError(f"unknown pack form {form!r} (use {' or '.join(map(repr, _FORMS))})")
    if batch_per_agent < 1:
        raise PackError(f"batch_per_agent must be >= 1, got {batch_per_agent}")
    shapes = _check_population(weight_sets)
    agents, batch = len(weight_sets), batch_per_agent
    in_dim, out_dim = shapes[0][1], shapes[-1][0]
    builder = _GraphBuilder(np.dtype(dtype))
    stacked = [np.stack([np.asarray(w[i]) for w in weight_sets]) for i in range(len(weight_sets[0]))]
    _FORMS[form](builder, stacked, shapes, batch)
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    graph = helper.make_graph(
        builder.nodes,
        f"population_pack_{form}_{agents}x{batch}",
        [helper.make_tensor_value_info(INPUT_NAME, elem, [agents * batch, in_dim])],
        [helper.make_tensor_value_info(OUTPUT_NAME, elem, [agents * batch, out_dim])],
        initializer=builder.initializers,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="blockmarket.pack"
    )
    model.ir_version = IR_VERSION
    helper.set_model_props(
        model,
        {
            f"{META_PREFIX}agents": str(agents),
            f"{META_PREFIX}form": form,
            f"{META_PREFIX}batch_per_agent": str(batch),
        },
    )
    onnx.checker.check_model(model)
    return model


def _matmul_graph(
    builder: _GraphBuilder, stacked: list[np.ndarray], shapes: list[tuple[int, int]], batch: int
) -> None:
    """[N, B, D] @ [N, D, H] per layer: 3-D batched MatMul (exact on CPU, wrong on HTP fp16)."""
    agents, in_dim, out_dim = len(stacked[0]), shapes[0][1], shapes[-1][0]
    hidden = builder.reshape(INPUT_NAME, (agents, batch, in_dim))
    for layer in range(len(shapes)):
        weight = builder.const(f"w{layer}", stacked[2 * layer].transpose(0, 2, 1))  # [N, in, out]
        bias = builder.const(f"b{layer}", stacked[2 * layer + 1][:, None, :])  # [N, 1, out]
        hidden = builder.node("Add", [builder.node("MatMul", [hidden, weight]), bias])
        hidden = _activation(builder, hidden, last=layer == len(shapes) - 1)
    builder.reshape(hidden, (agents * batch, out_dim), output=OUTPUT_NAME)


def _conv_graph(
    builder: _GraphBuilder, stacked: list[np.ndarray], shapes: list[tuple[int, int]], batch: int
) -> None:
    """Agents as channel groups of [1, N*D, B, 1], one grouped 1x1 Conv per layer (matches on HTP)."""
    agents, in_dim, out_dim = len(stacked[0]), shapes[0][1], shapes[-1][0]
    hidden = builder.reshape(INPUT_NAME, (agents, batch, in_dim))
    if batch > 1:
        hidden = builder.node("Transpose", [hidden], perm=[0, 2, 1])  # [N, D, B]
    hidden = builder.reshape(hidden, (1, agents * in_dim, batch, 1))
    for layer, (out_features, in_features) in enumerate(shapes):
        kernel = stacked[2 * layer].reshape(agents * out_features, in_features, 1, 1)
        weight = builder.const(f"w{layer}", kernel)
        bias = builder.const(f"b{layer}", stacked[2 * layer + 1].reshape(agents * out_features))
        hidden = builder.node("Conv", [hidden, weight, bias], group=agents, kernel_shape=[1, 1])
        hidden = _activation(builder, hidden, last=layer == len(shapes) - 1)
    hidden = builder.reshape(hidden, (agents, out_dim, batch))
    if batch > 1:
        hidden = builder.node("Transpose", [hidden], perm=[0, 2, 1])  # [N, B, n^2]
    builder.reshape(hidden, (agents * batch, out_dim), output=OUTPUT_NAME)


def _activation(builder: _GraphBuilder, value: str, *, last: bool) -> str:
    """ReLU between layers; softplus + 0.1 after the head (the TradingNetwork output)."""
    if not last:
        return builder.node("Relu", [value])
    return builder.node(
        "Add", [builder.node("Softplus", [value]), builder.const("floor", np.array(POLICY_FLOOR))]
    )


class _GraphBuilder:
    """Accumulates nodes and initializers with unique names."""

    def __init__(self, dtype: np.dtype) -> None:
        self.dtype = dtype
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def const(self, name: str, value: npt.ArrayLike, dtype: np.dtype | None = None) -> str:
        array = np.asarray(value, dtype=dtype or self.dtype)
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], output: str | None = None, **attrs: Any) -> str:
        name = f"{op.lower()}_{len(self.nodes)}"
        out = output or f"{name}_out"
        self.nodes.append(helper.make_node(op, inputs, [out], name=name, **attrs))
        return out

    def reshape(self, value: str, shape: tuple[int, ...], output: str | None = None) -> str:
        target = self.const(f"shape_{len(self.initializers)}", np.array(shape), dtype=np.dtype(np.int64))
        return self.node("Reshape", [value, target], output=output)


_FORMS: dict[str, Callable[[_GraphBuilder, list[np.ndarray], list[tuple[int, int]], int], None]] = {
    "matmul": _matmul_graph,
    "conv": _conv_graph,
}


def pack_metadata(model: onnx.ModelProto) -> dict[str, str]:
    """The pack's agents / form / batch_per_agent (empty for a model that is not a pack)."""
    return {
        prop.key.removeprefix(META_PREFIX): prop.value
        for prop in model.metadata_props
        if prop.key.startswith(META_PREFIX)
    }


def save_pack(model: onnx.ModelProto, path: str | Path) -> Path:
    """Write atomically (the runtime may be loading packs from the same directory)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp")
    onnx.save_model(model, str(tmp))
    tmp.replace(target)
    return target
