"""Commands run and stop the same way where the event loop cannot watch signals (Windows), simulated here.

Windows is simulated, not run: `loop.add_signal_handler` raising NotImplementedError (what both Windows
event loops do) and `lifecycle.WINDOWS` set, either in this process (monkeypatch) or in a command's
processes through `windows_like/sitecustomize.py`. Everything else is real: the RuntimeServer, the
simulator and the demo against the real broker, and real signals.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from blockmarket.core import lifecycle
from blockmarket.core.config import MqttConfig, load_config
from blockmarket.wire.transport import MqttLink
from runtime.server import RuntimeServer
from tests.support.broker import SHARED_HOST, SHARED_PORT
from tests.support.serving import (
    ITEMS,
    GameClient,
    check_matrices,
    runtime_process,
    stop_process,
    write_config,
)
from tests.support.wire import Inbox, started, wait_until

pytestmark = pytest.mark.mqtt

WINDOWS_LIKE = Path(__file__).with_name("windows_like")
REFUSED = "windows-like: loop signal handlers refused"  # windows_like/sitecustomize.py says this
STOPPING = "SIGINT received: stopping cleanly"


def windows_like_env() -> dict[str, str]:
    """The environment that makes a command's processes (children included) load windows_like/."""
    path = os.pathsep.join(p for p in (str(WINDOWS_LIKE), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path}


def serving_config(tmp_path: Path, model_dir: Path, prefix: str) -> Path:
    return write_config(
        tmp_path / "config.yaml",
        runtime={"num_agents": 5, "model_dir": str(model_dir), "convert_on_startup": False},
        training={"model_save_path": str(tmp_path / "none")},
        mqtt={"topic_prefix": prefix},
        npu={"enabled": False},
    )


def command(args: Sequence[str], out: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """`blockmarket ARGS` with stdout in ``out`` and stderr in ``out``.err."""
    with out.open("wb") as stdout, out.with_suffix(".err").open("wb") as stderr:
        return subprocess.Popen(
            [sys.executable, "-m", "blockmarket.cli", *args], stdout=stdout, stderr=stderr, env=env
        )


def wait_for_text(
    path: Path, text: str, process: subprocess.Popen[bytes], timeout: float = 60.0, count: int = 1
) -> None:
    deadline = time.monotonic() + timeout
    while path.read_text().count(text) < count:
        assert process.poll() is None, f"exited with {process.returncode} before {text!r}: {path.read_text()}"
        assert time.monotonic() < deadline, f"no {text!r} in {path} after {timeout} s"
        time.sleep(0.05)


def refuse_loop_signal_handlers(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The running loop refuses signal handlers as on Windows; returns the signals it was asked for."""
    asked: list[int] = []

    def refuse(sig: int, *_: object) -> None:
        asked.append(sig)
        raise NotImplementedError

    monkeypatch.setattr(asyncio.get_running_loop(), "add_signal_handler", refuse)
    return asked


# ------------------------------------------------------------------------------ lifecycle.run


def test_windows_runs_a_selector_loop_woken_by_signals(monkeypatch: pytest.MonkeyPatch, prefix: str) -> None:
    """aiomqtt works on the loop `run` picks for Windows, and a signal wakes that loop's select()."""

    class SelectorLoop(asyncio.SelectorEventLoop):
        """asyncio.SelectorEventLoop, recognisable."""

    async def main() -> tuple[type, int]:
        wakeup_fd = signal.set_wakeup_fd(-1)
        signal.set_wakeup_fd(wakeup_fd)
        inbox = Inbox()
        topic = f"{prefix}/lifecycle"
        link = MqttLink(
            MqttConfig(host=SHARED_HOST, port=SHARED_PORT, topic_prefix=prefix),
            client_id=f"{prefix}-loop",
            subscriptions={topic: inbox},
        )
        task = await started(link)
        assert await link.publish(topic, b"over aiomqtt")
        assert await inbox.next() == b"over aiomqtt"
        await link.disconnect()
        await task
        return type(asyncio.get_running_loop()), wakeup_fd

    monkeypatch.setattr(asyncio, "SelectorEventLoop", SelectorLoop)
    monkeypatch.setattr(lifecycle, "WINDOWS", True)
    loop_type, wakeup_fd = lifecycle.run(main())
    assert loop_type is SelectorLoop and wakeup_fd != -1
    assert signal.set_wakeup_fd(-1) == -1  # restored
    monkeypatch.setattr(lifecycle, "WINDOWS", False)
    loop_type, wakeup_fd = lifecycle.run(main())
    assert loop_type is not SelectorLoop and wakeup_fd == -1


def test_windows_ctrl_c_before_serving_still_interrupts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside stop_on_signals (loading models, converting) Ctrl-C keeps asyncio's meaning: interrupt."""

    async def main() -> None:
        signal.raise_signal(signal.SIGINT)
        await asyncio.sleep(30)

    monkeypatch.setattr(lifecycle, "WINDOWS", True)
    # Ctrl-C with its default meaning: a process started in the background by a shell without job
    # control (as CI may be) inherits SIGINT ignored, and then there is nothing to interrupt
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    start = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            lifecycle.run(main())
    finally:
        signal.signal(signal.SIGINT, previous)
    assert time.monotonic() - start < 5


async def test_stop_at_eof_stops_only_within_the_block() -> None:
    stops: list[str] = []
    for label in ("inside", "after"):
        read_fd, write_fd = os.pipe()
        try:
            with lifecycle.stop_at_eof(read_fd, functools.partial(stops.append, label)):
                os.write(write_fd, b"data is not a stop\n")
                await asyncio.sleep(0.2)
                assert stops == ([] if label == "inside" else ["inside"])
                if label == "inside":
                    os.close(write_fd)
                    await wait_until(lambda: stops == ["inside"], 5, "the stop at end of file")
            if label == "after":
                os.close(write_fd)
            for reader in [t for t in threading.enumerate() if t.name == "stop-at-eof"]:
                reader.join(5)  # it has seen the end of file
            await asyncio.sleep(0.05)  # a stop it handed the loop would have run by now
        finally:
            os.close(read_fd)
    assert stops == ["inside"]


# ------------------------------------------------------------------------------ a real RuntimeServer


async def test_runtime_server_stops_cleanly_on_sigint_without_loop_signal_handlers(
    tmp_path: Path, model_dir: Path, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    asked = refuse_loop_signal_handlers(monkeypatch)
    before = {sig: signal.getsignal(sig) for sig in lifecycle.STOP_SIGNALS}
    config = load_config(serving_config(tmp_path, model_dir, prefix))
    serving = asyncio.create_task(RuntimeServer(config).serve())
    async with GameClient(config.mqtt, len(ITEMS)) as game:
        await game.online()
        await game.send(game.tick(0))
        check_matrices((await game.answer(0)).matrices, 5, len(ITEMS))
        assert signal.getsignal(signal.SIGINT) not in (before[signal.SIGINT], None)  # ours, via signal.signal
        signal.raise_signal(signal.SIGINT)
        assert await asyncio.wait_for(serving, 30) == 0
        await wait_until(lambda: game.status.get("state") == "offline", 10, "the offline status")
    assert asked == [signal.SIGINT]  # tried the loop first, then fell back
    assert {sig: signal.getsignal(sig) for sig in lifecycle.STOP_SIGNALS} == before


async def test_a_second_sigint_forces_the_exit_without_loop_signal_handlers(
    tmp_path: Path, model_dir: Path, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    refuse_loop_signal_handlers(monkeypatch)
    config = load_config(serving_config(tmp_path, model_dir, prefix))
    server = RuntimeServer(config)
    serving = asyncio.create_task(server.serve())
    async with GameClient(config.mqtt, len(ITEMS)) as game:
        await game.online()
        signal.raise_signal(signal.SIGINT)  # the stop is handed to the loop, which has not run it yet
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)  # raised at once, where the main thread is
        assert await asyncio.wait_for(serving, 30) == 0  # the first one still stops it cleanly


def test_run_command_goes_offline_on_sigint_windows_like(
    tmp_path: Path, model_dir: Path, prefix: str
) -> None:
    config_path = serving_config(tmp_path, model_dir, prefix)
    process = runtime_process(config_path, tmp_path / "run.log", env=windows_like_env())

    async def play() -> None:
        async with GameClient(load_config(config_path).mqtt, len(ITEMS)) as game:
            await game.online()
            await game.send(game.tick(0))
            check_matrices((await game.answer(0)).matrices, 5, len(ITEMS))
            process.send_signal(signal.SIGINT)
            await wait_until(lambda: process.poll() is not None, 30, "the runtime to exit")
            await wait_until(lambda: game.status.get("state") == "offline", 10, "the offline status")

    try:
        asyncio.run(play())
    finally:
        stop_process(process)
    log = (tmp_path / "run.log").read_text()
    assert process.returncode == 0, log
    assert REFUSED in log and STOPPING in log
    assert "runtime stopped: 5 agents: 1 ticks received, 1 served" in log


# ------------------------------------------------------------------------------ simulate and demo


@pytest.mark.slow
@pytest.mark.parametrize("windows_like", [False, True], ids=["loop-handlers", "windows-like"])
def test_simulate_second_sigint_forces_the_exit(tmp_path: Path, prefix: str, windows_like: bool) -> None:
    """The first SIGINT waits for the outstanding answers (60 s: no runtime answers); the second exits."""
    config = write_config(
        tmp_path / "config.yaml", simulator={"reply_timeout_s": 60.0}, mqtt={"topic_prefix": prefix}
    )
    out = tmp_path / "sim.out"
    args = ["simulate", "--config", str(config), "--wait", "0", "--agents", "4", "--ticks", "0"]
    process = command(args, out, windows_like_env() if windows_like else None)
    err = out.with_suffix(".err")
    try:
        wait_for_text(out, "answered", process)
        process.send_signal(signal.SIGINT)
        wait_for_text(err, STOPPING, process, timeout=10)
        time.sleep(1.0)
        assert process.poll() is None, "a single SIGINT must wait for the outstanding answers"
        process.send_signal(signal.SIGINT)
        assert process.wait(15) == 130, err.read_text()
    finally:
        stop_process(process)
    assert "final:" not in out.read_text()
    assert (REFUSED in err.read_text()) is windows_like


@pytest.mark.slow
def test_demo_ctrl_c_lets_the_simulator_report_windows_like(
    tmp_path: Path, model_dir: Path, prefix: str
) -> None:
    """Ctrl-C to the demo alone: its simulator and dashboard children get no signal, their stdin closes,
    the simulator still reports."""
    config = serving_config(tmp_path, model_dir, prefix)
    out, report = tmp_path / "demo.out", tmp_path / "sim.json"
    args = ["demo", "--config", str(config), "--ticks", "0", "--rate", "20", "--json", str(report)]
    process = command(args, out, windows_like_env())
    err = out.with_suffix(".err")
    try:
        wait_for_text(out, "answered", process, timeout=120, count=2)  # two live lines: ~20 ticks
        process.send_signal(signal.SIGINT)
        assert process.wait(30) == 0, err.read_text()[-3000:]
    finally:
        stop_process(process)
    log = err.read_text()
    assert log.count(REFUSED) == 3, log  # the demo, its simulator and its dashboard took the fallback
    assert log.count(STOPPING) == 1, log  # only the demo got the signal
    assert "runtime stopped: 5 agents" in log
    summary = json.loads(report.read_text())
    assert "final: tick" in out.read_text() and summary["answered"] > 0 and summary["rule_violations"] == 0
