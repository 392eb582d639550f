"""Proof that an exported model computes what the PyTorch network computes, on realistic agent states.

A model passes when ``onnx.checker`` accepts it and, for every output element,
``|actual - reference| <= atol + rtol * |reference|`` on at least ``validation_samples`` states from
:func:`blockmarket.core.state.realistic_states` (edge cases included). ``compare_outputs`` is
precision-agnostic so NPU variants (fp16, QDQ) reuse it with their own tolerances.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import torch
from google.protobuf.message import DecodeError
from torch import nn

from blockmarket.core.config import ConversionConfig
from blockmarket.core.contract import INPUT_NAME
from blockmarket.core.state import realistic_states
from conversion.networks import spec_of

Outputs = dict[str, npt.NDArray[np.float32]]


class ValidationError(ValueError):
    """An exported model does not reproduce its PyTorch network; the message names the file."""


@dataclass(frozen=True)
class ValidationReport:
    """Errors of one model against its reference; ``passed`` is the verdict under atol/rtol."""

    samples: int
    atol: float
    rtol: float
    max_abs_error: float
    max_rel_error: float
    passed: bool
    worst_output: str | None = None
    per_output: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        verdict = "passed" if self.passed else "FAILED"
        return (
            f"{verdict}: max abs error {self.max_abs_error:.3g}, max rel error {self.max_rel_error:.3g} "
            f"on {self.samples} states (atol {self.atol:g}, rtol {self.rtol:g})"
            + ("" if self.passed or self.worst_output is None else f", worst output '{self.worst_output}'")
        )


def compare_outputs(
    reference: Mapping[str, npt.NDArray[Any]],
    actual: Mapping[str, npt.NDArray[Any]],
    atol: float,
    rtol: float,
) -> ValidationReport:
    """Element-wise comparison of every reference output (allclose semantics, NaN never passes)."""
    missing = sorted(set(reference) - set(actual))
    if missing:
        raise ValueError(f"outputs missing from the model under test: {', '.join(missing)}")
    per_output: dict[str, dict[str, float]] = {}
    passed, samples = True, 0
    worst, worst_excess = None, -np.inf
    for name, ref_raw in reference.items():
        ref = np.asarray(ref_raw, dtype=np.float64)
        got = np.asarray(actual[name], dtype=np.float64)
        if got.shape != ref.shape:
            raise ValueError(f"output '{name}' has shape {got.shape}, reference {ref.shape}")
        samples = max(samples, ref.shape[0] if ref.ndim else 1)
        diff = np.abs(got - ref)
        diff[~np.isfinite(diff)] = np.inf
        excess = float(np.max(diff - (atol + rtol * np.abs(ref)), initial=-np.inf))
        per_output[name] = {
            "max_abs_error": float(diff.max(initial=0.0)),
            "max_rel_error": float(
                (diff / np.maximum(np.abs(ref), np.finfo(np.float32).tiny)).max(initial=0.0)
            ),
        }
        passed &= excess <= 0.0
        if excess > worst_excess:
            worst, worst_excess = name, excess
    return ValidationReport(
        samples=samples,
        atol=atol,
        rtol=rtol,
        max_abs_error=max((o["max_abs_error"] for o in per_output.values()), default=0.0),
        max_rel_error=max((o["max_rel_error"] for o in per_output.values()), default=0.0),
        passed=bool(passed),
        worst_output=worst,
        per_output=per_output,
    )


def validation_states(num_items: int, count: int, seed: int) -> npt.NDArray[np.float32]:
    """The states a model is validated on: realistic agent states with the edge cases first."""
    return realistic_states(np.random.default_rng(seed), count, num_items)


def torch_outputs(model: nn.Module, states: npt.NDArray[np.float32]) -> Outputs:
    """The reference: the PyTorch network's outputs by registry output name."""
    names = spec_of(model).architecture.output_names
    with torch.inference_mode():
        result = model.eval()(torch.from_numpy(np.ascontiguousarray(states, dtype=np.float32)))
    tensors = result if isinstance(result, tuple) else (result,)
    return {name: t.numpy() for name, t in zip(names, tensors, strict=True)}


def cpu_session(onnx_path: str | Path) -> ort.InferenceSession:
    """A plain CPU session (the reference runtime for fp32 models)."""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])


def session_outputs(
    session: ort.InferenceSession, states: npt.NDArray[np.float32], batch_size: int | None = None
) -> Outputs:
    """Run ``states`` through a session, in chunks of ``batch_size`` for a static-shape model
    (the last chunk is zero-padded and trimmed)."""
    names = [o.name for o in session.get_outputs()]
    input_name = session.get_inputs()[0].name
    if batch_size is None:
        return dict(zip(names, session.run(names, {input_name: states}), strict=True))
    count = states.shape[0]
    padded = np.zeros((-(-count // batch_size) * batch_size, states.shape[1]), dtype=np.float32)
    padded[:count] = states
    chunks = [
        session.run(names, {input_name: padded[i : i + batch_size]})
        for i in range(0, len(padded), batch_size)
    ]
    return {name: np.concatenate([c[k] for c in chunks])[:count] for k, name in enumerate(names)}


def check_model(onnx_path: str | Path) -> onnx.ModelProto:
    """onnx.checker with full shape inference; raises ValidationError naming the file."""
    try:
        model = onnx.load(str(onnx_path))
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, DecodeError, OSError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise ValidationError(f"{onnx_path}: invalid ONNX model ({first})") from None
    return model


def _input_batch(model: onnx.ModelProto) -> int | None:
    """The static batch size of a model's input (None when the batch axis is dynamic)."""
    dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    return int(dim.dim_value) if dim.HasField("dim_value") else None


def validate_onnx(model: nn.Module, onnx_path: str | Path, settings: ConversionConfig) -> ValidationReport:
    """Check an exported fp32 model and compare ONNX Runtime (CPU) with PyTorch on realistic states."""
    proto = check_model(onnx_path)
    spec = spec_of(model)
    graph_input = proto.graph.input[0]
    actual_dim = graph_input.type.tensor_type.shape.dim[1].dim_value
    if graph_input.name != INPUT_NAME or actual_dim != spec.input_dim:
        raise ValidationError(
            f"{onnx_path}: input is '{graph_input.name}' [*, {actual_dim}], the checkpoint's "
            f"{spec.architecture.name} needs '{INPUT_NAME}' [*, {spec.input_dim}]"
        )
    states = validation_states(spec.num_items, settings.validation_samples, settings.seed)
    return compare_outputs(
        torch_outputs(model, states),
        session_outputs(cpu_session(onnx_path), states, _input_batch(proto)),
        settings.atol,
        settings.rtol,
    )
