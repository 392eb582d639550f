"""ORT threading settings reach the sessions that serve: runtime.allow_spinning (spinning ORT threads burn
a core between ticks) and runtime.intra_op_threads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from blockmarket.core.config import Config, NpuConfig, load_config
from blockmarket.core.state import realistic_states
from blockmarket.models.providers import create_session
from runtime.server import RuntimeServer
from runtime.units import default_session_factory
from tests.support.serving import ITEMS, write_config

SPINNING = "session.intra_op.allow_spinning"
CONFIG_YAML = Path(__file__).parents[2] / "config.yaml"


def test_serving_sessions_do_not_spin_by_default() -> None:
    assert Config().runtime.allow_spinning is False
    assert load_config(CONFIG_YAML).runtime.allow_spinning is False


async def serving_options(tmp_path: Path, model_dir: Path, **runtime: Any) -> list[ort.SessionOptions]:
    """The options of every session a runtime with these `runtime` settings serves 6 agents with."""
    name = "-".join(f"{key}-{value}" for key, value in runtime.items())
    config = load_config(
        write_config(
            tmp_path / f"config-{name}.yaml",
            runtime={"num_agents": 6, "model_dir": str(model_dir), **runtime},
            npu={"enabled": False},
        )
    )
    _, pool = await RuntimeServer(config, handle_signals=False).build_pool()
    try:
        proposals = await pool.infer(realistic_states(np.random.default_rng(0), 6, len(ITEMS)))
        assert proposals.shape == (6, len(ITEMS) ** 2) and np.isfinite(proposals).all()
        return [unit.session.get_session_options() for unit in pool.current.units]
    finally:
        pool.close()


async def test_runtime_allow_spinning_reaches_every_serving_session(tmp_path: Path, model_dir: Path) -> None:
    for allow, expected in ((False, "0"), (True, "1")):
        options = await serving_options(tmp_path, model_dir, allow_spinning=allow)
        assert len(options) == 3 and {o.get_session_config_entry(SPINNING) for o in options} == {expected}


async def test_runtime_intra_op_threads_reaches_every_serving_session(
    tmp_path: Path, model_dir: Path
) -> None:
    """0 hands the choice to ONNX Runtime (one thread per physical core); a number is used as it is."""
    for threads in (0, 2):
        options = await serving_options(tmp_path, model_dir, intra_op_threads=threads)
        assert len(options) == 3 and {o.intra_op_num_threads for o in options} == {threads}


def test_create_session_keeps_ort_spinning_unless_asked(model_dir: Path) -> None:
    """Conversion and validation keep ORT's default; serving asks for allow_spinning=False."""
    npu = NpuConfig(enabled=False)
    default, _ = create_session(model_dir / "m0.onnx", npu)
    quiet, _ = create_session(model_dir / "m0.onnx", npu, allow_spinning=False)
    assert default.get_session_options().get_session_config_entry(SPINNING) == "1"
    assert quiet.get_session_options().get_session_config_entry(SPINNING) == "0"
    served, _ = default_session_factory(npu, 1)(model_dir / "m0.onnx", False)  # the serving factory
    assert served.get_session_options().get_session_config_entry(SPINNING) == "0"
