"""BlockMarket conversion: `.pth` checkpoints -> validated ONNX models, NPU variants, metadata.

Exports are resolved lazily so that importing the package (e.g. for the CLI's --help) does not
import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ONNXConverter": "conversion.converter",
    "ConversionResult": "conversion.results",
    "convert_to_onnx": "conversion.export",
    "export_static": "conversion.export",
    "ValidationReport": "conversion.validation",
    "compare_outputs": "conversion.validation",
    "load_checkpoint": "conversion.checkpoint",
    "save_checkpoint": "conversion.checkpoint",
    "CheckpointError": "conversion.checkpoint",
    "TradingNetwork": "conversion.networks",
    "ValueNetwork": "conversion.networks",
    "ActorCriticNetwork": "conversion.networks",
    "ARCHITECTURES": "conversion.networks",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'conversion' has no attribute {name!r}")
