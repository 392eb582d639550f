"""The one pack check: a population pack's rows against their reference, allclose-style.

The runtime compares every model's rows with that model's fp32 forward before a pack serves
(runtime/units.py, :func:`references`); the converter compares every agent's rows with its own PyTorch
network (conversion/pack_validation.py). Both judge with :func:`row_errors`, under the contract's
tolerances (blockmarket/core/contract.py).
"""

from __future__ import annotations

import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from blockmarket.core.contract import OUTPUT_FLOOR, TOLERANCES, Tolerance

Errors = npt.NDArray[np.float64]


def row_errors(
    actual: npt.ArrayLike, reference: npt.ArrayLike, tolerance: Tolerance
) -> tuple[Errors, Errors]:
    """Absolute errors (a non-finite one counts as infinite) and how far each exceeds
    ``atol + rtol * |reference|``: a pack passes where no excess is above 0."""
    ref = np.asarray(reference, dtype=np.float64)
    diff = np.abs(np.asarray(actual, dtype=np.float64) - ref)
    diff[~np.isfinite(diff)] = np.inf
    return diff, diff - (tolerance.atol + tolerance.rtol * np.abs(ref))


def alone_on_cpu(model: Path, states: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """The model's outputs run alone on one CPU thread (:func:`references` checks its numpy forward with
    it). The runtime has its pack builder process compute it, since creating a session for a large model
    takes the serving process's GIL for tens of milliseconds at a time (seen as 50-190 ms event-loop
    stalls with a 200 MB model)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {session.get_inputs()[0].name: states})[0])


class ReferenceMismatch(ValueError):
    """The numpy forward of a model disagrees with ONNX Runtime running that model: no pack check on it."""


ALONE_SAMPLE = 32  # models of a pack also run alone in ONNX Runtime: the check of the numpy forward itself


def forward_fp32(
    weights: Sequence[npt.NDArray[np.float32]], states: npt.NDArray[np.float32]
) -> npt.NDArray[np.float32]:
    """The TradingNetwork's forward in numpy fp32: ReLU hidden layers, then softplus(head) + OUTPUT_FLOOR
    (``weights`` in nn.Linear layout, as :func:`extract_trading_weights` gives them)."""
    hidden = np.asarray(states, dtype=np.float32)
    for layer in range(0, len(weights) - 2, 2):
        hidden = np.maximum(hidden @ weights[layer].T + weights[layer + 1], np.float32(0))
    head = hidden @ weights[-2].T + weights[-1]
    return (np.logaddexp(np.float32(0), head) + np.float32(OUTPUT_FLOOR)).astype(np.float32)


def references(
    models: Sequence[tuple[Path, npt.NDArray[np.float32]]], sample: int = ALONE_SAMPLE
) -> list[npt.NDArray[np.float32]]:
    """Each (model, states)'s reference outputs: :func:`forward_fp32` of the weights in the model's file.

    A pack only holds TradingNetwork graphs, which :func:`extract_trading_weights` checks op by op, so
    that forward computes what the file computes. ``sample`` of the models, spread evenly over the list,
    are also run alone in ONNX Runtime and must agree with it within fp32 tolerance: a check of the numpy
    forward on this machine. One session per model was the reference before; at 10,000 models creating
    them took 14-20 s of a start, reading the weights takes a few.
    """
    from blockmarket.models.pack import extract_trading_weights  # onnx: only in the builder process

    picked = set(np.linspace(0, len(models) - 1, min(sample, len(models))).round().astype(int).tolist())
    out = []
    for index, (model, states) in enumerate(models):
        reference = forward_fp32(extract_trading_weights(model), states)
        if index in picked:
            error, excess = row_errors(reference, alone_on_cpu(model, states), TOLERANCES["fp32"])
            if (excess > 0).any():
                raise ReferenceMismatch(
                    f"{model}: its numpy fp32 forward differs from the model run alone in ONNX Runtime "
                    f"(max abs error {float(error.max()):.3g}); the pack check cannot trust it"
                )
        out.append(reference)
    return out


def cpu_features() -> set[str]:
    """The CPU's feature flags as the OS lists them (Linux /proc/cpuinfo: x86 "flags", ARM "Features");
    empty elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    present: set[str] = set()
    for line in text.splitlines():
        if line.startswith(("flags", "Features")):
            present.update(line.split(":", 1)[1].split())
    return present


def kernel_fingerprint() -> dict[str, Any]:
    """What decides which ONNX Runtime kernels compute a pack on this machine (and so its int8
    arithmetic): the ORT version, the OS and architecture, and the CPU's feature flags where the OS lists
    them (Linux). A pack checked under one fingerprint is not taken as checked under another."""
    return {
        "onnxruntime": ort.__version__,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_flags": " ".join(sorted(cpu_features())),
    }
