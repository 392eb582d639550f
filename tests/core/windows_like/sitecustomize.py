"""Run this interpreter's event loops as on Windows (test_lifecycle.py puts this directory first on
PYTHONPATH, so every process of a command loads it at start-up, child processes included).

- `blockmarket.core.lifecycle.WINDOWS` is true: `lifecycle.run` takes its Windows branch (selector loop from a
  loop factory, signal wake-up socket);
- `loop.add_signal_handler` / `remove_signal_handler` raise NotImplementedError, as both Windows event
  loops do, and say so on stderr so a test can see the `signal.signal` fallback was taken.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from blockmarket.core import lifecycle

REFUSED = "windows-like: loop signal handlers refused"


def _no_loop_signal_handlers(self: asyncio.AbstractEventLoop, sig: int, *args: Any) -> bool:
    print(f"{REFUSED} ({sig!r})", file=sys.stderr, flush=True)
    raise NotImplementedError


lifecycle.WINDOWS = True
asyncio.SelectorEventLoop.add_signal_handler = _no_loop_signal_handlers  # type: ignore[method-assign,assignment]
asyncio.SelectorEventLoop.remove_signal_handler = _no_loop_signal_handlers  # type: ignore[method-assign]
