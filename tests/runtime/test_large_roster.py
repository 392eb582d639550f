"""10,000+ agents: the runtime connects (its last will stays small), announces the roster, serves every
tick; message limits follow runtime.num_agents, and a payload limit too small for them stops startup."""

from __future__ import annotations

import json
import signal
from collections.abc import Mapping
from pathlib import Path

import pytest

from blockmarket.core.config import MqttConfig, load_config
from blockmarket.simulator.roster import discover_roster
from blockmarket.wire.messages import encode_status
from blockmarket.wire.runtime_link import MAX_WILL_BYTES, RuntimeTransport
from tests.support.serving import (
    ITEMS,
    GameClient,
    check_matrices,
    python_module,
    runtime_process,
    stop_process,
    write_config,
)
from tests.support.wire import wait_until

AGENTS = 10_000
BEYOND = 12_000  # past the 10,000 agents the message limits were once fixed at


def large_config(
    tmp_path: Path, model_dir: Path, prefix: str, agents: int, **sections: Mapping[str, object]
) -> Path:
    """A config serving ``agents`` agents drawn from the three test models, without conversion."""
    return write_config(
        tmp_path / "config.yaml",
        runtime={
            "num_agents": agents,
            "model_dir": str(model_dir),
            "convert_on_startup": False,
            "hot_reload": False,
            "status_interval_s": 0.5,
        },
        training={"model_save_path": str(tmp_path / "none")},
        mqtt={"topic_prefix": prefix, **sections.pop("mqtt", {})},
        npu={"enabled": False},
        **sections,
    )


@pytest.mark.mqtt
@pytest.mark.slow
async def test_ten_thousand_agents_connect_announce_the_roster_and_leave_a_small_will(
    tmp_path: Path, model_dir: Path, prefix: str
) -> None:
    config_path = large_config(tmp_path, model_dir, prefix, AGENTS)
    config = load_config(config_path)
    process = runtime_process(config_path, tmp_path / "run.log")
    try:
        async with GameClient(config.mqtt, len(ITEMS)) as game:
            status = await game.online(120)
            assert status["agents"] == AGENTS and status["client_id"] == f"blockmarket-runtime-{process.pid}"
            assert len(encode_status(status)) < 4096  # a heartbeat: the roster has its own topic
            assert game.roster is not None and len(game.agent_ids) == len(game.roster.desired) == AGENTS
            assert game.roster.initial_matrices.shape == (AGENTS, len(ITEMS), len(ITEMS))
            roster = await discover_roster(config, 10)  # what `blockmarket simulate` reads
            assert roster is not None and roster.agent_ids == game.agent_ids
            await game.send(game.tick(0))
            check_matrices((await game.answer(0, timeout=30)).matrices, AGENTS, len(ITEMS))
            process.send_signal(signal.SIGKILL)  # no goodbye: the broker publishes the last will
            process.wait(10)
            await wait_until(lambda: game.status.get("state") == "offline", 10, "the last will")
            assert game.status == {
                "state": "offline",
                "pid": process.pid,
                "client_id": f"blockmarket-runtime-{process.pid}",
                "started_at": status["started_at"],
            }
    finally:
        stop_process(process)
    log = (tmp_path / "run.log").read_text()
    assert "connected to MQTT broker" in log and "Traceback" not in log, log[-3000:]


@pytest.mark.mqtt
@pytest.mark.slow
async def test_twelve_thousand_agents_every_tick_served_to_the_simulator(
    tmp_path: Path, model_dir: Path, prefix: str
) -> None:
    """`blockmarket run` and `blockmarket simulate` with 12,000 agents: every tick answered, none refused."""
    simulator = {"tick_rate_hz": 1.0, "reply_timeout_s": 30.0}
    config_path = large_config(tmp_path, model_dir, prefix, BEYOND, simulator=simulator)
    config = load_config(config_path)
    process = runtime_process(config_path, tmp_path / "run.log")
    try:
        async with GameClient(config.mqtt, len(ITEMS)) as game:
            assert (await game.online(120))["agents"] == BEYOND
        summary_path = tmp_path / "sim.json"
        simulate = ["simulate", "--config", str(config_path), "--ticks", "5", "--wait", "30", "--quiet"]
        done = python_module("blockmarket.cli", *simulate, "--json", str(summary_path))
        assert done.returncode == 0, done.stderr[-3000:]
        summary = json.loads(summary_path.read_text())
        assert summary["agents"] == BEYOND and summary["ticks_sent"] == 5
        assert summary["answered"] == 5 and summary["missing"] == 0, summary
        assert summary["dropped"] == {} and summary["unknown_agents"] == 0 and summary["rule_violations"] == 0
    finally:
        assert stop_process(process) == 0
    log = (tmp_path / "run.log").read_text()
    assert "oversized" not in log and "Traceback" not in log, log[-3000:]


def test_a_payload_limit_too_small_for_the_agents_stops_startup_naming_the_keys(
    tmp_path: Path, model_dir: Path
) -> None:
    config_path = large_config(tmp_path, model_dir, "unused", BEYOND, mqtt={"max_payload_bytes": 1_048_576})
    process = runtime_process(config_path, tmp_path / "run.log")
    assert process.wait(120) == 1
    log = (tmp_path / "run.log").read_text()
    assert "12000 agents: answer messages of " in log and "exceed mqtt.max_payload_bytes (1,048,576)" in log
    assert "or serve a smaller runtime.num_agents" in log and "Traceback" not in log


def test_a_will_beyond_the_mqtt_limit_is_refused_by_name() -> None:
    """paho would fail every connect with a struct.error; the transport says what is wrong up front."""
    roster = {"state": "offline", "agent_ids": [f"agent-{i:04d}" for i in range(AGENTS)]}
    with pytest.raises(ValueError, match=f"runtime/status is \\d+ bytes, MQTT allows {MAX_WILL_BYTES}"):
        RuntimeTransport(MqttConfig(), on_tick=lambda *_: None, will_payload=encode_status(roster))
