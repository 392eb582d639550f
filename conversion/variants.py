"""NPU variants of a converted network: static-batch fp16 and QDQ int8/int16 models, each proven on QNN HTP.

* ``fp16``: fp16 weights with fp32 inputs/outputs (a Cast at each end). The simulated HTP computes a
  float graph in fp16 whether the weights are fp32 or fp16 and whatever ``enable_htp_fp16_precision``
  says (measured: identical outputs), so the variant states its real precision in the file, halves its
  size, and the runtime still feeds float32 states.
* ``int8``: QDQ with uint8 activations and uint8 weights; ``int16``: uint16 activations, uint8 weights.
  Both from ONNX Runtime's QNN helpers (``qnn_preprocess_model`` + ``get_qnn_qdq_config`` + ``quantize``),
  calibrated on agent states from a market rollout driven by the network itself plus the realistic
  state generator (edge cases included) — never random noise.

Every variant is run on the HTP backend with ``session.disable_cpu_ep_fallback=1`` and compared with
PyTorch fp32 on the validation states (a different seed from calibration). Tolerances are per precision
(:data:`blockmarket.core.contract.TOLERANCES`, docs/npu.md explains them); the metadata entry records
errors, tolerance, verdict and where ONNX Runtime placed the nodes.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import torch
from onnx import version_converter
from onnxruntime.quantization import CalibrationDataReader, QuantType, quantize
from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config, qnn_preprocess_model
from onnxruntime.quantization.shape_inference import quant_pre_process
from onnxruntime.transformers.float16 import convert_float_to_float16
from torch import nn

from blockmarket.core.config import Config, NpuConfig
from blockmarket.core.contract import INPUT_NAME, MATRIX_OUTPUT, TOLERANCES
from blockmarket.core.files import atomic_target
from blockmarket.core.state import apply_update, realistic_states
from blockmarket.market.rules import MarketPopulation, trade_step
from blockmarket.models.placement import CPU_EP
from blockmarket.models.providers import ContextCache, ProviderError, create_session
from conversion.export import export_static, written_opset
from conversion.networks import NetworkSpec
from conversion.validation import compare_outputs, session_outputs, torch_outputs, validation_states

log = logging.getLogger(__name__)

States = npt.NDArray[np.float32]


# (activation type, weight type) of the QDQ precisions.
QDQ_TYPES: dict[str, tuple[QuantType, QuantType]] = {
    "int8": (QuantType.QUInt8, QuantType.QUInt8),
    "int16": (QuantType.QUInt16, QuantType.QUInt8),
}

# 16-bit QuantizeLinear/DequantizeLinear exist from opset 21; torch exports at most 20, so the static
# fp32 model is upgraded with onnx's version converter before quantization.
MIN_OPSET = {"int16": 21}

ROLLOUT_AGENTS = 16  # agents of the calibration market; states are collected every step
RANGE_MARGIN = 0.15  # each activation's calibrated range is widened by this share of its span per side
EDGE_CHUNK = 16  # realistic calibration states are drawn in chunks this size, each opening with edge cases


class StateCalibrationReader(CalibrationDataReader):
    """Calibration states in static-batch chunks (the quantizer runs the static model on them)."""

    def __init__(self, states: States, batch_size: int) -> None:
        usable = len(states) - len(states) % batch_size
        if usable == 0:
            raise ValueError(f"{len(states)} calibration states cannot fill one batch of {batch_size}")
        self._batches = np.ascontiguousarray(states[:usable]).reshape(-1, batch_size, states.shape[1])
        self._iter: Iterator[npt.NDArray[np.float32]] = iter(self._batches)

    def get_next(self) -> dict[str, npt.NDArray[np.float32]] | None:
        batch = next(self._iter, None)
        return None if batch is None else {INPUT_NAME: batch}

    def rewind(self) -> None:
        self._iter = iter(self._batches)


def calibration_states(model: nn.Module, spec: NetworkSpec, config: Config, count: int) -> States:
    """Half from a market the network itself trades in (the states it will meet), half realistic."""
    rng = np.random.default_rng(config.conversion.seed + 1)  # validation uses `seed`: keep them apart
    env = config.environment
    pop = MarketPopulation.random(rng, ROLLOUT_AGENTS, spec.num_items, env.world_size)
    rollout: list[States] = []
    with torch.inference_mode():
        for _ in range(-(-(count // 2) // ROLLOUT_AGENTS)):
            states = pop.states()
            rollout.append(states)
            if spec.architecture.produces_matrix:  # a ValueNetwork's market keeps its initial rates
                proposals = torch_outputs(model, states)[MATRIX_OUTPUT]
                apply_update(pop.matrices, proposals, config.learning.matrix_update_rate)
            trade_step(pop, rng, env)
    market = np.concatenate(rollout)[: count // 2]
    # realistic_states opens every call with its edge cases (empty inventory, all-max / all-min rates,
    # no market data); drawing it in small chunks puts many of them in the calibration set, so the
    # quantized ranges cover the extremes instead of clipping them (measured: up to 2.8e-2 error).
    chunks = [
        realistic_states(rng, min(EDGE_CHUNK, count - len(market) - start), spec.num_items)
        for start in range(0, count - len(market), EDGE_CHUNK)
    ]
    return np.concatenate([market, *chunks])


def variant_file(name: str, precision: str, batch_size: int) -> str:
    """``<name>_<precision>_b<batch>.onnx``: one file per precision and static batch size."""
    return f"{name}_{precision}_b{batch_size}.onnx"


def _write_fp16(static_fp32: Path, target: Path) -> None:
    model = convert_float_to_float16(onnx.load(str(static_fp32)), keep_io_types=True)
    with atomic_target(target) as tmp:
        onnx.save_model(model, str(tmp))


def _write_qdq(static_fp32: Path, target: Path, precision: str, reader: StateCalibrationReader) -> None:
    """QNN's graph fixes, ORT's quantization pre-processing (shape inference, optimisation), then QDQ.

    (In this order: ``qnn_preprocess_model`` fails on a model that already carries metadata props.)
    """
    activation, weight = QDQ_TYPES[precision]
    scratch = static_fp32.with_name(f"{static_fp32.stem}_{precision}")
    start = static_fp32
    if precision in MIN_OPSET and written_opset(onnx.load(str(static_fp32))) < MIN_OPSET[precision]:
        start = scratch.with_name(f"{scratch.name}_opset.onnx")
        onnx.save_model(
            version_converter.convert_version(onnx.load(str(static_fp32)), MIN_OPSET[precision]), start
        )
    prepared = scratch.with_name(f"{scratch.name}_qnn.onnx")
    source = scratch.with_name(f"{scratch.name}_pre.onnx")
    quant_pre_process(  # static shapes: ONNX shape inference is enough, the symbolic pass costs ~0.6 s
        prepared if qnn_preprocess_model(start, prepared) else start, source, skip_symbolic_shape=True
    )
    quant_config = get_qnn_qdq_config(
        source,
        reader,
        activation_type=activation,
        weight_type=weight,
        init_overrides=widened_ranges(source, reader),
    )
    with atomic_target(target) as tmp:
        quantize(source, tmp, quant_config)


def widened_ranges(
    model_path: Path, reader: StateCalibrationReader
) -> dict[str, list[dict[str, np.float32]]]:
    """Quantization ranges of every node output: the calibration min/max widened by RANGE_MARGIN.

    MinMax calibration takes the extremes of a finite sample; a state slightly beyond them is clipped,
    and a clipped first layer propagates (measured: 0.085 error on an int16 variant whose first Gemm
    saw 9 % more range in validation). The margin costs int16 nothing and int8 ~15 % resolution.
    Non-negative outputs (ReLU, softplus) keep a non-negative range.
    """
    model = onnx.load(str(model_path))
    names = [out for node in model.graph.node if node.op_type != "Constant" for out in node.output]
    graph_outputs = {out.name for out in model.graph.output}
    model.graph.output.extend(onnx.ValueInfoProto(name=name) for name in names if name not in graph_outputs)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    low = np.full(len(names), np.inf)
    high = np.full(len(names), -np.inf)
    reader.rewind()
    while (feed := reader.get_next()) is not None:
        values = session.run(names, feed)
        low = np.minimum(low, [v.min() for v in values])
        high = np.maximum(high, [v.max() for v in values])
    reader.rewind()
    span = (high - low) * RANGE_MARGIN
    wide_low = np.where(low < 0, low - span, np.maximum(low - span, 0.0))
    return {
        name: [{"rmin": np.float32(lo), "rmax": np.float32(hi)}]
        for name, lo, hi in zip(names, wide_low, high + span, strict=True)
    }


def validate_variant(
    model: nn.Module, spec: NetworkSpec, path: Path, precision: str, batch_size: int, config: Config
) -> dict[str, Any]:
    """Run the variant on HTP (CPU fallback disabled) against PyTorch fp32: one metadata entry."""
    tolerance = TOLERANCES[precision]
    npu: NpuConfig = config.npu.model_copy(
        update={"context_cache": config.conversion.context_cache, "require_npu": False}
    )
    entry: dict[str, Any] = {
        "precision": precision,
        "onnx_path": path.name,
        "batch_size": batch_size,
        "atol": tolerance.atol,
        "rtol": tolerance.rtol,
    }
    try:
        session, placement = create_session(path, npu, disable_cpu_fallback=True)
    except ProviderError as exc:
        log.error("%s: %s variant does not run on QNN HTP: %s", path, precision, exc)
        return {**entry, "backend": None, "passed": False, "error": str(exc)}
    states = validation_states(spec.num_items, config.conversion.validation_samples, config.conversion.seed)
    report = compare_outputs(
        torch_outputs(model, states),
        session_outputs(session, states, batch_size),
        tolerance.atol,
        tolerance.rtol,
    )
    backend = "htp" if placement.on_npu else "cpu"
    if placement.provider == CPU_EP:
        log.warning("%s: validated on CPU only (%s); HTP numerics are unproven", path.name, placement.reason)
    log.log(
        logging.INFO if report.passed else logging.ERROR,
        "%s: %s on %s %s",
        path.name,
        precision,
        backend,
        report.summary(),
    )
    return {
        **entry,
        "backend": backend,
        "samples": report.samples,
        "max_abs_error": report.max_abs_error,
        "max_rel_error": report.max_rel_error,
        "passed": report.passed,
        "placement": placement.as_dict(),
        "context_model": ContextCache(path).context_model.name if placement.context != "off" else None,
    }


def build_variants(
    model: nn.Module, spec: NetworkSpec, output_dir: str | Path, name: str, config: Config
) -> list[dict[str, Any]]:
    """Export, quantize and validate every configured NPU precision at every static batch size."""
    precisions = [p for p in config.conversion.precisions if p != "fp32"]
    if not precisions:
        return []
    out = Path(output_dir)
    model = model.eval()
    entries: list[dict[str, Any]] = []
    calibration: States | None = None
    with tempfile.TemporaryDirectory(prefix=f".{name}.", dir=out) as scratch:
        for batch_size in config.conversion.static_batch_sizes:
            static = Path(scratch) / f"{name}_b{batch_size}.onnx"
            export_static(model, static, batch_size, config.conversion.opset_version)
            for precision in precisions:
                target = out / variant_file(name, precision, batch_size)
                if precision == "fp16":
                    _write_fp16(static, target)
                else:
                    if calibration is None:
                        calibration = calibration_states(
                            model, spec, config, config.conversion.calibration_samples
                        )
                    _write_qdq(static, target, precision, StateCalibrationReader(calibration, batch_size))
                entries.append(validate_variant(model, spec, target, precision, batch_size, config))
    return entries
