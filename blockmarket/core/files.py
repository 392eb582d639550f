"""Replacing a file that other processes may be reading, on every OS.

POSIX renames over an open file. Windows refuses while any process has the target open without
delete sharing, which Python's open() never grants: the runtime hashing a model at the moment the
converter replaces it is enough. That is a moment, not a state, so the rename is retried briefly.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

WINDOWS_BUSY = (5, 32)  # ERROR_ACCESS_DENIED, ERROR_SHARING_VIOLATION: the target is open elsewhere
BUSY_RETRY_S = 2.0
BUSY_SLEEP_S = 0.02


def replace_file(source: Path, target: Path) -> None:
    """`os.replace`, retried for up to BUSY_RETRY_S while Windows reports the target busy."""
    deadline = time.monotonic() + BUSY_RETRY_S
    while True:
        try:
            os.replace(source, target)
            return
        except PermissionError as exc:
            if getattr(exc, "winerror", None) not in WINDOWS_BUSY or time.monotonic() >= deadline:
                raise
            time.sleep(BUSY_SLEEP_S)
