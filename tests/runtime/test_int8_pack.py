"""The int8-weight CPU pack: int8 in the file, per-agent scales, within its tolerance, served by the pool."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from blockmarket.core.contract import INPUT_NAME, PACK_TOLERANCE
from blockmarket.core.state import realistic_states, state_dim
from blockmarket.models.pack import WEIGHT_LEVELS, PackError, build_pack, save_pack
from runtime.planning import PoolError
from tests.support.pools import CountingFactory, make_pool, per_agent_reference
from tests.support.serving import ITEMS, trading_weights

ATOL, RTOL = PACK_TOLERANCE["cpu_int8"]
ROWS = 8
HEAD_SCALES = (1.0, 4.0, 8.0, 12.0)


def population(count: int, hidden: int = 128) -> list[list[np.ndarray]]:
    """Distinct agents with PyTorch's default nn.Linear init, heads scaled x1..x12 like trained policies
    (outputs up to ~6; docs/npu.md measures the same ranges)."""
    rng = np.random.default_rng(count)
    dims = [state_dim(len(ITEMS)), hidden, hidden, hidden, len(ITEMS) ** 2]
    agents = []
    for agent in range(count):
        weights = []
        for fan_in, fan_out in itertools.pairwise(dims):
            bound = 1.0 / np.sqrt(fan_in)
            weights += [
                rng.uniform(-bound, bound, size).astype(np.float32) for size in ((fan_out, fan_in), fan_out)
            ]
        weights[-2] *= HEAD_SCALES[agent % len(HEAD_SCALES)]
        weights[-1] *= HEAD_SCALES[agent % len(HEAD_SCALES)]
        agents.append(weights)
    return agents


def run_pack(model: onnx.ModelProto, states: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {INPUT_NAME: states})[0])


def test_int8_pack_keeps_int8_weights_and_matches_the_fp32_pack_per_agent(tmp_path: Path) -> None:
    agents = population(32)
    states = realistic_states(np.random.default_rng(0), len(agents) * ROWS, len(ITEMS))
    fp32 = build_pack(agents, form="matmul", batch_per_agent=ROWS)
    int8 = build_pack(agents, form="matmul_int8", batch_per_agent=ROWS)

    weights = {t.name: t for t in int8.graph.initializer if t.name.startswith("w")}
    assert {t.data_type for t in weights.values()} == {onnx.TensorProto.INT8}
    assert [n.op_type for n in int8.graph.node].count("MatMulInteger") == 4
    fp32_size = save_pack(fp32, tmp_path / "fp32.onnx").stat().st_size
    assert save_pack(int8, tmp_path / "int8.onnx").stat().st_size < 0.3 * fp32_size

    want, got = run_pack(fp32, states), run_pack(int8, states)
    error = np.abs(got - want).reshape(len(agents), ROWS, -1)
    allowed = (ATOL + RTOL * np.abs(want)).reshape(error.shape)
    assert (error <= allowed).all(), (
        f"agents over tolerance: {np.flatnonzero((error > allowed).any(axis=(1, 2)))}"
    )
    assert error.max() > 1e-4  # really quantized, not an fp32 graph under another name


def integer_reference(model: onnx.ModelProto, states: np.ndarray) -> np.ndarray:
    """What the int8 pack declares, in exact integer arithmetic: per layer, each row quantized to uint8
    with its own scale (its peak / 255), int64 products with the int8 weights, then row scale x the
    per-agent, per-channel weight scales, and the bias."""
    init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    layers = sum(name.startswith("w") for name in init)
    agents = init["w0"].shape[0]
    hidden = states.reshape(agents, -1, states.shape[1])
    for layer in range(layers):
        scale = np.maximum(hidden.max(axis=2, keepdims=True), np.finfo(np.float32).tiny) / np.float32(255)
        quantized = np.clip(np.rint(hidden / scale), 0, 255).astype(np.int64)
        products = np.einsum("nbi,nio->nbo", quantized, init[f"w{layer}"].astype(np.int64))
        hidden = products.astype(np.float32) * scale * init[f"s{layer}"] + init[f"b{layer}"]
        hidden = np.maximum(hidden, 0.0) if layer < layers - 1 else np.logaddexp(hidden, 0.0) + 0.1
    return hidden.reshape(len(states), -1)


def test_int8_pack_computes_its_integer_arithmetic_exactly_on_this_cpu() -> None:
    """No kernel saturates: on x86 without VNNI, ORT's u8s8 path adds pairs of uint8 x int8 products in a
    saturating int16, which 8-bit weights overflow (errors up to 0.4 seen on AVX2); 7-bit weights cannot."""
    agents = population(16)
    states = realistic_states(np.random.default_rng(5), len(agents) * ROWS, len(ITEMS))
    int8 = build_pack(agents, form="matmul_int8", batch_per_agent=ROWS)
    weights = [numpy_helper.to_array(t) for t in int8.graph.initializer if t.name.startswith("w")]
    assert max(int(np.abs(w.astype(np.int16)).max()) for w in weights) == WEIGHT_LEVELS == 63

    np.testing.assert_allclose(run_pack(int8, states), integer_reference(int8, states), atol=1e-4, rtol=1e-4)


def test_a_rows_answer_does_not_depend_on_the_other_rows_of_the_call() -> None:
    """Per-row activation scales: an agent's answer is the same whoever shares the call (cross-market
    batching and replicas rely on it); a per-call scale moved it by up to 7e-3."""
    agents = population(16)
    states = realistic_states(np.random.default_rng(6), len(agents) * ROWS, len(ITEMS))
    int8 = build_pack(agents, form="matmul_int8", batch_per_agent=ROWS)
    others = states.copy()
    others[1:] = realistic_states(np.random.default_rng(7), len(states) - 1, len(ITEMS)) * 3.0

    assert np.array_equal(run_pack(int8, states)[0], run_pack(int8, others)[0])


def test_each_agent_has_its_own_scales() -> None:
    """A small-weight agent packed next to a large-weight one keeps its precision (shared scales lose it)."""
    large, small = trading_weights(1, hidden=64), trading_weights(2, hidden=64)
    large[0] *= 100.0
    small[0] *= 0.01
    states = realistic_states(np.random.default_rng(1), 2 * ROWS, len(ITEMS))
    want = run_pack(build_pack([large, small], form="matmul", batch_per_agent=ROWS), states)
    got = run_pack(build_pack([large, small], form="matmul_int8", batch_per_agent=ROWS), states)
    small_rows = slice(ROWS, 2 * ROWS)
    assert np.abs(got[small_rows] - want[small_rows]).max() < 1e-2


def test_int8_pack_refuses_fp16() -> None:
    with pytest.raises(PackError, match="matmul_int8 form computes in float32"):
        build_pack(population(2, hidden=8), form="matmul_int8", dtype=np.float16)


def test_save_pack_refuses_an_invalid_graph_and_leaves_no_file(tmp_path: Path) -> None:
    model = build_pack(population(2, hidden=8), form="matmul_int8")
    del model.graph.node[1]  # a dangling input
    with pytest.raises(PackError, match=r"broken\.onnx: the pack is not a valid ONNX model"):
        save_pack(model, tmp_path / "broken.onnx")
    assert list(tmp_path.iterdir()) == []


async def test_pool_serves_an_int8_pack_validated_per_agent(model_dir: Path) -> None:
    pool = await make_pool(model_dir, agents=10, max_sessions=1, cpu_pack_precision="int8")
    (unit,) = pool.current.units
    assert unit.pack_weights == "int8" and unit.model_path.name.startswith("pack-matmul_int8-3x")
    assert "int8 weights" in pool.current.describe()
    states = realistic_states(np.random.default_rng(3), 10, len(ITEMS))
    want = per_agent_reference(model_dir, pool.population.model_keys, states)
    np.testing.assert_allclose(await pool.infer(states), want, atol=ATOL, rtol=RTOL)


async def test_an_int8_pack_beyond_its_tolerance_is_refused(model_dir: Path) -> None:
    class SkewedPacks(CountingFactory):
        def __call__(self, path: Path, prefer_npu: bool) -> tuple[Any, str]:
            session, provider = super().__call__(path, prefer_npu)
            run = session.run
            session.run = lambda *args: [run(*args)[0] + 2 * ATOL]
            return session, provider

    with pytest.raises(PoolError, match=r"pack-matmul_int8-.*differ from the model's fp32"):
        await make_pool(model_dir, agents=6, max_sessions=1, factory=SkewedPacks(), cpu_pack_precision="int8")


async def test_auto_serves_int8_weights_where_they_validate(model_dir: Path) -> None:
    pool = await make_pool(model_dir, agents=6, max_sessions=1, cpu_pack_precision="auto")
    (unit,) = pool.current.units
    assert unit.pack_weights == "int8" and unit.model_path.name.startswith("pack-matmul_int8-")


async def test_auto_falls_back_to_fp32_weights_when_int8_fails_its_check(
    model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    class SkewedInt8(CountingFactory):
        def __call__(self, path: Path, prefer_npu: bool) -> tuple[Any, str]:
            session, provider = super().__call__(path, prefer_npu)
            if "matmul_int8" in path.name:
                run = session.run
                session.run = lambda *args: [run(*args)[0] + 2 * ATOL]
            return session, provider

    pool = await make_pool(
        model_dir, agents=6, max_sessions=1, factory=SkewedInt8(), cpu_pack_precision="auto"
    )
    (unit,) = pool.current.units
    assert unit.pack_weights == "fp32" and unit.model_path.name.startswith("pack-matmul-")
    assert "serving pack:" in caplog.text and "with fp32 pack weights instead" in caplog.text
    states = realistic_states(np.random.default_rng(4), 6, len(ITEMS))
    want = per_agent_reference(model_dir, pool.population.model_keys, states)
    np.testing.assert_allclose(await pool.infer(states), want, atol=1e-5, rtol=1e-4)
