"""One typed, validated configuration for every command (loaded once, passed down).

A config file is read as written by this product or by the original trainer: sections and keys it leaves
out take the shipped defaults (and are listed once), the original's `server` and `socket` sections are
reported as unused, and anything else unknown or mistyped is an error naming the file and the dotted key.
Command-line overrides are dotted keys validated by the same model.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Final, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import ErrorDetails

from blockmarket.core.contract import OPSET, TOLERANCES

DEFAULT_CONFIG_PATH = Path("config.yaml")

log = logging.getLogger(__name__)

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
    simulation_speed: float = Field(0.0, ge=0)  # the original's sleep per step (0 = none); never sleeps
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

    @field_validator("format")
    @classmethod
    def _format_works(cls, value: str) -> str:
        """A broken format would fail on every record; refuse it here, naming the key."""
        record = logging.LogRecord("blockmarket", logging.INFO, __file__, 0, "check", None, None)
        try:
            logging.Formatter(value).format(record)
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"not a usable logging format ({type(exc).__name__}: {exc})") from None
        return value


class ConversionConfig(_Section):
    """`.pth` -> ONNX: output place, opset, NPU variants, validation tolerances."""

    output_dir: str | None = None  # default: <training.model_save_path>/onnx
    opset_version: int = Field(OPSET, ge=13)
    precisions: tuple[Precision, ...] = ("fp32",)
    static_batch_sizes: tuple[Annotated[int, Field(ge=1)], ...] = (1,)
    validation_samples: int = Field(256, ge=16)
    atol: float = Field(TOLERANCES["fp32"].atol, gt=0)
    rtol: float = Field(TOLERANCES["fp32"].rtol, ge=0)
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
    """The broker connection: address, topics, credentials (password from the environment), TLS, retries."""

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
    # The longest pause between two connection attempts (jittered by +-20 %): serving resumes within about
    # this long after the broker is back. 1 s keeps that under 2 s; more spares a struggling broker.
    reconnect_max_backoff_s: float = Field(1.0, ge=0.1, le=60.0)
    max_auth_failures: int = Field(3, ge=1)  # credentials refused this many times in a row: the command exits


class HttpConfig(_Section):
    """The serving process's HTTP endpoints: /metrics (Prometheus), /healthz and /readyz (docs/runtime.md)."""

    enabled: bool = True
    host: str = "127.0.0.1"  # loopback: reachable from this machine only; 0.0.0.0 exposes it
    port: int = Field(9640, ge=0, le=65535)  # 0: an ephemeral port (logged)
    max_loop_lag_s: float = Field(5.0, gt=0)  # /healthz fails when the event loop has not run this long


class RuntimeConfig(_Section):
    """The serving process: agents, session pool, reporting, hot reload, HTTP endpoints."""

    num_agents: int = Field(128, ge=1)
    assignment: Literal["round_robin", "one_per_checkpoint"] = "round_robin"
    model_dir: str | None = None  # default: conversion output dir
    max_sessions: int = Field(8, ge=1)
    # CPU population packs' weights: int8 (per-agent scales, a quarter of the bytes), fp32, or auto: int8
    # when the pack passes its per-agent check on this CPU's kernels, else fp32 (logged)
    cpu_pack_precision: Literal["auto", "fp32", "int8"] = "auto"
    intra_op_threads: int = Field(1, ge=0)
    allow_spinning: bool = False  # ORT intra-op threads busy-wait between calls: a core burnt between ticks
    convert_on_startup: bool = True
    bootstrap_generations: int = Field(5, ge=1)
    hot_reload: bool = True
    reload_watcher: Literal["auto", "poll"] = "auto"  # auto: OS notifications (watchfiles) when installed
    reload_poll_s: float = Field(2.0, gt=0)  # the polling watcher's interval
    status_interval_s: float = Field(5.0, gt=0)
    seed: int = 0
    http: HttpConfig = HttpConfig()


class SimulatorConfig(_Section):
    tick_rate_hz: float = Field(20.0, gt=0, allow_inf_nan=False)
    num_agents: int = Field(128, ge=1)
    ticks: int = Field(0, ge=0)  # 0 = until stopped
    reply_timeout_s: float = Field(2.0, gt=0)
    seed: int = 0


class DashboardConfig(_Section):
    """`blockmarket dashboard`: where its page listens, and which runtime /metrics it scrapes."""

    host: str = "127.0.0.1"
    port: int = Field(8650, ge=0, le=65535)  # 0: an ephemeral port (printed)
    metrics_url: str | None = None  # default: runtime.http's /metrics on this machine (when enabled)
    scrape_interval_s: float = Field(1.0, gt=0)


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
    dashboard: DashboardConfig = DashboardConfig()

    @property
    def onnx_dir(self) -> Path:
        if self.conversion.output_dir:
            return Path(self.conversion.output_dir)
        return Path(self.training.model_save_path) / "onnx"

    @property
    def model_dir(self) -> Path:
        return Path(self.runtime.model_dir) if self.runtime.model_dir else self.onnx_dir


# Sections of the original trainer's config.yaml that this product has no use for: read, reported once.
ORIGINAL_ONLY_SECTIONS: Final = {
    "server": "the original's Flask web page",
    "socket": "the original's Socket.IO client",
}
SECTIONS: Final[dict[str, type[BaseModel]]] = {
    name: field.annotation
    for name, field in Config.model_fields.items()
    if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
}

Overrides = Mapping[str, object]  # dotted key ("runtime.num_agents") -> value, validated like the file
Notice = tuple[int, str]  # (logging level, message)


@dataclass(frozen=True)
class LoadedConfig:
    """A validated config and what loading it has to tell the user (logged once logging is set up)."""

    config: Config
    notices: tuple[Notice, ...] = ()

    def log(self) -> None:
        for level, message in self.notices:
            log.log(level, "%s", message)


def _coerce(data: Any) -> Any:
    """YAML gives lists where the config holds tuples."""
    if isinstance(data, dict):
        return {k: _coerce(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return tuple(_coerce(v) for v in data)
    return data


def _unknown(where: str, name: str, known: Iterable[str], what: str) -> str:
    typed = name.rpartition(".")[2]
    close = [k for k in known if k.startswith(typed) or typed.startswith(k)]
    close = close or difflib.get_close_matches(typed, list(known), n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return f"{where}: {name}: unknown {what}{hint}; config.yaml in the repository lists every key"


def _known_sections(data: dict[str, Any], source: str) -> tuple[dict[str, Any], list[str]]:
    """The file's sections this product reads (copied), and every unknown section or key."""
    sections: dict[str, Any] = {}
    problems: list[str] = []
    for name, value in data.items():
        if name in ORIGINAL_ONLY_SECTIONS:
            continue
        if name not in SECTIONS:
            problems.append(_unknown(source, str(name), [*SECTIONS, *ORIGINAL_ONLY_SECTIONS], "section"))
            continue
        fields = SECTIONS[name].model_fields
        if isinstance(value, dict):
            problems += [
                _unknown(source, f"{name}.{key}", fields, "key") for key in value if key not in fields
            ]
            value = dict(value)
        sections[name] = value
    return sections, problems


def _apply_overrides(sections: dict[str, Any], overrides: Overrides) -> list[str]:
    """Write each dotted override into the sections; returns the overrides that name no key."""
    problems = []
    for dotted, value in overrides.items():
        name, _, key = dotted.partition(".")
        if name not in SECTIONS or key not in SECTIONS[name].model_fields:
            problems.append(f"override {dotted}: unknown key")
            continue
        section = sections.setdefault(name, {})
        if isinstance(section, dict):  # otherwise validation refuses the file's section itself
            section[key] = value
    return problems


def _defaulted(data: dict[str, Any], overrides: Overrides) -> str:
    """The sections and keys neither the file nor an override sets (the shipped defaults fill them)."""
    sections = [name for name in SECTIONS if name not in data]
    keys = [
        f"{name}.{key}"
        for name, section in SECTIONS.items()
        if isinstance(data.get(name), dict)
        for key in section.model_fields
        if key not in data[name] and f"{name}.{key}" not in overrides
    ]
    parts = [f"sections {', '.join(sections)}" if sections else "", f"keys {', '.join(keys)}" if keys else ""]
    return "; ".join(part for part in parts if part)


def _error_line(error: ErrorDetails, source: str, overrides: Overrides) -> str:
    key = ".".join(str(p) for p in error["loc"]) or "(top level)"
    for dotted, value in overrides.items():
        if key == dotted or key.startswith(f"{dotted}."):
            return f"override {dotted}={value!r}: {error['msg']}"
    return f"{source}: {key}: {error['msg']}"


def parse_config(data: object, source: str = "<config>", overrides: Overrides | None = None) -> LoadedConfig:
    """Validate config data with dotted-key overrides applied; every error names ``source`` (or the
    override) and the dotted key. Sections and keys left out take the shipped defaults (one INFO notice
    lists them); the original trainer's `server`/`socket` sections are read and reported as unused."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections")
    overrides = dict(overrides or {})
    sections, problems = _known_sections(data, source)
    problems += _apply_overrides(sections, overrides)
    if problems:
        raise ConfigError("\n".join(problems))
    try:
        config = Config.model_validate(_coerce(sections))  # strict pydantic accepts 5 for a float, not "5"
    except ValidationError as exc:
        raise ConfigError("\n".join(_error_line(e, source, overrides) for e in exc.errors())) from None
    notices: list[Notice] = []
    if defaulted := _defaulted(data, overrides):
        notices.append(
            (logging.INFO, f"{source}: not in the file, the shipped defaults apply to {defaulted}")
        )
    unused = [f"{name} ({what})" for name, what in ORIGINAL_ONLY_SECTIONS.items() if name in data]
    if config.training.simulation_speed:
        unused.append("training.simulation_speed (training never sleeps between steps)")
    if unused:
        notices.append((logging.WARNING, f"{source}: not used by this product, ignored: {', '.join(unused)}"))
    return LoadedConfig(config, tuple(notices))


def read_config(path: str | Path | None = None, overrides: Overrides | None = None) -> LoadedConfig:
    """Load, apply overrides, validate; no path and no ./config.yaml means the built-in defaults."""
    if path is None:
        if not DEFAULT_CONFIG_PATH.exists():
            config = parse_config({}, "built-in defaults", overrides).config
            notice = f"no {DEFAULT_CONFIG_PATH} in {Path.cwd()}: the built-in defaults apply"
            return LoadedConfig(config, ((logging.INFO, notice),))
        path = DEFAULT_CONFIG_PATH
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return parse_config(data if data is not None else {}, str(path), overrides)


def load_config(path: str | Path | None = None, overrides: Overrides | None = None) -> Config:
    """:func:`read_config`, logging its notices now (commands log them after setting up logging)."""
    loaded = read_config(path, overrides)
    loaded.log()
    return loaded.config


def dump_default_config() -> dict[str, Any]:
    """The built-in defaults as plain YAML-able data (what `config.yaml` in the repository holds)."""
    return Config().model_dump(mode="json")
