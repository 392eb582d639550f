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

    def replica_status(self, client_id: str) -> str:
        """Replica mode: a replica's retained status (the group: ``{prefix}/runtime/replicas/+/status``)."""
        return f"{self.prefix}/runtime/replicas/{client_id}/status"

    def agent_matrix(self, agent_id: str) -> str:
        return f"{self.prefix}/agents/{agent_id}/matrix"


# Protocol version 2: a game server's markets live under {prefix}/v2/{owner}/{market}/..., owner first so
# that a broker ACL pattern on the MQTT user name (Mosquitto's %u) confines each game server to its own
MARKET_VERSION = 2
NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")
MAX_NAME_LEN = 64
INBOUND = ("tick", "control")  # what a game server publishes to a market
OUTBOUND = ("matrices", "reply", "notice", "roster")  # what the runtime publishes there


def valid_name(name: str) -> bool:
    """An owner or market name: 1..64 of [A-Za-z0-9_.-], not "." or ".." (safe in a topic and a path)."""
    return 0 < len(name) <= MAX_NAME_LEN and set(name) <= NAME_CHARS and name not in (".", "..")


@dataclass(frozen=True)
class MarketTopics:
    """The topics of one market of protocol version 2 (docs/protocol.md §13)."""

    prefix: str
    owner: str
    market: str

    def __post_init__(self) -> None:
        Topics(self.prefix)  # the same prefix rules
        for what, name in (("owner", self.owner), ("market", self.market)):
            if not valid_name(name):
                raise ValueError(f"{what} {name!r} must be 1..{MAX_NAME_LEN} characters of A-Z a-z 0-9 _ . -")

    @property
    def base(self) -> str:
        return f"{self.prefix}/v{MARKET_VERSION}/{self.owner}/{self.market}"

    def leaf(self, name: str) -> str:
        return f"{self.base}/{name}"

    @property
    def tick(self) -> str:
        return self.leaf("tick")

    @property
    def control(self) -> str:
        return self.leaf("control")

    @property
    def matrices(self) -> str:
        return self.leaf("matrices")

    @property
    def reply(self) -> str:
        return self.leaf("reply")

    @property
    def notice(self) -> str:
        return self.leaf("notice")

    @property
    def roster(self) -> str:
        return self.leaf("roster")

    @staticmethod
    def patterns(prefix: str, shared_group: str | None = None) -> dict[str, str]:
        """Leaf -> the wildcard subscription that receives it from every game server's markets.

        ``shared_group`` (replica mode): ticks and requests through an MQTT 5 shared subscription, each
        to one replica of the group, and every market's retained roster to every replica, first (so a
        replica knows a market before its ticks reach it)."""
        every = f"{prefix}/v{MARKET_VERSION}/+/+"
        if shared_group is None:
            return {leaf: f"{every}/{leaf}" for leaf in INBOUND}
        return {
            "roster": f"{every}/roster",
            **{leaf: f"$share/{shared_group}/{every}/{leaf}" for leaf in INBOUND},
        }

    @classmethod
    def parse(cls, prefix: str, topic: str) -> tuple[MarketTopics, str] | None:
        """(the market, the leaf) of an inbound topic (or a replica's roster) under ``prefix``; None when
        it is not one."""
        head = f"{prefix}/v{MARKET_VERSION}/"
        if not topic.startswith(head):
            return None
        parts = topic[len(head) :].split("/")
        if (
            len(parts) != 3
            or parts[2] not in (*INBOUND, "roster")
            or not (valid_name(parts[0]) and valid_name(parts[1]))
        ):
            return None
        return cls(prefix, parts[0], parts[1]), parts[2]
