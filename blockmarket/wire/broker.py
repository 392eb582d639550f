"""An embedded MQTT broker (amqtt, MQTT 3.1.1) so the first command works on a machine without one.

Only ever on loopback, only when nothing answers at the configured address (or when asked to always),
and always announced in the log: production uses Mosquitto or EMQX.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from typing import TYPE_CHECKING

from blockmarket.core.config import MqttConfig

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    from amqtt.broker import Broker


PROBE_TIMEOUT_S = 1.0


class BrokerError(RuntimeError):
    """The embedded broker could not be started (the message says where and what to do)."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def broker_answers(host: str, port: int, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """True when something accepts TCP connections at host:port."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
    except (OSError, TimeoutError):
        return False
    writer.close()
    await writer.wait_closed()
    return True


class EmbeddedBroker:
    """A running amqtt broker on one loopback port, inside this process's event loop."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._broker: Broker | None = None

    async def start(self) -> None:
        from amqtt.broker import Broker  # imported here: amqtt is only needed when we embed

        logging.getLogger("amqtt").setLevel(logging.WARNING)  # its INFO is per packet
        broker = Broker(
            {
                "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
                "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
            }
        )
        try:
            await broker.start()
        except Exception as exc:  # amqtt wraps bind errors in its own BrokerError
            raise BrokerError(
                f"cannot start the embedded MQTT broker on {self.host}:{self.port} ({exc}); "
                "free the port or set mqtt.embedded_broker: never and point mqtt.host/port at a broker"
            ) from exc
        self._broker = broker
        logger.warning(
            "no MQTT broker answered at %s:%d: started an EMBEDDED amqtt broker there (loopback only, "
            "for trying things out; use Mosquitto or EMQX in production, or set mqtt.embedded_broker: never)",
            self.host,
            self.port,
        )

    async def stop(self) -> None:
        if self._broker is None:
            return
        broker, self._broker = self._broker, None
        await broker.shutdown()
        logger.info("embedded MQTT broker on %s:%d stopped", self.host, self.port)


async def ensure_broker(cfg: MqttConfig) -> EmbeddedBroker | None:
    """Start an embedded broker when config allows and none answers at cfg.host:cfg.port; else None."""
    if cfg.embedded_broker == "never":
        return None
    loopback = is_loopback(cfg.host)
    if cfg.embedded_broker == "auto":
        if await broker_answers(cfg.host, cfg.port):
            logger.info("using the MQTT broker at %s:%d", cfg.host, cfg.port)
            return None
        if not loopback:
            logger.warning(
                "no MQTT broker answers at %s:%d (not loopback: none embedded); retrying until one does",
                cfg.host,
                cfg.port,
            )
            return None
    elif not loopback:
        raise BrokerError(
            f"mqtt.embedded_broker is 'always' but mqtt.host {cfg.host!r} is not a loopback address"
        )
    broker = EmbeddedBroker("127.0.0.1" if cfg.host == "localhost" else cfg.host, cfg.port)
    await broker.start()
    return broker
