"""Watching the model directory off the event loop, behind one interface chosen by what is installed
(as uvicorn picks its reload supervisor): :class:`NotifyWatcher` takes the operating system's file
notifications (`watchfiles`: inotify, ReadDirectoryChangesW, FSEvents) on a thread of its own;
:class:`PollingWatcher` stats the files every ``runtime.reload_poll_s`` on a worker thread. Neither
lists, stats nor reads a file on the event loop."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from blockmarket.models.files import METADATA_SUFFIX
from runtime.workers import checkpoint_files, is_checkpoint_name

log = logging.getLogger(__name__)


WatcherKind = Literal["auto", "poll"]
FileStamp = tuple[int, int]  # (mtime_ns, size)
Stamps = dict[str, FileStamp]  # path -> stamp
SETTLE_S = 0.2  # a burst of writes (the converter writes several files per model) ends after this quiet
MAX_BATCH_S = 2.0  # ... or after this long, so a long conversion run is reloaded model by model
# The converter replaces `<name>.onnx`, then builds and validates the NPU variants, then writes the
# metadata: a model whose metadata still declares the previous file is refused only this much later
METADATA_GRACE_S = 60.0


def model_key(path: Path) -> str:
    """`m_metadata.json` and `m.onnx` both belong to model `m`."""
    name = path.name
    return name[: -len(METADATA_SUFFIX)] if name.endswith(METADATA_SUFFIX) else path.stem


@dataclass(frozen=True)
class Changes:
    """What a batch of file events means for serving."""

    models: frozenset[str] = frozenset()  # keys of models whose files appeared or changed
    checkpoints: bool = False  # a `.pth` appeared or changed

    def __or__(self, other: Changes) -> Changes:
        return Changes(self.models | other.models, self.checkpoints or other.checkpoints)

    def __bool__(self) -> bool:
        return bool(self.models) or self.checkpoints


@dataclass(frozen=True)
class WatchedFiles:
    """The files hot reload follows: converted models at the top of the model directory, and `.pth`
    checkpoints anywhere below the checkpoint directory except in the conversion output.

    Every method that touches the file system blocks: watchers call them from their threads.
    """

    model_dir: Path
    checkpoint_dir: Path | None = None  # None: checkpoints are not converted while serving
    converted_dir: Path | None = None  # the conversion output, never searched for checkpoints

    def resolved(self) -> WatchedFiles:
        """The same directories as absolute, symlink-free paths (what OS notifications report)."""
        checkpoints, converted = self.checkpoint_dir, self.converted_dir
        return WatchedFiles(
            self.model_dir.resolve(),
            checkpoints.resolve() if checkpoints is not None else None,
            converted.resolve() if converted is not None else None,
        )

    def dirs(self) -> list[Path]:
        """The model directory and, if checkpoints are converted, the checkpoint directory."""
        return list(dict.fromkeys(d for d in (self.model_dir, self.checkpoint_dir) if d is not None))

    def is_model_file(self, path: Path) -> bool:
        return path.parent == self.model_dir and path.name.endswith((METADATA_SUFFIX, ".onnx"))

    def in_checkpoint_tree(self, path: Path) -> bool:
        """Below the checkpoint directory and outside the conversion output."""
        return (
            self.checkpoint_dir is not None
            and path.is_relative_to(self.checkpoint_dir)
            and not (self.converted_dir is not None and path.is_relative_to(self.converted_dir))
        )

    def is_checkpoint(self, path: Path) -> bool:
        return is_checkpoint_name(path.name) and self.in_checkpoint_tree(path)

    def holds_checkpoints(self, folder: Path) -> bool:
        """A directory that appeared in the checkpoint tree: files written into it before the OS watch on
        it was in place sent no event, so look inside."""
        return (
            self.in_checkpoint_tree(folder)
            and folder.is_dir()
            and bool(checkpoint_files(folder, self.converted_dir))
        )

    def stamps(self) -> Stamps:
        """(mtime, size) of every watched file: enough to notice an atomic replace or a rewrite.

        Keyed by path string: a Path object per file tripled the cost (10,000 models: 85 ms, not 250).
        """
        found: Stamps = {}
        if self.model_dir.is_dir():
            with os.scandir(self.model_dir) as entries:
                for entry in entries:
                    if entry.name.endswith((METADATA_SUFFIX, ".onnx")):
                        _stamp(found, entry.path, entry)
        if self.checkpoint_dir is not None:
            for path in checkpoint_files(self.checkpoint_dir, self.converted_dir):
                _stamp(found, str(path), path)
        return found

    def changes(self, paths: Iterable[Path]) -> Changes:
        """What these added or modified files mean: models (those with metadata) and checkpoints.

        A metadata entry that is no readable file (a symlink loop, a directory) is reported all the same:
        reading it fails, which is counted and logged, instead of it being ignored.
        """
        paths = list(paths)
        touched = {model_key(p) for p in paths if self.is_model_file(p)}
        # NPU variants and QNN context caches (`<name>_*.onnx`) have no metadata of their own: the
        # converter rewrites `<name>_metadata.json` with them, which is what reports the change
        models = {key for key in touched if os.path.lexists(self.model_dir / f"{key}{METADATA_SUFFIX}")}
        return Changes(frozenset(models), any(self.is_checkpoint(p) for p in paths))

    def roots(self) -> tuple[list[Path], list[Path]]:
        """The directories to watch recursively, none inside another, and those missing: the model
        directory must exist, a missing checkpoint directory is left out."""
        if not self.model_dir.is_dir():
            raise FileNotFoundError(f"{self.model_dir}: no such directory")
        dirs = [d for d in self.dirs() if d.is_dir()]
        roots = [d for d in dirs if not any(d != o and d.is_relative_to(o) for o in dirs)]
        return roots, [d for d in self.dirs() if d not in dirs]

    def describe(self) -> str:
        return " and ".join(map(str, self.dirs()))


def _stamp(found: Stamps, path: str, source: os.DirEntry[str] | Path) -> None:
    """A broken entry (a dangling symlink, a symlink loop) gets its link's own stamp: it is reported
    once, fails once when read, and reports again only when it changes."""
    try:
        stat = source.stat()
    except OSError:
        try:
            stat = source.stat(follow_symlinks=False)
        except OSError:  # deleted between listing and stat: absent
            return
    found[path] = (stat.st_mtime_ns, stat.st_size)


class ModelWatcher(ABC):
    """Reports what changed among the watched files, without file-system work on the event loop."""

    def __init__(self, files: WatchedFiles) -> None:
        self.files = files

    @abstractmethod
    async def start(self) -> None:
        """Begin watching; changes from the time this returns on are reported."""

    @abstractmethod
    async def next_changes(self) -> Changes:
        """Wait for the next batch of changes (a burst of writes is one batch)."""

    @abstractmethod
    def close(self) -> None:
        """Stop watching."""


class PollingWatcher(ModelWatcher):
    """Stats the watched files every ``interval_s`` on a worker thread: for file systems that send no
    notifications (network shares, Windows drives under WSL) or where `watchfiles` is missing."""

    def __init__(self, files: WatchedFiles, interval_s: float) -> None:
        super().__init__(files)
        self.interval_s = interval_s
        self._stamps: Stamps = {}

    async def start(self) -> None:
        self._stamps = await asyncio.to_thread(self.files.stamps)
        log.info("hot reload: polling %s every %s s", self.files.describe(), self.interval_s)

    async def next_changes(self) -> Changes:
        while True:
            await asyncio.sleep(self.interval_s)
            changes = await self._poll()
            if changes:
                return await self._settled(changes)

    async def _settled(self, changes: Changes) -> Changes:
        """Keep polling every SETTLE_S while files keep changing (at most MAX_BATCH_S): one batch."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + MAX_BATCH_S
        while loop.time() < deadline:
            await asyncio.sleep(SETTLE_S)
            more = await self._poll()
            if not more:
                break
            changes |= more
        return changes

    async def _poll(self) -> Changes:
        """What changed since the previous poll; a poll cancelled midway changes nothing."""
        self._stamps, changes = await asyncio.to_thread(self._diff, self._stamps)
        return changes

    def _diff(self, before: Stamps) -> tuple[Stamps, Changes]:
        """(thread) Stat every watched file: the new stamps, and what differs from ``before``."""
        stamps = self.files.stamps()
        return stamps, self.files.changes(Path(p) for p, stamp in stamps.items() if before.get(p) != stamp)

    def close(self) -> None:
        """Nothing to release: polling stops with the task that awaits it."""


class NotifyWatcher(ModelWatcher):
    """OS file notifications through `watchfiles`, received on a thread of its own.

    Its Rust core groups a burst of events (SETTLE_S of quiet, at most MAX_BATCH_S); the thread turns a
    batch into :class:`Changes` and hands it to the loop. If notifications cannot be set up (a directory
    is missing, the OS watch limit is reached) or stop working, it says so and polls instead.
    """

    def __init__(self, files: WatchedFiles, fallback_poll_s: float) -> None:
        super().__init__(files)
        self.fallback_poll_s = fallback_poll_s
        self.polling: PollingWatcher | None = None  # set once notifications failed
        self._stop = threading.Event()
        self._pending = Changes()
        self._arrived = asyncio.Event()
        self._failure: BaseException | None = None
        self._ready: asyncio.Future[tuple[list[Path], list[Path]]] | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._ready = loop.create_future()
        thread = threading.Thread(target=self._watch, args=(loop,), name="reload-watch", daemon=True)
        thread.start()
        try:
            roots, missing = await self._ready
        except Exception as exc:
            await self._fall_back(exc)
            return
        log.info("hot reload: watching %s (OS notifications)", ", ".join(map(str, roots)))
        for folder in missing:
            log.warning(
                "hot reload: the checkpoint directory %s does not exist; checkpoints written there once it "
                "does are converted at the next start (runtime.reload_watcher: poll notices them)",
                folder,
            )

    async def next_changes(self) -> Changes:
        while self.polling is None:
            await self._arrived.wait()
            self._arrived.clear()
            if self._failure is not None:
                await self._fall_back(self._failure)
            elif self._pending:
                changes, self._pending = self._pending, Changes()
                return changes
        return await self.polling.next_changes()

    def close(self) -> None:
        self._stop.set()

    async def _fall_back(self, exc: BaseException) -> None:
        self.close()
        log.error(
            "hot reload: OS file notifications for %s failed (%s: %s); polling every %s s instead",
            self.files.describe(),
            type(exc).__name__,
            exc,
            self.fallback_poll_s,
        )
        self.polling = PollingWatcher(self.files, self.fallback_poll_s)
        await self.polling.start()

    def _watch(self, loop: asyncio.AbstractEventLoop) -> None:
        """(thread) Register the watches, then turn each batch of events into Changes for the loop."""
        try:
            from watchfiles import Change
            from watchfiles._rust_notify import RustNotify  # in watchfiles' API reference; unlike
            # watch(), its constructor returns once the watches are registered, so start() knows when

            files = self.files.resolved()
            roots, missing = files.roots()
            with RustNotify([str(r) for r in roots], False, False, 300, True, False) as notify:
                self._post(loop, self._started, roots, missing)
                while True:
                    batch = notify.watch(int(MAX_BATCH_S * 1000), int(SETTLE_S * 1000), 0, self._stop)
                    if batch == "stop":
                        return
                    if isinstance(batch, set):
                        paths = [Path(path) for change, path in batch if change != Change.deleted]
                        added = [Path(path) for change, path in batch if change == Change.added]
                        changes = files.changes(paths)
                        if not changes.checkpoints and any(map(files.holds_checkpoints, added)):
                            changes |= Changes(checkpoints=True)
                        if changes:
                            self._post(loop, self._deliver, changes)
        except Exception as exc:
            self._post(loop, self._fail, exc)

    def _post(self, loop: asyncio.AbstractEventLoop, callback: Callable[..., None], *args: Any) -> None:
        if self._stop.is_set():
            return
        try:
            loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the loop closed after close() was called: nobody waits for this any more
            if not self._stop.is_set():
                raise

    def _started(self, roots: list[Path], missing: list[Path]) -> None:
        if self._ready is not None and not self._ready.done():
            self._ready.set_result((roots, missing))

    def _deliver(self, changes: Changes) -> None:
        self._pending |= changes
        self._arrived.set()

    def _fail(self, exc: BaseException) -> None:
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(exc)
            return
        self._failure = exc
        self._arrived.set()


def model_watcher(files: WatchedFiles, kind: WatcherKind, poll_s: float) -> ModelWatcher:
    """OS notifications when `watchfiles` is installed (``auto``), else polling every ``poll_s``."""
    if kind == "auto":
        if importlib.util.find_spec("watchfiles") is not None:
            return NotifyWatcher(files, poll_s)
        log.warning("hot reload: the watchfiles package is missing; polling instead of OS notifications")
    return PollingWatcher(files, poll_s)
