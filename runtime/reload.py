"""Hot reload: watch the model files off the event loop and swap changed models in between two ticks.

Two watchers behind one interface (runtime/watchers.py), chosen by what is installed (as uvicorn picks its
reload supervisor):
:class:`NotifyWatcher` takes the operating system's file notifications (`watchfiles`: inotify,
ReadDirectoryChangesW, FSEvents) on a thread of its own; :class:`PollingWatcher` stats the files every
``runtime.reload_poll_s`` on a worker thread. Neither lists, stats nor reads a file on the event loop,
and neither does what follows a change: metadata is read on a thread and the session pool builds and
validates the affected model group or pack in its executor before swapping it in. A model that fails
keeps the previous version serving (counted and logged). A new or changed `.pth` checkpoint is
converted in a worker process; the converted files are then reported as changed like any other.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable

import numpy as np

from blockmarket.models.files import METADATA_SUFFIX, ModelInfo, StaleMetadata, read_models
from runtime.agents import AgentPopulation, new_agents
from runtime.sessions import SessionPool
from runtime.watchers import (
    METADATA_GRACE_S,
    Changes,
    ModelWatcher,
)

log = logging.getLogger(__name__)


class ModelReloader:
    """The reload loop: convert new checkpoints, reload changed models into the pool.

    A model nobody runs yet becomes a new agent when each agent is one checkpoint
    (``one_per_checkpoint``); agents drawn round-robin keep their models until a restart reassigns them.
    A model file whose metadata still declares the previous sha256 is what the converter leaves between
    replacing the model and rewriting its metadata: it is read again when the metadata changes, and
    refused as a reload failure only if the metadata still disagrees ``metadata_grace_s`` later.
    """

    def __init__(
        self,
        pool: SessionPool,
        watcher: ModelWatcher,
        *,
        convert: Callable[[], Awaitable[object]] | None = None,
        add_new_agents: bool = False,
        free_rows: Callable[[list[str]], AgentPopulation] | None = None,
        seed: int = 0,
        metadata_grace_s: float = METADATA_GRACE_S,
    ) -> None:
        self.pool = pool
        self.watcher = watcher
        self.convert = convert
        self.add_new_agents = add_new_agents
        self.free_rows = free_rows  # markets' free rows for new models nobody is assigned (runtime.markets)
        self.seed = seed
        self.metadata_grace_s = metadata_grace_s
        self.reloads = 0
        self.watching = asyncio.Event()  # set once changes are being seen
        self._unassigned: set[str] = set()
        self._stale: dict[str, float] = {}  # model key -> loop time its stale metadata is refused at
        self._next: asyncio.Task[Changes] | None = None

    async def start(self) -> None:
        """Begin watching (the watcher's setup runs off the loop); changes from now on are reloaded."""
        await self.watcher.start()
        self.watching.set()

    async def run(self) -> None:
        """Reload changes until cancelled (starting the watcher first unless :meth:`start` did)."""
        if not self.watching.is_set():
            await self.start()
        try:
            while True:
                try:
                    await self.apply(await self._next_changes())
                except Exception:  # a failed conversion or unreadable directory must not stop serving
                    self.pool.reload_failures += 1
                    where = self.watcher.files.describe()
                    log.exception("hot reload in %s failed; the current models keep serving", where)
        finally:
            if self._next is not None:
                self._next.cancel()
            self.watcher.close()

    async def _next_changes(self) -> Changes:
        """The watcher's next batch, or the models whose stale metadata is due to be read again.

        The watcher's wait is never cancelled for a re-check (a poll's changes would be lost with it).
        """
        if self._next is None:
            self._next = asyncio.ensure_future(self.watcher.next_changes())
        now = asyncio.get_running_loop().time()
        timeout = max(0.0, min(self._stale.values()) - now) if self._stale else None
        done, _ = await asyncio.wait({self._next}, timeout=timeout)
        if not done:
            due = asyncio.get_running_loop().time()
            return Changes(frozenset(key for key, at in self._stale.items() if at <= due))
        finished, self._next = self._next, None
        return finished.result()

    async def apply(self, changes: Changes) -> None:
        """Convert new checkpoints (their models arrive as the next changes), reload changed models."""
        if changes.checkpoints and self.convert is not None:
            log.info("new or changed checkpoints: converting them in a worker process")
            await self.convert()
        if changes.models:
            await self.reload(changes.models)

    async def reload(self, keys: Iterable[str]) -> None:
        """Read the models' metadata and hash their files on a thread; serve what changed. A model that
        cannot be read is skipped (counted, logged once per change): the others still reload. Models the
        pool refused before are read and tried again with them."""
        model_dir = self.watcher.files.model_dir
        paths = [model_dir / f"{key}{METADATA_SUFFIX}" for key in sorted({*keys, *self.pool.refused})]
        infos, problems = await asyncio.to_thread(read_models, paths)
        for problem in problems:
            if isinstance(problem, StaleMetadata) and self._awaits_metadata(problem.key):
                continue
            self.pool.reload_failures += 1
            log.error("hot reload skipped, the previous version keeps serving: %s", problem)
        for info in infos:
            self._stale.pop(info.key, None)
        changed = {i.key: i for i in infos if i.key in self.pool.models and i != self.pool.models[i.key]}
        new = [info for info in infos if info.key not in self.pool.models]
        pending = {*changed, *(info.key for info in new)}
        for key in [key for key in self.pool.refused if key not in pending]:  # reverted, or unreadable now
            del self.pool.refused[key]
        if changed and await self.pool.reload(changed):  # a new version, or new NPU variants
            self.reloads += 1
        if new:
            await self._add_agents(new)

    def _awaits_metadata(self, key: str) -> bool:
        """True while stale metadata may still be the converter at work (the first time: said so)."""
        now = asyncio.get_running_loop().time()
        if key not in self._stale:
            self._stale[key] = now + self.metadata_grace_s
            log.info(
                "hot reload: %s.onnx changed but its metadata still declares another sha256; waiting up to "
                "%.0f s for the converter to rewrite it",
                key,
                self.metadata_grace_s,
            )
            return True
        if now < self._stale[key]:
            return True
        del self._stale[key]  # refused now; a later change of either file is read again
        return False

    async def _add_agents(self, models: list[ModelInfo]) -> None:
        population = self.pool.population
        usable = [m for m in models if m.items == population.items]
        for info in models:
            if info.items != population.items:
                log.warning(
                    "new model %s trades %s, the runtime %s: skipped", info.key, info.items, population.items
                )
        if not self.add_new_agents and self.free_rows is not None and usable:
            # round robin draws the default market's agents at startup; markets can choose the new models
            rows = self.free_rows([m.key for m in usable])
            if await self.pool.add_agents(rows, {m.key: m for m in usable}):
                self.reloads += 1
                log.info("new models %s: markets can choose them now", ", ".join(m.key for m in usable))
            return
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
