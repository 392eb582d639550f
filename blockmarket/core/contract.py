"""The model contract: what a converted BlockMarket model is, written once for the converter, the packs,
the runtime and the tests (as optimum's exporter configs carry theirs).

Per architecture: the input and output names, the floor of the trading-matrix output (softplus(head) +
0.1, so every proposed rate is at least 0.1), the ONNX opset. For every model: the tolerances a copy must
meet against its fp32 reference per precision (docs/npu.md explains them), the realistic states it is
checked on and the seeds those are drawn with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from blockmarket.core.state import FloatArray, realistic_states

INPUT_NAME = "state_vector"  # [B, D] float32, D = state_dim(n)
MATRIX_OUTPUT = "trading_matrix"  # [B, n^2]: the proposed trading matrix, row-major
MODELS_INPUT = "models"  # a selectable population pack's second input: the weight sets to run, int64 [K]
# A selectable pack runs the K models whose agents ticked (gathering their weights first) while K is below
# this fraction of its N models, else all N. Gathering copies the weight sets it picks: on 1,020 models it
# costs half the whole pack at ~0.35 N (int8) and ~0.2 N (fp32), and as much at ~0.85 N and ~0.6 N
# (`python -m benchmarks.selected_models`, Intel Xeon avx512_vnni). Selecting only where it saves half
# keeps a loaded machine, whose batches grow, on the whole pack rather than on gathers that cost as much
# (with 0.6 the 50-market benchmark fell into large gathered batches, p99 ~290 ms against ~120).
GATHER_BELOW = {"int8": 0.3, "fp32": 0.2}
VALUE_OUTPUT = "state_value"  # [B, 1]
OUTPUT_FLOOR = 0.1  # the policy output is softplus(head) + 0.1, so every rate is >= 0.1
OPSET = 17
VALIDATION_SEED = 20240601  # the states the runtime checks every unit on before it serves


class Tolerance(NamedTuple):
    """Pass when ``|actual - reference| <= atol + rtol * |reference|`` element-wise (allclose semantics)."""

    atol: float
    rtol: float


# fp32: the ONNX export against PyTorch (config.conversion.atol/rtol default to it).
# NPU precisions, measured on the simulated HTP (v73), TradingNetworks n=5 H=128, 5 seeds x head scaled
# x1/x4/x8/x12 (outputs up to ~0.5-1.2 untrained, up to ~7 like a trained policy), 256 validation states:
# worst of error / (atol + rtol*|ref|) was 0.35 fp16, 0.52 int8, 0.66 int16 (max abs errors 0.018, 0.10,
# 0.047). Float Softplus on HTP is an approximation (~0.017 abs worst, measured alone): it dominates fp16
# and keeps int16 (Softplus evaluated in float inside HTP) near fp16. An output error d moves a rate by
# only alpha*d per tick.
TOLERANCES: dict[str, Tolerance] = {
    "fp32": Tolerance(atol=1e-5, rtol=1e-4),
    "fp16": Tolerance(atol=3e-2, rtol=2e-2),
    "int16": Tolerance(atol=5e-2, rtol=2e-2),
    "int8": Tolerance(atol=1e-1, rtol=5e-2),
}
# A population pack's rows against each model run alone: CPU fp32 weights, CPU int8 weights, HTP (fp16).
PACK_TOLERANCE: dict[str, Tolerance] = {
    "cpu": TOLERANCES["fp32"],
    "cpu_int8": TOLERANCES["int8"],
    "npu": TOLERANCES["fp16"],
}


@dataclass(frozen=True)
class ModelContract:
    """What one architecture's converted model takes and gives."""

    architecture: str
    output_names: tuple[str, ...]
    input_name: str = INPUT_NAME
    opset: int = OPSET
    output_floor: float | None = OUTPUT_FLOOR  # of the trading-matrix output; None: no such output

    @property
    def trades(self) -> bool:
        """Whether the model proposes trading matrices (a value-only network does not)."""
        return MATRIX_OUTPUT in self.output_names

    @staticmethod
    def states(count: int, num_items: int, seed: int = VALIDATION_SEED) -> FloatArray:
        """Realistic sample states [count, D] (edge cases included) drawn from ``seed``."""
        return realistic_states(np.random.default_rng(seed), count, num_items)


CONTRACTS: dict[str, ModelContract] = {
    "TradingNetwork": ModelContract("TradingNetwork", (MATRIX_OUTPUT,)),
    "ValueNetwork": ModelContract("ValueNetwork", (VALUE_OUTPUT,), output_floor=None),
    "ActorCriticNetwork": ModelContract("ActorCriticNetwork", (MATRIX_OUTPUT, VALUE_OUTPUT)),
}
