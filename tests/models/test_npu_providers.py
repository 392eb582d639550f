"""Execution-provider selection: real placement, loud CPU fallback, require_npu, the context-binary cache."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import get_args

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from blockmarket.core.config import NpuConfig
from blockmarket.models import providers
from blockmarket.models.pack import save_pack
from blockmarket.models.providers import ProviderError, create_session
from conversion.export import convert_to_onnx, export_static
from conversion.pack_validation import pack_networks
from tests.support.npu import trading_network

REPO = Path(__file__).resolve().parents[2]
QNN = "QNNExecutionProvider"


def hardmax_model(path: Path) -> Path:
    """Relu -> Hardmax: QNN HTP takes the Relu, Hardmax has no HTP kernel and lands on CPU."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Hardmax", ["r"], ["y"])],
        "partly_supported",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 10
    onnx.save(model, str(path))
    return path


def warnings_about(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and text in r.getMessage()]


@pytest.mark.qnn
@pytest.mark.usefixtures("htp")
class TestOnHtp:
    def test_static_model_runs_wholly_on_qnn(self, tmp_path: Path, npu: NpuConfig) -> None:
        path = export_static(trading_network(0), tmp_path / "agent_b1.onnx", batch_size=1).path

        session, placement = create_session(path, npu, disable_cpu_fallback=True)

        assert session.get_providers()[0] == QNN
        assert placement.on_npu and placement.nodes == {QNN: 9}
        assert placement.describe() == "agent_b1.onnx: QNNExecutionProvider (9/9 nodes on QNN, 0 on CPU)"

    @pytest.mark.parametrize("mode", get_args(NpuConfig.model_fields["performance_mode"].annotation), ids=str)
    def test_every_configurable_performance_mode_is_accepted(self, tmp_path: Path, mode: str) -> None:
        path = export_static(trading_network(0), tmp_path / "agent_b1.onnx", batch_size=1).path

        _, placement = create_session(
            path,
            NpuConfig.model_validate({"context_cache": False, "performance_mode": mode}),
            disable_cpu_fallback=True,
        )

        assert placement.on_npu

    def test_dynamic_batch_goes_to_cpu_with_the_reason_warned_once(
        self, tmp_path: Path, npu: NpuConfig, caplog: pytest.LogCaptureFixture
    ) -> None:
        path = convert_to_onnx(trading_network(0), tmp_path / "agent.onnx").path
        with caplog.at_level(logging.WARNING, logger="blockmarket.models.providers"):
            for _ in range(2):
                session, placement = create_session(path, npu)

        assert session.get_providers() == ["CPUExecutionProvider"]
        assert placement.nodes == {"CPUExecutionProvider": 9} and not placement.on_npu
        assert "dynamic input dimensions state_vector['batch', 61]" in placement.reason
        assert len(warnings_about(caplog, "agent.onnx: running on CPU")) == 1
        with pytest.raises(ProviderError, match="require_npu is true but dynamic input dimensions"):
            create_session(path, npu.model_copy(update={"require_npu": True}))

    def test_unsupported_op_is_counted_on_cpu_and_fatal_with_require_npu(
        self, tmp_path: Path, npu: NpuConfig, caplog: pytest.LogCaptureFixture
    ) -> None:
        path = hardmax_model(tmp_path / "partly.onnx")
        with caplog.at_level(logging.WARNING, logger="blockmarket.models.providers"):
            _, placement = create_session(path, npu)

        assert placement.nodes == {QNN: 1, "CPUExecutionProvider": 1} and placement.cpu_ops == ("Hardmax",)
        assert warnings_about(caplog, "1/2 nodes on QNN, 1 on CPU) CPU ops: Hardmax")
        with pytest.raises(ProviderError, match=r"partly\.onnx: QNN HTP cannot run the whole graph"):
            create_session(path, npu.model_copy(update={"require_npu": True}))

    def test_context_cache_loads_10x_faster_and_is_rebuilt_when_the_model_changes(
        self, tmp_path: Path
    ) -> None:
        population = [trading_network(seed) for seed in range(64)]
        path = save_pack(pack_networks(population, form="conv"), tmp_path / "pack.onnx")
        cached, uncached = NpuConfig(context_cache=True), NpuConfig(context_cache=False)
        create_session(path, uncached)  # the backend's one-time load is not part of either figure

        start = time.perf_counter()
        reference, _ = create_session(path, uncached)
        compile_s = time.perf_counter() - start
        _, built = create_session(path, cached)
        loads = []
        for _ in range(3):
            start = time.perf_counter()
            session, loaded = create_session(path, cached)
            loads.append(time.perf_counter() - start)

        assert (built.context, loaded.context) == ("built", "loaded")
        assert loaded.on_npu and loaded.source_nodes == sum(built.nodes.values())
        assert compile_s / min(loads) >= 10, f"compile {compile_s:.4f}s, cached load {min(loads):.4f}s"
        states = np.random.default_rng(0).uniform(0, 2, size=(64, 61)).astype(np.float32)
        before = session.run(None, {"state_vector": states})[0]
        np.testing.assert_array_equal(before, reference.run(None, {"state_vector": states})[0])

        sidecar = tmp_path / "pack_ctx.json"
        old_sha = json.loads(sidecar.read_text())["source_sha256"]
        save_pack(pack_networks(population[::-1], form="conv"), path)  # same shapes, other weights
        session, rebuilt = create_session(path, cached)

        assert rebuilt.context == "built"
        assert json.loads(sidecar.read_text())["source_sha256"] != old_sha
        after = session.run(None, {"state_vector": states})[0]
        fresh, _ = create_session(path, uncached)
        np.testing.assert_array_equal(after, fresh.run(None, {"state_vector": states})[0])
        assert not np.allclose(after, before, atol=0.05)

    def test_a_corrupt_context_binary_is_recompiled_with_a_warning(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        path = export_static(trading_network(0), tmp_path / "agent_b2.onnx", batch_size=2).path
        cached = NpuConfig(context_cache=True)
        create_session(path, cached)
        (tmp_path / "agent_b2_ctx_qnn.bin").write_bytes(b"not a QNN context")

        with caplog.at_level(logging.WARNING, logger="blockmarket.models.providers"):
            session, placement = create_session(path, cached)

        assert placement.context == "built" and placement.on_npu
        assert warnings_about(caplog, "agent_b2_ctx.onnx: context binary unusable")
        assert session.run(None, {"state_vector": np.ones((2, 61), np.float32)})[0].shape == (2, 25)
        assert create_session(path, cached)[1].context == "loaded"


class TestWithoutQnn:
    def test_unimportable_qnn_runs_on_cpu_and_says_so_once(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
    ) -> None:
        monkeypatch.setattr(providers, "_qnn", providers._QnnState())
        monkeypatch.setitem(
            sys.modules, "onnxruntime_qnn", None
        )  # `import onnxruntime_qnn` raises ImportError
        paths = [
            export_static(trading_network(i), tmp_path / f"a{i}.onnx", batch_size=1).path for i in range(2)
        ]
        npu = NpuConfig(context_cache=False)
        with caplog.at_level(logging.WARNING, logger="blockmarket.models.providers"):
            placements = [create_session(p, npu)[1] for p in paths]

        assert all(
            p.provider == "CPUExecutionProvider" and "QNN not importable" in p.reason for p in placements
        )
        assert len(warnings_about(caplog, "QNN not importable")) == 1 + len(
            paths
        )  # once globally, once per model
        assert (
            len([m for m in warnings_about(caplog, "QNN not importable") if m.endswith(": running on CPU")])
            == 1
        )
        with pytest.raises(ProviderError, match="require_npu is true but QNN not importable"):
            create_session(paths[0], npu.model_copy(update={"require_npu": True}))

    def test_npu_disabled_in_config_is_a_choice_not_a_warning(
        self, tmp_path: Path, caplog: pytest.LogCaptureFixture
    ) -> None:
        path = export_static(trading_network(0), tmp_path / "a.onnx", batch_size=1).path
        off = NpuConfig(enabled=False)
        with caplog.at_level(logging.INFO, logger="blockmarket.models.providers"):
            _, placement = create_session(path, off)

        assert placement.provider == "CPUExecutionProvider" and "npu.enabled: false" in placement.reason
        assert not warnings_about(caplog, "a.onnx")
        assert any("placement a.onnx: CPUExecutionProvider" in r.getMessage() for r in caplog.records)
        with pytest.raises(ProviderError, match=r"require_npu is true but npu\.enabled is false"):
            create_session(path, off.model_copy(update={"require_npu": True}))

    def test_disable_env_var_runs_on_cpu_in_a_fresh_process(self, tmp_path: Path) -> None:
        path = export_static(trading_network(0), tmp_path / "a.onnx", batch_size=1).path
        script = (
            "import logging, numpy as np\n"
            "from blockmarket.core.config import NpuConfig\n"
            "from blockmarket.models.providers import create_session\n"
            "logging.basicConfig(level=logging.INFO)\n"
            "for _ in range(2):\n"
            f"    s, p = create_session({str(path)!r}, NpuConfig())\n"
            "print(p.provider, s.run(None, {'state_vector': np.ones((1, 61), np.float32)})[0].shape)\n"
        )
        env = {**os.environ, providers.DISABLE_QNN_ENV: "1"}
        done = subprocess.run(
            [sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True, text=True
        )

        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == "CPUExecutionProvider (1, 25)"
        assert done.stderr.count("QNN disabled by BLOCKMARKET_DISABLE_QNN: running on CPU") == 1
