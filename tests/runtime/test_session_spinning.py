"""runtime.allow_spinning reaches the sessions that serve (spinning ORT threads burn a core between ticks)."""

from __future__ import annotations

from pathlib import Path

from runtime.config import Config, NpuConfig, load_config
from runtime.providers import create_session
from runtime.serve import RuntimeServer
from runtime.sessions import default_session_factory
from tests.runtime.runtime_helpers import write_config

SPINNING = "session.intra_op.allow_spinning"
CONFIG_YAML = Path(__file__).parents[2] / "config.yaml"


def test_serving_sessions_do_not_spin_by_default() -> None:
    assert Config().runtime.allow_spinning is False
    assert load_config(CONFIG_YAML).runtime.allow_spinning is False


async def test_runtime_allow_spinning_reaches_every_serving_session(tmp_path: Path, model_dir: Path) -> None:
    for allow, expected in ((False, "0"), (True, "1")):
        config = load_config(
            write_config(
                tmp_path / f"config-{allow}.yaml",
                runtime={"num_agents": 6, "model_dir": str(model_dir), "allow_spinning": allow},
                npu={"enabled": False},
            )
        )
        server = RuntimeServer(config, handle_signals=False)
        _, pool = await server.build_pool()
        try:
            options = [unit.session.get_session_options() for unit in pool.current.units]
            assert len(options) == 3 and {o.get_session_config_entry(SPINNING) for o in options} == {expected}
        finally:
            pool.close()


def test_create_session_keeps_ort_spinning_unless_asked(model_dir: Path) -> None:
    """Conversion and validation keep ORT's default; serving asks for allow_spinning=False."""
    npu = NpuConfig(enabled=False)
    default, _ = create_session(model_dir / "m0.onnx", npu)
    quiet, _ = create_session(model_dir / "m0.onnx", npu, allow_spinning=False)
    assert default.get_session_options().get_session_config_entry(SPINNING) == "1"
    assert quiet.get_session_options().get_session_config_entry(SPINNING) == "0"
    served, _ = default_session_factory(npu, 1)(model_dir / "m0.onnx", False)  # the serving factory
    assert served.get_session_options().get_session_config_entry(SPINNING) == "0"
