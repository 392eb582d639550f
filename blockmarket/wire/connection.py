"""How a BlockMarket process connects to its MQTT broker: its client id, credentials and TLS options, and
which refusals mean the credentials are wrong (blockmarket.wire.transport keeps the connection up)."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import aiomqtt

from blockmarket.core.config import ConfigError, MqttConfig

# CONNACK reason codes refusing our credentials: bad user name or password, not authorized (paho gives
# MQTT 3.1.1's codes 4 and 5 these MQTT 5 numbers).
AUTH_REFUSALS = frozenset({134, 135})


def runtime_client_id(cfg: MqttConfig) -> str:
    """The runtime's MQTT client id: ``mqtt.client_id`` or one per process (named in its status and will)."""
    return cfg.client_id or f"blockmarket-runtime-{os.getpid()}"


def client_options(cfg: MqttConfig) -> dict[str, object]:
    """aiomqtt.Client keyword arguments for auth and TLS (the password comes from ``cfg.password_env``).

    A user without a password in the environment, or a missing CA file, is a :class:`ConfigError` now
    rather than refused connections later.
    """
    # TCP_NODELAY: ticks and answers are latency-bound single writes; Nagle's algorithm may hold a write
    # that follows an unacknowledged one until the peer's delayed ACK (up to 40 ms on Linux).
    options: dict[str, object] = {
        "keepalive": cfg.keepalive_s,
        "socket_options": ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),),
    }
    if cfg.username:
        password = os.environ.get(cfg.password_env)
        if password is None:
            raise ConfigError(
                f"mqtt.username is {cfg.username!r} but ${cfg.password_env} (named by mqtt.password_env) is "
                "not set: export the user's password in it, or set mqtt.username: null for a broker that "
                "takes anonymous clients"
            )
        options.update(username=cfg.username, password=password)
    if cfg.tls:
        if cfg.ca_file is not None and not Path(cfg.ca_file).is_file():
            raise ConfigError(f"mqtt.ca_file: {cfg.ca_file}: no such file (the CA bundle for TLS)")
        options["tls_params"] = aiomqtt.TLSParameters(ca_certs=cfg.ca_file)
    return options


def refuses_credentials(exc: aiomqtt.MqttError) -> bool:
    """Whether ``exc`` is the broker's CONNACK refusing our user name or password."""
    code = getattr(getattr(exc, "rc", None), "value", None)
    return isinstance(exc, aiomqtt.MqttCodeError) and code in AUTH_REFUSALS
