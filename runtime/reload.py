"""Hot reload: poll the model directory (stat only) and swap changed models in between two ticks.

A changed `<name>_metadata.json` / `<name>.onnx` of a served model is re-read, and the session pool
rebuilds and validates the affected model group or pack off the event loop before swapping it in; a
model that fails keeps the previous version serving (counted and logged). A new or changed `.pth`
checkpoint is converted first, in a worker process, and then reloaded the same way.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from runtime.models import METADATA_SUFFIX, ModelError, read_model
from runtime.sessions import SessionPool

log = logging.getLogger(__name__)

FileStamp = tuple[int, int]  # (mtime_ns, size)


def stamps(paths: Iterable[Path]) -> dict[Path, FileStamp]:
    """(mtime, size) per existing file: enough to notice an atomic replace or a rewrite."""
    out: dict[Path, FileStamp] = {}
    for path in paths:
        try:
            stat = path.stat()
        except FileNotFoundError:  # deleted between listing and stat: absent
            continue
        out[path] = (stat.st_mtime_ns, stat.st_size)
    return out


def model_key(path: Path) -> str:
    """`m_metadata.json` and `m.onnx` both belong to model `m` (NPU variants `m_*.onnx` are in metadata)."""
    name = path.name
    return name[: -len(METADATA_SUFFIX)] if name.endswith(METADATA_SUFFIX) else path.stem


@dataclass(frozen=True)
class Changes:
    models: frozenset[str]  # keys of models whose files appeared or changed
    checkpoints: bool  # a `.pth` appeared or changed


class ModelWatcher:
    """Remembers the stamps of the watched files; :meth:`poll` says what changed since the last call."""

    def __init__(self, model_dir: Path, list_checkpoints: Callable[[], list[Path]]) -> None:
        self.model_dir = model_dir
        self._list_checkpoints = list_checkpoints
        self._models = self._model_stamps()
        self._checkpoints = stamps(list_checkpoints())

    def _model_stamps(self) -> dict[Path, FileStamp]:
        if not self.model_dir.is_dir():
            return {}
        return stamps([*self.model_dir.glob(f"*{METADATA_SUFFIX}"), *self.model_dir.glob("*.onnx")])

    def poll(self) -> Changes:
        models, ckpts = self._model_stamps(), stamps(self._list_checkpoints())
        changed = {model_key(p) for p, stamp in models.items() if self._models.get(p) != stamp}
        new_checkpoints = any(self._checkpoints.get(p) != stamp for p, stamp in ckpts.items())
        self._models, self._checkpoints = models, ckpts
        return Changes(frozenset(changed), new_checkpoints)


class ModelReloader:
    """The reload loop: convert new checkpoints, then reload changed models into the pool."""

    def __init__(
        self,
        pool: SessionPool,
        watcher: ModelWatcher,
        *,
        poll_s: float,
        convert: Callable[[], Awaitable[object]] | None = None,
    ) -> None:
        self.pool = pool
        self.watcher = watcher
        self.poll_s = poll_s
        self.convert = convert
        self.reloads = 0
        self._unassigned: set[str] = set()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            await self.check()

    async def check(self) -> None:
        """One poll: convert what is new, then reload every served model whose files changed."""
        changes = self.watcher.poll()
        if changes.checkpoints and self.convert is not None:
            log.info("new or changed checkpoints: converting them in a worker process")
            await self.convert()
            changes = Changes(changes.models | self.watcher.poll().models, False)
        if changes.models:
            await self.reload(changes.models)

    async def reload(self, keys: Iterable[str]) -> None:
        served = set(self.pool.models)
        changed = {}
        for key in sorted(keys):
            if key not in served:
                if key not in self._unassigned:
                    self._unassigned.add(key)
                    log.warning(
                        "new model %s in %s is not assigned to any agent; restart the runtime to serve it",
                        key, self.watcher.model_dir,
                    )  # fmt: skip
                continue
            try:
                info = read_model(self.watcher.model_dir / f"{key}{METADATA_SUFFIX}")
            except ModelError as exc:
                self.pool.reload_failures += 1
                log.error("hot reload of %s skipped, the previous version keeps serving: %s", key, exc)
                continue
            if info.version != self.pool.models[key].version:
                changed[key] = info
        if changed and await self.pool.reload(changed):
            self.reloads += 1
