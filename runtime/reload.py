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

import numpy as np

from runtime.agents import new_agents
from runtime.models import METADATA_SUFFIX, ModelError, ModelInfo, read_model
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
    """`m_metadata.json` and `m.onnx` both belong to model `m`."""
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
        touched = {model_key(p) for p, stamp in models.items() if self._models.get(p) != stamp}
        # NPU variants and QNN context caches (`<name>_*.onnx`) have no metadata of their own: the
        # converter rewrites `<name>_metadata.json` with them, which is what reports the change
        changed = {key for key in touched if (self.model_dir / f"{key}{METADATA_SUFFIX}").is_file()}
        new_checkpoints = any(self._checkpoints.get(p) != stamp for p, stamp in ckpts.items())
        self._models, self._checkpoints = models, ckpts
        return Changes(frozenset(changed), new_checkpoints)


class ModelReloader:
    """The reload loop: convert new checkpoints, then reload changed models into the pool.

    A model nobody runs yet becomes a new agent when each agent is one checkpoint
    (``one_per_checkpoint``); agents drawn round-robin keep their models until a restart reassigns them.
    """

    def __init__(
        self,
        pool: SessionPool,
        watcher: ModelWatcher,
        *,
        poll_s: float,
        convert: Callable[[], Awaitable[object]] | None = None,
        add_new_agents: bool = False,
        seed: int = 0,
    ) -> None:
        self.pool = pool
        self.watcher = watcher
        self.poll_s = poll_s
        self.convert = convert
        self.add_new_agents = add_new_agents
        self.seed = seed
        self.reloads = 0
        self._unassigned: set[str] = set()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                await self.check()
            except Exception:  # a failed conversion or unreadable directory must not stop serving
                self.pool.reload_failures += 1
                log.exception(
                    "hot reload check of %s failed; the current models keep serving", self.watcher.model_dir
                )

    async def check(self) -> None:
        """One poll: convert what is new, then reload every model whose files changed."""
        changes = self.watcher.poll()
        if changes.checkpoints and self.convert is not None:
            log.info("new or changed checkpoints: converting them in a worker process")
            await self.convert()
            changes = Changes(changes.models | self.watcher.poll().models, False)
        if changes.models:
            await self.reload(changes.models)

    async def reload(self, keys: Iterable[str]) -> None:
        changed, new = {}, []
        for key in sorted(keys):
            try:
                info = read_model(self.watcher.model_dir / f"{key}{METADATA_SUFFIX}")
            except ModelError as exc:
                self.pool.reload_failures += 1
                log.error("hot reload of %s skipped, the previous version keeps serving: %s", key, exc)
                continue
            if key not in self.pool.models:
                new.append(info)
            elif info != self.pool.models[key]:  # a new version, or new NPU variants
                changed[key] = info
        if changed and await self.pool.reload(changed):
            self.reloads += 1
        if new:
            await self._add_agents(new)

    async def _add_agents(self, models: list[ModelInfo]) -> None:
        population = self.pool.population
        usable = [m for m in models if m.items == population.items]
        for info in models:
            if info.items != population.items:
                log.warning(
                    "new model %s trades %s, the runtime %s: skipped", info.key, info.items, population.items
                )
        if not self.add_new_agents:
            for info in usable:
                if info.key not in self._unassigned:
                    self._unassigned.add(info.key)
                    log.warning(
                        "new model %s is not assigned to any agent (runtime.assignment round_robin); "
                        "restart the runtime to draw agents from it",
                        info.key,
                    )
            return
        if not usable:
            return
        taken, ids = set(population.agent_ids), []
        for info in usable:  # the checkpoint's agent id unless already served, then the (unique) file stem
            ids.append(info.agent_id if info.agent_id and info.agent_id not in taken else info.key)
            taken.add(ids[-1])
        rng = np.random.default_rng([self.seed, len(population)])
        newcomers = new_agents(usable, ids, population.items, rng, first_row=len(population))
        if await self.pool.add_agents(newcomers, {m.key: m for m in usable}):
            self.reloads += 1
