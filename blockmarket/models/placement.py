"""Where ONNX Runtime put a model's nodes (read from ORT's own graph assignment report), and the names
of the execution providers."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

QNN_EP = "QNNExecutionProvider"
CPU_EP = "CPUExecutionProvider"

ContextState = Literal["off", "loaded", "built"]


@dataclass(frozen=True)
class Placement:
    """Where ONNX Runtime put a model's nodes, and why it is not (fully) on the NPU if it is not."""

    model: Path
    nodes: Mapping[str, int]  # execution provider -> number of nodes assigned to it
    cpu_ops: tuple[str, ...] = ()  # op types of the nodes that landed on CPU (empty when all on QNN)
    reason: str = ""  # why the model is (partly) on CPU; empty when fully on the NPU
    context: ContextState = "off"
    source_nodes: int | None = None  # nodes of the source model, when a context binary replaced them

    @property
    def provider(self) -> str:
        """The EP running the model: QNN, CPU, or both joined with '+' for a split graph."""
        return "+".join(ep for ep in (QNN_EP, CPU_EP) if self.nodes.get(ep)) or CPU_EP

    @property
    def on_npu(self) -> bool:
        """True when every node runs on QNN (no CPU fallback at all)."""
        return self.nodes.get(QNN_EP, 0) > 0 and sum(self.nodes.values()) == self.nodes[QNN_EP]

    def describe(self) -> str:
        """One log line: `file: EP (q/t nodes on QNN, c on CPU) [context] [reason]`."""
        total = sum(self.nodes.values())
        text = (
            f"{self.model.name}: {self.provider} ({self.nodes.get(QNN_EP, 0)}/{total} nodes on QNN, "
            f"{self.nodes.get(CPU_EP, 0)} on CPU)"
        )
        if self.context != "off":
            compiled = f", {self.source_nodes} source nodes" if self.source_nodes is not None else ""
            text += f" [context binary {self.context}{compiled}]"
        if self.cpu_ops:
            text += f" CPU ops: {', '.join(sorted(set(self.cpu_ops)))}"
        if self.reason:
            text += f" — {self.reason}"
        return text

    def as_dict(self) -> dict[str, Any]:
        """JSON-able form for metadata files and status reports."""
        return {
            "model": str(self.model),
            "provider": self.provider,
            "on_npu": self.on_npu,
            "nodes": dict(self.nodes),
            "cpu_ops": sorted(set(self.cpu_ops)),
            "reason": self.reason,
            "context": self.context,
        }
