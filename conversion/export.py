"""PyTorch network -> one self-contained ONNX file (input `state_vector`, outputs from the registry).

The TorchScript exporter (``dynamo=False``) is used on purpose: it exports these small MLPs in ~0.15 s,
the torch.export-based one takes ~3 s per model, too slow for a directory of checkpoints.
Two shapes are produced: a dynamic batch axis (CPU serving, any population size) and a fixed batch size
(QNN needs static shapes; every node falls back to CPU on a dynamic axis).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from torch import nn

from blockmarket.core.contract import INPUT_NAME, OPSET
from blockmarket.core.files import atomic_target
from conversion.networks import spec_of

BATCH_AXIS = "batch"

DynamicAxes = Mapping[str, Mapping[int, str]]


@dataclass(frozen=True)
class ExportedModel:
    """What was actually written: the file, the opset read back from it, the I/O names, the batch."""

    path: Path
    opset_version: int
    input_name: str
    output_names: tuple[str, ...]
    batch_size: int | None  # None: dynamic batch axis


def batch_axes(output_names: tuple[str, ...]) -> dict[str, dict[int, str]]:
    """A dynamic batch axis on the input and on every output."""
    return {name: {0: BATCH_AXIS} for name in (INPUT_NAME, *output_names)}


def written_opset(model: onnx.ModelProto) -> int:
    """The default-domain opset a model declares (what runtimes will hold it to)."""
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    raise ValueError("the ONNX model declares no default-domain opset")


def convert_to_onnx(
    model: nn.Module,
    path: str | Path,
    opset_version: int = OPSET,
    dynamic_axes: DynamicAxes | bool = True,
    batch_size: int = 1,
) -> ExportedModel:
    """Export a registered network; ``dynamic_axes=True`` adds a batch axis, ``False`` keeps
    ``batch_size`` fixed. The file is written atomically and holds all weights inline."""
    spec = spec_of(model)
    output_names = spec.architecture.output_names
    axes: DynamicAxes | None
    if dynamic_axes is True:
        axes = batch_axes(output_names)
    elif dynamic_axes is False:
        axes = None
    else:
        axes = dynamic_axes
    path = Path(path)
    dummy = torch.zeros(batch_size, spec.input_dim, dtype=torch.float32)
    with atomic_target(path) as tmp, warnings.catch_warnings():
        # The TorchScript exporter announces its own deprecation on every call; it is chosen on purpose.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        torch.onnx.export(
            model.eval(),
            (dummy,),
            str(tmp),
            input_names=[INPUT_NAME],
            output_names=list(output_names),
            dynamic_axes=axes,
            opset_version=opset_version,
            do_constant_folding=True,
            dynamo=False,
        )
        opset = written_opset(onnx.load(str(tmp), load_external_data=False))
    return ExportedModel(path, opset, INPUT_NAME, output_names, None if axes else batch_size)


def export_static(
    model: nn.Module, path: str | Path, batch_size: int, opset_version: int = OPSET
) -> ExportedModel:
    """Export with a fixed batch size: the shape QNN HTP needs to place every node on the NPU."""
    if batch_size < 1:
        raise ValueError(f"static batch size must be >= 1, got {batch_size}")
    return convert_to_onnx(
        model, path, opset_version=opset_version, dynamic_axes=False, batch_size=batch_size
    )
