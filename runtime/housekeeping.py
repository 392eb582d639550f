"""What a long-running server cleans up after each pool swap: stale pack files and retained heap.

Packs are content-addressed (named by their models' versions), so every hot reload writes new ones
and the old ones are never read again by this process. Left alone they fill the disk (about 47 MB per
reload of a 1000-agent int8 pack). A pack that no generation of this process serves is deleted once it
has not been written or reused for ``PACK_GRACE_S``: another process serving the same model directory
(a second runtime, a benchmark) refreshes the time of every pack it reuses, and a process that loaded a
pack earlier holds it in memory and does not need the file again.

glibc's malloc keeps the pages of freed small allocations (protobuf parsing, session building) in its
arenas: in a 3-minute soak with a reload a minute, RSS rose 8% and `malloc_trim(0)` gave 190 MB back
(see benchmarks/soak.py). ``release_free_memory`` asks for that on glibc and does nothing elsewhere
(Windows, macOS, musl return freed memory on their own terms and have no such call).
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import os
import re
import sys
import time
from collections.abc import Collection
from pathlib import Path

log = logging.getLogger(__name__)

PACK_GRACE_S = 120.0
# runtime.sessions names packs pack-<form>-<models>x<rows>-<16 hex>.onnx; save_pack writes .<name>.tmp
# first, and a QNN context cache adds <stem>_ctx.onnx, <stem>_ctx_qnn.bin and <stem>_ctx.json
_PACK_STEM = re.compile(r"^\.?(pack-[a-z0-9_]+-\d+x\d+-(?:sel-)?[0-9a-f]{16})")


def prune_packs(pack_dir: Path, keep: Collection[Path], grace_s: float | None = None) -> list[Path]:
    """Delete the packs in ``pack_dir`` (with their temp and context-cache files) that are not in
    ``keep`` and of which no file was written or touched for ``grace_s``.

    Returns what was deleted. A file another process holds open (Windows) or removes first is skipped.
    """
    kept = {_stem(Path(p).name) for p in keep}
    packs: dict[str, list[tuple[Path, float]]] = {}
    for path in pack_dir.glob("*pack-*"):
        stem = _stem(path.name)
        try:
            if stem is not None and stem not in kept:
                packs.setdefault(stem, []).append((path, path.stat().st_mtime))
        except OSError:  # gone meanwhile
            continue
    cutoff = time.time() - (PACK_GRACE_S if grace_s is None else grace_s)
    removed = []
    for files in packs.values():
        if max(mtime for _, mtime in files) > cutoff:
            continue
        for path, _ in files:
            try:
                path.unlink()
            except OSError as exc:
                log.debug("pack cache: %s stays (%s)", path, exc)
                continue
            removed.append(path)
    if removed:
        log.info("pack cache: removed %d file(s) of packs no longer served", len(removed))
    return removed


def _stem(name: str) -> str | None:
    match = _PACK_STEM.match(name)
    return match.group(1) if match else None


def touch(path: Path) -> None:
    """Mark a reused pack as in use now, so that no process prunes it during its grace period."""
    try:
        os.utime(path)
    except OSError as exc:  # read-only model directory: pruning will not happen there either
        log.debug("pack cache: cannot touch %s (%s)", path, exc)


def release_free_memory() -> bool:
    """Return freed heap pages to the OS where the C library holds on to them (glibc); True if asked."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # musl and other C libraries without malloc_trim
        return False
    trim(0)
    return True


BELOW_NORMAL_PRIORITY_CLASS = 0x4000  # Windows process priority class
BACKGROUND_NICE = 10  # POSIX niceness added to a background worker


def lower_priority() -> str:
    """Make this process (a background worker: the pack builder) yield the CPU to the serving process,
    whose event loop must wake within a tick; returns what it did.

    On a 2-core machine a pack build competing at equal priority with the loop thread delayed its
    wakeups by up to 50-120 ms under load (tests/runtime/test_reload.py measures them)."""
    if sys.platform == "win32":
        kernel32 = ctypes.WinDLL("kernel32")  # type: ignore[attr-defined,unused-ignore]
        if kernel32.SetPriorityClass(kernel32.GetCurrentProcess(), BELOW_NORMAL_PRIORITY_CLASS):
            return "below normal priority class"
        return "priority unchanged (SetPriorityClass failed)"
    try:
        return f"niceness {os.nice(BACKGROUND_NICE)}"
    except OSError as exc:
        return f"priority unchanged ({exc})"


def freeze_startup_heap() -> int:
    """Collect once, then exclude every object alive now (imports, config, the first pool) from later
    collections; returns how many were frozen.

    Called once, before serving: a full collection traverses every tracked object while holding the GIL,
    and what startup leaves behind (hundreds of thousands of objects, far more in a process that also
    runs other code: a test suite's took 31-63 ms per full collection) never becomes garbage. The
    collections left while serving traverse only what was allocated since.
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


async def cancel_all(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel the tasks and wait for them to end. A task still running a second later is cancelled
    again: Python 3.11's ``asyncio.wait_for`` (inside aiomqtt's publish) swallows a cancellation that
    arrives as its future completes, and the task would go on for ever (seen: the status task, stopped
    just as its first status was published)."""
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=1.0)
    for task in tasks:  # retrieve each outcome: no "exception was never retrieved" warnings
        if not task.cancelled():
            task.exception()
