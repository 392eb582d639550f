"""The QNN HTP backend is never skipped silently: where its wheel exists, a missing one fails the test."""

from __future__ import annotations

import importlib
import platform
import sys

import pytest

# Where onnxruntime-qnn publishes wheels: pyproject.toml's environment marker for the dependency.
QNN_MACHINES = frozenset({"x86_64", "ARM64", "aarch64"})
QNN_PLATFORMS = ("linux", "win32")


def require_qnn() -> None:
    """Fail unless onnxruntime-qnn imports on a platform it ships for; elsewhere skip, saying why."""
    machine = platform.machine()
    if machine not in QNN_MACHINES or not sys.platform.startswith(QNN_PLATFORMS):
        pytest.skip(f"onnxruntime-qnn has no wheel for {sys.platform}/{machine}")
    try:
        importlib.import_module("onnxruntime_qnn")
    except ImportError as exc:
        pytest.fail(f"onnxruntime-qnn is missing on {sys.platform}/{machine}, where it installs: {exc}")
