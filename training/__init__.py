"""Evolutionary training of BlockMarket agents on the market simulation (original-format checkpoints).

Exports resolve lazily so that importing the package (e.g. for the CLI's --help) does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "train": "training.evolution",
    "TrainingSummary": "training.evolution",
    "GenerationStats": "training.evolution",
    "PolicyPopulation": "training.policy",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'training' has no attribute {name!r}")
