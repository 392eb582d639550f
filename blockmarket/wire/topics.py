"""The MQTT topic names under one prefix (spec: docs/protocol.md)."""

from __future__ import annotations

from dataclasses import dataclass

# The market a runtime serves on its topic prefix (protocol v1 has one): the `market` label of the
# metrics and the market the simulator's view names
DEFAULT_MARKET = "default"


@dataclass(frozen=True)
class Topics:
    """The MQTT topic names under one prefix."""

    prefix: str

    def __post_init__(self) -> None:
        if not self.prefix or any(c in self.prefix for c in "+#\0") or self.prefix.endswith("/"):
            raise ValueError(
                f"MQTT topic prefix {self.prefix!r} must be non-empty, without '+', '#' or a trailing '/'"
            )

    @property
    def tick(self) -> str:
        return f"{self.prefix}/market/tick"

    @property
    def matrices(self) -> str:
        return f"{self.prefix}/agents/matrices"

    @property
    def status(self) -> str:
        return f"{self.prefix}/runtime/status"

    @property
    def roster(self) -> str:
        return f"{self.prefix}/runtime/roster"

    def agent_matrix(self, agent_id: str) -> str:
        return f"{self.prefix}/agents/{agent_id}/matrix"
