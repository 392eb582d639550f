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
from typing import Any, Final

import yaml
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from blockmarket.core.sections import (  # noqa: F401  (re-exported: callers import them from here)
    ConversionConfig,
    DashboardConfig,
    EnvironmentConfig,
    HttpConfig,
    LearningConfig,
    LoggingConfig,
    MarketsConfig,
    MqttConfig,
    NetworkConfig,
    NpuConfig,
    Precision,
    RuntimeConfig,
    SimulatorConfig,
    TrainingConfig,
    _Section,
)

DEFAULT_CONFIG_PATH = Path("config.yaml")

log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A configuration file is missing, unreadable, or does not validate."""


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
