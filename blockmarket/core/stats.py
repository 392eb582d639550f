"""Latency figures: the one percentile helper the simulator, the runtime and the benchmarks share."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np


def percentiles(samples: Iterable[float], qs: Sequence[float] = (50, 99), digits: int = 3) -> list[float]:
    """The ``qs`` percentiles of ``samples`` (numpy's linear interpolation), rounded to ``digits``;
    raises ValueError when there are none."""
    values = np.fromiter(samples, dtype=np.float64)
    if not values.size:
        raise ValueError("no samples")
    return [round(float(v), digits) for v in np.percentile(values, list(qs))]
