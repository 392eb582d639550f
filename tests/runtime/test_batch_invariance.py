"""Batch-invariant inference (runtime.batch_invariant, always on for replicas): an agent's answer does not
depend, to the bit, on how many other rows share its session run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from blockmarket.core.state import realistic_states
from runtime.inference import InferenceUnit
from tests.support.serving import ITEMS, trading_model, trading_weights


def unit_of(tmp_path: Path, pad_rows: int) -> InferenceUnit:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    model = trading_model(trading_weights(seed=63))
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    rows = np.arange(64)
    return InferenceUnit(
        "m", rows, ("m",) * 64, {}, session, "CPUExecutionProvider", tmp_path / "m.onnx", None,
        pad_rows=pad_rows,
    )  # fmt: skip


def test_a_padded_run_gives_every_row_the_same_bits_at_every_batch_size(tmp_path: Path) -> None:
    unit = unit_of(tmp_path, pad_rows=1)
    rng = np.random.default_rng(0)
    for trial in range(20):
        states = realistic_states(rng, 64, len(ITEMS))
        whole = unit.run(states)
        for count in (1, 2, 3, 5, 8, 13, 31, 63):
            part = unit.run(states[:count])
            assert part.tobytes() == whole[:count].tobytes(), (trial, count)
