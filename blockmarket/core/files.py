"""Replacing a file that other processes may be reading, on every OS.

POSIX renames over an open file. Windows refuses while any process has the target open without
delete sharing, which Python's open() never grants: the runtime hashing a model at the moment the
converter replaces it is enough. That is a moment, not a state, so the rename is retried briefly.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
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


@contextmanager
def atomic_target(path: Path, mode: int = 0o644) -> Iterator[Path]:
    """Yield a temp path next to ``path`` (a unique name: two writers never share one); on success it
    replaces ``path`` in one rename (:func:`replace_file`), on error it is removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        tmp.chmod(mode)
        replace_file(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
