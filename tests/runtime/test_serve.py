"""`blockmarket run` as an operator starts it: converts in a worker, serves, stops cleanly, no torch."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest

from blockmarket.core.config import load_config
from blockmarket.models.files import discover_models
from blockmarket.wire.messages import encode_roster, encode_status
from runtime import units
from runtime.agents import create_population
from runtime.server import RuntimeServer
from tests.support.docs import section, table_rows
from tests.support.original_format import make_network, write_original_checkpoint
from tests.support.serving import (
    ITEMS,
    GameClient,
    check_matrices,
    runtime_process,
    stop_process,
    write_config,
)
from tests.support.wire import wait_until

PROBE = Path(__file__).resolve().parents[1] / "support" / "serve_probe.py"

pytestmark = [pytest.mark.mqtt, pytest.mark.slow]


def test_serving_process_converts_in_a_worker_and_never_imports_torch(tmp_path: Path, prefix: str) -> None:
    checkpoints = tmp_path / "trading_agents"
    for i, desired in enumerate(("gold", "apple")):
        network = make_network("TradingNetwork", len(ITEMS), hidden_dim=32, seed=i)
        write_original_checkpoint(
            checkpoints / f"agent_a{i}_final.pth", network, agent_id=f"a{i}", desired_item=desired
        )
    config = write_config(
        tmp_path / "config.yaml",
        training={"model_save_path": str(checkpoints)},
        runtime={"num_agents": 8, "convert_on_startup": True, "hot_reload": True},
        mqtt={"topic_prefix": prefix},
        npu={"enabled": False},
    )
    done = subprocess.run(
        [sys.executable, str(PROBE), str(config), "3"],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {
        "exit_code": 0,
        "answers": 3,
        "agents": 8,
        "torch_imported": False,
        "converter_imported": False,
    }, done.stderr[-3000:]
    converted = sorted(p.name for p in (checkpoints / "onnx").glob("*_metadata.json"))
    assert converted == ["agent_a0_final_metadata.json", "agent_a1_final_metadata.json"]
    assert "converting new checkpoints" in done.stderr


async def test_run_answers_ticks_and_goes_offline_on_sigterm(
    tmp_path: Path, model_dir: Path, prefix: str
) -> None:
    config_path = write_config(
        tmp_path / "config.yaml",
        runtime={
            "num_agents": 5,
            "model_dir": str(model_dir),
            "convert_on_startup": False,
            "status_interval_s": 0.5,
        },
        training={"model_save_path": str(tmp_path / "none")},
        mqtt={"topic_prefix": prefix},
        npu={"enabled": False},
    )
    config = load_config(config_path)
    process = runtime_process(config_path, tmp_path / "run.log")
    try:
        async with GameClient(config.mqtt, len(ITEMS)) as game:
            status = await game.online()
            assert status["agents"] == 5 and status["items"] == list(ITEMS)
            assert status["eps"] == ["CPUExecutionProvider"]
            # what a game server needs to check answers and to notice a dead runtime without the will
            assert status["alpha"] == config.learning.matrix_update_rate
            assert status["status_interval_s"] == 0.5 and abs(status["published_at"] - time.time()) < 5
            limits = status["limits"]
            assert limits["max_agents"] == 5 and limits["matrix_range"] == [0.1, 10.0]  # ids: the roster
            roster = game.roster
            assert roster is not None and roster.client_id == status["client_id"]
            assert roster.desired[:3] == ("gold", ITEMS[1], "apple")
            assert roster.models == ("m0", "m1", "m2", "m0", "m1") and set(roster.model_versions) == {
                "m0",
                "m1",
                "m2",
            }
            models, _ = discover_models(model_dir, ITEMS)
            fresh = create_population(models, ITEMS, num_agents=5, assignment="round_robin", seed=0)
            np.testing.assert_array_equal(roster.initial_matrices, fresh.matrices)  # the starting point
            await game.send(game.tick(0))
            check_matrices((await game.answer(0)).matrices, 5, len(ITEMS))
            assert stop_process(process) == 0
            await wait_until(lambda: game.status.get("state") == "offline", 10, "the offline status")
            assert game.status["ticks_served"] == 1
    finally:
        stop_process(process)
    assert "runtime stopped: 5 agents: 1 ticks received, 1 served" in (tmp_path / "run.log").read_text()


def test_require_npu_without_qnn_is_a_startup_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """npu.require_npu must stop a start where QNN cannot be used, never fall back to CPU quietly."""
    from blockmarket.core.config import NpuConfig
    from blockmarket.models.providers import ProviderError

    monkeypatch.setattr(units, "qnn_available", lambda: False)
    monkeypatch.setattr(units, "qnn_unavailable_reason", lambda: "onnxruntime_qnn is not importable")
    with pytest.raises(ProviderError, match="not importable"):
        units.serve_on_npu(NpuConfig(require_npu=True))
    assert units.serve_on_npu(NpuConfig(require_npu=False)) is False


async def test_status_and_roster_carry_exactly_what_protocol_md_section_6_documents(
    tmp_path: Path, model_dir: Path
) -> None:
    config = load_config(
        write_config(
            tmp_path / "config.yaml",
            runtime={"num_agents": 5, "model_dir": str(model_dir), "convert_on_startup": False},
            npu={"enabled": False},
        )
    )
    server = RuntimeServer(config, handle_signals=False)
    _, pool = await server.build_pool()
    try:
        server.serving_parts(pool, embedded_broker=False)  # scheduler and markets, as `run` serves
        status = msgpack.unpackb(encode_status(server.status("online")))
        roster = msgpack.unpackb(encode_roster(server.roster()))
    finally:
        pool.close()
    text = section("6")
    status_part, roster_part = text.split("### 6.1")[0], text.split("### 6.1")[1].split("### 6.2")[0]

    def documented(part: str) -> set[str]:
        return {key for row in table_rows(part) for key in re.findall(r"`(\w+)`", row[0])}

    assert set(status) == documented(status_part)
    assert set(roster) == documented(roster_part)
    limits_cell = next(row for row in table_rows(status_part) if row[0] == "`limits`")[2]
    assert all(f"`{key}`" in limits_cell for key in status["limits"]), limits_cell
