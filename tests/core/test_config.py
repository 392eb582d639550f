"""The config pipeline: the original trainer's files load, defaults fill gaps, overrides are validated."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import pytest
import yaml

from blockmarket.core.config import (
    Config,
    ConfigError,
    dump_default_config,
    load_config,
    parse_config,
    read_config,
)

REPO = Path(__file__).resolve().parents[2]
ORIGINAL = {version: REPO / "tests" / "conversion" / f"original_config_v{version}.yaml" for version in (1, 8)}
NEW_SECTIONS = "sections conversion, npu, mqtt, runtime, simulator, dashboard"
NEW_TRAINING_KEYS = (
    "keys training.fresh_agent_fraction, training.matrix_mutation_std, training.top_k_saved, "
    "training.seed, training.convert_after_training, training.markets_per_generation"
)


def test_the_shipped_file_is_the_built_in_defaults_and_complete() -> None:
    loaded = read_config(REPO / "config.yaml")
    assert loaded.config == Config()
    assert loaded.notices == ()


@pytest.mark.parametrize("version", [1, 8])
def test_the_original_trainers_config_loads_with_its_own_values(version: int) -> None:
    path = ORIGINAL[version]
    loaded = read_config(path)
    config = loaded.config
    expected_items = (
        ("wood", "stone", "iron", "gold", "food") if version == 1 else Config().environment.items_list
    )
    assert config.environment.items_list == expected_items
    assert config.environment.population_size == (50 if version == 1 else 10)
    assert config.environment.max_trade_amount == (10.0 if version == 1 else 5.0)
    assert config.learning.matrix_update_rate == (0.1 if version == 1 else 0.04)
    assert config.training.target_fitness == (100.0 if version == 1 else 250.0)
    assert config.training.simulation_speed == 0.01
    assert config.logging.log_file == "trading.log"
    assert config.logging.format == "%(asctime)s - %(name)s - %(levelname)s - %(message)s"
    assert config.runtime == Config().runtime and config.mqtt == Config().mqtt  # filled from the defaults
    ignored = "server (the original's Flask web page)"
    if version == 8:
        ignored += ", socket (the original's Socket.IO client)"
    assert loaded.notices == (
        (
            logging.INFO,
            f"{path}: not in the file, the shipped defaults apply to {NEW_SECTIONS}; {NEW_TRAINING_KEYS}",
        ),
        (
            logging.WARNING,
            f"{path}: not used by this product, ignored: {ignored}, "
            "training.simulation_speed (training never sleeps between steps)",
        ),
    )


def test_load_config_logs_the_notices_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="blockmarket.core.config")
    load_config(ORIGINAL[8])
    messages = [r.getMessage() for r in caplog.records if r.name == "blockmarket.core.config"]
    assert len(messages) == 2
    assert "shipped defaults apply to" in messages[0] and "server" in messages[1] and "socket" in messages[1]


def write(path: Path, data: Mapping[str, object]) -> Path:
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def original(version: int) -> dict[str, dict[str, object]]:
    data: dict[str, dict[str, object]] = yaml.safe_load(ORIGINAL[version].read_text())
    return data


def test_simulation_speed_zero_is_the_originals_no_delay_and_not_reported(tmp_path: Path) -> None:
    data = original(1)
    data["training"]["simulation_speed"] = 0
    path = write(tmp_path / "c.yaml", data)
    loaded = read_config(path)
    assert loaded.config.training.simulation_speed == 0.0
    assert loaded.notices[1] == (
        logging.WARNING,
        f"{path}: not used by this product, ignored: server (the original's Flask web page)",
    )
    data["training"]["simulation_speed"] = -0.01
    with pytest.raises(ConfigError, match=r"c\.yaml: training\.simulation_speed: Input should be greater"):
        read_config(write(tmp_path / "c.yaml", data))


def test_a_misspelt_key_in_a_known_section_stays_an_error(tmp_path: Path) -> None:
    data = original(8)
    data["training"]["max_generation"] = data["training"].pop("max_generations")
    path = write(tmp_path / "c.yaml", data)
    with pytest.raises(ConfigError) as caught:
        read_config(path)
    assert str(caught.value) == (
        f"{path}: training.max_generation: unknown key (did you mean max_generations?); "
        "config.yaml in the repository lists every key"
    )


def test_an_unknown_section_is_an_error_but_servers_and_sockets_are_not(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", {**dump_default_config(), "runtim": {"num_agents": 3}})
    with pytest.raises(ConfigError, match=r"c\.yaml: runtim: unknown section \(did you mean runtime\?\)"):
        read_config(path)
    path = write(tmp_path / "ok.yaml", {**dump_default_config(), "server": {"port": 1}, "socket": {}})
    assert read_config(path).config == Config()


def test_a_missing_key_takes_the_default_and_is_listed(tmp_path: Path) -> None:
    data = dump_default_config()
    del data["conversion"]["opset_version"]
    data["runtime"]["num_agents"] = 7
    path = write(tmp_path / "c.yaml", data)
    loaded = read_config(path)
    assert loaded.config.conversion.opset_version == Config().conversion.opset_version
    assert loaded.config.runtime.num_agents == 7
    assert loaded.notices == (
        (
            logging.INFO,
            f"{path}: not in the file, the shipped defaults apply to keys conversion.opset_version",
        ),
    )


def test_overrides_are_validated_like_the_file(tmp_path: Path) -> None:
    path = write(tmp_path / "c.yaml", dump_default_config())
    with pytest.raises(ConfigError) as caught:
        load_config(path, {"training.seed": "not-an-int", "training.model_save_frequency": -3})
    assert set(str(caught.value).splitlines()) == {
        "override training.seed='not-an-int': Input should be a valid integer",
        "override training.model_save_frequency=-3: Input should be greater than or equal to 1",
    }
    with pytest.raises(ConfigError, match=r"^override runtime\.agents: unknown key$"):
        load_config(path, {"runtime.agents": 3})
    with pytest.raises(ConfigError, match=r"^override simulator\.tick_rate_hz=inf: "):
        load_config(path, {"simulator.tick_rate_hz": float("inf")})
    config = load_config(path, {"runtime.num_agents": 12, "conversion.precisions": ("fp32", "int8")})
    assert config.runtime.num_agents == 12 and config.conversion.precisions == ("fp32", "int8")


def test_an_override_sets_a_key_the_file_leaves_out(tmp_path: Path) -> None:
    loaded = read_config(ORIGINAL[1], {"runtime.num_agents": 12, "training.seed": 3})
    assert loaded.config.runtime.num_agents == 12 and loaded.config.training.seed == 3
    defaulted = loaded.notices[0][1]
    assert "training.seed" not in defaulted and "runtime" in defaulted  # the rest of runtime is default


def test_errors_from_the_file_and_from_overrides_name_their_source(tmp_path: Path) -> None:
    data = dump_default_config()
    data["mqtt"]["port"] = 0
    path = write(tmp_path / "c.yaml", data)
    with pytest.raises(ConfigError) as caught:
        read_config(path, {"runtime.num_agents": 0})
    assert str(caught.value).splitlines() == [
        f"{path}: mqtt.port: Input should be greater than or equal to 1",
        "override runtime.num_agents=0: Input should be greater than or equal to 1",
    ]


def test_a_logging_format_that_cannot_format_is_refused_by_key(tmp_path: Path) -> None:
    data = dump_default_config()
    data["logging"]["format"] = "%(asctime)s %(agent)s %(message)s"
    with pytest.raises(
        ConfigError, match=r"c\.yaml: logging\.format: Value error, not a usable logging format"
    ):
        read_config(write(tmp_path / "c.yaml", data))


def test_no_file_means_the_built_in_defaults_said_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    loaded = read_config(None, {"runtime.num_agents": 5})
    assert loaded.config.runtime.num_agents == 5
    assert loaded.notices == ((logging.INFO, f"no config.yaml in {tmp_path}: the built-in defaults apply"),)


def test_a_config_that_is_not_a_mapping_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"^x\.yaml: the top level must be a mapping of sections$"):
        parse_config(["environment"], "x.yaml")


def test_a_replica_group_needs_mqtt5_a_real_broker_and_a_plain_name() -> None:
    """mqtt.shared_group (docs/deploy.md "Replicas"): refused with what to change, naming the key."""
    assert parse_config({"mqtt": {"shared_group": "blockmarket"}}).config.mqtt.shared_group == "blockmarket"
    for mqtt, reason in (
        ({"shared_group": "g", "protocol": "3.1.1"}, "needs MQTT 5"),
        ({"shared_group": "g", "embedded_broker": "always"}, "needs a real broker"),
        ({"shared_group": "a/b"}, "without '/'"),
        ({"shared_group": ""}, "non-empty"),
    ):
        with pytest.raises(ConfigError, match=rf"mqtt.*{reason}"):
            parse_config({"mqtt": mqtt})
