"""The one pack check: a population pack's rows against their reference, allclose-style.

The runtime compares every model's rows with that model run alone on CPU before a pack serves
(runtime/units.py); the converter compares every agent's rows with its own PyTorch network
(conversion/pack_validation.py). Both judge with :func:`row_errors`, under the contract's tolerances
(blockmarket/core/contract.py).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

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
