"""Assembling an ONNX graph in place: nodes with unique names, initializers written once (population packs,
blockmarket.models.pack)."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import helper

from blockmarket.core.contract import MODELS_INPUT


class GraphBuilder:
    """Appends nodes with unique names to a graph (the model's, or an If branch's), and initializers,
    each written once, to the model's graph (a branch reads its enclosing graph's initializers)."""

    def __init__(
        self,
        graph: onnx.GraphProto,
        dtype: np.dtype,
        selectable: bool = False,
        *,
        model_graph: onnx.GraphProto | None = None,
        prefix: str = "",
        gather: bool = False,
    ) -> None:
        self.graph = graph
        self.dtype = dtype
        self.selectable = selectable
        self.model_graph = model_graph if model_graph is not None else graph
        self.prefix = prefix
        self.gather = gather

    def branch(self, prefix: str, *, gather: bool) -> GraphBuilder:
        """A builder of an If branch: its own nodes, this model's initializers; ``gather``: :meth:`pick`
        selects the ``models`` input's weight sets."""
        graph = onnx.GraphProto(name=f"{prefix}models")
        return GraphBuilder(
            graph, self.dtype, self.selectable, model_graph=self.model_graph, prefix=prefix, gather=gather
        )

    def subgraph(self, output: str, width: int) -> onnx.GraphProto:
        """This branch's graph, ``output`` [rows, width] its result."""
        elem = helper.np_dtype_to_tensor_dtype(self.dtype)
        self.graph.output.append(helper.make_tensor_value_info(output, elem, ["rows", width]))
        return self.graph

    def pick(self, name: str) -> str:
        """A stacked per-agent parameter [N, ...]: whole, or (a gathering branch) the ``models``' rows."""
        return self.node("Gather", [name, MODELS_INPUT], axis=0) if self.gather else name

    def const(self, name: str, value: npt.ArrayLike, dtype: np.dtype | None = None) -> str:
        """An initializer whose raw bytes are written once (little-endian, as every target is); a name
        already written is the same constant (both branches of a selectable pack ask for it)."""
        initializers = self.model_graph.initializer
        if any(init.name == name for init in initializers):
            return name
        array = np.ascontiguousarray(value, dtype=dtype or self.dtype)
        tensor = initializers.add()
        tensor.name = name
        tensor.data_type = helper.np_dtype_to_tensor_dtype(array.dtype)
        tensor.dims.extend(array.shape)
        tensor.raw_data = array.tobytes()
        return name

    def node(self, op: str, inputs: list[str], output: str | None = None, **attrs: Any) -> str:
        name = f"{self.prefix}{op.lower()}_{len(self.graph.node)}"
        out = output or f"{name}_out"
        self.graph.node.append(helper.make_node(op, inputs, [out], name=name, **attrs))
        return out

    def reshape(self, value: str, shape: tuple[int, ...], output: str | None = None) -> str:
        count = len(self.model_graph.initializer)
        target = self.const(f"shape_{count}", np.array(shape), dtype=np.dtype(np.int64))
        return self.node("Reshape", [value, target], output=output)
