"""How a command's asyncio main runs and is asked to stop, the same on Linux and on Windows.

- `run`: the selector event loop on Windows, where the default Proactor loop has no `add_reader`,
  which aiomqtt (paho) needs; with a wake-up socket, since a signal does not interrupt that loop's
  `select()` on Windows (the Proactor loop does the same for itself).
- `stop_on_signals`: the first SIGINT/SIGTERM (SIGBREAK on Windows) asks for a clean stop, a second one
  forces the exit (KeyboardInterrupt, exit code 130). `loop.add_signal_handler` where the loop has it,
  else `signal.signal` handing the stop to the loop with `call_soon_threadsafe` (uvicorn's way).
- `stop_at_eof`: a parent closing our stdin asks for a clean stop (a signal to a child process is not
  portable: Windows has no SIGINT to send, only console events that reach the whole console).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Coroutine, Iterator
from types import FrameType
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

WINDOWS = sys.platform == "win32"
SIGBREAK: signal.Signals | None = getattr(signal, "SIGBREAK", None)  # Ctrl-Break, Windows only
STOP_SIGNALS: tuple[signal.Signals, ...] = tuple(
    sig for sig in (signal.SIGINT, signal.SIGTERM, SIGBREAK) if sig is not None
)
READ_BYTES = 1 << 12


def run(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run` with the event loop every command needs on this platform."""
    if not WINDOWS:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=asyncio.SelectorEventLoop) as runner:
        return runner.run(_woken_by_signals(main))


async def _woken_by_signals(main: Coroutine[Any, Any, T]) -> T:
    """Run ``main`` with the signal wake-up fd on a socket the loop watches, so Ctrl-C is seen at once."""
    if threading.current_thread() is not threading.main_thread():
        return await main  # signals reach the main thread only
    loop = asyncio.get_running_loop()
    reader, writer = socket.socketpair()
    reader.setblocking(False)
    writer.setblocking(False)
    loop.add_reader(reader.fileno(), _drain, reader)
    previous = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    try:
        return await main
    finally:
        signal.set_wakeup_fd(previous)
        loop.remove_reader(reader.fileno())
        reader.close()
        writer.close()


def _drain(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):  # BlockingIOError once empty
        while sock.recv(READ_BYTES):
            pass


@contextlib.contextmanager
def stop_on_signals(stop: Callable[[], None]) -> Iterator[None]:
    """Within the block, the first stop signal calls ``stop()`` on the running loop and a second one
    raises KeyboardInterrupt; the previous handlers are restored on exit."""
    if threading.current_thread() is not threading.main_thread():
        yield  # signals reach the main thread only
        return
    loop = asyncio.get_running_loop()
    received = 0

    def request_stop(signum: int) -> None:  # in the loop
        name = signal.Signals(signum).name
        log.warning("%s received: stopping cleanly (send it again to force the exit)", name)
        stop()

    def on_signal(signum: int, _frame: FrameType | None = None) -> None:
        nonlocal received
        received += 1
        if received > 1:  # from signal.signal this runs wherever the main thread is, stuck loop or not
            raise KeyboardInterrupt
        loop.call_soon_threadsafe(request_stop, signum)  # no logging in a signal handler (reentrancy)

    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    in_loop = True
    try:
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, on_signal, sig)
    except NotImplementedError:  # Windows: its event loops cannot watch signals
        in_loop = False
        for sig in STOP_SIGNALS:
            signal.signal(sig, on_signal)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            if in_loop:
                loop.remove_signal_handler(sig)
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


@contextlib.contextmanager
def stop_at_eof(fd: int, stop: Callable[[], None]) -> Iterator[None]:
    """Within the block, file descriptor ``fd`` reaching end of file calls ``stop()`` on the running loop.

    A daemon thread reads it (the Windows selector loop cannot watch a pipe) with os.read: a thread
    blocked in a buffered stream would hold its lock and abort the interpreter's shutdown. It never
    holds up the exit, and after the block an end of file is ignored.
    """
    loop = asyncio.get_running_loop()
    lock = threading.Lock()
    active = True

    def read_to_eof() -> None:
        try:
            while os.read(fd, READ_BYTES):
                pass
        except OSError as exc:  # unreadable from now on: as good as closed
            log.warning("file descriptor %d cannot be read (%s): taken as closed", fd, exc)
        with lock:
            if active:
                loop.call_soon_threadsafe(stop)

    threading.Thread(target=read_to_eof, name="stop-at-eof", daemon=True).start()
    try:
        yield
    finally:
        with lock:
            active = False
