"""The one pack check: a population pack's rows against their reference, allclose-style.

The runtime compares every model's rows with that model run alone on CPU before a pack serves
(runtime/units.py); the converter compares every agent's rows with its own PyTorch network
(conversion/pack_validation.py). Both judge with :func:`row_errors`, under the contract's tolerances
(blockmarket/core/contract.py).
"""

from __future__ import annotations

import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from blockmarket.core.contract import Tolerance

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
    """The model's outputs run alone on one CPU thread: a pack's reference. The runtime has its pack
    builder process compute it, since creating a session for a large model takes the serving process's
    GIL for tens of milliseconds at a time (seen as 50-190 ms event-loop stalls with a 200 MB model)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {session.get_inputs()[0].name: states})[0])


def each_alone_on_cpu(
    models: Sequence[tuple[Path, npt.NDArray[np.float32]]],
) -> list[npt.NDArray[np.float32]]:
    """:func:`alone_on_cpu` for each (model, states): one call for a whole pack, so that the builder
    process is asked once rather than once per model (at 10,000 models: 19.8 s for the whole check,
    against 25.3 s with a round trip per model)."""
    return [alone_on_cpu(model, states) for model, states in models]


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
