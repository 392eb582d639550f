"""The sections of the configuration: one pydantic model each, with the shipped defaults (config.yaml
lists the same keys, with comments; blockmarket.core.config loads and checks a file against them)."""

from __future__ import annotations

import logging
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from blockmarket.core.contract import OPSET, TOLERANCES

Precision = Literal["fp32", "fp16", "int8", "int16"]


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
    protocol: Literal["auto", "3.1.1", "5"] = "auto"  # auto: 5; 3.1.1 with the embedded broker
    max_auth_failures: int = Field(3, ge=1)  # credentials refused this many times in a row: the command exits
    # Replica mode (docs/deploy.md): runtimes with the same group share the v2 markets' ticks and requests
    # through MQTT 5 shared subscriptions ($share/<group>/...); null: this runtime serves alone
    shared_group: str | None = None

    @model_validator(mode="after")
    def _replicas_speak_mqtt5(self) -> MqttConfig:
        group = self.shared_group
        if group is None:
            return self
        if not group or any(c in group for c in "/+#\0"):
            raise ValueError(f"shared_group {group!r} must be a non-empty name without '/', '+' or '#'")
        if self.protocol == "3.1.1":
            raise ValueError("shared_group needs MQTT 5 (shared subscriptions): set protocol to auto or 5")
        if self.embedded_broker == "always":
            raise ValueError(
                "shared_group needs a real broker that replicas share: embedded_broker is always"
            )
        return self


class HttpConfig(_Section):
    """The serving process's HTTP endpoints: /metrics (Prometheus), /healthz and /readyz (docs/runtime.md)."""

    enabled: bool = True
    host: str = "127.0.0.1"  # loopback: reachable from this machine only; 0.0.0.0 exposes it
    port: int = Field(9640, ge=0, le=65535)  # 0: an ephemeral port (logged)
    max_loop_lag_s: float = Field(5.0, gt=0)  # /healthz fails when the event loop has not run this long


class MarketsConfig(_Section):
    """Protocol version 2: markets that game servers open, change and close (docs/protocol.md §13)."""

    enabled: bool = True  # subscribe to {prefix}/v2/+/+/tick and /control
    max_markets: int = Field(64, ge=1)  # open at once (the v1 default market not counted)
    max_agents_per_market: int = Field(1000, ge=1)
    max_agents: int = Field(10_000, ge=1)  # live agents of all markets, the default market included
    idle_close_s: float = Field(600.0, gt=0)  # a market with no tick or request for this long is closed
    batch_window_ms: float = Field(0.0, ge=0, le=1000)  # wait this long for other markets' ticks to batch
    cross_market_batching: bool = True  # false: one inference per market tick (the benchmark's baseline)
    notice_rate_hz: float = Field(20.0, gt=0)  # notices per market per second at most (the rest: counted)
    spare_rows: int = Field(1, ge=0)  # free rows for every repository model the default market does not use


class RuntimeConfig(_Section):
    """The serving process: agents, session pool, reporting, hot reload, HTTP endpoints."""

    num_agents: int = Field(128, ge=1)
    assignment: Literal["round_robin", "one_per_checkpoint"] = "round_robin"
    model_dir: str | None = None  # default: conversion output dir
    max_sessions: int = Field(8, ge=1)
    # CPU population packs' weights: int8 (per-agent scales, a quarter of the bytes), fp32, or auto: int8
    # when the pack passes its per-agent check on this CPU's kernels, else fp32 (logged)
    cpu_pack_precision: Literal["auto", "fp32", "int8"] = "auto"
    # every answer independent of the other agents in its session run, bit for bit (one padding row per
    # run; a pack one slot more per model). Always on in replica mode (mqtt.shared_group): docs/deploy.md
    batch_invariant: bool = False
    # CPU packs run only the models whose agents ticked (selectable packs, docs/runtime.md); false: every
    # inference runs the whole pack
    select_models: bool = True
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
    markets: MarketsConfig = MarketsConfig()


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
