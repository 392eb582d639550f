"""Population packs: N agents with distinct weights in one static-shape ONNX graph, one call per tick.

Input ``state_vector`` [N*B, D] holds B consecutive rows per agent (agent i owns rows i*B .. i*B+B-1 and
is evaluated with its own weights); output ``trading_matrix`` [N*B, n^2] in the same row order.

Two equivalent formulations of the same MLP (ReLU hidden layers, head -> softplus + 0.1):

* ``"matmul"``: states as [N, B, D] times stacked weights [N, D, H] (3-D batched MatMul). For CPU.
* ``"conv"``: agents as channel groups, ``Conv(kernel 1x1, group=N)`` over [1, N*D, B, 1]. For QNN HTP,
  where the batched-MatMul form returned wrong results in fp16 and grouped Conv matched (docs/npu.md).
* ``"matmul_int8"``: the matmul form with int8 weights (7-bit range, see :data:`WEIGHT_LEVELS`) and one
  fp32 scale per agent and output channel, multiplied as int8 by ONNX Runtime's ``MatMulInteger``; each
  input row is quantized to uint8 with its own scale (its peak / 255), so a row's result never depends
  on the other rows of the call. For CPU at large N, where a tick is bound by reading every agent's
  weights: 4x fewer bytes.

Weights are numpy arrays in PyTorch ``nn.Linear`` layout (``weight`` [out, in], ``bias`` [out]), so a
pack can be built both from checkpoints (conversion) and from already-converted fp32 ONNX files (runtime,
no torch) via :func:`extract_trading_weights`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt
import onnx
from onnx import helper, numpy_helper

from blockmarket.core.contract import INPUT_NAME, MATRIX_OUTPUT, MODELS_INPUT, OUTPUT_FLOOR
from blockmarket.core.files import atomic_target
from blockmarket.models.graph import GraphBuilder

PackForm = Literal["matmul", "conv", "matmul_int8"]
Weights = Sequence[npt.NDArray[np.floating]]

OPSET = 17
# Weights use 7 of int8's bits (-63..63, ORT's `reduce_range`). ONNX Runtime's u8s8 kernels on x86 CPUs
# without VNNI (AVX2, AVX-512BW) multiply uint8 activations by int8 weights with VPMADDUBSW, which adds
# each pair of products into a saturating int16: 2 * 255 * 127 overflows it, 2 * 255 * 63 cannot. With 8-bit
# weights the pack was off by up to 0.4 on such CPUs (AMD EPYC, AVX2 only) while exact on VNNI and ARM64;
# 7-bit weights give the same result on every ISA, measured within 0.36 of the tolerance (docs/npu.md).
WEIGHT_LEVELS = 63
UINT8_MAX = 255  # activation levels: every input is >= 0 (state features and ReLU outputs)
IR_VERSION = 10  # readable by every ONNX Runtime >= 1.17
META_PREFIX = "blockmarket.pack."
SELECTABLE_FORMS = ("matmul", "matmul_int8")


class PackError(ValueError):
    """Weights that cannot be packed (wrong architecture, mismatched shapes, empty population)."""


def extract_trading_weights(
    onnx_path: str | Path, content: bytes | None = None
) -> list[npt.NDArray[np.float32]]:
    """[W1, b1, ..., W_head, b_head] of a fp32 TradingNetwork ONNX file (or of its ``content``, already
    read), in nn.Linear layout.

    The graph must be Gemm (+ReLU) layers ending in Gemm -> Softplus -> Add 0.1; anything else (a
    ValueNetwork, a quantized or fp16 variant, a context model) is refused with the file named.
    """
    path = Path(onnx_path)
    model = onnx.load(str(path)) if content is None else onnx.load_model_from_string(content)
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
    if len(floor) != 1 or not np.allclose(floor[0], OUTPUT_FLOOR):
        raise PackError(f"{path}: output is not softplus(x) + {OUTPUT_FLOOR}")
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
    selectable: bool = False,
) -> onnx.ModelProto:
    """One static-shape graph evaluating agent i's network on its own B rows, for all N agents at once.

    The model is assembled in place: each stacked weight goes once into its initializer's raw bytes, so a
    10,000-agent pack costs about one extra copy of the weights (no make_graph / make_model / checker
    copies). :func:`save_pack` checks the written file.
    """
    if form not in _FORMS:
        raise PackError(f"unknown pack form {form!r} (use {' or '.join(map(repr, _FORMS))})")
    if batch_per_agent < 1:
        raise PackError(f"batch_per_agent must be >= 1, got {batch_per_agent}")
    if form == "matmul_int8" and np.dtype(dtype) != np.float32:
        raise PackError(f"the matmul_int8 form computes in float32, not {np.dtype(dtype)}")
    shapes = _check_population(weight_sets)
    agents, batch = len(weight_sets), batch_per_agent
    in_dim, out_dim = shapes[0][1], shapes[-1][0]
    model = onnx.ModelProto(ir_version=IR_VERSION, producer_name="blockmarket.pack")
    model.opset_import.append(helper.make_opsetid("", OPSET))
    graph = model.graph
    graph.name = f"population_pack_{form}_{agents}x{batch}"
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    if selectable and form not in SELECTABLE_FORMS:
        raise PackError(f"a {form} pack has static shapes; selectable ones: {', '.join(SELECTABLE_FORMS)}")
    rows: int | str = "rows" if selectable else agents * batch
    graph.input.append(helper.make_tensor_value_info(INPUT_NAME, elem, [rows, in_dim]))
    if selectable:
        graph.input.append(helper.make_tensor_value_info(MODELS_INPUT, onnx.TensorProto.INT64, ["models"]))
    graph.output.append(helper.make_tensor_value_info(MATRIX_OUTPUT, elem, [rows, out_dim]))
    _FORMS[form](GraphBuilder(graph, np.dtype(dtype), selectable), weight_sets, shapes, batch)
    helper.set_model_props(
        model,
        {
            f"{META_PREFIX}agents": str(agents),
            f"{META_PREFIX}form": form,
            f"{META_PREFIX}batch_per_agent": str(batch),
            **({f"{META_PREFIX}selectable": MODELS_INPUT} if selectable else {}),
        },
    )
    return model


def _stacked(
    weight_sets: Sequence[Weights], index: int, dtype: np.dtype, *, transpose: bool = False
) -> np.ndarray:
    """Parameter ``index`` of every agent as one contiguous [N, ...] array, written in place once."""
    first = np.shape(weight_sets[0][index])
    out = np.empty((len(weight_sets), *(first[::-1] if transpose else first)), dtype=dtype)
    np.stack([np.asarray(w[index]).T if transpose else w[index] for w in weight_sets], out=out)
    return out


def _quantized(weight_sets: Sequence[Weights], index: int) -> tuple[np.ndarray, np.ndarray]:
    """Parameter ``index`` ([out, in] fp32) of every agent -> int8 [N, in, out] in -63..63 and scales
    [N, 1, out].

    Symmetric, one scale per agent and output channel: an agent's weights never share a scale with
    another agent's, so a small-valued agent keeps its full 8 bits. Done _QUANTIZE_CHUNK agents at a
    time, so that the temporaries stay in the CPU's cache and no fp32 copy of all agents' weights is
    made (at 10,000 agents, under cProfile: 4.9 s quantizing the stacked whole, 2.5 s in chunks).
    """
    agents = len(weight_sets)
    out_dim, in_dim = np.shape(weight_sets[0][index])
    levels = np.empty((agents, in_dim, out_dim), dtype=np.int8)
    scales = np.empty((agents, out_dim), dtype=np.float32)
    for start in range(0, agents, _QUANTIZE_CHUNK):
        chunk = _stacked(weight_sets[start : start + _QUANTIZE_CHUNK], index, np.dtype(np.float32))
        scale = np.abs(chunk).max(axis=2) / WEIGHT_LEVELS
        scale[scale == 0] = 1.0  # an all-zero channel stays all zero
        levels[start : start + _QUANTIZE_CHUNK] = np.rint(chunk / scale[:, :, None]).transpose(0, 2, 1)
        scales[start : start + _QUANTIZE_CHUNK] = scale
    return levels, scales[:, None, :]


_QUANTIZE_CHUNK = 64  # agents quantized at a time: 64 x 128 x 128 fp32 is 4 MB


def _matmul_graph(
    builder: GraphBuilder,
    weight_sets: Sequence[Weights],
    shapes: list[tuple[int, int]],
    batch: int,
    *,
    int8: bool = False,
) -> None:
    """[N, B, D] @ [N, D, H] per layer: 3-D batched MatMul (exact on CPU, wrong on HTP fp16).

    ``int8``: the weights are int8 with per-agent, per-channel scales, multiplied by MatMulInteger
    without ever being widened to fp32 in memory (:func:`_int8_product`).

    A selectable pack holds the same chain twice, over the same initializers, under an If on the size of
    its ``models`` input: all N -> the whole pack, as above; K < N -> each parameter's K selected weight
    sets gathered first, so the run reads and computes only those (its rows bit for bit the same: each
    weight set is multiplied on its own, with the same kernel).
    """
    agents = len(weight_sets)
    params = [_layer_params(builder, weight_sets, layer, int8) for layer in range(len(shapes))]
    if not builder.selectable:
        _matmul_chain(builder, params, shapes, batch, agents, output=MATRIX_OUTPUT)
        return
    every, some = builder.branch("every_", gather=False), builder.branch("some_", gather=True)
    branches = [
        branch.subgraph(_matmul_chain(branch, params, shapes, batch, rows), shapes[-1][0])
        for branch, rows in ((every, agents), (some, -1))
    ]
    count = builder.node("Shape", [MODELS_INPUT])
    every_model = builder.const("all_models", np.array([agents]), np.dtype(np.int64))
    whole = builder.node("Equal", [count, every_model])
    builder.node("If", [whole], output=MATRIX_OUTPUT, then_branch=branches[0], else_branch=branches[1])


def _layer_params(
    builder: GraphBuilder, weight_sets: Sequence[Weights], layer: int, int8: bool
) -> tuple[str, ...]:
    """One layer's stacked initializers: (weight [N, in, out], bias [N, 1, out]) or, int8, (int8 weight,
    its scales [N, 1, out], bias)."""
    bias = _stacked(weight_sets, 2 * layer + 1, builder.dtype)[:, None, :]
    if int8:
        weight, scale = _quantized(weight_sets, 2 * layer)
        return (
            builder.const(f"w{layer}", weight, weight.dtype),
            builder.const(f"s{layer}", scale),
            builder.const(f"b{layer}", bias),
        )
    weight = _stacked(weight_sets, 2 * layer, builder.dtype, transpose=True)
    return builder.const(f"w{layer}", weight), builder.const(f"b{layer}", bias)


def _matmul_chain(
    builder: GraphBuilder,
    params: Sequence[tuple[str, ...]],
    shapes: list[tuple[int, int]],
    batch: int,
    rows: int,
    output: str | None = None,
) -> str:
    """The layers over ``rows`` weight sets of B rows each (-1: as many as the input holds)."""
    hidden = builder.reshape(INPUT_NAME, (rows, batch, shapes[0][1]))
    for layer, names in enumerate(params):
        picked = [builder.pick(name) for name in names]
        if len(picked) == 3:
            product = _int8_product(builder, hidden, layer, picked[0], picked[1])
        else:
            product = builder.node("MatMul", [hidden, picked[0]])
        hidden = builder.node("Add", [product, picked[-1]])
        hidden = _activation(builder, hidden, last=layer == len(shapes) - 1)
    return builder.reshape(hidden, (rows * batch if rows > 0 else -1, shapes[-1][0]), output=output)


def _int8_product(builder: GraphBuilder, hidden: str, layer: int, weight: str, weight_scale: str) -> str:
    """``hidden`` [N, B, in] (every value >= 0) times the int8 ``weight`` [N, in, out], in fp32 [N, B, out].

    Each row is quantized to uint8 with its own scale, peak / 255, computed in the graph: unlike a
    per-call scale (DynamicQuantizeMatMul's), a row's rounding never depends on the other rows, so an
    agent's answer is the same whatever else shares the call, and a small-valued agent keeps its 8 bits
    next to a large one. The int32 products are rescaled by row scale x weight scale.
    """
    peak = builder.node("ReduceMax", [hidden], axes=[2], keepdims=1)  # opset 17: axes is an attribute
    peak = builder.node("Max", [peak, builder.const(f"tiny{layer}", np.array(np.finfo(np.float32).tiny))])
    row_scale = builder.node("Div", [peak, builder.const(f"levels{layer}", np.array(UINT8_MAX))])  # [N, B, 1]
    levels = builder.node("Round", [builder.node("Div", [hidden, row_scale])])
    bounds = [builder.const(f"lo{layer}", np.array(0.0)), builder.const(f"hi{layer}", np.array(UINT8_MAX))]
    levels = builder.node("Clip", [levels, *bounds])
    quantized = builder.node("Cast", [levels], to=onnx.TensorProto.UINT8)
    integer = builder.node("MatMulInteger", [quantized, weight])
    product = builder.node("Cast", [integer], to=onnx.TensorProto.FLOAT)
    product = builder.node("Mul", [product, row_scale])
    return builder.node("Mul", [product, weight_scale])


def _conv_graph(
    builder: GraphBuilder, weight_sets: Sequence[Weights], shapes: list[tuple[int, int]], batch: int
) -> None:
    """Agents as channel groups of [1, N*D, B, 1], one grouped 1x1 Conv per layer (matches on HTP)."""
    agents, in_dim, out_dim = len(weight_sets), shapes[0][1], shapes[-1][0]
    hidden = builder.reshape(INPUT_NAME, (agents, batch, in_dim))
    if batch > 1:
        hidden = builder.node("Transpose", [hidden], perm=[0, 2, 1])  # [N, D, B]
    hidden = builder.reshape(hidden, (1, agents * in_dim, batch, 1))
    for layer, (out_features, in_features) in enumerate(shapes):
        kernel = _stacked(weight_sets, 2 * layer, builder.dtype)
        weight = builder.const(f"w{layer}", kernel.reshape(agents * out_features, in_features, 1, 1))
        biases = _stacked(weight_sets, 2 * layer + 1, builder.dtype).reshape(agents * out_features)
        bias = builder.const(f"b{layer}", biases)
        hidden = builder.node("Conv", [hidden, weight, bias], group=agents, kernel_shape=[1, 1])
        hidden = _activation(builder, hidden, last=layer == len(shapes) - 1)
    hidden = builder.reshape(hidden, (agents, out_dim, batch))
    if batch > 1:
        hidden = builder.node("Transpose", [hidden], perm=[0, 2, 1])  # [N, B, n^2]
    builder.reshape(hidden, (agents * batch, out_dim), output=MATRIX_OUTPUT)


def _activation(builder: GraphBuilder, value: str, *, last: bool) -> str:
    """ReLU between layers; softplus + 0.1 after the head (the TradingNetwork output)."""
    if not last:
        return builder.node("Relu", [value])
    return builder.node(
        "Add", [builder.node("Softplus", [value]), builder.const("floor", np.array(OUTPUT_FLOOR))]
    )


_FORMS: dict[str, Callable[[GraphBuilder, Sequence[Weights], list[tuple[int, int]], int], None]] = {
    "matmul": _matmul_graph,
    "conv": _conv_graph,
    "matmul_int8": partial(_matmul_graph, int8=True),
}


def pack_metadata(model: onnx.ModelProto) -> dict[str, str]:
    """The pack's agents / form / batch_per_agent (empty for a model that is not a pack)."""
    return {
        prop.key.removeprefix(META_PREFIX): prop.value
        for prop in model.metadata_props
        if prop.key.startswith(META_PREFIX)
    }


def write_pack(
    sources: Sequence[tuple[Path, str]],
    path: Path,
    form: PackForm,
    batch_per_agent: int,
    selectable: bool = False,
) -> Path:
    """The pack of these fp32 model files, each of the version (start of its content's sha256) given,
    written to ``path``: what the serving process has a worker process do, since parsing, assembling,
    serializing and checking a large model hold the GIL (for 200 MB of weights 0.3-0.5 s each, in which
    its event loop could not run). A file whose content is not that version any more is refused."""
    weights = []
    for source, version in sources:
        content = source.read_bytes()
        found = hashlib.sha256(content).hexdigest()
        if not found.startswith(version):
            raise PackError(
                f"{source}: its content (sha256 {found[: len(version)]}) is no longer version {version}, "
                "which the pack was to hold"
            )
        weights.append(extract_trading_weights(source, content))
    pack = build_pack(weights, form=form, batch_per_agent=batch_per_agent, selectable=selectable)
    return save_pack(pack, path)


def save_pack(model: onnx.ModelProto, path: str | Path) -> Path:
    """Write atomically (the runtime may be loading packs from the same directory), checked on disk.

    The checker reads the file rather than the in-memory proto, which it would serialize once more.
    """
    target = Path(path)
    with atomic_target(target) as tmp:
        onnx.save_model(model, str(tmp))
        try:
            onnx.checker.check_model(str(tmp))
        except onnx.checker.ValidationError as exc:
            raise PackError(f"{target}: the pack is not a valid ONNX model: {exc}") from exc
    return target
