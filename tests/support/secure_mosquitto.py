"""A private Mosquitto running the SHIPPED deploy/mosquitto configuration: users, ACL, TLS.

The test makes what an operator makes by following docs/deploy.md: users with `mosquitto_passwd -b`, a
self-signed CA and a server certificate for 127.0.0.1 with `openssl`. Only the paths and the ports of the
shipped files are changed (and the commented TLS listener switched on), so the tests check those files.
"""

from __future__ import annotations

import getpass
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from blockmarket.core.config import MqttConfig
from tests.support.wire import PrivateMosquitto, free_port

SHIPPED = Path(__file__).resolve().parents[2] / "deploy" / "mosquitto"
INSTALLED = "/etc/mosquitto/blockmarket/"  # where the shipped file expects its companions
RUNTIME_USER, GAME_USER = "blockmarket-runtime", "blockmarket-game"  # the users the shipped ACL names
PREFIX = "blockmarket"  # the topic prefix the shipped ACL grants


def _run(command: str) -> None:
    """Run a command given as one line (the paths in it are the test's, without spaces)."""
    done = subprocess.run(command.split(), capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, f"{command}: {done.stderr}"


def make_certificates(directory: Path) -> Path:
    """ca.crt (a self-signed CA) and server.crt/server.key for 127.0.0.1, signed by it; returns ca.crt."""
    assert " " not in str(directory)
    new_key = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"
    ca_key, ca, server = directory / "ca.key", directory / "ca.crt", directory / "server"
    _run(
        f"openssl req -x509 -days 2 {new_key} -keyout {ca_key} -out {ca} -subj /CN=BlockMarket-test-CA "
        "-addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign"
    )
    _run(f"openssl req {new_key} -keyout {server}.key -out {server}.csr -subj /CN=127.0.0.1")
    Path(f"{server}.ext").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
        "authorityKeyIdentifier=keyid\nsubjectKeyIdentifier=hash\n"
    )
    _run(
        f"openssl x509 -req -days 2 -in {server}.csr -CA {ca} -CAkey {ca_key} -CAcreateserial "
        f"-extfile {server}.ext -out {server}.crt"
    )
    return ca


def shipped_config(directory: Path, port: int, tls_port: int) -> str:
    """deploy/mosquitto/blockmarket.conf with its files in ``directory``, on these loopback ports, TLS on.

    One line is added: the broker keeps the test's user (started as root, Mosquitto would switch to the
    'mosquitto' user, which cannot read the test's private temporary directory).
    """
    text = (SHIPPED / "blockmarket.conf").read_text() + f"\nuser {getpass.getuser()}\n"
    for old, new in {
        INSTALLED: f"{directory}/",
        "listener 1883 127.0.0.1": f"listener {port} 127.0.0.1",
        "#listener 8883": f"listener {tls_port} 127.0.0.1",
        "#certfile ": "certfile ",
        "#keyfile ": "keyfile ",
    }.items():
        assert old in text, f"{SHIPPED / 'blockmarket.conf'} no longer has {old!r}: update this test"
        text = text.replace(old, new)
    return text


@dataclass
class SecureMosquitto:
    """The running broker, its users' passwords and the CA its TLS listener's certificate chains to."""

    broker: PrivateMosquitto
    tls_port: int
    ca_file: Path
    passwords: dict[str, str]

    @classmethod
    def start(cls, directory: Path, *game_servers: str) -> SecureMosquitto:
        """With the shipped users, and a user per name in ``game_servers`` (password: <name>-secret)."""
        directory.mkdir(parents=True, exist_ok=True)
        shutil.copy(SHIPPED / "blockmarket.acl", directory / "blockmarket.acl")
        passwords = {RUNTIME_USER: "runtime-secret", GAME_USER: "game-secret"}
        passwords.update({name: f"{name}-secret" for name in game_servers})
        for user, password in passwords.items():
            create = "" if (directory / "passwd").exists() else "-c"
            _run(f"mosquitto_passwd {create} -b {directory / 'passwd'} {user} {password}")
        ca_file = make_certificates(directory)
        port, tls_port = free_port(), free_port()
        broker = PrivateMosquitto(directory, shipped_config(directory, port, tls_port), (port, tls_port))
        broker.start()
        return cls(broker, tls_port, ca_file, passwords)

    def mqtt(self, user: str | None, password_env: str, *, tls: bool = False, **fields: object) -> MqttConfig:
        """A client config for ``user`` (None: anonymous) on the plain or the TLS listener."""
        return MqttConfig(
            port=self.tls_port if tls else self.broker.port,
            topic_prefix=PREFIX,
            username=user,
            password_env=password_env,
            tls=tls,
            ca_file=str(self.ca_file) if tls else None,
            keepalive_s=5,
            **fields,  # type: ignore[arg-type]
        )

    def refusals(self) -> int:
        """Connections the broker refused for their credentials so far (from its log)."""
        return self.broker.log.read_text().count("disconnected, not authorised")
