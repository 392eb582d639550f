"""Population packs: every agent slice equals its own PyTorch network, on CPU (matmul) and HTP (conv)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from blockmarket.core.config import NpuConfig
from blockmarket.core.contract import PACK_TOLERANCE, TOLERANCES, Tolerance
from blockmarket.models.pack import PackError, build_pack, extract_trading_weights, pack_metadata, save_pack
from conversion.export import convert_to_onnx
from conversion.networks import ValueNetwork
from conversion.pack_validation import pack_networks, trading_weights, validate_pack
from tests.support.npu import trading_network

CPU_EXACT = Tolerance(atol=1e-5, rtol=0.0)
CPU_INT8 = Tolerance(*PACK_TOLERANCE["cpu_int8"])


@pytest.fixture(scope="module")
def population() -> list:
    """64 distinct agents, half with a wide output range like trained policies."""
    return [trading_network(seed=i, head_scale=8.0 if i % 2 else 1.0) for i in range(64)]


@pytest.mark.qnn
@pytest.mark.usefixtures("htp")
def test_conv_pack_of_64_agents_matches_every_agent_on_htp(
    tmp_path: Path, population: list, npu: NpuConfig
) -> None:
    path = save_pack(pack_networks(population, form="conv"), tmp_path / "pack_conv.onnx")

    report = validate_pack(path, population, npu, TOLERANCES["fp16"], rows_per_agent=8)

    assert report.placement.on_npu, report.placement.describe()
    assert report.agents == 64 and report.rows_per_agent == 8
    assert report.passed, report.summary()
    assert 0 < max(report.max_abs_error) <= TOLERANCES["fp16"].atol + TOLERANCES["fp16"].rtol * 10


@pytest.mark.parametrize("batch_per_agent", [1, 3])
def test_matmul_and_conv_packs_match_every_agent_on_cpu(
    tmp_path: Path, population: list, npu: NpuConfig, batch_per_agent: int
) -> None:
    for form in ("matmul", "conv"):
        model = pack_networks(population, form=form, batch_per_agent=batch_per_agent)
        path = save_pack(model, tmp_path / f"pack_{form}.onnx")
        assert pack_metadata(model) == {"agents": "64", "form": form, "batch_per_agent": str(batch_per_agent)}

        report = validate_pack(path, population, npu, CPU_EXACT, prefer_npu=False, rows_per_agent=6)

        assert report.placement.provider == "CPUExecutionProvider"
        assert report.passed and max(report.max_abs_error) <= 1e-5, report.summary()


@pytest.mark.qnn
@pytest.mark.usefixtures("htp")
def test_fp16_weight_pack_matches_on_cpu_and_htp(tmp_path: Path, population: list, npu: NpuConfig) -> None:
    agents = population[:8]
    model = build_pack([trading_weights(n) for n in agents], form="conv", dtype=np.float16)
    path = save_pack(model, tmp_path / "pack_fp16.onnx")

    on_cpu = validate_pack(path, agents, npu, Tolerance(atol=5e-3, rtol=2e-3), prefer_npu=False)
    on_htp = validate_pack(path, agents, npu, TOLERANCES["fp16"])

    assert on_cpu.passed and on_cpu.placement.provider == "CPUExecutionProvider", on_cpu.summary()
    assert on_htp.passed and on_htp.placement.on_npu, on_htp.summary()


def test_int8_pack_matches_every_agent_within_its_tolerance(
    tmp_path: Path, population: list, npu: NpuConfig
) -> None:
    """The int8-weight CPU pack, checked per agent against each PyTorch network (docs/npu.md)."""
    path = save_pack(pack_networks(population, form="matmul_int8", batch_per_agent=4), tmp_path / "i8.onnx")

    report = validate_pack(path, population, npu, CPU_INT8, prefer_npu=False, rows_per_agent=8)

    assert report.placement.provider == "CPUExecutionProvider"
    assert report.passed, report.summary()
    assert 1e-4 < max(report.max_abs_error) < CPU_INT8.atol  # quantized, and within the band


def test_a_swapped_agent_is_named(tmp_path: Path, population: list, npu: NpuConfig) -> None:
    agents = population[:8]
    swapped = [agents[1], agents[0], *agents[2:]]
    path = save_pack(pack_networks(swapped, form="matmul"), tmp_path / "pack.onnx")

    report = validate_pack(path, agents, npu, CPU_EXACT, prefer_npu=False)

    assert report.failed_agents == [0, 1]
    assert "FAILED for agents [0, 1]" in report.summary()


def test_weights_read_back_from_a_converted_onnx_file(tmp_path: Path, population: list) -> None:
    network = population[1]
    exported = convert_to_onnx(network, tmp_path / "agent.onnx")

    weights = extract_trading_weights(exported.path)

    expected = trading_weights(network)
    assert [w.shape for w in weights] == [w.shape for w in expected]
    assert all(np.array_equal(got, want) for got, want in zip(weights, expected, strict=True))


def test_packs_refuse_what_they_cannot_hold(tmp_path: Path, population: list) -> None:
    value_net = convert_to_onnx(ValueNetwork(61, 128, 5), tmp_path / "value.onnx")
    with pytest.raises(PackError, match=r"value\.onnx: not a fp32 TradingNetwork"):
        extract_trading_weights(value_net.path)
    narrow = trading_weights(trading_network(0))
    narrow[0] = narrow[0][:64]
    with pytest.raises(PackError, match="agent 1: weight shapes"):
        build_pack([trading_weights(population[0]), narrow], form="conv")
    with pytest.raises(PackError, match="at least one agent"):
        build_pack([], form="conv")
    with pytest.raises(PackError, match="unknown pack form 'dense'"):
        build_pack([narrow], form="dense")  # type: ignore[arg-type]
