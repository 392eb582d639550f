"""One typed, validated configuration for every command (loaded once, passed down)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

DEFAULT_CONFIG_PATH = Path("config.yaml")

Precision = Literal["fp32", "fp16", "int8", "int16"]


class ConfigError(ValueError):
    """A configuration file is missing, unreadable, or does not validate."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class EnvironmentConfig(_Section):
    """The market: world, trade limits, items, population (original keys)."""

    world_size: float = Field(100.0, gt=0)
    max_trade_distance: float = Field(20.0, gt=0)
    max_trade_amount: float = Field(5.0, gt=0)
    items_list: tuple[str, ...] = ("diamond", "gold", "apple", "emerald", "redstone")
    population_size: int = Field(20, ge=2)  # 10 was too few to select from (docs/training.md)
    generation_length: int = Field(100, ge=1)
    survival_rate: float = Field(0.5, gt=0, lt=1)
    mutation_rate: float = Field(0.05, ge=0)

    @model_validator(mode="after")
    def _items_unique(self) -> EnvironmentConfig:
        if len(self.items_list) < 2:
            raise ValueError("items_list needs at least two items")
        if len(set(self.items_list)) != len(self.items_list):
            raise ValueError(f"items_list has duplicates: {list(self.items_list)}")
        return self

    @property
    def num_items(self) -> int:
        return len(self.items_list)


class NetworkConfig(_Section):
    hidden_dim: int = Field(128, ge=2)


class LearningConfig(_Section):
    learning_rate: float = Field(0.0005, gt=0)
    matrix_update_rate: float = Field(0.04, gt=0, le=1)


class TrainingConfig(_Section):
    """Evolutionary training (original keys, plus the knobs the original hard-coded)."""

    max_generations: int = Field(20, ge=1)
    simulation_speed: float = Field(1.0, gt=0)
    model_save_frequency: int = Field(5, ge=1)
    model_save_path: str = "models/trading_agents"
    log_frequency: int = Field(1, ge=1)
    early_stopping_patience: int = Field(20, ge=1)
    target_fitness: float = 1000.0
    fresh_agent_fraction: float = Field(0.1, ge=0, lt=1)
    matrix_mutation_std: float = Field(0.3, ge=0)
    top_k_saved: int = Field(5, ge=1)
    seed: int | None = None
    convert_after_training: bool = False
    markets_per_generation: int = Field(64, ge=1)  # independent markets each genome plays per generation


class LoggingConfig(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    format: str = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    log_file: str | None = None


class ConversionConfig(_Section):
    """`.pth` -> ONNX: output place, opset, NPU variants, validation tolerances."""

    output_dir: str | None = None  # default: <training.model_save_path>/onnx
    opset_version: int = Field(17, ge=13)
    precisions: tuple[Precision, ...] = ("fp32",)
    static_batch_sizes: tuple[int, ...] = (1,)
    validation_samples: int = Field(256, ge=16)
    atol: float = Field(1e-5, gt=0)
    rtol: float = Field(1e-4, ge=0)
    calibration_samples: int = Field(256, ge=16)
    context_cache: bool = False
    seed: int = 0


class NpuConfig(_Section):
    """QNN execution provider options (applied when onnxruntime_qnn is importable)."""

    enabled: bool = True
    backend: Literal["htp"] = "htp"
    performance_mode: Literal[
        "default", "burst", "balanced", "high_performance", "sustained_high_performance", "power_saver"
    ] = "burst"
    fp16_precision: bool = True
    soc_model: int = Field(60, ge=0)
    htp_arch: int = Field(73, ge=0)
    context_cache: bool = True
    require_npu: bool = False  # True: a missing NPU or any CPU-fallback node stops startup


class MqttConfig(_Section):
    host: str = "127.0.0.1"
    port: int = Field(1883, ge=1, le=65535)
    topic_prefix: str = "blockmarket"
    client_id: str | None = None
    username: str | None = None
    password_env: str = "BLOCKMARKET_MQTT_PASSWORD"
    tls: bool = False
    ca_file: str | None = None
    keepalive_s: int = Field(30, ge=5)
    qos: Literal[0, 1] = 0
    per_agent_topics: bool = False
    embedded_broker: Literal["auto", "always", "never"] = "auto"
    max_payload_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    reconnect_max_backoff_s: float = Field(10.0, gt=0)


class RuntimeConfig(_Section):
    """The serving process: agents, session pool, reporting, hot reload."""

    num_agents: int = Field(128, ge=1)
    assignment: Literal["round_robin", "one_per_checkpoint"] = "round_robin"
    model_dir: str | None = None  # default: conversion output dir
    max_sessions: int = Field(8, ge=1)
    cpu_pack_precision: Literal["fp32", "int8"] = "fp32"  # int8: per-agent-scaled int8 pack weights
    intra_op_threads: int = Field(1, ge=0)
    allow_spinning: bool = False  # ORT intra-op threads busy-wait between calls: a core burnt between ticks
    convert_on_startup: bool = True
    bootstrap_generations: int = Field(5, ge=1)
    hot_reload: bool = True
    reload_poll_s: float = Field(2.0, gt=0)
    status_interval_s: float = Field(5.0, gt=0)
    seed: int = 0


class SimulatorConfig(_Section):
    tick_rate_hz: float = Field(20.0, gt=0)
    num_agents: int = Field(128, ge=1)
    ticks: int = Field(0, ge=0)  # 0 = until stopped
    reply_timeout_s: float = Field(2.0, gt=0)
    seed: int = 0


class Config(_Section):
    """The whole `config.yaml`."""

    environment: EnvironmentConfig = EnvironmentConfig()
    network: NetworkConfig = NetworkConfig()
    learning: LearningConfig = LearningConfig()
    training: TrainingConfig = TrainingConfig()
    logging: LoggingConfig = LoggingConfig()
    conversion: ConversionConfig = ConversionConfig()
    npu: NpuConfig = NpuConfig()
    mqtt: MqttConfig = MqttConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    simulator: SimulatorConfig = SimulatorConfig()

    @property
    def onnx_dir(self) -> Path:
        if self.conversion.output_dir:
            return Path(self.conversion.output_dir)
        return Path(self.training.model_save_path) / "onnx"

    @property
    def model_dir(self) -> Path:
        return Path(self.runtime.model_dir) if self.runtime.model_dir else self.onnx_dir


def _coerce(data: Any) -> Any:
    """YAML gives lists where the config holds tuples and ints where floats are fine."""
    if isinstance(data, dict):
        return {k: _coerce(v) for k, v in data.items()}
    if isinstance(data, list):
        return tuple(_coerce(v) for v in data)
    return data


def _key_problems(section: type[BaseModel], data: dict[str, Any], prefix: str = "") -> list[str]:
    """Every key must be written out (a config file is the whole truth, not a patch on defaults) and
    every key written must exist."""
    problems = [
        f"{prefix}{key}: unknown key (check the spelling; config.yaml in the repository lists all keys)"
        for key in data
        if key not in section.model_fields
    ]
    for key, field in section.model_fields.items():
        annotation = field.annotation
        if key not in data:
            problems.append(f"{prefix}{key}: missing key")
        elif (
            isinstance(annotation, type) and issubclass(annotation, BaseModel) and isinstance(data[key], dict)
        ):
            problems += _key_problems(annotation, data[key], f"{prefix}{key}.")
    return problems


def _relax_numbers(section: type[BaseModel], data: dict[str, Any]) -> dict[str, Any]:
    """Accept `5` for a float field (strict mode would refuse it) without accepting "5"."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        field = section.model_fields.get(key)
        if field is None:
            out[key] = value
            continue
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel) and isinstance(value, dict):
            out[key] = _relax_numbers(annotation, value)
        elif "float" in str(annotation) and isinstance(value, int) and not isinstance(value, bool):
            out[key] = float(value)
        else:
            out[key] = value
    return out


def config_from_dict(data: dict[str, Any], source: str = "<config>") -> Config:
    """Validate a mapping; errors name the source and the dotted key."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections")
    problems = _key_problems(Config, data)
    if problems:
        raise ConfigError("\n".join(f"{source}: {problem}" for problem in problems))
    try:
        return Config.model_validate(_relax_numbers(Config, _coerce(data)))
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"]) or "(top level)"
            lines.append(f"{source}: {key}: {err['msg']}")
        raise ConfigError("\n".join(lines)) from None


def load_config(path: str | Path | None = None) -> Config:
    """Load and validate `config.yaml`; a missing default file means built-in defaults."""
    if path is None:
        path = DEFAULT_CONFIG_PATH
        if not path.exists():
            return Config()
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return config_from_dict(data if data is not None else {}, source=str(path))


def dump_default_config() -> dict[str, Any]:
    """The built-in defaults as plain YAML-able data (what `config.yaml` in the repository holds)."""
    return Config().model_dump(mode="json")
